"""GRPO post-training of the bundled world model with the world critic's reward.

    python -m spiral_rt.world.grpo --out runs/world-grpo [--weights FILE] [--iterations 200] [--group-size 8]
    python -m spiral_rt.world.grpo --out /tmp/grpo --smoke          # CPU, seconds (random tiny weights)

One iteration is ``--goals-per-update`` random training goals per rank (seeds from
``GRPO_SEED_BASE``, apart from the training videos' and the held-out evaluation's), each run as one
execution group (TempAct's scheme), their gradients accumulated into one update. The goals of an
iteration share their chunk count (``iteration_goals``: the seed-ordered goal stream, bucketed by
chunk count), so they form one RolloutSpec whose groups run in lockstep (``concurrent_groups``: one
engine step per chunk and denoising step for all goals x G members, and one trainer micro-batch):

    prefix     chunk 0: the rendered start scene, observed (``Engine.observe``) under its description,
               once per goal (the plan's intro step)
    fork       the KV cache forks G ways (the members share the prefix pages)
    members    the goal's canonical steps, each over its span, with the rollout step policy
               (``--policy``: Flow-GRPO's SDE step, or the engine's own re-noise sampler); every
               stochastic denoising step after the fork is recorded
    reward     ``WorldCritic`` judges each step from the prefix's last frame on; a member's reward is
               the mean over its steps of the graded score or of completion (``--reward``);
               advantages are normalised within the group
    update     one ``GRPOTrainer.train_step`` (LoRA adapters on the DiT's linears, fp32 so the
               recomputed log-probs equal the recorded ones before the update; ``--objective``:
               the clipped policy gradient, advantage-weighted denoising of the members' videos, or
               Diffusion-DPO on each group's best- vs worst-rewarded video)

Several GPUs: ``torchrun --nproc_per_node N -m spiral_rt.world.grpo ...`` runs N ranks (NCCL on CUDA,
gloo on the CPU), each on its own device with its own goal per iteration; the trainer averages the
gradients over ranks (DDP), so every rank holds the same adapters; rank 0 writes the log (every
rank's record) and the weights.

The engine runs the same DiT object the trainer updates, so every rollout is on-policy. Every
``--save-every`` iterations and at the end, ``OUT/world.safetensors`` holds the post-trained model
(adapters folded in; ``load_world_model`` and ``bench_world.py --grpo-weights`` read it), and
``OUT/log.jsonl`` one line per iteration (reward mean / std, step success, loss statistics, seconds),
and ``OUT/trainer/`` the trainer's state: a later run with the same ``--out`` resumes from it (the
goals continue where it stopped), so a long post-training can span several time-limited calls.

Boundaries: the iteration loop and its assembly; rollouts are ``spiral_rt.rollout``'s, updates
``spiral_rt.rl``'s, goals, language and critic ``spiral_rt.world``'s, the model files ``loader``'s.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from spiral_rt.agents.types import Goal, Plan, Step
from spiral_rt.config_cli import config_from_args, dataclass_parser
from spiral_rt.rl import GRPOLossConfig
from spiral_rt.rl.launch import join_from_env
from spiral_rt.rl.trainer import (DEFAULT_LORA_TARGETS, DENOISING_INPUTS, DENOISING_WEIGHTS, OBJECTIVES, GRPOTrainer,
                                  GRPOTrainerConfig)
from spiral_rt.rollout import RolloutRunner, RolloutSpec
from spiral_rt.rollout.spec import CREDITS, NOISE_POLICIES, REWARD_SIGNALS
from spiral_rt.sampling import FlowGRPOStep, SelfForcingRenoise

from .agents import WorldCritic
from .goals import random_goal
from .language import goal_to_steps
from .scene import Scene, WorldConfig

logger = logging.getLogger(__name__)

GRPO_SEED_BASE = 700_000_000
"""Goal seeds of GRPO iterations start here (training videos use small seeds, evaluation 900,000,000+)."""
WEIGHTS_FILE = "world.safetensors"
TRAINER_DIR = "trainer"
"""Under --out: the trainer's state (adapters, optimizer, update count); a run finding it resumes."""


