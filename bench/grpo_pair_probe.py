"""Does what Diffusion-DPO learns from some goals' pairs rank other goals' pairs? (held-out pair accuracy)

    python bench/grpo_pair_probe.py [--train-batches 6] [--test-batches 4] [--goals 8] [--epochs 8]
                                    [--train-steps 0,1,2] [--lora-targets ...] [--lr 1e-3] [--device cpu]

Online world GRPO draws fresh goals every update, so an update helps held-out step completion only
if the direction it learns from one set of goals also favours the better videos of others. This
checks that offline, the way a reward model is checked: rollouts of the shipped model (each goal an
execution group of G members; each group's best- and worst-rewarded member form a pair) are split by
goal into training and test batches; the "dpo" objective is trained for several epochs on the
training batches, and after each epoch the pair accuracy (``dpo_accuracy``: the fraction of
pair-transitions whose winner the policy favours more than the reference does, d_w < d_l) is read on
both. Training accuracy well above 0.5 with test accuracy at 0.5 means the pairs teach only their own
goals; a test accuracy above 0.5 is the signal an online run could accumulate.
Prints one row per epoch and writes bench/results/grpo_pair_probe.json (``--result`` names another).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from common import print_table, write_result
from spiral_rt.rollout import RolloutRunner
from spiral_rt.world import WorldConfig, WorldCritic
from spiral_rt.world.grpo import WorldGRPOConfig, grpo_engine, grpo_trainer, iteration_goals, rollout_goals
from spiral_rt.world.model.loader import load_world_model


def pair_accuracy(trainer, batches) -> tuple[float, float]:
    """Mean dpo_accuracy and dpo_margin over ``batches`` under the current adapters (their gradients
    are computed by the objective's pass and thrown away)."""
    acc = margin = 0.0
    for b in batches:
        stats = trainer.compute_gradients(b)
        acc += stats["dpo_accuracy"] / len(batches)
        margin += stats["dpo_margin"] / len(batches)
    trainer.optimizer.zero_grad(set_to_none=True)
    return acc, margin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--goals", type=int, default=8, help="goals per batch")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--train-batches", type=int, default=6)
    p.add_argument("--test-batches", type=int, default=4)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dpo-beta", type=float, default=WorldGRPOConfig.dpo_beta)
    p.add_argument("--train-steps", default=WorldGRPOConfig.train_steps,
                   help="trained denoising steps (empty: all); the adapters are gated to them")
    p.add_argument("--lora-targets", default="", help="as WorldGRPOConfig.lora_targets (empty: every linear)")
    p.add_argument("--result", default="grpo_pair_probe", help="name of the result file (bench/results/NAME.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())

    cfg = WorldGRPOConfig(goals_per_update=args.goals, group_size=args.group_size, device=args.device,
                          train_steps=args.train_steps, lr=args.lr, kl_coef=0.0, objective="dpo", dpo_beta=args.dpo_beta,
                          lora_targets=args.lora_targets, micro_batch_size=args.goals * args.group_size)
    cfg.validate()
    world = load_world_model(None, device=args.device, dtype=torch.float32)
    engine = grpo_engine(world, args.goals * args.group_size)
    trainer = grpo_trainer(world, engine, cfg)  # fresh adapters (B = 0): the rollouts are the shipped model's
    runner = RolloutRunner(engine, WorldCritic(WorldConfig()), critic_processes=cfg.critic_processes)
    stream = iteration_goals(cfg.seed, args.goals, WorldConfig())
    t0 = time.perf_counter()
    batches = []
    for i in range(args.train_batches + args.test_batches):
        batches.append(rollout_goals(runner, world, cfg, next(stream), seed=i + 1))
        print(f"rollout batch {i + 1}: reward {float(batches[-1].rewards.mean()):.3f}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    rollout_s = time.perf_counter() - t0
    runner.close()
    engine.close()
    train, test = batches[:args.train_batches], batches[args.train_batches:]
    rows = []
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        for b in train:
            trainer.train_step(b)
        train_acc, train_margin = pair_accuracy(trainer, train)
        test_acc, test_margin = pair_accuracy(trainer, test)
        rows.append({"epoch": epoch, "updates": trainer.step, "train_accuracy": train_acc, "test_accuracy": test_acc,
                     "train_margin": train_margin, "test_margin": test_margin})
        print("epoch {epoch}: train accuracy {train_accuracy:.3f}, test accuracy {test_accuracy:.3f}, "
              "margins {train_margin:.2e} / {test_margin:.2e}".format(**rows[-1]), flush=True)
    print_table(rows, ["epoch", "updates", "train_accuracy", "test_accuracy", "train_margin", "test_margin"])
    pairs = {name: sum(len(trainer._dpo_pairs(b)) for b in bs) for name, bs in (("train", train), ("test", test))}
    print(f"pairs {pairs}; rollouts {rollout_s:.0f} s, training {time.perf_counter() - t0:.0f} s")
    write_result(args.result, {"goals": args.goals, "group_size": args.group_size, "train_batches": args.train_batches,
                               "test_batches": args.test_batches, "pairs": pairs, "lr": args.lr, "dpo_beta": args.dpo_beta,
                               "train_steps": cfg.train_steps, "lora_targets": cfg.lora_targets or "all",
                               "device": args.device, "rollout_s": rollout_s}, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
