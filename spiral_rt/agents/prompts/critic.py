"""Prompt templates and answer schema of the VLM CriticAgent.

The critic sees the step (prompt and success criteria), the memory's summary, optionally the last
key frame of the previous step (for consistency), and frames sampled evenly from the segment.
"""

from __future__ import annotations

import numpy as np

from ..types import FailureKind, Step, WorldMemory

SYSTEM = """\
You are the critic of a video world model. You see frames sampled in order from one generated video \
segment and the instruction the segment was generated for. Decide whether the segment carries out \
the instruction and whether it is plausible and consistent with what came before.

Answer with one JSON object:
- "score": a number from 0 to 1 (1: the instruction is fully and plausibly carried out).
- "completed": true if every success criterion holds at the end of the segment, else false.
- "failure": null if completed, else one of {kinds}:
  "incomplete_action" (the right action did not finish), "wrong_action" (a different action), \
"physics" (implausible physics: objects pass through each other, float, teleport), \
"drift_or_inconsistency" (objects, colours, identities or layout changed without reason), "other".
- "feedback": one or two sentences on what is wrong (or right), concrete enough to fix the prompt.
- "refined_prompt": if the segment failed and a clearer instruction would help, a rewritten prompt \
for regenerating it; otherwise null.
- "plan_is_wrong": true only if the instruction cannot succeed from the current state of the scene \
(for example it refers to an object that is not there), so retrying is pointless."""

JUDGE_USER = """\
Instruction of this segment: {prompt}
Success criteria at the end of the segment: {criteria}

What the video showed before this segment:
{memory}
"""

REFERENCE_CAPTION = "Last frame of the previous segment (for consistency):"
FRAMES_CAPTION = "Frames of this segment, in order ({count} of {total}; frame numbers {indices}):"


def schema() -> dict:
    """JSON schema of a verdict answer (strict-mode compatible)."""
    return {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "completed": {"type": "boolean"},
            "failure": {"type": ["string", "null"], "enum": [k.value for k in FailureKind] + [None]},
            "feedback": {"type": "string"},
            "refined_prompt": {"type": ["string", "null"]},
            "plan_is_wrong": {"type": "boolean"},
        },
        "required": ["score", "completed", "failure", "feedback", "refined_prompt", "plan_is_wrong"],
        "additionalProperties": False,
    }


def sample_indices(num_frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``num_frames``, always including the last."""
    if num_frames < 1 or count < 1:
        raise ValueError(f"sample_indices: arguments 'num_frames' and 'count' must be >= 1, got {num_frames}, {count}")
    return sorted(set(np.linspace(0, num_frames - 1, num=min(count, num_frames)).round().astype(int).tolist()))


def judge_messages(frames: np.ndarray, step: Step, memory: WorldMemory, *, num_frames: int,
                   reference_frame: bool = True) -> list[dict]:
    """Messages of a judgement: text, optional reference frame, then the sampled frames as images."""
    idx = sample_indices(len(frames), num_frames)
    content: list[dict] = [{"type": "text", "text": JUDGE_USER.format(
        prompt=step.prompt, criteria="; ".join(step.success_criteria) or "the instruction is visibly carried out",
        memory=memory.render(max_steps=8))}]
    if reference_frame and memory.key_frames:
        content.append({"type": "text", "text": REFERENCE_CAPTION})
        content.append({"type": "image", "image": memory.key_frames[-1]})
    content.append({"type": "text", "text": FRAMES_CAPTION.format(count=len(idx), total=len(frames), indices=idx)})
    content.extend({"type": "image", "image": frames[i]} for i in idx)
    return [{"role": "system", "content": SYSTEM.format(kinds=", ".join(f'"{k.value}"' for k in FailureKind))},
            {"role": "user", "content": content}]