@dataclass
class WorldGRPOConfig:
    """One post-training run (the CLI is built from these fields: ``--field-name``)."""

    out: str = "runs/world-grpo"
    """Output directory (weights, log)."""
    weights: str = ""
    """World weights file to start from (empty: the bundled weights)."""
    iterations: int = 200
    """GRPO updates; each rank rolls out ``goals_per_update`` goals per update."""
    goals_per_update: int = 8
    """Goals (execution groups) per rank whose gradients accumulate into one update: more goals, a
    less noisy update (one group's advantages are a noisy estimate of the policy gradient)."""
    micro_batch_size: int = 64
    """Members per trainer forward / backward (the whole update's goals x G members, up to this)."""
    group_size: int = 8
    """G, members per goal (continuations of the shared intro chunk)."""
    lr: float = 2e-4
    """AdamW learning rate of the LoRA adapters (5e-4 lost 10 points of held-out steps in 60 updates)."""
    lora_rank: int = 16
    """LoRA rank."""
    lora_targets: str = ""
    """Comma-separated suffixes of the block linears that get adapters (e.g. "self_attn.q,self_attn.k");
    empty: ``DEFAULT_LORA_TARGETS`` (every linear of a block). Self-attention's q and k hold twice the
    cross-goal share of the denoising gradient of the others (bench/NOTES.md, session 23)."""
    kl_coef: float = 0.01
    """Weight of the KL term to the starting model (adapters disabled)."""
    policy: str = "self_forcing"
    """The rollouts' step policy: "flow_grpo" (Flow-GRPO's SDE step at ``noise_level``) or "self_forcing"
    (the re-noise step the engine samples the world model with: x' = (1 - s') x0 + s' eps, a Gaussian
    policy too, so the trained policy is exactly the sampler used at inference)."""
    train_steps: str = "0,1,2"
    """Trained denoising steps of every chunk, comma-separated (default: the early steps that set where
    things go); empty: every stochastic step (the late steps' small noise barely changes the outcome,
    so crediting it adds gradient noise: every step trained lost ~10 points of held-out steps; so
    did Diffusion-DPO over every step, -13 points after 12 updates, bench/NOTES.md session 24)."""
    noise: str = "shared_initial"
    """Noise within a goal's group (``RolloutSpec.noise``): "shared_initial" (DanceGRPO: the members
    start every chunk from the same initial noise, so they differ only by the noise of the recorded
    transitions, which the update credits), "independent", "shared_except_fork" or "branch" (the members
    share every draw but the noise the trained steps draw, slot k + 1 of step k: TempFlow-GRPO's
    branching, so a group's reward spread comes from the credited transitions alone). Measured on the
    shipped model: the initial latents barely move the outcome (members differing only there split
    6% of groups), while any single re-noise draw from sigma 0.94 down re-draws most of it
    (bench/grpo_outcome_probe.py, bench/NOTES.md session 25)."""
    noise_level: float = 0.7
    """Flow-GRPO's SDE noise level of the rollouts' step policy."""
    credit: str = "video"
    """``RolloutSpec.credit``: "video" (a member's mean over its steps, for all its transitions) or
    "step" (each transition answers for the plan step its chunk belongs to)."""
    reward: str = "completed"
    """A member's reward: the mean over its steps of the critic's graded "score", or of "completed" (1/0)."""
    seed: int = 0
    """Goal seeds (GRPO_SEED_BASE + seed * 100003 + goal index, ``iteration_goals``) and the rollouts' Philox seed."""
    objective: str = "policy_gradient"
    """``GRPOTrainerConfig.objective``: "policy_gradient" (clipped ratio of the recorded transitions'
    log-probs), "denoising" (advantage-weighted denoising loss of the members' clean chunks at the
    trained steps' noise levels; give it a ``kl_coef`` above the largest |advantage|, e.g. 3) or "dpo"
    (Diffusion-DPO of each group's best- against its worst-rewarded member, reference = adapters off;
    ``dpo_beta``; needs ``credit`` "video")."""
    denoising_weights: str = "advantage"
    """``GRPOTrainerConfig.denoising_weights`` of the "denoising" objective: "advantage" or "positive"
    (only the members above their group's mean are fitted)."""
    denoising_input: str = "fresh"
    """``GRPOTrainerConfig.denoising_input`` of the "denoising" objective: "fresh" (the member's clean
    chunk noised afresh at the step's sigma) or "recorded" (the state the sampler fed the model)."""
    dpo_beta: float = 1000.0
    """``GRPOTrainerConfig.dpo_beta``: inverse temperature of the "dpo" objective's pair loss
    -log sigmoid(-beta (d_w - d_l)), d = a member's mean squared x0 error minus the reference's."""
    gate_adapters: bool = True
    """The LoRA adapters act only at the trained steps' timesteps (``gate_lora_by_timestep``); off:
    in every forward, where an update credited to steps 0-2 also moves the untrained steps and the
    clean pass (after one update at lr 3e-3, fresh groups of the goal it saw: step success 0.55 with
    the base model, 0.48 with the adapters at the trained steps alone, 0.20 with them everywhere;
    bench/NOTES.md, session 10)."""
    goal_pool: int = 0
    """0: every iteration draws new goals; N > 0: iterations cycle over goals 0 .. N - 1 only (a fixed
    training set: the check that updates raise the reward on the goals they are trained on)."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Where the model runs."""
    critic_processes: int = min(8, max(0, (os.cpu_count() or 1) - 2)) if torch.cuda.is_available() else 0
    """Worker processes of the world critic (0: threads); on a GPU machine the critic's numpy work
    on 64 members takes longer than their generation unless it runs on several cores."""
    save_every: int = 50
    """Iterations between weight files (the last one is always written)."""
    time_limit_min: float = 0.0
    """Stop after the iteration during which this many wall-clock minutes have passed (0: no limit);
    the weights are written as at the end (ranks agree on the stopping iteration)."""
    smoke: bool = False
    """Random tiny weights, 2 iterations of 2 members (CPU seconds; checks the loop runs)."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        for name in ("iterations", "goals_per_update", "group_size", "lora_rank", "save_every", "micro_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"WorldGRPOConfig: '{name}' must be a positive int, got {v!r}")
        if any(not t for t in self.lora_target_names()):
            raise ValueError(f"WorldGRPOConfig: 'lora_targets' must be empty or comma-separated module suffixes, "
                             f"got {self.lora_targets!r}")
        if self.group_size < 2:
            raise ValueError(f"WorldGRPOConfig: 'group_size' must be >= 2 (advantages compare members), got {self.group_size}")
        for name in ("lr", "kl_coef", "noise_level"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"WorldGRPOConfig: '{name}' must be a number >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"WorldGRPOConfig: 'lr' must be > 0, got {self.lr!r}")
        if self.policy not in ("flow_grpo", "self_forcing"):
            raise ValueError(f"WorldGRPOConfig: 'policy' must be 'flow_grpo' or 'self_forcing', got {self.policy!r}")
        try:
            steps = self.trained_step_indices()
        except ValueError:
            steps = (-1,)
        if steps is not None and min(steps) < 0:
            raise ValueError(f"WorldGRPOConfig: 'train_steps' must be empty or comma-separated step indices >= 0, "
                             f"got {self.train_steps!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"WorldGRPOConfig: 'objective' must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.denoising_weights not in DENOISING_WEIGHTS:
            raise ValueError(f"WorldGRPOConfig: 'denoising_weights' must be one of {DENOISING_WEIGHTS}, "
                             f"got {self.denoising_weights!r}")
        if self.denoising_input not in DENOISING_INPUTS:
            raise ValueError(f"WorldGRPOConfig: 'denoising_input' must be one of {DENOISING_INPUTS}, "
                             f"got {self.denoising_input!r}")
        if isinstance(self.dpo_beta, bool) or not isinstance(self.dpo_beta, (int, float)) \
                or not 0 < self.dpo_beta < float("inf"):
            raise ValueError(f"WorldGRPOConfig: 'dpo_beta' must be a finite number > 0, got {self.dpo_beta!r}")
        if self.noise not in NOISE_POLICIES:
            raise ValueError(f"WorldGRPOConfig: 'noise' must be one of {NOISE_POLICIES}, got {self.noise!r}")
        if self.credit not in CREDITS:
            raise ValueError(f"WorldGRPOConfig: 'credit' must be one of {CREDITS}, got {self.credit!r}")
        if self.objective == "dpo" and self.credit != "video":
            raise ValueError(f"WorldGRPOConfig: 'credit' must be 'video' with objective 'dpo' (pairs are ranked by the "
                             f"member's reward), got {self.credit!r}")
        if self.reward not in REWARD_SIGNALS:
            raise ValueError(f"WorldGRPOConfig: 'reward' must be one of {REWARD_SIGNALS}, got {self.reward!r}")
        if isinstance(self.time_limit_min, bool) or not isinstance(self.time_limit_min, (int, float)) or not self.time_limit_min >= 0:
            raise ValueError(f"WorldGRPOConfig: 'time_limit_min' must be a number >= 0, got {self.time_limit_min!r}")
        for name in ("seed", "goal_pool"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"WorldGRPOConfig: '{name}' must be an int >= 0, got {v!r}")
        if isinstance(self.critic_processes, bool) or not isinstance(self.critic_processes, int) or self.critic_processes < 0:
            raise ValueError(f"WorldGRPOConfig: 'critic_processes' must be an int >= 0, got {self.critic_processes!r}")

    def lora_target_names(self) -> tuple[str, ...]:
        """``lora_targets`` as a tuple of module suffixes (``DEFAULT_LORA_TARGETS`` when empty)."""
        text = self.lora_targets.strip()
        return tuple(t.strip() for t in text.split(",")) if text else DEFAULT_LORA_TARGETS

    def trained_step_indices(self) -> tuple[int, ...] | None:
        """``train_steps`` as a tuple (None: every stochastic step); ValueError when it does not parse."""
        text = self.train_steps.strip()
        return tuple(int(x) for x in text.split(",")) if text else None


def goal_plan(seed: int, config: WorldConfig) -> tuple[Plan, int, Scene]:
    """The plan of random goal ``seed`` with its intro step (the scene description, one chunk, observed)
    first, the video's chunk count, and the start scene."""
    spec = random_goal(seed, config)
    steps = goal_to_steps(spec.text, config)
    intro = Step(prompt=spec.scene.describe(), span_chunks=1)
    plan = Plan(goal=Goal(text=spec.text, id=spec.id), steps=[intro, *steps],
                rationale="observed intro chunk under the scene description, then the goal's canonical steps")
    return plan, 1 + sum(s.span_chunks for s in steps), spec.scene


