"""How much of a world-GRPO update is signal: the cosine between gradients of independent batches.

    python bench/grpo_signal.py [--goals 4] [--group-size 8] [--draws 1,4] [--device cpu]

A GRPO update is a noisy estimate of the reward's gradient. Two batches of the same goals rolled out
with different seeds give gradients g1, g2 = mu + n1, mu + n2 with independent noise; their cosine
estimates |mu|^2 / (|mu|^2 + E|n|^2), the fraction of an update's squared norm that is the shared
direction. A third batch of other goals gives the cosine with a different goal set: the part of the
signal that generalises across goals, which is what can raise held-out step completion. With
per-update cosine c, Adam's updates add up the signal linearly and the noise as a square root, so
it takes about 1 / c updates for the signal to lead (and a KL term pulls the adapters back by a
constant fraction each update, which the signal must beat).

Measured at the start of post-training (fresh LoRA adapters, B = 0, so only the B matrices get
gradients) on the shipped world model, for each objective of ``GRPOTrainerConfig``: the clipped
policy gradient of the recorded transitions, and advantage-weighted denoising with 1 or several
fresh noise draws per transition (``--draws``: more draws, less of the denoising loss's own noise).
The KL term is off (zero gradient at the start).

With ``--update-steps N`` it then checks whether the direction raises the reward: N updates of one
objective (``--update-objective``, ``--lr``) on the first batch alone, then fresh groups of the same
goals and of the other goals (new seeds), compared with the base model's groups on the same seeds
and noise (before the update: the adapters start at zero, so those are the base model's). Prints a
table and writes bench/results/grpo_signal.json (``--result`` names another).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from common import print_table, write_result
from spiral_rt.rl.trainer import DENOISING_WEIGHTS, OBJECTIVES, GRPOTrainer
from spiral_rt.rollout import RolloutRunner
from spiral_rt.rollout.spec import NOISE_POLICIES, REWARD_SIGNALS
from spiral_rt.world import WorldConfig, WorldCritic
from spiral_rt.world.grpo import WorldGRPOConfig, grpo_engine, grpo_trainer, iteration_goals, rollout_goals
from spiral_rt.world.model.loader import load_world_model


def gradient(trainer: GRPOTrainer, batch, objective: str, draws: int) -> dict[str, torch.Tensor]:
    """Each trainable tensor's flattened gradient of one update on ``batch`` (mean over ``draws`` noise draws)."""
    trainer.config.objective = objective
    total: dict[str, torch.Tensor] = {}
    for d in range(draws):
        trainer.step = d  # the denoising objective keys its noise draw by the step
        trainer.compute_gradients(batch)
        for name, p in trainer.trainable.items():
            if p.grad is not None:
                g = p.grad.flatten().double()
                total[name] = g if name not in total else total[name] + g
    trainer.step = 0
    return {name: g / draws for name, g in total.items()}


