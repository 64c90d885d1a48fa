"""The bundled world: procedural scenes of coloured shapes, their language, data and programmatic agents.

Boundaries: everything here runs on the CPU with numpy and needs no download. It provides the ground
truth that the closed loop is measured against; it does not generate video with a model (the tiny
world model and its training live elsewhere) and it does not run the loop (``spiral_rt.agents``).

  scene       objects, scenes, actions and their animation (normalised geometry, no pixels)
  render      states -> antialiased (F, H, W, 3) uint8 videos with per-frame ground truth; degrade()
  language    compound goals <-> actions, canonical step prompts, success-criteria predicates
  goals       seeded random goals and the fixed public goal set (goals.json)
  perception  colour segmentation and object measurement from pixels
  agents      WorldPlanner (PlanAgent) and WorldCritic (CriticAgent)
  dataset     training-set writer and reader
"""

from .agents import CriticConfig, WorldCritic, WorldPlanner
from .dataset import DatasetConfig, read_manifest, read_video, write_dataset
from .goals import GoalSpec, build_goal_set, load_goal_set, random_goal, scene_for_goal
from .language import (GoalParseError, canonical_prompt, goal_text, goal_to_steps, parse_goal,
                       success_criteria)
from .perception import DetectedObject, PerceptionConfig, extract_objects
from .render import RenderedVideo, degrade, render_frame, render_step, render_video
from .scene import (Action, ObjectRef, ObjectState, Scene, WorldConfig, apply_action, simulate)

__all__ = [
    "Action", "CriticConfig", "DatasetConfig", "DetectedObject", "GoalParseError", "GoalSpec", "ObjectRef",
    "ObjectState", "PerceptionConfig", "RenderedVideo", "Scene", "WorldConfig", "WorldCritic", "WorldPlanner",
    "apply_action", "build_goal_set", "canonical_prompt", "degrade", "extract_objects", "goal_text",
    "goal_to_steps", "load_goal_set", "parse_goal", "random_goal", "read_manifest", "read_video", "scene_for_goal",
    "render_frame", "render_step", "render_video", "simulate", "success_criteria", "write_dataset",
]
