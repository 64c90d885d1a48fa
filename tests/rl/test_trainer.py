"""GRPOTrainer on the CPU (tiny DiT with random weights, reference ops, fp32, rollouts from the runner).

- before any update the recomputed log-probs equal the recorded ones (context K/V rebuilt from the
  members' clean latents with the engine's context noise; per-chunk prompts), and a wrong context
  noise does not;
- loss and gradients of one step equal an independent hand-written loop (one block-causal dense
  forward over [clean context, x] per transition, float64 GRPO formula, Gaussian KL to the initial
  weights), with gradient checkpointing and uneven micro-batches;
- a few steps with a positive advantage on one member raise its log-probs;
- the "denoising" objective's loss and gradients equal a hand-written loop, and its steps lower the
  positive member's denoising error relative to the others';
- the "dpo" objective's gradient equals autograd of the literal pair loss, tied groups add nothing,
  and its steps favour the winner over the loser;
- LoRA leaves the base weights unchanged, the reference is the base model, merge / unmerge are exact;
- save -> load gives identical parameters, optimizer state and continuation;
- a two-process gloo run completes a step with identical parameters on both ranks;
- configuration and batch errors name the argument.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from spiral_rt.cache import GlobalPolicy, SinkWindowPolicy
from spiral_rt.models.attention import DenseAttention
from spiral_rt.rl import GRPOLossConfig
from spiral_rt.rl.trainer import GRPOTrainer, GRPOTrainerConfig, LoRALinear, lora_disabled, merge_lora, unmerge_lora
from spiral_rt.rollout import RolloutBatch, RolloutRunner, RolloutSpec
from spiral_rt.sampling import FlowGRPOStep
from tests.rollout.rollout_helpers import embeddings, make_engine, tiny_model
from tests.spawn_helpers import run_ranks

F = 3
PROMPTS = ["a fox in snow", "the fox runs", "the fox jumps", "a cat on a wall", "fox"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rollout(model, *, plans, context_noise=0.0, group_size=3, num_chunks=3, fork_chunk=1, train_steps=(0, 1), **engine_kw):
    engine = make_engine(model, context_noise=context_noise, **engine_kw)
    emb = embeddings(model, PROMPTS)
    spec = RolloutSpec(goals=["fox"], plans=plans, num_plans=len(plans[0]), group_size=group_size,
                       num_chunks=num_chunks, fork_chunk=fork_chunk, train_steps=train_steps,
                       step_policy=FlowGRPOStep(noise_level=0.7), progress=False)
    with torch.no_grad():
        batch = RolloutRunner(engine, prompt_embeddings=emb).run(spec)
    return batch, engine.config, emb


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- log-prob reconstruction


def test_recomputed_log_probs_equal_recorded():
    model = tiny_model(seed=3)
    plans = [[["a fox in snow", "the fox runs", "the fox jumps"]]]  # a new prompt every chunk
    batch, ecfg, emb = rollout(model, plans=plans, context_noise=0.05, num_chunks=4, fork_chunk=2)
    assert batch.chunk.tolist() == [2, 2, 3, 3]
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None, micro_batch_size=2), emb, engine_config=ecfg)
    lp = trainer.log_probs(batch)
    torch.testing.assert_close(lp, batch.log_prob, rtol=0, atol=1e-3)
    torch.testing.assert_close(trainer.log_probs(batch, "mean"), batch.log_probs("mean"), rtol=0, atol=1e-6)
    # the first step's ratio is 1 (same weights); with advantages of both signs the loss is ~0 on average
    batch.advantages = torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64)
    stats = trainer.compute_gradients(batch)
    assert abs(stats["ratio_mean"] - 1) < 1e-6 and stats["clipfrac"] == 0
    normed = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None, loss=GRPOLossConfig(ratio_norm=True)), emb,
                         engine_config=ecfg)  # TempAct's normalised ratio (m_old from the recorded mu) is 1 too
    assert abs(normed.compute_gradients(batch)["ratio_mean"] - 1) < 1e-4
    # the reconstruction is what makes them equal: another context noise gives other log-probs
    wrong = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None), emb,
                        engine_config=dataclasses.replace(ecfg, context_noise=0.0))
    assert (wrong.log_probs(batch) - batch.log_prob).abs().max() > 1e-2


def test_recomputed_log_probs_equal_recorded_with_a_sink_window_policy():
    """A chunk's context is what the engine's policy showed it (sink + rolling window, frames evicted)."""
    model = tiny_model(seed=4)
    plans = [[["a fox in snow", "the fox runs", "the fox jumps", "fox", "a cat on a wall"]]]
    policy = SinkWindowPolicy(sink_frames=3, window_frames=3)  # from chunk 3 on, chunk 1 is out of sight
    batch, ecfg, emb = rollout(model, plans=plans, num_chunks=5, fork_chunk=3, policy=policy)
    assert sorted(set(batch.chunk.tolist())) == [3, 4]
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None), emb, engine_config=ecfg)
    torch.testing.assert_close(trainer.log_probs(batch), batch.log_prob, rtol=0, atol=1e-3)
    everything = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None), emb,
                             engine_config=dataclasses.replace(ecfg, policy=GlobalPolicy()))
    assert (everything.log_probs(batch) - batch.log_prob).abs().max() > 1e-2


# ----------------------------------------------------------------------------- loss and gradient vs a hand loop


class DetachedContext(DenseAttention):
    """Block-causal dense attention whose context keys / values (every token before the last
    ``own`` ones) carry no gradient: the trainer's "context K/V without gradients"."""

    def __init__(self, own: int, **kw):
        super().__init__(**kw)
        self.own = own

    def self_attention(self, layer, q, k, v):
        n = k.shape[1] - self.own
        k = torch.cat([k[:, :n].detach(), k[:, n:]], dim=1)
        v = torch.cat([v[:, :n].detach(), v[:, n:]], dim=1)
        return super().self_attention(layer, q, k, v)


