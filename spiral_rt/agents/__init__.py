"""SPIRAL's think-act-reflect layer: plan and critic agents, world memory and the closed loop.

Boundaries: this package decides *what* to generate (step prompts, spans, seeds, retries, replans)
and keeps the record of it (trace, video, contact sheet). It never touches model weights, KV pages
or devices: it drives anything that implements ``protocols.Generator`` (the streaming engine, a fake
generator in tests) and any ``PlanAgent`` / ``CriticAgent`` (LLM endpoints, a local VLM, the bundled
world's programmatic agents, scripted agents).

    from spiral_rt.agents import ClosedLoop, LoopConfig, write_outputs
    result = ClosedLoop(generator, planner, critic, LoopConfig(max_retries=2)).run("goal", warmup=engine.warmup)
    write_outputs(result, "out/")
"""

from .llm import AgentOutputError, ChatCriticAgent, ChatPlanAgent, PlannerSettings
from .loop import ClosedLoop, LoopConfig, LoopResult
from .outputs import ContactSheetConfig, OutputPaths, write_contact_sheet, write_outputs, write_trace, write_video
from .protocols import CriticAgent, Generator, PlanAgent
from .trace import AttemptRecord, FallbackRecord, LoopTrace, ReplanRecord
from .types import ExecutedStep, FailureKind, Goal, Plan, Step, Verdict, WorldMemory

__all__ = [
    "CriticAgent", "Generator", "PlanAgent",
    "ExecutedStep", "FailureKind", "Goal", "Plan", "Step", "Verdict", "WorldMemory",
    "ClosedLoop", "LoopConfig", "LoopResult",
    "AttemptRecord", "FallbackRecord", "LoopTrace", "ReplanRecord",
    "ContactSheetConfig", "OutputPaths", "write_contact_sheet", "write_outputs", "write_trace", "write_video",
    "AgentOutputError", "ChatCriticAgent", "ChatPlanAgent", "PlannerSettings",
]
