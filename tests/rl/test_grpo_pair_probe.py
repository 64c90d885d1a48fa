"""bench/grpo_pair_probe.py's measurement on a tiny random DiT (CPU, seconds): the pair accuracy of
several batches is the mean of their own, read without touching the weights, the optimizer step or
the gradients; after a few DPO updates on a batch its own pairs are favoured."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import grpo_pair_probe as gp  # noqa: E402
from spiral_rt.rl.trainer import GRPOTrainer, GRPOTrainerConfig  # noqa: E402
from tests.rl.test_trainer import dpo_batch  # noqa: E402
from tests.rollout.rollout_helpers import tiny_model  # noqa: E402


def test_pair_accuracy_reads_without_updating_and_rises_on_trained_pairs():
    model = tiny_model(seed=4)
    batch, ecfg, emb = dpo_batch(model)
    batch.rewards = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1, 0.6], dtype=torch.float64)
    other, _, _ = dpo_batch(model)
    other.rewards = torch.tensor([0.8, 0.1, 0.4, 0.3, 0.9, 0.2], dtype=torch.float64)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=4, lora_alpha=8.0, lr=3e-3, micro_batch_size=4,
                                                   objective="dpo", dpo_beta=30.0), emb, engine_config=ecfg)
    for _ in range(2):
        trainer.train_step(batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = trainer.step
    acc_a, margin_a = gp.pair_accuracy(trainer, [batch])
    acc_b, margin_b = gp.pair_accuracy(trainer, [other])
    acc_ab, margin_ab = gp.pair_accuracy(trainer, [batch, other])
    assert abs(acc_ab - (acc_a + acc_b) / 2) < 1e-9 and abs(margin_ab - (margin_a + margin_b) / 2) < 1e-12
    assert trainer.step == step and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in trainer.trainable.values())
    assert acc_a > 0.5 and margin_a > 0  # two updates on its own pairs: the winners are favoured