def hand_loss(model, ref_model, batch, emb, loss_cfg: GRPOLossConfig, context_t: float) -> torch.Tensor:
    """Independent GRPO loss: per (member, transition) one dense block-causal forward over
    [clean chunks 0..c-1 at the context timestep, x at the transition's timestep] (one prompt),
    context K/V detached."""
    tpf = (batch.x.shape[4] // 2) * (batch.x.shape[5] // 2)
    text = emb[batch.prompts[0]][None]
    surrogate, kls = [], []
    for m in range(batch.num_members):
        for t in range(batch.num_transitions):
            c = int(batch.chunk[t])
            x = batch.x[m:m + 1, t]
            seq = torch.cat([batch.latents[m:m + 1, :, :c * F], x], dim=2)
            ts = torch.cat([torch.full((c * F,), context_t), torch.full((F,), float(batch.timestep[t]))])[None]
            attn = DetachedContext(F * tpf, block_frames=F, tokens_per_frame=tpf)

            def velocity(net):
                return net(seq, ts, 0, attn, net.encode_text(text))[:, :, -F:].double()

            a, b, std = batch.a[m, t], batch.b[m, t], batch.c[m, t]
            mu = a * x.double() + b * velocity(model)
            n = x.numel()
            logp = (-((batch.x_next[m:m + 1, t].double() - mu) ** 2).sum() / (2 * std**2)
                    - n * (math.log(std) + 0.5 * math.log(2 * math.pi))) / n
            ratio = torch.exp(logp - batch.log_prob[m, t] / n)
            adv = batch.advantages[m]
            clipped = ratio.clamp(1 - loss_cfg.clip_range, 1 + loss_cfg.clip_range)
            surrogate.append(torch.maximum(-adv * ratio, -adv * clipped))
            with torch.no_grad():
                mu_ref = a * x.double() + b * velocity(ref_model)
            kls.append(((mu - mu_ref) ** 2 / (2 * std**2)).mean())
    return torch.stack(surrogate).mean() + loss_cfg.kl_coef * torch.stack(kls).mean()


def moved_policy_gradients(model, trainer, batch):
    """Move the policy 0.01 N(0, 1) per weight away from the rollout's (and the reference's) weights,
    then run the trainer's gradient pass. Returns (stats, gradients by name, a copy of the moved model
    for the hand formula: a plain module, no patched block, no gradients)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    stats = trainer.compute_gradients(batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    hand_model = copy.deepcopy(model)
    hand_model.__dict__.pop("_block", None)
    hand_model.zero_grad(set_to_none=True)
    return stats, grads, hand_model


def test_loss_and_gradient_match_hand_reference():
    model = tiny_model(seed=5)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow"]]], group_size=3, num_chunks=3, fork_chunk=1)
    batch.advantages = torch.tensor([1.3, -0.4, -0.9], dtype=torch.float64)
    loss_cfg = GRPOLossConfig(clip_range=0.0004, kl_coef=0.3, kl="gaussian", convention="mean")
    reference = copy.deepcopy(model)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None, micro_batch_size=2, gradient_checkpointing=True,
                                                   loss=loss_cfg), emb, engine_config=ecfg)
    stats, grads, hand_model = moved_policy_gradients(model, trainer, batch)
    expected = hand_loss(hand_model, reference, batch, emb, loss_cfg, context_t=0.0)
    expected.backward()
    assert stats["kl"] > 0 and 0 < stats["clipfrac"] < 1  # both terms and both clip branches take part
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    for n, p in hand_model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad.float(), rtol=2e-3, atol=1e-6, msg=lambda s: f"{n}: {s}")


def hand_x0_pair(trainer, model, ref_model, batch, text, m: int, t: int, noise_key: int | None = None,
                 recorded: bool = False):
    """(x0, policy x0_hat with its graph, reference x0_hat) of member ``m`` at transition ``t``: one
    dense block-causal forward over [clean chunks 0..c-1 at t = 0, the member's clean chunk c noised at
    the transition's sigma (the trainer's draw, under ``noise_key``, default m), or with ``recorded``
    the rollout's recorded state x[m, t]], fp64 from the fp32 model output."""
    tpf = (batch.x.shape[4] // 2) * (batch.x.shape[5] // 2)
    c = int(batch.chunk[t])
    x0 = batch.latents[m:m + 1, :, c * F:(c + 1) * F].double()
    if recorded:
        x_t = batch.x[m:m + 1, t]
    else:
        x_t = trainer._denoising_input(batch, [m], t, None if noise_key is None else [noise_key])[1]
    seq = torch.cat([batch.latents[m:m + 1, :, :c * F], x_t], dim=2)
    ts = torch.cat([torch.zeros(c * F), torch.full((F,), float(batch.timestep[t]))])[None]
    attn = DetachedContext(F * tpf, block_frames=F, tokens_per_frame=tpf)

    def x0_hat(net):
        return x_t.double() - float(batch.sigma[t]) * net(seq, ts, 0, attn, net.encode_text(text))[:, :, -F:].double()

    with torch.no_grad():
        ref = x0_hat(ref_model)
    return x0, x0_hat(model), ref


def hand_denoising_terms(trainer, model, ref_model, batch, emb, kl_coef: float,
                         recorded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent advantage-weighted denoising loss and per-member mean error (``hand_x0_pair`` per
    member and transition, one prompt)."""
    text = emb[batch.prompts[0]][None]
    terms, mse = [], torch.zeros(batch.num_members, dtype=torch.float64)
    for m in range(batch.num_members):
        for t in range(batch.num_transitions):
            x0, pred, ref = hand_x0_pair(trainer, model, ref_model, batch, text, m, t, recorded=recorded)
            err = ((pred - x0) ** 2).mean()
            mse[m] += err.detach() / batch.num_transitions
            terms.append(batch.advantages[m] * err + kl_coef * ((pred - ref) ** 2).mean())
    return torch.stack(terms).mean(), mse


@pytest.mark.parametrize("denoising_input", ["fresh", "recorded"])
def test_denoising_objective_matches_hand_reference(denoising_input):
    model = tiny_model(seed=5)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow"]]], group_size=3, num_chunks=3, fork_chunk=1)
    batch.advantages = torch.tensor([1.3, -0.4, -0.9], dtype=torch.float64)
    reference = copy.deepcopy(model)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None, micro_batch_size=2, objective="denoising",
                                                   denoising_input=denoising_input,
                                                   loss=GRPOLossConfig(kl_coef=3.0)), emb, engine_config=ecfg)
    stats, grads, hand_model = moved_policy_gradients(model, trainer, batch)
    expected, mse = hand_denoising_terms(trainer, hand_model, reference, batch, emb, kl_coef=3.0,
                                         recorded=denoising_input == "recorded")
    expected.backward()
    assert stats["kl"] > 0 and stats["denoise_mse"] == pytest.approx(mse.mean().item(), rel=1e-4)
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    for n, p in hand_model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad.float(), rtol=2e-3, atol=1e-6, msg=lambda s: f"{n}: {s}")


def test_denoising_objective_favours_the_positive_member():
    model = tiny_model(seed=7)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow", "the fox runs"]]], group_size=3)
    batch.advantages = torch.tensor([1.2, -0.6, -0.6], dtype=torch.float64)
    reference = copy.deepcopy(model)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=4, lora_alpha=8.0, lr=3e-3, micro_batch_size=3,
                                                   objective="denoising", loss=GRPOLossConfig(kl_coef=3.0)),
                          emb, engine_config=ecfg)
    with torch.no_grad():  # the trainer's step 0 noise draw, kept for every measurement
        before = hand_denoising_terms(trainer, model, reference, batch, emb, 0.0)[1]
    first = trainer.compute_gradients(batch)
    assert first["kl"] == 0.0  # fresh adapters: the policy equals the reference on the same draw
    for _ in range(5):
        assert math.isfinite(trainer.train_step(batch)["loss"])
    trainer.step = 0
    with torch.no_grad():
        after = hand_denoising_terms(trainer, model, reference, batch, emb, 0.0)[1]
    change = after - before
    assert change[0] < 0 and change[0] < change[1] and change[0] < change[2], change


def test_positive_denoising_weights_fit_only_the_members_above_the_mean():
    model = tiny_model(seed=9)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow"]]], group_size=3)
    batch.advantages = torch.tensor([1.1, 0.2, -1.3], dtype=torch.float64)
    grads = {}
    for weights, adv in (("positive", batch.advantages), ("advantage", batch.advantages.clamp_min(0))):
        net = copy.deepcopy(model)
        trainer = GRPOTrainer(net, GRPOTrainerConfig(lora_rank=None, micro_batch_size=2, objective="denoising",
                                                     denoising_weights=weights), emb, engine_config=ecfg)
        trainer.compute_gradients(dataclasses.replace(batch, advantages=adv))
        grads[weights] = torch.cat([p.grad.flatten() for p in net.parameters()])
    torch.testing.assert_close(grads["positive"], grads["advantage"], rtol=0, atol=0)
    assert grads["positive"].abs().sum() > 0


def hand_dpo_terms(trainer, model, ref_model, batch, emb, pairs, beta: float, kl_coef: float):
    """Literal Diffusion-DPO loss over ``pairs`` ((winner, loser) rows): per pair and transition both
    members' errors through their own dense block-causal forward (graphs kept, as the formula reads),
    d = mse_policy - mse_reference on the trainer's x_t (both members on the winner's eps), then -log sigmoid(-beta (d_w - d_l)), mean over
    pairs and transitions, plus kl_coef * mean (x0_hat - x0_ref)^2 over the paired members. Returns
    (loss, the pair term alone, the mean of d_l - d_w)."""
    def terms(m, t, noise_key):
        text = emb[batch.prompts[int(batch.prompt_ids[m, int(batch.chunk[t])])]][None]  # one prompt per plan here
        x0, pred, ref = hand_x0_pair(trainer, model, ref_model, batch, text, m, t, noise_key)
        return ((pred - x0) ** 2).mean() - ((ref - x0) ** 2).mean(), ((pred - ref) ** 2).mean()

    pair_losses, kls, margins = [], [], []
    for w, l in pairs:
        for t in range(batch.num_transitions):
            (d_w, kl_w), (d_l, kl_l) = terms(w, t, w), terms(l, t, w)  # the pair shares the winner's noise
            pair_losses.append(-torch.nn.functional.logsigmoid(-beta * (d_w - d_l)))
            kls += [kl_w, kl_l]
            margins.append((d_l - d_w).detach())
    pair = torch.stack(pair_losses).mean()
    return pair + kl_coef * torch.stack(kls).mean(), pair, torch.stack(margins).mean()


def dpo_batch(model):
    """Two execution groups (plans) of three members, one prompt each."""
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow"], ["a cat on a wall"]]], group_size=3, num_chunks=3)
    assert batch.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    return batch, ecfg, emb


@pytest.mark.parametrize("micro_batch_size", [2, 5])
def test_dpo_gradient_equals_autograd_of_the_pair_loss(micro_batch_size):
    """The trainer's two passes (reference errors, then one policy backward of the analytic weights
    times the errors) give the gradient of the literal pair loss. fp32 forwards against float64
    arithmetic on fp32 forwards: rtol 2e-3, atol 1e-6 (as the other hand-loop comparisons)."""
    model = tiny_model(seed=5)
    batch, ecfg, emb = dpo_batch(model)
    batch.rewards = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1, 0.7], dtype=torch.float64)  # winners 1, 3 (first of equals)
    reference = copy.deepcopy(model)
    beta, kl_coef = 30.0, 0.5
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None, micro_batch_size=micro_batch_size, objective="dpo",
                                                   dpo_beta=beta, gradient_checkpointing=True,
                                                   loss=GRPOLossConfig(kl_coef=kl_coef)), emb, engine_config=ecfg)
    assert trainer._dpo_pairs(batch) == [(1, 0), (3, 4)]
    stats, grads, hand_model = moved_policy_gradients(model, trainer, batch)
    expected, pair, margin = hand_dpo_terms(trainer, hand_model, reference, batch, emb, [(1, 0), (3, 4)], beta, kl_coef)
    expected.backward()
    # the sigmoid is neither saturated nor linear here, and both terms take part
    assert 0.05 < stats["dpo_margin_abs"] * beta < 5 and stats["kl"] > 0
    assert stats["dpo_pairs"] == 2 and stats["transitions"] == 2 * 2 * batch.num_transitions
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    assert stats["policy_loss"] == pytest.approx(pair.item(), rel=1e-4, abs=1e-7)
    assert stats["dpo_margin"] == pytest.approx(margin.item(), rel=1e-3, abs=1e-8)
    for n, p in hand_model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad.float(), rtol=2e-3, atol=1e-6, msg=lambda s: f"{n}: {s}")


def test_dpo_groups_with_equal_rewards_contribute_nothing():
    model = tiny_model(seed=6)
    batch, ecfg, emb = dpo_batch(model)
    reference = copy.deepcopy(model)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None, micro_batch_size=4, objective="dpo", dpo_beta=30.0),
                          emb, engine_config=ecfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    # every group tied: no pair, no gradient at all
    batch.rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0, 1.0], dtype=torch.float64)
    stats = trainer.compute_gradients(batch)
    assert stats["dpo_pairs"] == 0 and stats["loss"] == 0.0 and stats["transitions"] == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # one group tied: the gradient is the other group's pair loss alone
    batch.rewards = torch.tensor([0.5, 0.5, 0.5, 0.3, 1.0, 0.6], dtype=torch.float64)
    assert trainer._dpo_pairs(batch) == [(4, 3)]
    trainer.compute_gradients(batch)
    hand_model = copy.deepcopy(model)
    hand_model.zero_grad(set_to_none=True)
    hand_dpo_terms(trainer, hand_model, reference, batch, emb, [(4, 3)], 30.0, 0.0)[0].backward()
    for (n, p), q in zip(model.named_parameters(), hand_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=2e-3, atol=1e-6, msg=lambda s: f"{n}: {s}")


def test_dpo_pair_members_share_their_noise():
    model = tiny_model(seed=7)
    batch, ecfg, emb = dpo_batch(model)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=None, objective="dpo"), emb, engine_config=ecfg)
    sigma = float(batch.sigma[0])
    x0, x_t = trainer._denoising_input(batch, [1, 0], 0, noise_keys=[1, 1])
    eps = (x_t.float() - (1 - sigma) * x0) / sigma
    torch.testing.assert_close(eps[0], eps[1], rtol=1e-5, atol=1e-5)  # same draw for winner and loser
    _, apart = trainer._denoising_input(batch, [1, 0], 0)
    eps_apart = (apart.float() - (1 - sigma) * x0) / sigma
    assert not torch.allclose(eps_apart[0], eps_apart[1], atol=0.1)  # the members' own keys differ


def test_dpo_steps_favour_the_winner_over_the_loser():
    model = tiny_model(seed=7)
    batch, ecfg, emb = dpo_batch(model)
    batch.rewards = torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=4, lora_alpha=8.0, lr=3e-3, micro_batch_size=4,
                                                   objective="dpo", dpo_beta=300.0,
                                                   loss=GRPOLossConfig(kl_coef=0.0)), emb, engine_config=ecfg)
    first = trainer.compute_gradients(batch)  # fresh adapters: the policy is the reference, d = 0
    assert first["dpo_margin"] == 0.0 and first["policy_loss"] == pytest.approx(math.log(2))
    for _ in range(4):
        assert math.isfinite(trainer.train_step(batch)["loss"])
    trainer.step = 0  # the first step's noise draws again
    after = trainer.compute_gradients(batch)
    assert after["dpo_margin"] > 0 and after["dpo_accuracy"] == 1.0 and after["policy_loss"] < math.log(2)


# ----------------------------------------------------------------------------- learning signal


def test_positive_advantage_raises_that_members_log_prob():
    model = tiny_model(seed=7)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow", "the fox runs"]]], context_noise=0.05)
    batch.advantages = torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=4, lora_alpha=8.0, lr=3e-3, micro_batch_size=3,
                                                   loss=GRPOLossConfig(convention="mean", clip_range=0.2)),
                          emb, engine_config=ecfg)
    before = trainer.log_probs(batch, "mean")
    for _ in range(4):
        stats = trainer.train_step(batch)
        assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    after = trainer.log_probs(batch, "mean")
    gain = (after - before).mean(dim=1)
    assert gain[0] > 0, gain
    assert gain[0] > gain[1] and gain[0] > gain[2], gain
    assert trainer.step == 4


def test_a_list_of_batches_accumulates_their_mean_gradient():
    """train_step([b1, b2]) is one update on the mean of the two batches' losses."""
    model = tiny_model(seed=5)
    b1, ecfg, emb = rollout(model, plans=[[["a fox in snow", "the fox runs"]]], context_noise=0.05)
    b2, _, _ = rollout(model, plans=[[["a cat on a wall", "fox"]]], context_noise=0.05)
    b1.advantages = torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64)
    b2.advantages = torch.tensor([-1.0, 0.25, 0.75], dtype=torch.float64)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=4, lora_alpha=8.0, lr=1e-3, micro_batch_size=2,
                                                   loss=GRPOLossConfig(kl_coef=0.0)), emb, engine_config=ecfg)
    grads = []
    for batches in ([b1], [b2], [b1, b2]):
        stats = trainer.compute_gradients(batches)
        grads.append({n: p.grad.clone() for n, p in trainer.trainable.items() if p.grad is not None})
    assert stats["transitions"] == b1.num_members * b1.num_transitions + b2.num_members * b2.num_transitions
    assert grads[2] and set(grads[2]) == set(grads[0])
    for n in grads[2]:
        torch.testing.assert_close(grads[2][n], (grads[0][n] + grads[1][n]) / 2, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="'batch' is an empty list"):
        trainer.compute_gradients([])


