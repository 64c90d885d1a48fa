"""bench/grpo_signal.py's measurement helpers on a tiny random DiT (CPU, seconds): the gradient of
several denoising draws is the mean of the single draws' gradients, the trainer is left as it was
(no update, step restored), the cosine is that of the flattened directions, and the parameter
groups of ``--by-group``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import grpo_signal as gs  # noqa: E402
from spiral_rt.rl.trainer import GRPOTrainer, GRPOTrainerConfig  # noqa: E402
from tests.rl.test_trainer import rollout  # noqa: E402
from tests.rollout.rollout_helpers import tiny_model  # noqa: E402


def test_gradient_averages_draws_and_leaves_the_trainer_as_it_was():
    model = tiny_model(seed=3)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow"]]], group_size=3)
    batch.advantages = torch.tensor([0.9, -0.2, -0.7], dtype=torch.float64)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None, micro_batch_size=3), emb, engine_config=ecfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    singles = []
    for step in (0, 1):
        trainer.step = step
        trainer.config.objective = "denoising"
        trainer.compute_gradients(batch)
        singles.append(torch.cat([p.grad.flatten() for p in trainer.trainable.values()]).double())
    trainer.step = 0
    per = gs.gradient(trainer, batch, "denoising", draws=2)
    assert list(per) == list(trainer.trainable)
    mean = torch.cat(list(per.values()))
    torch.testing.assert_close(mean, (singles[0] + singles[1]) / 2, rtol=1e-6, atol=1e-12)
    assert gs.cosine(singles[0], singles[1]) < 1 - 1e-6  # the draws differ
    assert trainer.step == 0 and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    pg = torch.cat(list(gs.gradient(trainer, batch, "policy_gradient", draws=1).values()))
    assert trainer.config.objective == "policy_gradient" and pg.norm() > 0


def test_groups_of_splits_by_layer_kind_and_block_third():
    names = [f"blocks.{b}.{m}.lora_{ab}" for b in range(6) for m in ("self_attn.q", "ffn.0") for ab in "AB"]
    groups = gs.groups_of(names, 6)
    assert groups["all"] == names
    assert groups["self_attn.q"] == [n for n in names if ".self_attn.q." in n] and len(groups["ffn.0"]) == 12
    assert [len(groups[f"blocks {t} third"]) for t in ("1st", "2nd", "3rd")] == [8, 8, 8]
    assert all(n.startswith(("blocks.4.", "blocks.5.")) for n in groups["blocks 3rd third"])


def test_cosine():
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert gs.cosine(a, a) == pytest.approx(1.0)
    assert gs.cosine(a, -a) == pytest.approx(-1.0)
    assert gs.cosine(a, torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)) == pytest.approx(0.0)
