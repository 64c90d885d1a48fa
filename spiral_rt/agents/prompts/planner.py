"""Prompt templates and answer schema of the LLM PlanAgent.

The planner sees the goal, the generator's unit of time (a chunk) and, when replanning, the world
memory's summary, the failed step with the critic's feedback and the steps that were left.
"""

from __future__ import annotations

from ..types import Goal, Step, WorldMemory

SYSTEM = """\
You plan videos for an autoregressive video world model. The model generates a video segment by \
segment; each segment is conditioned on one text prompt and on everything generated before it, so \
the scene carries over between segments.

Split the user's goal into a short sequence of steps, in the order they must happen. For each step give:
- "prompt": a self-contained, concrete description of what happens in this segment, in the present \
tense (subject, action, objects, where things move). Mention the scene's persistent elements so \
they stay consistent. One action per step.
- "span_chunks": how many chunks the segment lasts, an integer from 1 to {max_span_chunks}{chunk_time}. \
Simple motions need few chunks; long or compound motions need more.
- "success_criteria": one to three short, visually checkable conditions that hold at the end of the \
segment if the step succeeded (e.g. "the red cube is inside the bowl").

Use at most {max_steps} steps. Put a one-sentence explanation of the split in "rationale". Answer \
with one JSON object only."""

PLAN_USER = """\
Goal: {goal}

What the video shows so far:
{memory}

Plan the steps."""

REPLAN_USER = """\
Goal: {goal}

What the video shows so far (accepted steps):
{memory}

The next step failed:
  prompt: {failed_prompt}
  success criteria: {failed_criteria}
  critic: {feedback}

Steps that were still planned:
{remaining}

Plan the steps that remain to reach the goal from the current state of the video. You may rephrase, \
split, reorder or drop steps, but do not repeat steps that are already done."""


def schema(max_span_chunks: int, max_steps: int) -> dict:
    """JSON schema of a plan answer (strict-mode compatible: every property required, no extras)."""
    return {
        "type": "object",
        "properties": {
            "rationale": {"type": "string"},
            "steps": {
                "type": "array", "minItems": 1, "maxItems": max_steps,
                "items": {
                    "type": "object",
                    "properties": {
                        "prompt": {"type": "string"},
                        "span_chunks": {"type": "integer", "minimum": 1, "maximum": max_span_chunks},
                        "success_criteria": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["prompt", "span_chunks", "success_criteria"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["rationale", "steps"],
        "additionalProperties": False,
    }


def system_prompt(max_span_chunks: int, max_steps: int, chunk_seconds: float | None) -> str:
    chunk_time = f" (one chunk is about {chunk_seconds:.2g} s of video)" if chunk_seconds else ""
    return SYSTEM.format(max_span_chunks=max_span_chunks, max_steps=max_steps, chunk_time=chunk_time)


def _steps_text(steps: list[Step]) -> str:
    if not steps:
        return "  (none)"
    return "\n".join(f"  - {s.prompt} [{s.span_chunks} chunks; success: {'; '.join(s.success_criteria) or 'n/a'}]" for s in steps)


def plan_messages(goal: Goal, memory: WorldMemory, *, max_span_chunks: int, max_steps: int,
                  chunk_seconds: float | None = None) -> list[dict]:
    """Messages of a first-plan request."""
    return [
        {"role": "system", "content": system_prompt(max_span_chunks, max_steps, chunk_seconds)},
        {"role": "user", "content": PLAN_USER.format(goal=goal.text, memory=memory.summary or memory.render())},
    ]


def replan_messages(goal: Goal, memory: WorldMemory, remaining: list[Step], *, max_span_chunks: int, max_steps: int,
                    chunk_seconds: float | None = None, feedback: str = "") -> list[dict]:
    """Messages of a replan request; ``remaining[0]`` is the step that failed."""
    failed = remaining[0]
    return [
        {"role": "system", "content": system_prompt(max_span_chunks, max_steps, chunk_seconds)},
        {"role": "user", "content": REPLAN_USER.format(
            goal=goal.text, memory=memory.render(), failed_prompt=failed.prompt,
            failed_criteria="; ".join(failed.success_criteria) or "n/a", feedback=feedback or "n/a",
            remaining=_steps_text(remaining))},
    ]