def test_transition_advantages_credit_each_transition_on_its_own():
    """Step credit: (M, T) advantages. Equal columns give the member-level gradient; a transition's
    gradient is that of its own advantage (zero elsewhere: only that transition moves the weights)."""
    model = tiny_model(seed=6)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow", "the fox runs"]]], context_noise=0.05)
    assert batch.num_transitions >= 2
    adv = torch.tensor([1.0, -0.25, -0.75], dtype=torch.float64)
    trainer = GRPOTrainer(model, GRPOTrainerConfig(lora_rank=4, lora_alpha=8.0, lr=1e-3, micro_batch_size=2,
                                                   loss=GRPOLossConfig(kl_coef=0.0)), emb, engine_config=ecfg)

    def grads(member=None, per_transition=None):
        batch.advantages, batch.transition_advantages = member, per_transition
        trainer.compute_gradients(batch)
        return {n: p.grad.clone() for n, p in trainer.trainable.items() if p.grad is not None}

    member = grads(member=adv)
    same = grads(per_transition=adv[:, None].expand(-1, batch.num_transitions).clone())
    for n in member:
        torch.testing.assert_close(same[n], member[n], rtol=1e-6, atol=1e-12)
    parts = []
    for t in range(batch.num_transitions):
        only_t = torch.zeros(batch.num_members, batch.num_transitions, dtype=torch.float64)
        only_t[:, t] = adv
        parts.append(grads(per_transition=only_t))
    for n in member:  # the policy loss is linear in the advantages (ratio 1, nothing clipped)
        torch.testing.assert_close(sum(p[n] for p in parts), member[n], rtol=1e-5, atol=1e-10)
    batch.transition_advantages = torch.zeros(batch.num_members, batch.num_transitions + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="transition_advantages"):
        trainer.compute_gradients(batch)
    batch.transition_advantages = torch.zeros(batch.num_members, batch.num_transitions, dtype=torch.float64)
    batch.rewards = torch.zeros(batch.num_members, dtype=torch.float64)
    recompute = GRPOTrainer(tiny_model(seed=6), GRPOTrainerConfig(lora_rank=4, recompute_advantages=True), emb,
                            engine_config=ecfg)
    with pytest.raises(ValueError, match="recompute_advantages"):
        recompute.compute_gradients(batch)


