"""Which noise draw of the world model's sampler decides whether a member succeeds? (outcome spread by slot)

    python bench/grpo_outcome_probe.py [--goals 8] [--batches 2] [--group-size 8] [--device cpu]

A GRPO update can only credit the denoising steps whose randomness changes the outcome. Every chunk's
noise has one slot per draw (slot 0 the initial latents, slot j >= 1 the re-noise after step j - 1 at
sigma_j; ``RolloutSpec`` module docstring). For each slot k this rolls out execution groups of the
shipped world model whose members share every draw except slot k (in every chunk after the fork), so
the members differ only by that one draw, and reads how much their rewards still differ: the mean
within-group variance of the reward (step completion) and the chance that two members disagree on a
step. Rows "independent" (no draw shared) and "none" (every draw shared: the members are identical,
variance 0, a check of the probe) bound the rest. All rows use the same goals and seeds.
Prints one row per setting and writes bench/results/grpo_outcome_probe.json (``--result`` names another).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from common import print_table, write_result
import spiral_rt.world.grpo as wgrpo
from spiral_rt.rollout import RolloutRunner, RolloutSpec
from spiral_rt.world import WorldConfig, WorldCritic
from spiral_rt.world.grpo import WorldGRPOConfig, grpo_engine, iteration_goals, rollout_goals
from spiral_rt.world.model.loader import load_world_model


def probe_spec(differing: set[int]):
    """A RolloutSpec class whose groups share every noise slot after the fork except those in ``differing``."""

    class ProbeSpec(RolloutSpec):
        def slot_noise_ids(self, group: int, member: int, chunk: int, num_steps: int) -> list[int]:
            shared, own = self.group_noise_id(group), self.member_noise_id(group, member)
            if chunk < self.fork_chunk:
                return [shared] * (num_steps + 1)
            return [own if j in differing else shared for j in range(num_steps + 1)]

    return ProbeSpec


def spread(batch, group_size: int) -> dict:
    """Reward mean, mean within-group reward variance, and the chance two members of a group disagree
    on a step's completion (over member pairs and steps)."""
    r = batch.rewards.view(-1, group_size)
    disagree = []
    for g in range(r.shape[0]):  # goals of one chunk count may still differ in their step count
        members = batch.verdicts[g * group_size:(g + 1) * group_size]
        p = torch.tensor([[float(v["completed"]) for v in m] for m in members]).mean(dim=0)  # per step
        disagree.append(float((2 * p * (1 - p) * group_size / (group_size - 1)).mean()))
    return {"reward": float(r.mean()), "within_var": float(r.var(dim=1, unbiased=False).mean()),
            "disagree": sum(disagree) / len(disagree), "groups_split": float((r.max(dim=1).values > r.min(dim=1).values).float().mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--goals", type=int, default=8, help="goals per batch (one chunk count)")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--slots", default="", help="comma-separated slots to probe (empty: every slot of the sampler)")
    p.add_argument("--result", default="grpo_outcome_probe", help="name of the result file (bench/results/NAME.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    cfg = WorldGRPOConfig(goals_per_update=args.goals, group_size=args.group_size, device=args.device, noise="independent")
    cfg.validate()
    world = load_world_model(None, device=args.device, dtype=torch.float32)  # as world GRPO runs it
    engine = grpo_engine(world, args.goals * args.group_size)
    num_steps = len(engine.config.schedule.transitions())
    sigmas = [float(s) for s, _ in engine.config.schedule.transitions()]  # slot j is drawn at sigma_j
    runner = RolloutRunner(engine, WorldCritic(WorldConfig()), critic_processes=cfg.critic_processes)
    goals = list(itertools.islice(iteration_goals(cfg.seed, args.goals, WorldConfig()), args.batches))
    slots = [int(s) for s in args.slots.split(",")] if args.slots else list(range(num_steps))
    settings = [("independent", set(range(num_steps + 1)))] + [(f"slot {k}", {k}) for k in slots] + [("none", set())]

    rows = []
    for name, differing in settings:
        t0 = time.perf_counter()
        stats = []
        wgrpo.RolloutSpec = probe_spec(differing)  # rollout_goals builds its spec from this name
        try:
            for i, batch_goals in enumerate(goals):
                stats.append(spread(rollout_goals(runner, world, cfg, batch_goals, seed=i + 1), args.group_size))
        finally:
            wgrpo.RolloutSpec = RolloutSpec
        row = {"setting": name, "sigma": sigmas[min(differing)] if len(differing) == 1 else None,
               **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print("{setting}: reward {reward:.3f}, within-group variance {within_var:.4f}, step disagreement "
              "{disagree:.3f}, groups split {groups_split:.2f} ({seconds:.0f} s)".format(**row), flush=True)
    runner.close()
    engine.close()
    print_table(rows, ["setting", "sigma", "reward", "within_var", "disagree", "groups_split", "seconds"])
    write_result(args.result, {"goals": args.goals, "batches": args.batches, "group_size": args.group_size,
                               "device": args.device, "sigmas": sigmas}, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