def iteration_goals(seed: int, goals_per_iteration: int, config: WorldConfig,
                    pool: int = 0) -> Iterator[list[tuple[int, Plan, int, Scene]]]:
    """The goals of GRPO iterations 0, 1, 2, ...: random goals in seed order (goal index i has seed
    ``GRPO_SEED_BASE + seed * 100003 + i``; with ``pool`` > 0 the indices cycle over 0 .. pool - 1) go
    to buckets by chunk count; an iteration takes the first bucket to hold ``goals_per_iteration``
    goals (with a pool, a goal may come twice in one iteration). Items are (goal index, plan, chunks,
    start scene)."""
    buckets: dict[int, list] = defaultdict(list)
    for index in itertools.cycle(range(pool)) if pool > 0 else itertools.count():
        plan, num_chunks, scene = goal_plan(GRPO_SEED_BASE + seed * 100_003 + index, config)
        bucket = buckets[num_chunks]
        bucket.append((index, plan, num_chunks, scene))
        if len(bucket) == goals_per_iteration:
            yield bucket
            buckets[num_chunks] = []


def _load(cfg: WorldGRPOConfig):
    from .model.loader import load_world_model

    if not cfg.smoke:
        return load_world_model(cfg.weights or None, device=cfg.device, dtype=torch.float32)
    import tempfile

    from spiral_rt.engine.generator import HashTextEncoder

    from .model.codec import PixelCodecConfig
    from .model.dit import build_world_dit, world_dit_config
    from .model.loader import save_world_weights

    torch.manual_seed(cfg.seed)
    codec = PixelCodecConfig()
    dit_cfg = world_dit_config("tiny", codec)
    path = Path(tempfile.mkdtemp()) / "tiny.safetensors"
    save_world_weights(path, build_world_dit(dit_cfg), codec, dtype=torch.float32)
    return load_world_model(path, device=cfg.device, dtype=torch.float32,
                            text_encoder=HashTextEncoder(dit_cfg.text_dim, 16))