# ----------------------------------------------------------------------------- LoRA


def test_lora_keeps_base_weights_and_reference_is_base():
    model = tiny_model(seed=9)
    base = copy.deepcopy(model)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow"]]], group_size=2, train_steps=(1,))
    batch.advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    cfg = GRPOTrainerConfig(lora_rank=4, lr=1e-2, loss=GRPOLossConfig(kl_coef=0.1, kl="velocity_mse"))
    trainer = GRPOTrainer(model, cfg, emb, engine_config=ecfg)
    assert trainer.reference_kind == "lora_disabled" and trainer.reference_model is None
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 2 * 8 and all(n.endswith(cfg.lora_targets) for n in adapted)
    assert set(trainer.trainable) == {f"{n}.{w}" for n in adapted for w in ("lora_A", "lora_B")}
    for _ in range(2):
        stats = trainer.train_step(batch)
    assert stats["kl"] > 0
    now = dict(model.named_parameters())
    for n, p in base.named_parameters():  # same names, unchanged values
        assert torch.equal(now[n], p), n
    assert any(now[f"{n}.lora_B"].abs().max() > 0 for n in adapted)

    x = batch.x[:, 0]
    ts = torch.full((2, F), 500.0)
    text = model.encode_text(emb["a fox in snow"][None])
    with torch.no_grad():
        with lora_disabled(model):
            ref_out = model(x, ts, 0, None, text)
        torch.testing.assert_close(ref_out, base(x, ts, 0, None, base.encode_text(emb["a fox in snow"][None])))
        lora_out = model(x, ts, 0, None, text)
        assert (lora_out - ref_out).abs().max() > 1e-5
        merge_lora(model)
        torch.testing.assert_close(model(x, ts, 0, None, text), lora_out, rtol=1e-4, atol=1e-5)
        with lora_disabled(model):  # disabled while merged still computes the base
            torch.testing.assert_close(model(x, ts, 0, None, text), ref_out, rtol=1e-4, atol=1e-5)
        unmerge_lora(model)
    for n, p in base.named_parameters():
        torch.testing.assert_close(now[n], p, rtol=0, atol=1e-6)