def groups_of(names, num_blocks: int) -> dict[str, list[str]]:
    """Parameter groups whose cosines are reported apart: all, each adapted layer kind (its module
    name's last two parts, e.g. ``self_attn.o``), and the first, middle and last third of the blocks."""
    out: dict[str, list[str]] = {"all": list(names)}
    for name in names:
        parts = name.split(".")
        kind = ".".join(parts[2:4]) if parts[0] == "blocks" else parts[0]
        out.setdefault(kind, []).append(name)
        if parts[0] == "blocks":
            third = ("blocks 1st third", "blocks 2nd third", "blocks 3rd third")[min(2, 3 * int(parts[1]) // num_blocks)]
            out.setdefault(third, []).append(name)
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--goals", type=int, default=4, help="goals per batch")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--draws", default="1,4", help="noise draws per transition of the denoising objective")
    p.add_argument("--update-steps", type=int, default=0, help="updates on the first batch before the fresh groups")
    p.add_argument("--update-objective", default="denoising", choices=OBJECTIVES)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of those updates")
    p.add_argument("--denoising-weights", default="advantage", choices=DENOISING_WEIGHTS,
                   help="GRPOTrainerConfig.denoising_weights of those updates")
    p.add_argument("--by-group", action="store_true",
                   help="also the cosines of each adapted layer kind and of each third of the blocks")
    p.add_argument("--skip-cosines", action="store_true", help="only the update check")
    p.add_argument("--train-steps", default=WorldGRPOConfig.train_steps,
                   help="trained denoising steps (comma-separated; empty: all), as world GRPO's --train-steps")
    p.add_argument("--noise", default=WorldGRPOConfig.noise, choices=NOISE_POLICIES,
                   help="noise within a group (RolloutSpec.noise; \"branch\": members differ only in the trained steps' draws)")
    p.add_argument("--reward", default=WorldGRPOConfig.reward, choices=REWARD_SIGNALS,
                   help="what each step's verdict contributes to a member's reward (RolloutSpec.reward_signal)")
    p.add_argument("--result", default="grpo_signal", help="name of the result file (bench/results/NAME.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    draws = [int(x) for x in args.draws.split(",")]

    # KL off: its gradient is zero at the start; seed 0 fixes the adapters' random A matrices, on
    # which the B gradients depend
    cfg = WorldGRPOConfig(goals_per_update=args.goals, group_size=args.group_size, device=args.device, critic_processes=0,
                          train_steps=args.train_steps, lr=args.lr, kl_coef=0.0, micro_batch_size=args.goals * args.group_size,
                          reward=args.reward, noise=args.noise)
    cfg.validate()
    world = load_world_model(None, device=args.device, dtype=torch.float32)
    members = args.goals * args.group_size
    engine = grpo_engine(world, members)
    trainer = grpo_trainer(world, engine, cfg)
    runner = RolloutRunner(engine, WorldCritic(WorldConfig()), critic_processes=0)
    stream = iteration_goals(cfg.seed, args.goals, WorldConfig())
    goals_a, goals_b = next(stream), next(stream)
    t0 = time.perf_counter()
    sources = {"A seed 1": (goals_a, 1)} if args.skip_cosines else \
        {"A seed 1": (goals_a, 1), "A seed 2": (goals_a, 2), "B seed 3": (goals_b, 3)}
    batches = {name: rollout_goals(runner, world, cfg, g, seed=s) for name, (g, s) in sources.items()}
    rollout_s = time.perf_counter() - t0
    objectives = [] if args.skip_cosines else [("policy_gradient", 1)] + [("denoising", d) for d in draws]
    rows = []
    for objective, d in objectives:
        per = {name: gradient(trainer, b, objective, d) for name, b in batches.items()}
        groups = groups_of(per["A seed 1"], len(world.dit.blocks)) if args.by_group else {"all": list(per["A seed 1"])}
        for group, names in groups.items():
            g = {b: torch.cat([grads[n] for n in names]) for b, grads in per.items()}
            rows.append({"objective": objective if objective != "denoising" else f"denoising x{d}", "group": group,
                         "cos_same_goals": cosine(g["A seed 1"], g["A seed 2"]),
                         "cos_other_goals": 0.5 * (cosine(g["A seed 1"], g["B seed 3"]) + cosine(g["A seed 2"], g["B seed 3"])),
                         "grad_norm": float(sum(x.norm() for x in g.values()) / len(g))})
    update = {}
    if args.update_steps > 0:
        fresh = {"same goals": (goals_a, 11), "other goals": (goals_b, 12)}
        before = {name: rollout_goals(runner, world, cfg, g, seed=s).rewards for name, (g, s) in fresh.items()}
        trainer.config.objective, trainer.config.denoising_weights = args.update_objective, args.denoising_weights
        for _ in range(args.update_steps):
            trainer.train_step(batches["A seed 1"])
        after = {name: rollout_goals(runner, world, cfg, g, seed=s).rewards for name, (g, s) in fresh.items()}
        update = {"objective": args.update_objective, "denoising_weights": args.denoising_weights,
                  "steps": args.update_steps, "lr": args.lr,
                  **{name: {"reward_before": float(before[name].mean()), "reward_after": float(after[name].mean()),
                            "members_changed": int((before[name] != after[name]).sum())} for name in fresh}}
    runner.close()
    engine.close()
    rewards = {name: float(b.rewards.mean()) for name, b in batches.items()}
    if rows:
        print_table(rows, ["objective", "group", "cos_same_goals", "cos_other_goals", "grad_norm"])
    print(f"batch rewards {rewards}; rollouts {rollout_s:.0f} s")
    if update:
        print(f"after {args.update_steps} {args.update_objective} update(s) at lr {args.lr} on batch 'A seed 1': {update}")
    write_result(args.result, {"goals": args.goals, "group_size": args.group_size, "device": args.device,
                                 "train_steps": cfg.train_steps, "noise": cfg.noise, "reward": cfg.reward,
                                 "policy": cfg.policy, "batch_rewards": rewards, "rollout_s": rollout_s},
                 rows, {"update": update} if update else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