def trained_timesteps(cfg: WorldGRPOConfig, model_timesteps) -> tuple[float, ...]:
    """The model timesteps of the trained denoising steps (all of them when ``train_steps`` is empty)."""
    timesteps = [float(t) for t in model_timesteps]
    steps = cfg.trained_step_indices()
    if steps is None:
        return tuple(timesteps)
    if max(steps) >= len(timesteps):
        raise ValueError(f"WorldGRPOConfig: 'train_steps' {cfg.train_steps!r} names a step past the schedule's "
                         f"{len(timesteps)} denoising steps")
    return tuple(timesteps[i] for i in steps)


CPU_KV_BYTES_PER_MEMBER = 16 * 2**20
"""KV pool per rollout member on the CPU (where the engine's default pool is 256 MiB): the world
model's window of 9 context frames plus the chunk being generated, 1.1 MiB a frame, with room."""


def grpo_engine(world, members: int):
    """An engine for rollouts of ``members`` members: on CUDA the default pool (40% of free memory),
    on the CPU one sized for the members."""
    if world.dit.patch_embedding.weight.device.type == "cuda":
        return world.engine(max_batch_size=members)
    return world.engine(max_batch_size=members, kv_memory_bytes=max(256 * 2**20, members * CPU_KV_BYTES_PER_MEMBER))