def test_timestep_gated_adapters_act_only_at_their_timesteps():
    """GRPOTrainerConfig.lora_timesteps: after updates, forwards at the trained steps' timesteps use the
    adapters and every other forward is the base model exactly; the update still follows the advantage,
    and a gated adapter refuses to be folded into the weights."""
    from spiral_rt.rl.trainer import lora_merged_state_dict

    model = tiny_model(seed=9)
    base = copy.deepcopy(model)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow"]]], group_size=2, train_steps=(1,))
    batch.advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    trained_t = float(ecfg.schedule.model_timesteps[1])
    cfg = GRPOTrainerConfig(lora_rank=4, lr=1e-2, lora_timesteps=(trained_t,))
    trainer = GRPOTrainer(model, cfg, emb, engine_config=ecfg)
    before = trainer.log_probs(batch)
    for _ in range(2):
        trainer.train_step(batch)
    after = trainer.log_probs(batch)
    assert after[0, 0] - before[0, 0] > after[1, 0] - before[1, 0]  # the positive member gained
    x = batch.x[:, 0]
    text = model.encode_text(emb["a fox in snow"][None])
    base_text = base.encode_text(emb["a fox in snow"][None])
    with torch.no_grad():
        for t, gated_on in ((trained_t, True), (500.0, False), (trained_t + 0.5, False)):
            ts = torch.full((2, F), t)
            out, ref = model(x, ts, 0, None, text), base(x, ts, 0, None, base_text)
            if gated_on:
                assert (out - ref).abs().max() > 1e-5
            else:
                assert torch.equal(out, ref), t
        mixed = torch.full((2, F), trained_t)
        mixed[1] = 500.0  # a forward mixing trained and other timesteps runs without adapters
        assert torch.equal(model(x, mixed, 0, None, text), base(x, mixed, 0, None, base_text))
    with pytest.raises(ValueError, match="gated"):
        lora_merged_state_dict(model)
    with pytest.raises(ValueError, match="lora_timesteps"):
        GRPOTrainerConfig(lora_rank=None, lora_timesteps=(trained_t,)).validate()


