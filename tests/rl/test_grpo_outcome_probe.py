"""bench/grpo_outcome_probe.py's pieces (CPU, no model): the probe's noise sharing matches
RolloutSpec's own policies at its extremes and differs in exactly the named slots in between; the
spread statistics are exact on a hand-made batch."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import grpo_outcome_probe as op  # noqa: E402
from spiral_rt.rollout import RolloutSpec  # noqa: E402

STEPS = 8
KW = dict(goals=["a red circle moves left"], group_size=3, num_chunks=4, fork_chunk=1)


def test_probe_spec_shares_every_slot_but_the_named_ones():
    independent = op.probe_spec(set(range(STEPS + 1)))(**KW)
    plain = RolloutSpec(noise="independent", **KW)
    for member in range(3):
        for chunk in range(4):
            assert independent.slot_noise_ids(0, member, chunk, STEPS) == plain.slot_noise_ids(0, member, chunk, STEPS)
    one = op.probe_spec({5})(**KW)
    shared, own = one.group_noise_id(0), one.member_noise_id(0, 2)
    assert one.slot_noise_ids(0, 2, 0, STEPS) == [shared] * (STEPS + 1)  # the prefix is the group's
    for chunk in (1, 3):
        ids = one.slot_noise_ids(0, 2, chunk, STEPS)
        assert [j for j, i in enumerate(ids) if i == own] == [5] and ids.count(shared) == STEPS
    none = op.probe_spec(set())(**KW)
    assert {tuple(none.slot_noise_ids(0, m, 2, STEPS)) for m in range(3)} == {(shared,) * (STEPS + 1)}


def test_spread_statistics_on_a_hand_made_batch():
    def verdicts(*done):
        return [{"completed": d} for d in done]

    # group 0: both members complete both steps; group 1: they disagree on the first step only
    batch = SimpleNamespace(rewards=torch.tensor([1.0, 1.0, 0.5, 1.0], dtype=torch.float64),
                            verdicts=[verdicts(True, True), verdicts(True, True), verdicts(False, True), verdicts(True, True)])
    s = op.spread(batch, group_size=2)
    assert s["reward"] == 0.875
    assert abs(s["within_var"] - 0.0625 / 2) < 1e-12  # group 1's variance of (0.5, 1.0), averaged over 2 groups
    # group 1, step 1: p = 1/2, two members disagree with probability 2 p (1 - p) G / (G - 1) = 1; step 2: 0
    assert abs(s["disagree"] - (0.0 + 0.5) / 2) < 1e-12
    assert s["groups_split"] == 0.5
