"""GRPOTrainer: one GRPO update of the causal DiT from a RolloutBatch (issue 7, item 2).

Algorithm of ``GRPOTrainer.train_step(batch)`` (M members on this rank, T trained transitions each;
transition t is denoising step ``batch.step[t]`` of chunk ``batch.chunk[t]``)::

    adv = batch.advantages                       (or recomputed from all ranks' gathered rewards)
    for each micro-batch of members (all at the same transitions, so they share context lengths):
        cache = ContiguousKVCache                (no gradients; current weights)
        for chunk j = 0 .. last trained chunk:
            for each trained transition t of chunk j:
                m_new  = DiT(x[:, t], t_model[t] | cache, text of chunk j)    WITH gradients
                mu_new = A x + B m_new                                       (fp32, like the sampler op)
                logp   = log N(x_next[:, t]; mu_new, C^2 I)                   (transition_log_prob)
                m_ref  = reference DiT(x | reference cache, ...)             (no grad; only with a KL term)
                loss   = grpo_loss(logp, batch log-prob, adv, KL(mu_new, mu_ref) or MSE(m_new, m_ref))
                (loss * micro-batch transitions / all transitions).backward()
            clean pass of chunk j: DiT(latents of chunk j (+ context noise), t_context), write=True; commit
    clip the gradient norm; optimizer step

With ``objective="denoising"`` the per-transition term is instead the advantage-weighted denoising
loss of the member's clean chunk j, noised afresh at the transition's sigma (same contexts, same
reference): adv * mean (x0_hat - x0)^2 + kl_coef * mean (x0_hat - x0_ref)^2, x0_hat = x_t - sigma v.

With ``objective="dpo"`` (Diffusion-DPO, Wallace et al. 2023) each execution group whose rewards are
not all equal gives one pair, its best-rewarded member w and its worst l; at each trained transition
both are noised afresh as above, with the same eps (as in the paper: the pair's difference is then
the models' preference, not the two draws') and, with d = mse_theta - mse_ref (mean (x0_hat - x0)^2
of the policy minus that of the reference, on the same x_t), the pair's loss is
-log sigmoid(-beta (d_w - d_l)).
Only the paired members are forwarded: a no-grad reference pass, then one policy pass per micro-batch
of whole pairs whose backward is of sum(weight * mse_theta) with the analytic weights
+-beta sigmoid(beta (d_w - d_l)) (detached): the pair loss's gradient without a second policy graph.

The context reconstruction mirrors the engine's chunk loop (``Engine.chunk_sequence``): a chunk's K/V
come from a clean pass over its clean latents (``batch.latents``) at the context timestep
``context_noise * num_train_timesteps``, attending to the earlier chunks' K/V, with the chunk's own
prompt. With ``context_noise > 0`` the clean pass input is ``(1 - s) x + s eps``, eps the Philox draw
keyed ``(seed, noise id of slot num_steps, chunk, num_steps + 1)`` exactly as the engine (prefix
chunks) and the rollout runner (chunks after the fork: explicit noise in the latent dtype) drew it.
Before any update the recomputed log-probs therefore equal the recorded ones (ratio 1).

Policy parameterisation: LoRA adapters (``LoRALinear``, a built-in nn.Linear subclass keeping the
base parameter names; peft is not required) with the reference = the same model with adapters
disabled, or full fine-tuning with the reference = a frozen deep copy of the initial weights.
With ``lora_timesteps`` the adapters act only at the trained steps' timesteps: shared linears would
otherwise carry an update credited to a few steps into every step and the clean pass.
Gradient checkpointing wraps each DiT block call (``CausalWanDiT._block``, patched on the instance,
the model's code is not edited) in ``torch.utils.checkpoint``. bf16 autocast is used on CUDA only.

Distributed: when ``torch.distributed`` is initialised the policy forward is wrapped in DDP
(gradients averaged over ranks; ``no_sync`` for every backward of a step but the last), each rank
trains on its own members (whole execution groups, so prefixes stay local), rewards are
all-gathered when the trainer recomputes advantages, and only rank 0 writes checkpoints.

Boundaries: uses the model, attention contexts, sampler op and GRPO loss as they are. Not
reconstructed (``ValueError`` at construction): LongLive re-cache at prompt switches
(``EngineConfig.recache_on_switch``). A sink-window cache policy is reconstructed: each chunk's
context shows the frames ``visible_context_frames`` gives for the engine's policy.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from spiral_rt.cache import visible_context_frames
from spiral_rt.engine.config import EngineConfig
from spiral_rt.models.attention import ContiguousKVCache
from spiral_rt.models.dit import CausalWanDiT, TextConditioning
from spiral_rt.ops import sampler_step
from spiral_rt.sampling import transition_log_prob

from .advantages import AdvantageConfig, group_advantages
from .loss import GRPOLossConfig, gaussian_kl, grpo_loss, normalized_log_ratio, velocity_mse

logger = logging.getLogger(__name__)

__all__ = ["GRPOTrainerConfig", "GRPOTrainer", "LoRALinear", "inject_lora", "gate_lora_by_timestep", "lora_parameters",
           "lora_disabled", "merge_lora", "unmerge_lora", "DEFAULT_LORA_TARGETS"]

DEFAULT_LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
                        "ffn.0", "ffn.2")
"""Linear layers of every DiT block that get adapters by default (suffixes of module names)."""

OBJECTIVES = ("policy_gradient", "denoising", "dpo")
"""``GRPOTrainerConfig.objective`` values."""
DENOISING_WEIGHTS = ("advantage", "positive")
"""``GRPOTrainerConfig.denoising_weights`` values."""
DENOISING_INPUTS = ("fresh", "recorded")
"""``GRPOTrainerConfig.denoising_input`` values."""

TextProvider = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]


# ----------------------------------------------------------------------------- configuration


@dataclass
class GRPOTrainerConfig:
    """How ``GRPOTrainer`` updates the DiT."""

    lr: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value before the optimizer step (None: no clipping)."""
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    """The GRPO objective: clip range, KL weight and kind, log-prob convention, ratio normalisation."""
    reference: Literal["auto", "frozen_copy", "lora_disabled"] = "auto"
    """Reference policy of the KL term: "frozen_copy" (a deep copy of the initial weights; full
    fine-tuning), "lora_disabled" (the same model with adapters off; needs LoRA), or "auto" (the
    latter with LoRA, the former without). No reference is built when ``loss.kl_coef`` is 0."""
    lora_rank: int | None = 16
    """LoRA rank; None: full fine-tuning of every parameter."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapter output is multiplied by alpha / rank."""
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """nn.Linear modules that get adapters: a module matches when its name equals an entry or ends
    with "." + entry (e.g. "self_attn.q" matches "blocks.3.self_attn.q")."""
    lora_timesteps: tuple[float, ...] | None = None
    """With LoRA: the adapters act only in forwards at these timesteps (``gate_lora_by_timestep``;
    the trained steps' t), so an update changes the trained steps alone and every other step and
    the clean pass stay the base model's; None: the adapters act in every forward."""
    objective: Literal["policy_gradient", "denoising", "dpo"] = "policy_gradient"
    """"policy_gradient": the clipped GRPO objective on the recorded transitions' log-probs (module
    docstring). "denoising": advantage-weighted denoising, a GRPO update whose per-member likelihood
    is the denoising bound of its clean video (the flow-matching loss, as Diffusion-DPO and
    DiffusionNFT use it): at each trained transition the member's clean chunk is noised afresh at the
    step's sigma, and the loss is adv * mean (x0_hat - x0)^2 + kl_coef * mean (x0_hat - x0_ref)^2;
    a supervised target instead of one Gaussian draw's direction, so far less gradient noise per
    sample. Keep ``loss.kl_coef`` above the largest |advantage| (~2.7 for groups of 8): the per-sample
    loss is then a convex quadratic in x0_hat, bounded for negative advantages too. "dpo": Diffusion-DPO
    on each group's best- vs worst-rewarded member (module docstring; ``dpo_beta``), the reference
    being the adapters-disabled model (or the frozen copy); ``loss.kl_coef`` > 0 adds the same
    kl_coef * mean (x0_hat - x0_ref)^2 as "denoising", over the paired members."""
    denoising_weights: Literal["advantage", "positive"] = "advantage"
    """Member weights of the "denoising" objective: the advantage (members below their group's mean
    are pushed away from their own videos), or "positive": max(advantage, 0), only the members above
    the mean are fitted (reward-weighted regression on the group's better videos; bounded without
    a KL term, where pushing away is not: five unregularised updates at lr 3e-3 on one batch dropped
    fresh groups' reward from 0.68 to 0.11, bench/NOTES.md session 11)."""
    denoising_input: Literal["fresh", "recorded"] = "fresh"
    """The x_t of the "denoising" objective: "fresh" (the member's clean chunk noised afresh at the
    transition's sigma: the flow-matching loss on the member's video) or "recorded" (the state the
    rollout's sampler fed the model at that transition: the model is fitted where the sampler runs
    it, from its own intermediate states to the member's final clean chunk; with a re-noise sampler
    those states carry the blurred x0 predictions of earlier steps, which fresh noising of clean
    latents never shows). "dpo" noises its pairs afresh only. Measured on the world model with every
    step trained and the adapters ungated, positive weights, lr 1e-3: the reward fell to 0 within
    10 updates, each update fitting the members' ever worse videos (bench/NOTES.md, session 24)."""
    dpo_beta: float = 1000.0
    """Inverse temperature of the "dpo" objective: the pair loss is -log sigmoid(-dpo_beta (d_w - d_l)),
    d a member's denoising error (mean over latent elements, fp32) minus the reference's. The world
    model's errors are 0.01-0.025 in latent units; on the CPU goal-pool run (lr 5e-4, bench/NOTES.md
    session 21) the mean |d_w - d_l| was 3e-4 after one update and 0.6-2.7e-3 from then on, so 1000
    puts dpo_beta * |d_w - d_l| at ~1-2.5: the sigmoid's bend, neither saturated at once nor linear
    (where DPO would be the unregularised +1 / -1 weighted denoising loss). 10000 did worse on the
    same goal pool (session 22)."""
    gradient_checkpointing: bool = False
    """Recompute each DiT block in the backward pass (torch.utils.checkpoint around the model's
    per-block call), trading compute for activation memory."""
    bf16_autocast: bool = True
    """Run the forwards under torch.autocast(bfloat16) on CUDA (ignored on the CPU)."""
    micro_batch_size: int = 4
    """Members per forward / backward (one transition of each at a time)."""
    recompute_advantages: bool = False
    """Recompute advantages from ``batch.rewards`` (all-gathered over ranks, normalised within each
    execution group with ``advantage``) instead of using ``batch.advantages``."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Group normalisation used when ``recompute_advantages``."""
    checkpoint_dir: str | None = None
    """Directory of periodic checkpoints (``step-NNNNNNNN`` subdirectories); None: none."""
    checkpoint_interval: int = 0
    """Save every this many optimizer steps into ``checkpoint_dir`` (0: only explicit ``save``)."""

    def validate(self) -> None:
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"GRPOTrainerConfig: '{name}' must be a finite float >= 0, got {v!r}")
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"GRPOTrainerConfig: 'betas' must be two floats in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"GRPOTrainerConfig: 'grad_clip' must be None or > 0, got {self.grad_clip!r}")
        if not isinstance(self.loss, GRPOLossConfig):
            raise ValueError(f"GRPOTrainerConfig: 'loss' must be a GRPOLossConfig, got {type(self.loss).__name__}")
        if self.reference not in ("auto", "frozen_copy", "lora_disabled"):
            raise ValueError(f"GRPOTrainerConfig: 'reference' must be 'auto', 'frozen_copy' or 'lora_disabled', "
                             f"got {self.reference!r}")
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                                           or self.lora_rank < 1):
            raise ValueError(f"GRPOTrainerConfig: 'lora_rank' must be None or a positive int, got {self.lora_rank!r}")
        if self.lora_timesteps is not None and (self.lora_rank is None or not self.lora_timesteps):
            raise ValueError("GRPOTrainerConfig: 'lora_timesteps' needs LoRA ('lora_rank') and at least one timestep, "
                             f"got {self.lora_timesteps!r}")
        if self.reference == "lora_disabled" and self.lora_rank is None:
            raise ValueError("GRPOTrainerConfig: 'reference'='lora_disabled' needs LoRA ('lora_rank' is None)")
        if not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            raise ValueError(f"GRPOTrainerConfig: 'lora_alpha' must be > 0, got {self.lora_alpha!r}")
        if isinstance(self.lora_targets, str) or not self.lora_targets or not all(
                isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"GRPOTrainerConfig: 'lora_targets' must be a non-empty sequence of module names, "
                             f"got {self.lora_targets!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"GRPOTrainerConfig: 'objective' must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.denoising_weights not in DENOISING_WEIGHTS:
            raise ValueError(f"GRPOTrainerConfig: 'denoising_weights' must be one of {DENOISING_WEIGHTS}, "
                             f"got {self.denoising_weights!r}")
        if self.denoising_input not in DENOISING_INPUTS:
            raise ValueError(f"GRPOTrainerConfig: 'denoising_input' must be one of {DENOISING_INPUTS}, "
                             f"got {self.denoising_input!r}")
        if self.denoising_input == "recorded" and self.objective != "denoising":
            raise ValueError(f"GRPOTrainerConfig: 'denoising_input'='recorded' is for objective 'denoising' (a DPO pair "
                             f"needs one x_t for both members), got objective {self.objective!r}")
        if isinstance(self.dpo_beta, bool) or not isinstance(self.dpo_beta, (int, float)) or not math.isfinite(self.dpo_beta) \
                or self.dpo_beta <= 0:
            raise ValueError(f"GRPOTrainerConfig: 'dpo_beta' must be a finite number > 0, got {self.dpo_beta!r}")
        if isinstance(self.micro_batch_size, bool) or not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 1:
            raise ValueError(f"GRPOTrainerConfig: 'micro_batch_size' must be a positive int, got {self.micro_batch_size!r}")
        if not isinstance(self.advantage, AdvantageConfig):
            raise ValueError(f"GRPOTrainerConfig: 'advantage' must be an AdvantageConfig, got {type(self.advantage).__name__}")
        if isinstance(self.checkpoint_interval, bool) or not isinstance(self.checkpoint_interval, int) \
                or self.checkpoint_interval < 0:
            raise ValueError(f"GRPOTrainerConfig: 'checkpoint_interval' must be an int >= 0, got {self.checkpoint_interval!r}")
        if self.checkpoint_interval > 0 and not self.checkpoint_dir:
            raise ValueError("GRPOTrainerConfig: 'checkpoint_interval' > 0 needs 'checkpoint_dir'")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["lora_targets"] = list(self.lora_targets)
        return d


# ----------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: y = x W^T + b + (alpha / r) x A^T B^T.

    Shares the wrapped layer's ``weight`` and ``bias`` Parameters (same names in the state dict);
    ``lora_A`` (r, in) starts Kaiming-uniform, ``lora_B`` (out, r) at zero, so a fresh adapter
    leaves the output unchanged. ``enabled = False`` turns the update off (the reference policy);
    ``gate``, when set (``gate_lora_by_timestep``), is a 0-d device tensor the update is multiplied by
    (1 in forwards at the trained steps, 0 elsewhere). ``merge()`` folds the update into ``weight``
    (then the forward is a plain linear; not with a gate), ``unmerge()`` undoes it. Adapter parameters
    are fp32 and cast to the input dtype in the forward.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank = rank
        self.scale = float(alpha) / rank
        self.enabled = True
        self.merged = False
        self.gate: torch.Tensor | None = None
        self.gate_timesteps: tuple[float, ...] | None = None  # the timesteps the gate opens at

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.enabled and not self.merged:
            update = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale
            if self.gate is not None:
                update = update * self.gate.to(update.dtype)
            y = y + update.to(y.dtype)
        elif self.merged and not self.enabled:
            y = y - F.linear(x, self.delta_weight().to(x.dtype)).to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if self.gate is not None:
            raise ValueError("LoRALinear.merge: a timestep-gated adapter cannot be folded into the weight "
                             "(it would act at every step)")
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> list[str]:
    """Replace every nn.Linear of ``model`` whose name matches ``targets`` by a ``LoRALinear``; freeze
    every other parameter. Returns the adapted module names (ValueError if none matched)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and _matches(n, targets)]
    if not names:
        raise ValueError(f"inject_lora: argument 'targets' {list(targets)} matches no nn.Linear of the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    logger.info("inject_lora: %d adapters of rank %d on %s", len(names), rank, ", ".join(sorted(set(targets))))
    return names


def gate_lora_by_timestep(model: nn.Module, timesteps: Sequence[float], atol: float = 1e-3):
    """Make ``model``'s adapters act only in forwards at ``timesteps`` (argument 1 of the DiT's forward:
    (B, F) or (B,) t in [0, 1000]); in every other forward (the untrained denoising steps, the clean
    pass writing the cache) the model is the base model. A step-specific policy: an update credited to
    the trained steps changes those steps alone. The gate is computed on the device from a timesteps
    tensor (no host sync, so forwards stay capturable in CUDA graphs), or on the host from a number
    (one constant gate tensor each for open and closed); a forward mixing trained and other timesteps
    runs without adapters. Returns the hook handle (``.remove()``; the gates stay set).
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("gate_lora_by_timestep: argument 'model' has no LoRA adapters (inject_lora first)")
    if any(m.merged for m in layers):
        raise ValueError("gate_lora_by_timestep: argument 'model' has merged adapters (unmerge first)")
    allowed = sorted(float(t) for t in timesteps)
    if not allowed:
        raise ValueError("gate_lora_by_timestep: argument 'timesteps' is empty")
    cache: dict = {}  # device -> the allowed timesteps; (device, open) -> a constant gate
    for m in layers:  # off until the first forward sets it (and marked as gated for lora_merged_state_dict)
        m.gate = torch.zeros((), device=m.lora_A.device)
        m.gate_timesteps = tuple(allowed)

    def set_gates(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timesteps"]
        if not isinstance(t, torch.Tensor):  # one number for every frame: the gate is known on the host
            device = layers[0].lora_A.device
            key = (device, any(abs(float(t) - a) <= atol for a in allowed))
            if key not in cache:
                with torch.inference_mode(False):  # a normal tensor: training forwards may save it
                    cache[key] = torch.full((), float(key[1]), device=device)
            for m in layers:
                m.gate = cache[key]
            return
        if t.device not in cache:
            cache[t.device] = torch.tensor(allowed, dtype=torch.float64, device=t.device)
        near = (t.reshape(-1, 1).double() - cache[t.device]).abs() <= atol
        gate = near.any(dim=1).all().float()
        for m in layers:
            m.gate = gate

    return model.register_forward_pre_hook(set_gates, with_kwargs=True)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters (``...lora_A`` / ``...lora_B``) by name."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block every ``LoRALinear`` of ``model`` computes its base layer only."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.enabled = s


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (e.g. before exporting for the engine)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


@torch.no_grad()
def lora_merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every enabled adapter folded into its base weight and the
    adapter tensors left out: the plain model's key names (for exporting), ``model`` unchanged."""
    if any(isinstance(m, LoRALinear) and m.gate is not None for m in model.modules()):
        raise ValueError("lora_merged_state_dict: the model's adapters are timestep-gated; folded into the "
                         "weights they would act at every step (save the adapters and their timesteps instead)")
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and m.enabled and not m.merged:
            key = f"{name}.weight" if name else "weight"
            sd[key] = (m.weight.float() + m.delta_weight()).to(m.weight.dtype)
    return sd


# ----------------------------------------------------------------------------- helpers


def _checkpointed_block(self: CausalWanDiT, *args):
    """``CausalWanDiT._block`` under torch.utils.checkpoint while gradients are recorded."""
    if torch.is_grad_enabled():
        return checkpoint(type(self)._block, self, *args, use_reentrant=False)
    return type(self)._block(self, *args)


class _PolicyForward(nn.Module):
    """The trained forward as one module call (what DDP wraps): text MLP + cross K/V for the members'
    prompts (so text-side parameters get gradients), then the DiT forward against the cache."""

    def __init__(self, dit: CausalWanDiT):
        super().__init__()
        self.dit = dit

    def forward(self, x, timesteps, frame_offset, attention, embeddings: list[torch.Tensor]):
        return self.dit(x, timesteps, frame_offset, attention, _encode_texts(self.dit, embeddings))


def _encode_texts(dit: CausalWanDiT, embeddings: list[torch.Tensor]) -> TextConditioning:
    """Batched conditioning of per-row prompt embeddings (each (1, Lt, D)), each prompt encoded once
    (batch 1, like the engine) and rows concatenated."""
    uniq: dict[int, TextConditioning] = {}
    rows = []
    for e in embeddings:
        if id(e) not in uniq:
            uniq[id(e)] = dit.encode_text(e)
        rows.append(uniq[id(e)])
    if len(uniq) == 1:
        return rows[0]
    return TextConditioning.cat(rows)


def _signed(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed


# ----------------------------------------------------------------------------- the trainer


class GRPOTrainer:
    """GRPO updates of a ``CausalWanDiT`` from ``RolloutBatch`` es (module docstring).

    Args:
        model: the DiT that generated the rollouts (trained in place: adapters are injected into it
            with LoRA, its weights change with full fine-tuning).
        config: ``GRPOTrainerConfig``.
        text: prompt string -> encoder embeddings ((Lt, text_dim) or (1, Lt, text_dim)): a mapping
            (like ``RolloutRunner``'s ``prompt_embeddings``), a callable, or a text encoder with
            ``encode([prompt]).embeddings``. Embeddings are fetched once per prompt and cached.
        engine_config: the ``EngineConfig`` of the engine that ran the rollouts (chunk frames,
            schedule, context noise, latent dtype, sampler backend, cache policy, re-cache).
    """

    def __init__(self, model: CausalWanDiT, config: GRPOTrainerConfig | None = None, text: TextProvider | object = None,
                 *, engine_config: EngineConfig):
        if not isinstance(model, CausalWanDiT):
            raise ValueError(f"GRPOTrainer: argument 'model' must be a CausalWanDiT, got {type(model).__name__}")
        config = config or GRPOTrainerConfig()
        if not isinstance(config, GRPOTrainerConfig):
            raise ValueError(f"GRPOTrainer: argument 'config' must be a GRPOTrainerConfig, got {type(config).__name__}")
        config.validate()
        if not isinstance(engine_config, EngineConfig):
            raise ValueError(f"GRPOTrainer: argument 'engine_config' must be an EngineConfig, got {type(engine_config).__name__}")
        engine_config.validate()
        if engine_config.recache_on_switch:
            raise ValueError("GRPOTrainer: argument 'engine_config' has recache_on_switch=True; the trainer does not "
                             "reconstruct LongLive re-cache contexts")
        self._text_fn = self._text_provider(text)
        self.config = config
        self.engine_config = engine_config
        self.model = model
        self.device = model.patch_embedding.weight.device
        self._text_cache: dict[str, torch.Tensor] = {}

        use_lora = config.lora_rank is not None
        reference = config.reference if config.reference != "auto" else ("lora_disabled" if use_lora else "frozen_copy")
        self.reference_kind = reference
        needs_ref = (config.loss.kl_coef > 0 and config.loss.kl != "none") or config.objective == "dpo"
        self.reference_model: CausalWanDiT | None = None
        if needs_ref and reference == "frozen_copy":
            self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        if use_lora:
            self.lora_modules = inject_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha)
            if config.lora_timesteps is not None:
                gate_lora_by_timestep(model, config.lora_timesteps)
        else:
            self.lora_modules = []
            for p in model.parameters():
                p.requires_grad_(True)
        if config.gradient_checkpointing:
            model._block = types.MethodType(_checkpointed_block, model)
        model.train()

        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        self.step = 0
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self._forward = _PolicyForward(model)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._forward = nn.parallel.DistributedDataParallel(self._forward, device_ids=ids)
        logger.info("GRPOTrainer: %s, %d trainable tensors (%d values), reference %s, rank %d/%d",
                    "LoRA" if use_lora else "full fine-tuning", len(self.trainable),
                    sum(p.numel() for p in self.trainable.values()), reference if needs_ref else "none",
                    self.rank, self.world_size)

    # ------------------------------------------------------------------ text

    @staticmethod
    def _text_provider(text) -> Callable[[str], torch.Tensor]:
        if isinstance(text, Mapping):
            def lookup(prompt: str) -> torch.Tensor:
                if prompt not in text:
                    raise ValueError(f"GRPOTrainer: argument 'text' has no embeddings for prompt {prompt[:60]!r}")
                return text[prompt]
            return lookup
        if callable(getattr(text, "encode", None)):
            return lambda prompt: text.encode([prompt]).embeddings
        if callable(text):
            return text
        raise ValueError("GRPOTrainer: argument 'text' must be a mapping prompt -> embeddings, a callable, or a text "
                         f"encoder with encode(); got {type(text).__name__}")

    def _embeddings(self, prompt: str) -> torch.Tensor:
        hit = self._text_cache.get(prompt)
        if hit is None:
            emb = self._text_fn(prompt)
            emb = getattr(emb, "embeddings", emb)
            if not isinstance(emb, torch.Tensor):
                raise ValueError(f"GRPOTrainer: argument 'text' gave {type(emb).__name__} for {prompt[:40]!r}, not a tensor")
            if emb.dim() == 2:
                emb = emb[None]
            if emb.dim() != 3 or emb.shape[0] != 1:
                raise ValueError(f"GRPOTrainer: embeddings of {prompt[:40]!r} must be (Lt, D) or (1, Lt, D), "
                                 f"got {tuple(emb.shape)}")
            hit = self._text_cache[prompt] = emb.to(self.device).detach()
        return hit

    # ------------------------------------------------------------------ context reconstruction

    def _autocast(self):
        if self.device.type == "cuda" and self.config.bf16_autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_batch(self, batch) -> None:
        from spiral_rt.rollout import RolloutBatch

        if not isinstance(batch, RolloutBatch):
            raise ValueError(f"GRPOTrainer: argument 'batch' must be a RolloutBatch, got {type(batch).__name__}")
        cfg, ecfg = self.config, self.engine_config
        F_ = ecfg.chunk_frames
        if batch.x.shape[3] != F_ or tuple(batch.x.shape[4:]) != tuple(ecfg.latent_size):
            raise ValueError(f"GRPOTrainer: argument 'batch' has chunks of shape {tuple(batch.x.shape[2:])}; "
                             f"engine_config says {F_} frames of {ecfg.latent_size}")
        if cfg.loss.ratio_norm and batch.mu is None:
            raise ValueError("GRPOTrainer: loss.ratio_norm needs the rollout's means (argument 'batch' has mu=None; "
                             "run the rollout with record_mu=True)")
        step_credit = batch.transition_advantages
        if step_credit is not None and tuple(step_credit.shape) != (batch.num_members, batch.num_transitions):
            raise ValueError(f"GRPOTrainer: argument 'batch' has transition_advantages of shape {tuple(step_credit.shape)}, "
                             f"expected (members, transitions) = {(batch.num_members, batch.num_transitions)}")

    def _clean_input(self, batch, rows: list[int], chunk: int) -> torch.Tensor:
        """The clean pass input of ``chunk`` for members ``rows``: clean latents (+ context noise)."""
        ecfg = self.engine_config
        F_ = ecfg.chunk_frames
        x = batch.latents[rows, :, chunk * F_:(chunk + 1) * F_].to(self.device, ecfg.latent_dtype).contiguous()
        s = float(ecfg.context_noise)
        if s <= 0:
            return x
        num_steps = batch.noise_ids.shape[2] - 1
        seed = _signed(int(batch.spec["seed"]))
        keys = torch.tensor([[seed, int(batch.noise_ids[m, chunk, num_steps]), chunk, num_steps + 1] for m in rows],
                            dtype=torch.int64, device=self.device)
        backend = ecfg.sampler_backend
        if chunk < int(batch.spec["fork_chunk"]):  # the engine's own Philox path (prefix)
            return sampler_step(x, x, 1.0 - s, 0.0, s, noise_key=keys, return_mu=False, backend=backend).x_next
        zeros = torch.zeros_like(x)  # the runner's explicit noise: a Philox draw in the latent dtype
        eps = sampler_step(zeros, zeros, 0.0, 0.0, 1.0, noise_key=keys, return_mu=False, backend=backend).x_next
        return sampler_step(x, x, 1.0 - s, 0.0, s, noise=eps, return_mu=False, backend=backend).x_next

    @torch.no_grad()
    def _write_chunk(self, dit: CausalWanDiT, cache: ContiguousKVCache, batch, rows: list[int], chunk: int) -> None:
        """Clean pass of ``chunk`` for ``rows`` into ``cache`` (no gradients), then commit."""
        ecfg = self.engine_config
        x_in = self._clean_input(batch, rows, chunk)
        t = torch.full((len(rows), ecfg.chunk_frames), ecfg.context_noise * ecfg.schedule.num_train_timesteps,
                       dtype=torch.float32, device=self.device)
        text = _encode_texts(dit, self._row_embeddings(batch, rows, chunk))
        cache.write = True
        try:
            with self._autocast():
                dit(x_in, t, chunk * ecfg.chunk_frames, cache, text)
        finally:
            cache.write = False
        cache.commit()

    def _row_embeddings(self, batch, rows: list[int], chunk: int) -> list[torch.Tensor]:
        return [self._embeddings(batch.prompts[int(batch.prompt_ids[m, chunk])]) for m in rows]

    @contextlib.contextmanager
    def _reference_mode(self) -> Iterator[CausalWanDiT]:
        """The reference DiT (adapters disabled, or the frozen copy)."""
        if self.reference_kind == "lora_disabled":
            with lora_disabled(self.model):
                yield self.model
        else:
            yield self.reference_model

    # ------------------------------------------------------------------ per-transition terms

    def _predict(self, module, batch, rows: list[int], t: int, cache: ContiguousKVCache) -> torch.Tensor:
        """Velocity for x[rows, t] at the transition's timestep, in the latent dtype then fp32."""
        ecfg = self.engine_config
        chunk = int(batch.chunk[t])
        x = batch.x[rows, t].to(self.device, ecfg.latent_dtype)
        ts = torch.full((len(rows), ecfg.chunk_frames), float(batch.timestep[t]), dtype=torch.float32, device=self.device)
        with self._autocast():
            out = module(x, ts, chunk * ecfg.chunk_frames, cache, self._row_embeddings(batch, rows, chunk))
        return out.to(ecfg.latent_dtype).float()

    def _mean(self, batch, rows: list[int], t: int, m: torch.Tensor) -> torch.Tensor:
        """mu = A x + B m in fp32 (the sampler op's arithmetic)."""
        x = batch.x[rows, t].to(self.device, self.engine_config.latent_dtype).float()
        shape = (-1,) + (1,) * (x.dim() - 1)
        a = batch.a[rows, t].to(self.device, torch.float32).reshape(shape)
        b = batch.b[rows, t].to(self.device, torch.float32).reshape(shape)
        return a * x + b * m

    def _advantages(self, batch) -> torch.Tensor:
        """(M, T) float64 advantage of every trained transition."""
        cfg = self.config
        step_credit = batch.transition_advantages
        if not cfg.recompute_advantages:
            if step_credit is not None:
                return step_credit.double()
            if batch.advantages is None:
                raise ValueError("GRPOTrainer: argument 'batch' has no advantages (score the rollout, or set "
                                 "config.recompute_advantages with rewards)")
            return batch.advantages.double()[:, None].expand(-1, batch.num_transitions)
        if step_credit is not None:
            raise ValueError("GRPOTrainer: config.recompute_advantages recomputes member rewards' advantages; argument "
                             "'batch' carries step credit (transition_advantages): train it with recompute_advantages=False")
        return self._member_advantages(batch)[:, None].expand(-1, batch.num_transitions)

    def _member_advantages(self, batch) -> torch.Tensor:
        cfg = self.config
        if batch.rewards is None:
            raise ValueError("GRPOTrainer: config.recompute_advantages needs rewards (argument 'batch' has rewards=None)")
        rewards = batch.rewards.double().cpu()
        groups = batch.group_index.cpu()
        if self.distributed:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, (rewards, groups))
            offset = int(max(int(g.max()) for _, g in gathered)) + 1
            all_r = torch.cat([r for r, _ in gathered])
            all_g = torch.cat([g + i * offset for i, (_, g) in enumerate(gathered)])
            adv = group_advantages(all_r, all_g, cfg.advantage)
            start = sum(r.shape[0] for r, _ in gathered[:self.rank])
            return adv[start:start + rewards.shape[0]]
        return group_advantages(rewards, groups, cfg.advantage)

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def log_probs(self, batch, convention: Literal["sum", "mean"] = "sum") -> torch.Tensor:
        """(M, T) float64 log-probs of the batch's stored transitions under the current weights (no grad)."""
        if convention not in ("sum", "mean"):
            raise ValueError(f"GRPOTrainer.log_probs: argument 'convention' must be 'sum' or 'mean', got {convention!r}")
        self._check_batch(batch)
        out = torch.empty(batch.num_members, batch.num_transitions, dtype=torch.float64)
        for rows in self._micro_batches(batch.num_members):
            for t, cache in self._transitions(self.model, batch, rows):
                m = self._predict(_PolicyForward(self.model), batch, rows, t, cache)
                x_next = batch.x_next[rows, t].to(self.device)
                out[rows, t] = transition_log_prob(x_next, self._mean(batch, rows, t, m),
                                                   batch.c[rows, t].to(self.device), convention).cpu()
        return out

    def _micro_batches(self, num_members: int) -> list[list[int]]:
        size = self.config.micro_batch_size
        return [list(range(i, min(i + size, num_members))) for i in range(0, num_members, size)]

    def _transitions(self, dit: CausalWanDiT, batch, rows: list[int]) -> Iterator[tuple[int, ContiguousKVCache]]:
        """Yield (t, cache holding chunks [0, chunk[t])) for every trained transition, in chunk order."""
        ecfg = self.engine_config
        # the engine's cache policy decides which context frames each chunk sees (sink + window)
        cache = ContiguousKVCache(dit.config.num_layers, tokens_per_frame=dit.config.tokens_per_frame(*ecfg.latent_size),
                                  visible_frames=lambda n: visible_context_frames(ecfg.policy, n, ecfg.frames_per_page))
        order = sorted(range(batch.num_transitions), key=lambda t: (int(batch.chunk[t]), t))
        done = 0
        for t in order:
            chunk = int(batch.chunk[t])
            while done < chunk:
                self._write_chunk(dit, cache, batch, rows, done)
                done += 1
            yield t, cache

    def compute_gradients(self, batch) -> dict:
        """Zero the gradients, run the GRPO forward / backward over the whole batch (gradients are
        all-reduced across ranks); no optimizer step. Returns the step's statistics.

        ``batch``: one RolloutBatch, or a list of them whose gradients accumulate into one update,
        each batch weighing the same (e.g. several goals' groups: a less noisy update than one group).
        """
        batches = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        if not batches:
            raise ValueError("GRPOTrainer: argument 'batch' is an empty list")
        for b in batches:
            self._check_batch(b)
        self.optimizer.zero_grad(set_to_none=True)
        accumulate = {"policy_gradient": self._accumulate_gradients, "denoising": self._accumulate_denoising,
                      "dpo": self._accumulate_dpo}[self.config.objective]
        parts = [accumulate(b, 1.0 / len(batches), last=i == len(batches) - 1) for i, b in enumerate(batches)]
        stats = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0] if k != "transitions"}
        stats["transitions"] = sum(p["transitions"] for p in parts)
        return stats

    def _accumulate_gradients(self, batch, scale: float, last: bool) -> dict:
        """Backward of ``scale`` times one batch's GRPO loss, added to the gradients; across ranks the
        gradients are all-reduced at the last backward of the ``last`` batch (DDP no_sync before)."""
        lcfg = self.config.loss
        adv_all = self._advantages(batch)
        logp_old_all = batch.log_probs(lcfg.convention)
        need_ref = lcfg.kl_coef > 0 and lcfg.kl != "none"
        M, T = batch.num_members, batch.num_transitions
        total = M * T
        sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "ratio_mean": 0.0, "clipfrac": 0.0, "approx_kl_old": 0.0,
                "logp_new": 0.0}
        micro = self._micro_batches(M)
        backwards = len(micro) * T
        done = 0
        for rows in micro:
            n = len(rows)
            ref_m: dict[int, torch.Tensor] = {}  # the reference's predictions, from its own contexts
            if need_ref:
                with torch.no_grad(), self._reference_mode() as ref:
                    for t, rcache in self._transitions(ref, batch, rows):
                        ref_m[t] = self._predict(_PolicyForward(ref), batch, rows, t, rcache)
            for t, cache in self._transitions(self.model, batch, rows):
                done += 1
                sync = (last and done == backwards) or not self.distributed
                with (contextlib.nullcontext() if sync else self._forward.no_sync()):
                    m_new = self._predict(self._forward, batch, rows, t, cache)
                    mu_new = self._mean(batch, rows, t, m_new)
                    x_next = batch.x_next[rows, t].to(self.device)
                    c = batch.c[rows, t].to(self.device)
                    logp_new = transition_log_prob(x_next, mu_new, c, lcfg.convention)
                    logp_old = logp_old_all[rows, t].to(self.device)
                    kl = None
                    if need_ref:
                        if lcfg.kl == "gaussian":
                            kl = gaussian_kl(mu_new, self._mean(batch, rows, t, ref_m[t]), c.float(), lcfg.convention)
                        else:
                            kl = velocity_mse(m_new, ref_m[t])
                    log_ratio = None
                    if lcfg.ratio_norm:
                        b = batch.b[rows, t].to(self.device)
                        x = batch.x[rows, t].to(self.device).float()
                        shape = (-1,) + (1,) * (x.dim() - 1)
                        mu_old = batch.mu[rows, t].to(self.device).float()
                        m_old = (mu_old - batch.a[rows, t].to(self.device).float().reshape(shape) * x) \
                            / b.float().reshape(shape)
                        lr_mean = (logp_new - logp_old) / (batch.count if lcfg.convention == "sum" else 1)
                        log_ratio = normalized_log_ratio(lr_mean, m_new, m_old, b, c)
                    adv = adv_all[rows, t].to(self.device)
                    out = grpo_loss(logp_new, logp_old, adv, lcfg, kl=kl, log_ratio=log_ratio)
                    (out.loss * (scale * n / total)).backward()
                w = n / total
                sums["loss"] += float(out.loss.detach()) * w
                sums["policy_loss"] += float(out.policy_loss.detach()) * w
                sums["kl"] += float(out.kl.detach()) * w
                sums["logp_new"] += float(logp_new.detach().sum()) / total
                for k in ("ratio_mean", "clipfrac", "approx_kl_old"):
                    sums[k] += out.stats[k] * w
        return self._batch_stats(sums, batch, adv_all)

    @staticmethod
    def _batch_stats(sums: dict, batch, adv_all: torch.Tensor) -> dict:
        """One batch's statistics: the loss terms' weighted sums, its transitions, mean advantage and reward."""
        stats = {**sums, "transitions": batch.num_members * batch.num_transitions,
                 "advantage_mean": float(adv_all.mean())}
        if batch.rewards is not None:
            stats["reward_mean"] = float(batch.rewards.double().mean())
        return stats

    def _denoising_input(self, batch, rows: list[int], t: int,
                         noise_keys: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, x_t) of transition ``t`` for ``rows``: the members' clean chunk and that chunk noised
        afresh at the transition's sigma, (1 - sigma) x0 + sigma eps. eps is drawn from a generator
        keyed by (rollout seed, optimizer step, noise key, transition), so the policy and the reference
        see the same x_t; the key is the member's row unless ``noise_keys`` (one per row) says
        otherwise (a DPO pair shares its winner's). With ``denoising_input="recorded"`` x_t is the
        transition's recorded sampler state instead."""
        ecfg = self.engine_config
        F_ = ecfg.chunk_frames
        chunk = int(batch.chunk[t])
        x0 = batch.latents[rows, :, chunk * F_:(chunk + 1) * F_].to(self.device, torch.float32)
        if self.config.denoising_input == "recorded":
            return x0, batch.x[rows, t].to(self.device, ecfg.latent_dtype)
        sigma = float(batch.sigma[t])
        eps = torch.empty_like(x0)
        gen = torch.Generator(device=self.device)
        for i, key in enumerate(rows if noise_keys is None else noise_keys):
            gen.manual_seed(hash((int(batch.spec["seed"]), self.step, int(key), int(t))) & (2**63 - 1))
            eps[i] = torch.randn(x0.shape[1:], generator=gen, device=self.device)
        return x0, ((1 - sigma) * x0 + sigma * eps).to(ecfg.latent_dtype)

    def _predict_x0(self, module, batch, rows: list[int], t: int, x_t: torch.Tensor, cache) -> torch.Tensor:
        """x0_hat = x_t - sigma v (the engine's conversion of the model's velocity), fp32."""
        ecfg = self.engine_config
        chunk = int(batch.chunk[t])
        ts = torch.full((len(rows), ecfg.chunk_frames), float(batch.timestep[t]), dtype=torch.float32, device=self.device)
        with self._autocast():
            v = module(x_t, ts, chunk * ecfg.chunk_frames, cache, self._row_embeddings(batch, rows, chunk))
        return x_t.float() - float(batch.sigma[t]) * v.to(ecfg.latent_dtype).float()

    def _denoising_passes(self, batch, micro: list[list[int]], last: bool, with_reference: bool,
                          noise_keys: list[list[int]] | None = None):
        """For each micro-batch of member rows and each trained transition: (rows, t, x0, x0_hat with
        gradients, the reference's x0_hat or None), on the noise of ``noise_keys`` (per micro-batch, one
        key per row; default the rows, see ``_denoising_input``). The caller runs its backward before
        taking the next item: that happens inside the DDP context opened here, which synchronises the
        gradients at the step's last backward only (``last``: this batch ends the step)."""
        backwards, done = len(micro) * batch.num_transitions, 0
        for rows, keys in zip(micro, noise_keys or micro):
            ref_x0 = self._reference_x0(batch, rows, keys) if with_reference else {}
            for t, cache in self._transitions(self.model, batch, rows):
                done += 1
                sync = (last and done == backwards) or not self.distributed
                with (contextlib.nullcontext() if sync else self._forward.no_sync()):
                    x0, x_t = self._denoising_input(batch, rows, t, keys)
                    yield rows, t, x0, self._predict_x0(self._forward, batch, rows, t, x_t, cache), ref_x0.get(t)

    def _reference_x0(self, batch, rows: list[int], noise_keys: list[int] | None = None) -> dict[int, torch.Tensor]:
        """The reference model's x0_hat for ``rows`` at each trained transition, without gradients, on
        the same fresh noise the policy pass draws (``_denoising_input``)."""
        out = {}
        with torch.no_grad(), self._reference_mode() as ref:
            for t, rcache in self._transitions(ref, batch, rows):
                x_t = self._denoising_input(batch, rows, t, noise_keys)[1]
                out[t] = self._predict_x0(_PolicyForward(ref), batch, rows, t, x_t, rcache)
        return out

    def _accumulate_denoising(self, batch, scale: float, last: bool) -> dict:
        """Backward of ``scale`` times one batch's advantage-weighted denoising loss (``objective``
        "denoising"): mean over members and trained transitions of
        adv * mean (x0_hat - x0)^2 + kl_coef * mean (x0_hat - x0_ref)^2 (adv clamped at 0 with
        ``denoising_weights="positive"``)."""
        lcfg = self.config.loss
        adv_all = self._advantages(batch)
        if self.config.denoising_weights == "positive":
            adv_all = adv_all.clamp_min(0.0)
        need_ref = lcfg.kl_coef > 0 and lcfg.kl != "none"
        M, T = batch.num_members, batch.num_transitions
        total = M * T
        sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "denoise_mse": 0.0}
        for rows, t, x0, x0_hat, ref in self._denoising_passes(batch, self._micro_batches(M), last, need_ref):
            n = len(rows)
            mse = (x0_hat - x0).square().flatten(1).mean(1)
            policy = (adv_all[rows, t].to(self.device, torch.float32) * mse).mean()
            kl = (x0_hat - ref).square().mean() if need_ref else torch.zeros((), device=self.device)
            loss = policy + lcfg.kl_coef * kl
            (loss * (scale * n / total)).backward()
            w = n / total
            sums["loss"] += float(loss.detach()) * w
            sums["policy_loss"] += float(policy.detach()) * w
            sums["kl"] += float(kl.detach()) * w
            sums["denoise_mse"] += float(mse.detach().mean()) * w
        return self._batch_stats(sums, batch, adv_all)

    def _dpo_pairs(self, batch) -> list[tuple[int, int]]:
        """(winner, loser) rows of the "dpo" objective: per execution group (``group_index``) whose
        rewards are not all equal, its best- and worst-rewarded member (the first row among equals),
        in group order. Without rewards the members' advantages rank them (the same order within a
        group)."""
        if batch.transition_advantages is not None:
            raise ValueError("GRPOTrainer: objective 'dpo' pairs members by their reward; argument 'batch' carries "
                             "step credit (transition_advantages): roll out with video credit")
        scores = batch.rewards if batch.rewards is not None else batch.advantages
        if scores is None:
            raise ValueError("GRPOTrainer: objective 'dpo' needs rewards or advantages (argument 'batch' has neither)")
        scores = scores.double().cpu().tolist()
        groups = batch.group_index.cpu().tolist()
        pairs = []
        for g in sorted(set(groups)):
            rows = [m for m, gm in enumerate(groups) if gm == g]
            ranked = [scores[m] for m in rows]
            hi, lo = max(ranked), min(ranked)
            if hi != lo:
                pairs.append((rows[ranked.index(hi)], rows[ranked.index(lo)]))
        return pairs

    def _sync_gradients(self, batch) -> None:
        """A zero-weighted backward outside ``no_sync``: DDP all-reduces the gradients accumulated so
        far, for a rank whose last batch has nothing to train (every rank must take part)."""
        for t, cache in self._transitions(self.model, batch, [0]):
            x_t = self._denoising_input(batch, [0], t)[1]
            (self._predict_x0(self._forward, batch, [0], t, x_t, cache).sum() * 0.0).backward()
            return

    def _accumulate_dpo(self, batch, scale: float, last: bool) -> dict:
        """Backward of ``scale`` times one batch's Diffusion-DPO loss (``objective`` "dpo"): mean over
        pairs (``_dpo_pairs``) and trained transitions of -log sigmoid(-beta (d_w - d_l)), plus
        kl_coef * mean (x0_hat - x0_ref)^2 over the paired members. A batch without pairs adds
        nothing. Statistics besides the loss terms: dpo_margin (mean d_l - d_w, > 0 where the policy
        favours the winner more than the reference does), dpo_margin_abs (mean |d_w - d_l|, the scale
        beta acts on), dpo_accuracy (fraction of pair-transitions with d_w < d_l), dpo_pairs."""
        lcfg = self.config.loss
        beta = float(self.config.dpo_beta)
        need_kl = lcfg.kl_coef > 0 and lcfg.kl != "none"
        pairs = self._dpo_pairs(batch)
        T = batch.num_transitions
        sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "denoise_mse": 0.0, "dpo_margin": 0.0,
                "dpo_margin_abs": 0.0, "dpo_accuracy": 0.0}
        per_micro = max(1, self.config.micro_batch_size // 2)  # whole pairs: both members' errors set the weights
        chunks = [pairs[i:i + per_micro] for i in range(0, len(pairs), per_micro)]
        micro = [[m for pair in c for m in pair] for c in chunks]  # rows w0, l0, w1, l1, ...
        shared = [[w for w, _ in c for _ in range(2)] for c in chunks]  # noise keys: a pair is noised alike
        total = max(1, len(pairs) * T)
        for rows, t, x0, x0_hat, ref in self._denoising_passes(batch, micro, last, True, shared):
            n = len(rows) // 2
            mse = (x0_hat - x0).square().flatten(1).mean(1)
            ref_mse = (ref - x0).square().flatten(1).mean(1)
            d = (mse.detach() - ref_mse).double().view(n, 2)
            diff = d[:, 0] - d[:, 1]  # d_w - d_l
            pair_loss = F.softplus(beta * diff)  # = -log sigmoid(-beta (d_w - d_l))
            slope = beta * torch.sigmoid(beta * diff)  # d pair_loss / d d_w = -d pair_loss / d d_l
            weight = torch.stack([slope, -slope], dim=1).flatten().to(mse.dtype)
            surrogate = (weight * mse).sum() / n  # its gradient is that of pair_loss.mean()
            kl = (x0_hat - ref).square().mean() if need_kl else torch.zeros((), device=self.device)
            ((surrogate + lcfg.kl_coef * kl) * (scale * n / total)).backward()
            w = n / total
            policy = float(pair_loss.mean())
            sums["loss"] += (policy + lcfg.kl_coef * float(kl.detach())) * w
            sums["policy_loss"] += policy * w
            sums["kl"] += float(kl.detach()) * w
            sums["denoise_mse"] += float(mse.detach().mean()) * w
            sums["dpo_margin"] += float(-diff.mean()) * w
            sums["dpo_margin_abs"] += float(diff.abs().mean()) * w
            sums["dpo_accuracy"] += float((diff < 0).double().mean()) * w
        if not pairs and self.distributed and last:
            self._sync_gradients(batch)
        stats = {**sums, "transitions": 2 * len(pairs) * T, "dpo_pairs": len(pairs)}
        if batch.rewards is not None:
            stats["reward_mean"] = float(batch.rewards.double().mean())
        return stats

    def train_step(self, batch) -> dict:
        """One GRPO update on ``batch`` (a RolloutBatch or a list of them, accumulated: see
        ``compute_gradients``): gradients, clipping, optimizer step,
        periodic checkpoint. Returns statistics (loss, policy_loss, kl, ratio_mean, clipfrac,
        approx_kl_old, logp_new, grad_norm, step, ...)."""
        stats = self.compute_gradients(batch)
        params = list(self.trainable.values())
        if self.config.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            grads = [p.grad.detach().norm() for p in params if p.grad is not None]
            grad_norm = torch.stack(grads).norm() if grads else torch.zeros(())
        self.optimizer.step()
        self.step += 1
        stats["grad_norm"] = float(grad_norm)
        stats["step"] = self.step
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        logger.info("GRPOTrainer step %d: %s, grad norm %.4g", self.step, ", ".join(
            f"{k} {stats[k]:.4g}" for k in ("loss", "ratio_mean", "clipfrac", "denoise_mse", "kl", "dpo_margin",
                                            "dpo_accuracy") if k in stats),
            stats["grad_norm"])
        cfg = self.config
        if cfg.checkpoint_dir and cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0:
            self.save(Path(cfg.checkpoint_dir) / f"step-{self.step:08d}")
        return stats

    # ------------------------------------------------------------------ checkpoints

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors by parameter name (adapters with LoRA, every parameter otherwise)."""
        return {n: p.detach() for n, p in self.trainable.items()}

    def save(self, path: str | Path) -> Path:
        """Write ``weights.safetensors`` (trained tensors), ``optimizer.pt`` (optimizer state) and
        ``trainer.json`` (step, config) into directory ``path``; only rank 0 writes. Returns path."""
        path = Path(path)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            save_file({n: t.cpu().contiguous().clone() for n, t in self.trainable_state().items()},
                      str(path / "weights.safetensors"))
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
            meta = {"step": self.step, "lora": self.config.lora_rank is not None, "config": self.config.to_dict(),
                    "parameters": list(self.trainable)}
            (path / "trainer.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
            logger.info("GRPOTrainer: saved step %d to %s", self.step, path)
        if self.distributed:
            dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        """Resume from a ``save`` directory: trained tensors, optimizer state and step."""
        path = Path(path)
        if not (path / "trainer.json").is_file():
            raise ValueError(f"GRPOTrainer.load: argument 'path' {str(path)!r} holds no trainer.json")
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        if bool(meta["lora"]) != (self.config.lora_rank is not None):
            raise ValueError(f"GRPOTrainer.load: the checkpoint at {str(path)!r} is {'LoRA' if meta['lora'] else 'full'}; "
                             "this trainer is not")
        weights = load_file(str(path / "weights.safetensors"))
        missing = sorted(set(self.trainable) - set(weights))
        extra = sorted(set(weights) - set(self.trainable))
        if missing or extra:
            raise ValueError(f"GRPOTrainer.load: checkpoint at {str(path)!r} does not match the trained parameters "
                             f"(missing {missing[:4]}, unexpected {extra[:4]})")
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(weights[n].to(p.device, p.dtype))
        state = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state)
        self.step = int(meta["step"])
        logger.info("GRPOTrainer: resumed step %d from %s", self.step, path)