# ----------------------------------------------------------------------------- checkpoints


def test_save_resume_gives_identical_state(tmp_path):
    model = tiny_model(seed=11)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow"]]], group_size=2)
    batch.advantages = torch.tensor([0.7, -0.7], dtype=torch.float64)
    initial = copy.deepcopy(model)
    cfg = GRPOTrainerConfig(lora_rank=None, lr=1e-3, weight_decay=0.01, checkpoint_dir=str(tmp_path / "ckpt"),
                            checkpoint_interval=2, loss=GRPOLossConfig(kl_coef=0.05))
    a = GRPOTrainer(model, cfg, emb, engine_config=ecfg)
    a.train_step(batch)
    a.train_step(batch)
    saved = tmp_path / "ckpt" / "step-00000002"
    assert (saved / "weights.safetensors").is_file() and (saved / "optimizer.pt").is_file()

    b = GRPOTrainer(initial, dataclasses.replace(cfg, checkpoint_dir=None, checkpoint_interval=0), emb,
                    engine_config=ecfg)
    b.load(saved)
    assert b.step == 2
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(initial.named_parameters())[n]), n
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name]), (k, name)
    a.train_step(batch)
    b.train_step(batch)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, dict(initial.named_parameters())[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="'path'"):
        b.load(tmp_path / "nothing")


