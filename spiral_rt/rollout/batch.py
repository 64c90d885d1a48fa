"""RolloutBatch: everything a GRPO update (and a replay) needs from one rollout, with save / load.

Members are ordered goal-major: member i is (goal_index[i], plan_index[i], member_index[i]), and
its execution group is ``group_index[i] = goal * K + plan``. Trained transitions are the same for
every member: transition t is step ``step[t]`` of chunk ``chunk[t]``.

Files (``save(dir)``): ``tensors.safetensors`` (every tensor field), ``frames.safetensors`` (the
decoded frames, when kept) and ``batch.json`` (the spec with its resolved plans, prompts, verdicts,
stats and scalar fields). ``load(dir)`` restores an equal batch; ``RolloutRunner.replay(batch)``
regenerates it from its spec and seed.

Boundaries: storage and views only; no model, no engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spiral_rt.agents.types import Plan
from spiral_rt.rl import PlanRecord
from spiral_rt.sampling.log_prob import Convention

_TENSORS = ("goal_index", "plan_index", "member_index", "group_index", "noise_ids", "prompt_ids", "chunk", "step",
            "sigma", "sigma_next", "timestep", "x", "x_next", "mu", "a", "b", "c", "log_prob", "latents", "rewards",
            "advantages", "transition_advantages", "plan_rewards", "plan_advantages")
FORMAT_VERSION = 1


@dataclass
class RolloutBatch:
    """Per-member trained transitions, latents, frames, rewards and advantages of one rollout (M members,
    T trained transitions per member, P = goals x K plans)."""

    spec: dict
    """``RolloutSpec.to_dict()`` with the resolved plans: what ``RolloutRunner.replay`` runs."""
    goal_index: torch.Tensor
    """(M,) int64 goal of each member."""
    plan_index: torch.Tensor
    """(M,) int64 plan within its goal (0..K-1)."""
    member_index: torch.Tensor
    """(M,) int64 member within its execution group (0..G-1)."""
    group_index: torch.Tensor
    """(M,) int64 execution group = global plan index (goal * K + plan)."""
    noise_ids: torch.Tensor
    """(M, num_chunks, num_steps + 1) int64 Philox noise id of every noise slot (key (seed, id, chunk, step))."""
    prompts: list[str]
    """The distinct prompts; ``prompt_ids`` index this list."""
    prompt_ids: torch.Tensor
    """(M, num_chunks) int64 prompt of every chunk of every member."""
    chunk: torch.Tensor
    """(T,) int64 absolute chunk index of each trained transition."""
    step: torch.Tensor
    """(T,) int64 denoising step index of each trained transition."""
    sigma: torch.Tensor
    """(T,) float64 noise level before the step."""
    sigma_next: torch.Tensor
    """(T,) float64 noise level after the step."""
    timestep: torch.Tensor
    """(T,) float64 the model's timestep input at the step."""
    x: torch.Tensor
    """(M, T, C, F, h, w) latents before each trained step (the engine's latent dtype)."""
    x_next: torch.Tensor
    """(M, T, C, F, h, w) latents after each trained step (the sampled x')."""
    mu: torch.Tensor | None
    """(M, T, C, F, h, w) transition means A x + B v, or None when not recorded."""
    a: torch.Tensor
    """(M, T) float64 the step policy's A (coefficient of x)."""
    b: torch.Tensor
    """(M, T) float64 the step policy's B (coefficient of the model's velocity)."""
    c: torch.Tensor
    """(M, T) float64 the step policy's C (the transition's std)."""
    log_prob: torch.Tensor
    """(M, T) float64 log N(x'; mu, C^2 I), sum convention (``log_probs("mean")`` for the per-element mean)."""
    count: int
    """Elements per transition (C * F * h * w)."""
    latents: torch.Tensor
    """(M, C, num_chunks * F, h, w) every member's clean latents (prefix included)."""
    frames: torch.Tensor | None = None
    """(M, T_video, H, W, 3) uint8 decoded frames (None when not kept or not decoded)."""
    rewards: torch.Tensor | None = None
    """(M,) float64 member rewards (None when the rollout was not scored)."""
    advantages: torch.Tensor | None = None
    """(M,) float64 execution-level advantages, normalised within each execution group."""
    transition_advantages: torch.Tensor | None = None
    """(M, T) float64 advantage of every trained transition, with step credit (``RolloutSpec.credit``:
    its plan step's signal normalised within the group); None: ``advantages`` for all of a member's."""
    plan_rewards: torch.Tensor | None = None
    """(P,) float64 plan rewards (mean of their G members' rewards)."""
    plan_advantages: torch.Tensor | None = None
    """(P,) float64 plan rewards normalised within their goal's K plans."""
    verdicts: list[list[dict]] = field(default_factory=list)
    """Per member, the critic's verdicts (``Verdict.to_dict()``) on its plan steps after the fork."""
    stats: dict = field(default_factory=dict)
    """How it ran: schedule, seconds, DiT batches, peak KV pages and bytes, ..."""

    # ------------------------------------------------------------------ views

    @property
    def num_members(self) -> int:
        return int(self.goal_index.shape[0])

    @property
    def num_transitions(self) -> int:
        return int(self.chunk.shape[0])

    def log_probs(self, convention: Convention = "sum") -> torch.Tensor:
        """(M, T) float64 log-probs in the "sum" or per-element "mean" convention."""
        if convention not in ("sum", "mean"):
            raise ValueError(f"RolloutBatch.log_probs: argument 'convention' must be 'sum' or 'mean', got {convention!r}")
        return self.log_prob if convention == "sum" else self.log_prob / self.count

    def plans(self) -> list[Plan]:
        """The P resolved plans, in group order."""
        return [Plan.from_dict(p) for per_goal in self.spec["plans"] for p in per_goal]

    def planner_records(self) -> list[PlanRecord]:
        """One ``PlanRecord`` per plan (for ``spiral_rt.rl.write_planner_jsonl``); needs rewards."""
        if self.plan_rewards is None or self.plan_advantages is None or self.rewards is None:
            raise ValueError("RolloutBatch.planner_records: the batch has no rewards (run with a critic)")
        records = []
        for p, plan in enumerate(self.plans()):
            sel = self.group_index == p
            records.append(PlanRecord(
                goal_id=plan.goal.id or f"goal-{p // self.spec['num_plans']}", goal=plan.goal.text,
                plan_id=p % self.spec["num_plans"], plan_text=json.dumps(plan.to_dict(), ensure_ascii=False),
                reward=float(self.plan_rewards[p]), advantage=float(self.plan_advantages[p]),
                execution_rewards=tuple(float(r) for r in self.rewards[sel]),
            ))
        return records

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Write the batch into directory ``path`` (created); returns it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in _TENSORS:
            t = getattr(self, name)
            if t is not None:
                tensors[name] = t.detach().cpu().contiguous().clone()
        save_file(tensors, str(path / "tensors.safetensors"))
        if self.frames is not None:
            save_file({"frames": self.frames.detach().cpu().contiguous()}, str(path / "frames.safetensors"))
        meta = {"format_version": FORMAT_VERSION, "spec": self.spec, "prompts": self.prompts, "count": self.count,
                "verdicts": self.verdicts, "stats": self.stats, "has_frames": self.frames is not None}
        (path / "batch.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RolloutBatch":
        """Read a batch written by ``save``."""
        path = Path(path)
        if not (path / "batch.json").is_file():
            raise ValueError(f"RolloutBatch.load: argument 'path' {str(path)!r} holds no batch.json")
        meta = json.loads((path / "batch.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"RolloutBatch.load: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
        tensors = load_file(str(path / "tensors.safetensors"))
        frames = load_file(str(path / "frames.safetensors"))["frames"] if meta["has_frames"] else None
        kw = {name: tensors.get(name) for name in _TENSORS}
        return cls(spec=meta["spec"], prompts=meta["prompts"], count=meta["count"], verdicts=meta["verdicts"],
                   stats=meta["stats"], frames=frames, **kw)