def grpo_trainer(world, engine, cfg: WorldGRPOConfig) -> GRPOTrainer:
    """The trainer ``cfg`` describes over ``world``'s DiT (LoRA adapters injected into it, initialised
    from ``cfg.seed``: a run is reproducible), for rollouts of ``engine``."""
    members = cfg.goals_per_update * cfg.group_size
    torch.manual_seed(cfg.seed)
    return GRPOTrainer(world.dit, GRPOTrainerConfig(
        lr=cfg.lr, lora_rank=cfg.lora_rank, lora_alpha=float(cfg.lora_rank), bf16_autocast=False,
        lora_targets=cfg.lora_target_names(),
        micro_batch_size=min(cfg.micro_batch_size, members), loss=GRPOLossConfig(kl_coef=cfg.kl_coef),
        objective=cfg.objective, denoising_weights=cfg.denoising_weights, denoising_input=cfg.denoising_input,
        dpo_beta=cfg.dpo_beta, lora_timesteps=trained_timesteps(cfg, engine.config.schedule.model_timesteps) if cfg.gate_adapters else None),
        world.text_encoder, engine_config=engine.config)


def step_policy_of(cfg: WorldGRPOConfig):
    """The rollouts' step policy ``cfg.policy`` names."""
    return FlowGRPOStep(noise_level=cfg.noise_level) if cfg.policy == "flow_grpo" else SelfForcingRenoise(prediction="velocity")


def rollout_goals(runner: RolloutRunner, world, cfg: WorldGRPOConfig, goals: list, seed: int, step_policy=None):
    """One scored RolloutBatch of ``goals`` (items of ``iteration_goals``, one chunk count), each an
    execution group of ``cfg.group_size`` members after its observed intro chunk, generated together."""
    plans = [plan for _, plan, _, _ in goals]
    spec = RolloutSpec(goals=[p.goal for p in plans], plans=[[p] for p in plans], group_size=cfg.group_size,
                       num_chunks=goals[0][2], fork_chunk=1, observed_chunks=1, seed=seed, keep_frames=False,
                       step_policy=step_policy or step_policy_of(cfg), reward_signal=cfg.reward, credit=cfg.credit,
                       noise=cfg.noise, progress=False, train_steps=cfg.trained_step_indices())
    with torch.no_grad():
        return runner.run(spec, observations=[world.scene_latents(scene, WorldConfig()) for _, _, _, scene in goals],
                          concurrent_groups=len(goals))