# ----------------------------------------------------------------------------- two processes (gloo)


def select(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """The members ``rows`` of ``batch`` (per-member tensors indexed, per-transition ones kept)."""
    kw = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        per_member = isinstance(v, torch.Tensor) and f.name not in ("chunk", "step", "sigma", "sigma_next", "timestep",
                                                                      "plan_rewards", "plan_advantages")
        kw[f.name] = v[rows] if per_member else v
    return RolloutBatch(**kw)


def _gloo_worker(rank: int, data_dir: str) -> None:
    data = Path(data_dir)
    batch = RolloutBatch.load(data / "batch")
    ecfg, emb = torch.load(data / "setup.pt", weights_only=False)
    model = tiny_model(seed=13)
    torch.manual_seed(1000 + rank)  # different adapter inits per rank: DDP must broadcast rank 0's
    own = select(batch, [i for i in range(batch.num_members) if int(batch.group_index[i]) == rank])
    cfg = GRPOTrainerConfig(lora_rank=4, lr=1e-2, recompute_advantages=True, micro_batch_size=1)
    trainer = GRPOTrainer(model, cfg, emb, engine_config=ecfg)
    assert trainer.distributed and trainer.world_size == 2
    stats = trainer.train_step(own)
    torch.save({"params": {n: p.detach() for n, p in trainer.trainable.items()}, "stats": stats},
               data / f"rank{rank}.pt")


def test_two_process_gloo_step(tmp_path):
    model = tiny_model(seed=13)
    batch, ecfg, emb = rollout(model, plans=[[["a fox in snow"], ["a cat on a wall"]]], group_size=2, num_chunks=2,
                               train_steps=(0,))
    batch.rewards = torch.tensor([0.9, 0.1, 0.2, 0.6], dtype=torch.float64)
    batch.save(tmp_path / "batch")
    torch.save((ecfg, emb), tmp_path / "setup.pt")
    run_ranks(_gloo_worker, (str(tmp_path),), 2, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["params"].keys() == r1["params"].keys() and r0["params"]
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    assert any(r0["params"][n].abs().max() > 0 for n in r0["params"] if n.endswith("lora_B"))
    # each rank saw different members (its own group), yet the update is the same: gradients were averaged
    assert r0["stats"]["logp_new"] != r1["stats"]["logp_new"]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw, name", [
    (dict(lr=-1.0), "'lr'"), (dict(micro_batch_size=0), "'micro_batch_size'"), (dict(lora_rank=0), "'lora_rank'"),
    (dict(reference="lora_disabled", lora_rank=None), "'reference'"), (dict(checkpoint_interval=3), "'checkpoint_interval'"),
    (dict(grad_clip=0.0), "'grad_clip'"), (dict(lora_targets=()), "'lora_targets'"), (dict(objective="ppo"), "'objective'"),
    (dict(denoising_weights="negative"), "'denoising_weights'"), (dict(dpo_beta=0.0), "'dpo_beta'"),
    (dict(objective="denoising", denoising_input="clean"), "'denoising_input'"),
    (dict(objective="dpo", denoising_input="recorded"), "'denoising_input'"),
    (dict(dpo_beta=-1.0), "'dpo_beta'"), (dict(dpo_beta=float("nan")), "'dpo_beta'"),
])
def test_config_errors_name_the_field(kw, name):
    with pytest.raises(ValueError, match=name):
        GRPOTrainerConfig(**kw).validate()


def test_argument_errors_name_the_argument():
    model = tiny_model(seed=1)
    ecfg = make_engine(model).config
    emb = embeddings(model, PROMPTS)
    with pytest.raises(ValueError, match="'model'"):
        GRPOTrainer(torch.nn.Linear(2, 2), GRPOTrainerConfig(), emb, engine_config=ecfg)
    with pytest.raises(ValueError, match="'text'"):
        GRPOTrainer(model, GRPOTrainerConfig(), 3, engine_config=ecfg)
    with pytest.raises(ValueError, match="'engine_config'"):
        GRPOTrainer(model, GRPOTrainerConfig(), emb, engine_config=dataclasses.replace(ecfg, recache_on_switch=True))
    with pytest.raises(ValueError, match="'targets'"):
        GRPOTrainer(tiny_model(seed=1), GRPOTrainerConfig(lora_targets=("nope",)), emb, engine_config=ecfg)
    trainer = GRPOTrainer(tiny_model(seed=1), GRPOTrainerConfig(), emb, engine_config=ecfg)
    with pytest.raises(ValueError, match="'batch'"):
        trainer.train_step("not a batch")
