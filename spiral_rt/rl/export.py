"""Plan-level rewards as JSONL for LLM RL trainers (training the planner).

One line per plan, in the conversational prompt/completion form that TRL's trainers load
(``datasets.load_dataset("json", ...)``) and that verl's data preprocessing maps from: the goal as
the user turn, the plan (JSON) as the assistant turn, plus the scalar fields

    {"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", "content": ...}],
     "reward": float, "advantage": float, "goal_id": str, "plan_id": int, "execution_rewards": [float, ...]}

so an offline trainer can weight completions by advantage, or a reward function can look the
reward up by goal and plan. Boundaries: formatting and writing only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass
class PlanRecord:
    """One plan of one goal with its rewards."""

    goal_id: str
    """Which goal (the planning group)."""
    goal: str
    """The goal text given to the planner."""
    plan_id: int
    """Index of the plan within its goal's K plans."""
    plan_text: str
    """The planner's output, as it should be learned (e.g. the plan's JSON)."""
    reward: float
    """The plan's reward (mean of its executions' rewards)."""
    advantage: float
    """The plan's advantage within its goal's planning group."""
    execution_rewards: tuple[float, ...] = ()
    """Rewards of the plan's G executions."""


def plan_record_line(record: PlanRecord) -> dict:
    return {
        "prompt": [{"role": "user", "content": record.goal}],
        "completion": [{"role": "assistant", "content": record.plan_text}],
        "reward": float(record.reward),
        "advantage": float(record.advantage),
        "goal_id": record.goal_id,
        "plan_id": int(record.plan_id),
        "execution_rewards": [float(r) for r in record.execution_rewards],
    }


def write_planner_jsonl(records: Iterable[PlanRecord], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(plan_record_line(record), ensure_ascii=False) + "\n")
    return path
