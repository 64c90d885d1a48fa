"""RolloutSpec: what a GRPO rollout generates, which transitions it records, and how it draws noise.

Boundaries: plain data with validation (``ValueError`` naming the field) and the host-side
bookkeeping derived from it: plans resolved to one prompt per chunk, the Philox noise identities of
every member, chunk and noise slot, and the trained (chunk, step) pairs. No tensors, no engine here;
the runner (``spiral_rt.rollout.runner``) executes a spec and the batch (``spiral_rt.rollout.batch``)
stores the result together with ``to_dict()`` of its spec, which is all a replay needs.

Structure of one rollout (hierarchical GRPO groups)::

    goal g  --K plans-->  plan (g, k): a prompt per chunk
                            chunks [0, fork_chunk)          the prefix, generated once per plan
                            chunks [fork_chunk, num_chunks)  G members (the execution group), batched

Noise identity: every noise draw is Philox noise keyed (seed, noise id, chunk, step). For the plan
with global index p = g * K + k, noise id ``p * (G + 1)`` is the group's shared id (also the prefix's)
and ``p * (G + 1) + 1 + m`` is member m's own id. A chunk's noise has ``num_steps + 1`` slots, laid
out as the engine's explicit noise: slot 0 the initial latents, slot j (1 <= j < num_steps) the
re-noise after step j - 1, slot num_steps the clean pass's context noise; slot j is drawn with
Philox step index j, except the context slot, which uses num_steps + 1 (the engine's Philox path
does the same, so a member whose slots all use its own id equals a plain session with that noise
id). The noise policy picks, per chunk after the fork, which slots use the shared id:

    "independent"         no slot shared: members differ from the fork chunk's first draw on;
    "shared_initial"      slot 0 shared in every chunk after the fork (DanceGRPO's shared initial
                          noise): members start each chunk from the same x_T, the SDE noise differs;
    "shared_except_fork"  slot 0 shared in every chunk after the fork except the fork chunk itself;
    "branch"              every slot shared except those the trained transitions draw (slot k + 1
                          of trained step k, in trained chunks): TempFlow-GRPO's branching. The
                          members differ only by the noise of the transitions the update credits,
                          so the group's reward spread is theirs alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from spiral_rt.agents.protocols import PlanAgent
from spiral_rt.agents.types import Goal, Plan, Step, WorldMemory
from spiral_rt.rl import AdvantageConfig
from spiral_rt.sampling import FlowGRPOStep, FlowMatchSchedule, StepPolicy, make_step_policy

NoisePolicy = Literal["independent", "shared_initial", "shared_except_fork", "branch"]
NOISE_POLICIES = ("independent", "shared_initial", "shared_except_fork", "branch")
RewardReduce = Literal["mean", "min", "last"]
REWARD_REDUCE = ("mean", "min", "last")
REWARD_SIGNALS = ("score", "completed", "consistent")
CREDITS = ("video", "step")

PlanLike = Any  # Plan | list[str] | list[Step]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"RolloutSpec: '{name}' must be a positive int, got {value!r}")
    return value


def _index_tuple(name: str, value, upper: int, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"RolloutSpec: '{name}' must be None or a sequence of ints, got {value!r}") from None
    if not items:
        raise ValueError(f"RolloutSpec: '{name}' must not be empty (None selects every {what})")
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < upper:
            raise ValueError(f"RolloutSpec: '{name}' entries must be ints in [0, {upper}) ({what}), got {value!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"RolloutSpec: '{name}' has repeated entries: {value!r}")
    return tuple(sorted(items))


@dataclass
class RolloutSpec:
    """One rollout: goals x K plans x G members, the fork point, trained transitions, noise and policy."""

    goals: list[str | Goal]
    """The goals (planning groups). A goal without plans and without a planner is its own prompt for
    every chunk."""
    plans: list[list[PlanLike]] | None = None
    """Per goal, its ``num_plans`` plans. A plan is a ``Plan``, a list of ``Step`` (each covering its
    ``span_chunks``), or a list of step prompts (one chunk each). The last step extends to
    ``num_chunks``; steps beyond it are cut. None: ask ``planner``, or use the goal text."""
    planner: PlanAgent | None = None
    """Produces the plans when ``plans`` is None: ``planner.plan(goal, WorldMemory())`` is called
    ``num_plans`` times per goal (a stochastic planner gives K different plans). Not serialised: the
    resolved plans are (see ``resolved_plans``)."""
    num_plans: int = 1
    """K, plans per goal (the planning group)."""
    group_size: int = 4
    """G, members (continuations) per plan, generated as one batch from the plan's shared prefix."""
    num_chunks: int = 7
    """Chunks per video (7 chunks of 3 latent frames = 21 latent frames = 81 video frames)."""
    fork_chunk: int = 2
    """Chunks of the shared prefix: chunks [0, fork_chunk) are generated once per plan, then the KV
    cache forks G ways; 0 forks at the start (no prefix)."""
    observed_chunks: int = 0
    """Chunks [0, observed_chunks) of every plan are observed, not generated: their clean latents are
    given to ``RolloutRunner.run(observations=...)`` per goal (e.g. a world model's rendered start scene)
    and written into the cache by the clean pass (``Engine.observe``). They belong to the prefix
    (observed_chunks <= fork_chunk)."""
    train_chunks: tuple[int, ...] | None = None
    """Trained chunks, counted from the fork (0 = the fork chunk); None: every chunk after the fork."""
    train_steps: tuple[int, ...] | None = None
    """Trained denoising steps of those chunks (0 = the first step); None: every stochastic step. A
    step is trainable when it is stochastic in the engine (sigma_next > 0 and the policy's C > 0):
    the engine draws no noise into the last step (sigma_next = 0), which has no density."""
    noise: NoisePolicy = "independent"
    """Noise within an execution group: "independent", "shared_initial", "shared_except_fork" or
    "branch" (module docstring)."""
    seed: int = 0
    """Philox seed of every draw; with the noise ids it determines the rollout (replay)."""
    step_policy: StepPolicy = field(default_factory=FlowGRPOStep)
    """The sampler's step policy for the whole rollout (it replaces the engine's while it runs); it
    must be stochastic on the trained steps and take the model's velocity (prediction="velocity")."""
    record_mu: bool = True
    """Store each trained transition's mean mu = A x + B v (else x, x' and the scalars only)."""
    keep_frames: bool = True
    """Keep the decoded frames in the batch (saved with it); False keeps rewards only."""
    reward_reduce: RewardReduce = "mean"
    """A member's reward from its verdicts on the plan steps after the fork: "mean", "min" or "last" score."""
    reward_signal: str = "score"
    """What each verdict contributes before ``reward_reduce``: "score" (the critic's graded score),
    "completed" (1 if the step is judged completed, else 0: a binary success reward, which separates
    members more than a graded score that gives most failures partial credit) or "consistent" (0 if
    the verdict's failure is drift or physics, i.e. the world itself went wrong, else 1: whatever
    the step asked for)."""
    credit: str = "video"
    """What a trained transition is credited with: "video" (the member's reward, reduced over its judged
    steps and normalised within the group, for all its transitions) or "step" (each plan step's signal
    normalised within the group; a transition gets the advantage of the plan step its chunk belongs
    to, so a chunk's noise answers for the step it generated: ``RolloutBatch.transition_advantages``)."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Group normalisation of rewards (eps, clip, scale_by_std), at execution and plan level."""
    critic_workers: int = 4
    """Threads that run the critic while the engine generates the next plan."""
    progress: bool = True
    """Show tqdm progress bars (chunks generated, members judged)."""

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        if isinstance(self.goals, (str, Goal)) or not isinstance(self.goals, (list, tuple)) or not self.goals:
            raise ValueError(f"RolloutSpec: 'goals' must be a non-empty list of str or Goal, got {self.goals!r}")
        for i, g in enumerate(self.goals):
            if not isinstance(g, (str, Goal)) or (isinstance(g, str) and not g.strip()):
                raise ValueError(f"RolloutSpec: 'goals[{i}]' must be a non-empty str or a Goal, got {g!r}")
        for name in ("num_plans", "group_size", "num_chunks", "critic_workers"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.fork_chunk, bool) or not isinstance(self.fork_chunk, int) or not 0 <= self.fork_chunk < self.num_chunks:
            raise ValueError(f"RolloutSpec: 'fork_chunk' must be an int in [0, num_chunks={self.num_chunks}), got {self.fork_chunk!r}")
        if (isinstance(self.observed_chunks, bool) or not isinstance(self.observed_chunks, int)
                or not 0 <= self.observed_chunks <= self.fork_chunk):
            raise ValueError(f"RolloutSpec: 'observed_chunks' must be an int in [0, fork_chunk={self.fork_chunk}], "
                             f"got {self.observed_chunks!r}")
        self.train_chunks = _index_tuple("train_chunks", self.train_chunks, self.num_chunks - self.fork_chunk,
                                         "chunk after the fork")
        if self.noise not in NOISE_POLICIES:
            raise ValueError(f"RolloutSpec: 'noise' must be one of {NOISE_POLICIES}, got {self.noise!r}")
        if self.reward_reduce not in REWARD_REDUCE:
            raise ValueError(f"RolloutSpec: 'reward_reduce' must be one of {REWARD_REDUCE}, got {self.reward_reduce!r}")
        if self.credit not in CREDITS:
            raise ValueError(f"RolloutSpec: 'credit' must be one of {CREDITS}, got {self.credit!r}")
        if self.reward_signal not in REWARD_SIGNALS:
            raise ValueError(f"RolloutSpec: 'reward_signal' must be one of {REWARD_SIGNALS}, got {self.reward_signal!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"RolloutSpec: 'seed' must be an int in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.step_policy, StepPolicy):
            raise ValueError(f"RolloutSpec: 'step_policy' must be a StepPolicy, got {type(self.step_policy).__name__}")
        if getattr(self.step_policy, "prediction", None) != "velocity":
            raise ValueError("RolloutSpec: 'step_policy' must take the model's velocity (prediction='velocity'), "
                             f"got prediction={getattr(self.step_policy, 'prediction', None)!r}")
        if not isinstance(self.advantage, AdvantageConfig):
            raise ValueError(f"RolloutSpec: 'advantage' must be an AdvantageConfig, got {type(self.advantage).__name__}")
        if self.planner is not None and not isinstance(self.planner, PlanAgent):
            raise ValueError(f"RolloutSpec: 'planner' must implement PlanAgent (plan, replan), got {type(self.planner).__name__}")
        if self.plans is not None:
            if not isinstance(self.plans, (list, tuple)) or len(self.plans) != len(self.goals):
                raise ValueError(f"RolloutSpec: 'plans' must hold one list of plans per goal ({len(self.goals)}), "
                                 f"got {type(self.plans).__name__} of length {len(self.plans) if isinstance(self.plans, (list, tuple)) else '?'}")
            for g, per_goal in enumerate(self.plans):
                if not isinstance(per_goal, (list, tuple)) or len(per_goal) != self.num_plans:
                    raise ValueError(f"RolloutSpec: 'plans[{g}]' must hold num_plans={self.num_plans} plans, got {per_goal!r}")
        last_id = self.num_groups * (self.group_size + 1)
        if last_id >= 2**32:
            raise ValueError(f"RolloutSpec: goals x 'num_plans' x ('group_size' + 1) = {last_id} noise ids exceed 2**32")

    @property
    def num_groups(self) -> int:
        """Execution groups (plans over all goals)."""
        return len(self.goals) * self.num_plans

    @property
    def num_members(self) -> int:
        """Videos generated: goals x K x G."""
        return self.num_groups * self.group_size

    # ------------------------------------------------------------------ derived bookkeeping

    def goal_objects(self) -> list[Goal]:
        return [g if isinstance(g, Goal) else Goal(text=g, id=f"goal-{i}") for i, g in enumerate(self.goals)]

    def resolved_plans(self) -> list[list[Plan]]:
        """Per goal, its K plans as ``Plan`` objects (asks the planner when ``plans`` is None)."""
        goals = self.goal_objects()
        out = []
        for g, goal in enumerate(goals):
            if self.plans is not None:
                out.append([_as_plan(goal, p, f"plans[{g}][{k}]") for k, p in enumerate(self.plans[g])])
            elif self.planner is not None:
                out.append([_as_plan(goal, self.planner.plan(goal, WorldMemory()), f"planner.plan(goals[{g}])")
                            for _ in range(self.num_plans)])
            else:
                out.append([Plan(goal=goal, steps=[Step(prompt=goal.text, span_chunks=self.num_chunks)])
                            for _ in range(self.num_plans)])
        return out

    def chunk_prompts(self, plan: Plan) -> tuple[list[str], list[int]]:
        """The prompt of every chunk and the index of the plan step it belongs to (last step extended)."""
        prompts, steps = [], []
        for i, step in enumerate(plan.steps):
            for _ in range(step.span_chunks):
                if len(prompts) < self.num_chunks:
                    prompts.append(step.prompt)
                    steps.append(i)
        while len(prompts) < self.num_chunks:
            prompts.append(plan.steps[-1].prompt)
            steps.append(len(plan.steps) - 1)
        return prompts, steps

    def trained_steps(self, schedule: FlowMatchSchedule) -> tuple[int, ...]:
        """The trained denoising step indices for ``schedule`` (validated: each must be stochastic)."""
        transitions = schedule.transitions()
        n = len(transitions)
        chosen = _index_tuple("train_steps", self.train_steps, n, "denoising step")
        stochastic = []
        for k, (s, sn) in enumerate(transitions):
            c = float(self.step_policy.coefficients(s, sn).c)
            stochastic.append(sn > 0 and c > 0 and math.isfinite(c))
        if chosen is None:
            chosen = tuple(k for k in range(n) if stochastic[k])
            if not chosen:
                raise ValueError("RolloutSpec: 'train_steps' is None but no step of the schedule is stochastic "
                                 f"under {type(self.step_policy).__name__}")
        for k in chosen:
            if not stochastic[k]:
                s, sn = transitions[k]
                raise ValueError(f"RolloutSpec: 'train_steps' includes step {k} (sigma {s:.4g} -> {sn:.4g}), which is "
                                 "deterministic in the engine (no noise is drawn into the last step) and has no density")
        return chosen

    def trained_chunks(self) -> tuple[int, ...]:
        """Absolute indices of the trained chunks."""
        rel = self.train_chunks if self.train_chunks is not None else tuple(range(self.num_chunks - self.fork_chunk))
        return tuple(self.fork_chunk + c for c in rel)

    def group_noise_id(self, group: int) -> int:
        """The shared (and prefix) noise id of execution group ``group`` (global plan index)."""
        return group * (self.group_size + 1)

    def member_noise_id(self, group: int, member: int) -> int:
        """Member ``member``'s own noise id in execution group ``group``."""
        return group * (self.group_size + 1) + 1 + member

    def slot_noise_ids(self, group: int, member: int, chunk: int, num_steps: int) -> list[int]:
        """The noise id of each of the chunk's ``num_steps + 1`` noise slots for one member."""
        shared, own = self.group_noise_id(group), self.member_noise_id(group, member)
        if chunk < self.fork_chunk:
            return [shared] * (num_steps + 1)
        if self.noise == "branch":
            trained = chunk - self.fork_chunk in (self.train_chunks or range(self.num_chunks - self.fork_chunk))
            steps = self.train_steps if self.train_steps is not None else range(num_steps - 1)
            own_slots = {k + 1 for k in steps} if trained else set()
            return [own if j in own_slots else shared for j in range(num_steps + 1)]
        share_initial = self.noise == "shared_initial" or (self.noise == "shared_except_fork" and chunk > self.fork_chunk)
        return [shared if (j == 0 and share_initial) else own for j in range(num_steps + 1)]

    # ------------------------------------------------------------------ serialisation

    def to_dict(self, plans: list[list[Plan]] | None = None) -> dict:
        """JSON-ready form; ``plans`` (default: resolved now) are stored resolved, the planner is not."""
        plans = plans if plans is not None else self.resolved_plans()
        policy = self.step_policy
        return {
            "goals": [g.to_dict() for g in self.goal_objects()],
            "plans": [[p.to_dict() for p in per_goal] for per_goal in plans],
            "num_plans": self.num_plans, "group_size": self.group_size, "num_chunks": self.num_chunks,
            "fork_chunk": self.fork_chunk, "observed_chunks": self.observed_chunks,
            "train_chunks": list(self.train_chunks) if self.train_chunks is not None else None,
            "train_steps": list(self.train_steps) if self.train_steps is not None else None,
            "noise": self.noise, "seed": self.seed,
            "step_policy": {"name": policy.name, **dataclasses.asdict(policy)},
            "record_mu": self.record_mu, "keep_frames": self.keep_frames, "reward_reduce": self.reward_reduce,
            "reward_signal": self.reward_signal, "credit": self.credit, "advantage": dataclasses.asdict(self.advantage),
            "critic_workers": self.critic_workers,
        }

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "RolloutSpec":
        policy = dict(data["step_policy"])
        name = policy.pop("name")
        kw = dict(
            goals=[Goal.from_dict(g) for g in data["goals"]],
            plans=[[Plan.from_dict(p) for p in per_goal] for per_goal in data["plans"]],
            num_plans=data["num_plans"], group_size=data["group_size"], num_chunks=data["num_chunks"],
            fork_chunk=data["fork_chunk"], observed_chunks=data.get("observed_chunks", 0),
            train_chunks=tuple(data["train_chunks"]) if data.get("train_chunks") is not None else None,
            train_steps=tuple(data["train_steps"]) if data.get("train_steps") is not None else None,
            noise=data["noise"], seed=data["seed"], step_policy=make_step_policy(name, **policy),
            record_mu=data.get("record_mu", True), keep_frames=data.get("keep_frames", True),
            reward_reduce=data.get("reward_reduce", "mean"), reward_signal=data.get("reward_signal", "score"),
            credit=data.get("credit", "video"),
            advantage=AdvantageConfig(**data.get("advantage", {})),
            critic_workers=data.get("critic_workers", 4),
        )
        kw.update(overrides)
        return cls(**kw)


def _as_plan(goal: Goal, plan: PlanLike, where: str) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (list, tuple)) and plan and all(isinstance(s, Step) for s in plan):
        return Plan(goal=goal, steps=list(plan))
    if isinstance(plan, (list, tuple)) and plan and all(isinstance(s, str) and s.strip() for s in plan):
        return Plan(goal=goal, steps=[Step(prompt=p, span_chunks=1, index=i) for i, p in enumerate(plan)])
    raise ValueError(f"RolloutSpec: {where} must be a Plan, a non-empty list of Step or of prompt strings, got {plan!r}")


def members_of(spec: RolloutSpec) -> Sequence[tuple[int, int, int]]:
    """(goal, plan within goal, member) of every member, in batch order (goal-major)."""
    return [(g, k, m) for g in range(len(spec.goals)) for k in range(spec.num_plans) for m in range(spec.group_size)]