def run(cfg: WorldGRPOConfig) -> dict:
    """Post-train as ``cfg`` says; returns a summary (per-iteration rewards and the weights path)."""
    from tqdm import tqdm

    if cfg.smoke:
        cfg.iterations, cfg.group_size, cfg.device, cfg.critic_processes = min(cfg.iterations, 2), 2, "cpu", 0
    cfg.validate()
    launch = join_from_env(cfg.device)
    rank, world_size, cfg.device = launch.rank, launch.world_size, launch.device
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    wcfg = WorldConfig()
    world = _load(cfg)
    members = cfg.goals_per_update * cfg.group_size
    engine = grpo_engine(world, members)
    trainer = grpo_trainer(world, engine, cfg)
    runner = RolloutRunner(engine, WorldCritic(wcfg), critic_processes=cfg.critic_processes)
    step_policy = step_policy_of(cfg)
    log_path = out / "log.jsonl"
    start = 0
    if (out / TRAINER_DIR / "trainer.json").is_file():  # resume: adapters, optimizer state, update count
        trainer.load(out / TRAINER_DIR)
        start = trainer.step
        logger.info("resumed from %s after %d update(s)", out / TRAINER_DIR, start)
    history = []
    weights = None
    bar = tqdm(range(start, cfg.iterations), desc="world-grpo", unit="step", disable=not cfg.progress or rank != 0,
               dynamic_ncols=True)
    deadline = time.perf_counter() + 60.0 * cfg.time_limit_min if cfg.time_limit_min > 0 else None
    updates = start
    stream = iteration_goals(cfg.seed, cfg.goals_per_update * world_size, wcfg, cfg.goal_pool)
    for _ in range(start):  # a resumed run continues the goal stream where it stopped
        next(stream)
    for it in bar:
        t0 = time.perf_counter()
        mine = next(stream)[rank * cfg.goals_per_update:(rank + 1) * cfg.goals_per_update]  # every rank its own goals
        plans = [plan for _, plan, _, _ in mine]
        batch = rollout_goals(runner, world, cfg, mine, seed=cfg.seed * 1_000_003 + it * world_size + rank,
                              step_policy=step_policy)
        t1 = time.perf_counter()
        stats = trainer.train_step(batch)
        verdicts = [v for member in batch.verdicts for v in member]
        rec = {"iteration": it + 1, "rank": rank, "goals": [p.goal.text for p in plans], "chunks": mine[0][2],
               "reward_mean": float(batch.rewards.mean()),
               "reward_std": float(batch.rewards.view(len(mine), cfg.group_size).std(dim=1, unbiased=False).mean()),
               "step_success": sum(bool(v["completed"]) for v in verdicts) / max(1, len(verdicts)),
               "rollout_s": t1 - t0, "train_s": time.perf_counter() - t1,
               **{k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}}
        recs = [rec]
        if world_size > 1:
            recs = [None] * world_size
            dist.all_gather_object(recs, rec)
        history.extend(recs)
        if rank == 0:
            with open(log_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in recs)
        bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", success=f"{rec['step_success']:.2f}")
        updates = it + 1
        stop = deadline is not None and time.perf_counter() > deadline
        if deadline is not None and world_size > 1:  # every rank stops after the same update
            flag = torch.tensor([float(stop)], device=launch.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if (it + 1) % cfg.save_every == 0 or it + 1 == cfg.iterations or stop:
            trainer.save(out / TRAINER_DIR)  # every rank calls it (rank 0 writes, then a barrier)
            if rank == 0:
                weights = world.save(out / WEIGHTS_FILE, train_info={"grpo": {
                    "updates": it + 1, "goals": (it + 1) * world_size * cfg.goals_per_update, "ranks": world_size,
                    "goals_per_update": cfg.goals_per_update, "group_size": cfg.group_size,
                    "lr": cfg.lr, "lora_rank": cfg.lora_rank, "kl_coef": cfg.kl_coef, "reward": cfg.reward,
                    "policy": cfg.policy, "noise": cfg.noise, "train_steps": cfg.train_steps, "credit": cfg.credit,
                    "gate_adapters": cfg.gate_adapters, "objective": cfg.objective,
                    "denoising_weights": cfg.denoising_weights, "denoising_input": cfg.denoising_input,
                    "dpo_beta": cfg.dpo_beta, "lora_targets": cfg.lora_targets}})
        if stop:
            logger.info("time limit of %.1f min reached after %d update(s)", cfg.time_limit_min, updates)
            break
    bar.close()
    runner.close()
    engine.close()
    window = max(1, len(history) // 5)
    launch.leave()
    summary = {"rank": rank, "updates": updates, "goals": len(history) * cfg.goals_per_update, "ranks": world_size,
               "weights": str(weights) if rank == 0 else None,
               "reward_first": sum(r["reward_mean"] for r in history[:window]) / window,
               "reward_last": sum(r["reward_mean"] for r in history[-window:]) / window,
               "step_success_first": sum(r["step_success"] for r in history[:window]) / window,
               "step_success_last": sum(r["step_success"] for r in history[-window:]) / window}
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = dataclass_parser(WorldGRPOConfig, __doc__.splitlines()[0], prog="python -m spiral_rt.world.grpo").parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")
    cfg = config_from_args(WorldGRPOConfig, args)
    try:
        summary = run(cfg)
    except ValueError as exc:
        print(f"python -m spiral_rt.world.grpo: {exc}")
        return 2
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
