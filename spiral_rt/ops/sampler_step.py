"""``sampler_step``: one stochastic (or deterministic) sampler transition, fused, with log-prob terms.

    x_next = A * x + B * m + C * eps,   mu = A * x + B * m,   sq_sum = sum (x_next - mu)^2

per sequence (the leading dimension), with per-sequence scalars A, B, C and ``m`` the model's
velocity or x0 prediction. One op covers every step policy the samplers use:

- Self-Forcing re-noise, x' = (1 - s') x0 + s' eps: A = 0, B = 1 - s', C = s', m = x0;
- deterministic Euler, x' = x + (s' - s) v: A = 1, B = s' - s, C = 0;
- Flow-GRPO's SDE step, DanceGRPO, CPS: A, B from the drift, C the step's std.

The Gaussian log-density of the transition is ``-sq_sum / (2 C^2) - count * log(C sqrt(2 pi))``;
Flow-GRPO/DanceGRPO/TempAct use the per-element mean, ``-sq_sum / (count * 2 C^2)`` + const.
``sq_sum`` is computed from x_next *after* rounding to the output dtype, i.e. it is the density of
the sample that is actually stored.

Noise: ``noise=`` an explicit tensor, or ``noise_key=`` an int64 (S, 4) tensor of
(seed, sequence id, chunk index, step index) per sequence for Philox noise that depends on
nothing else (see ``spiral_rt.reference.philox``): a rollout replays exactly, and members of a
group share noise by sharing a sequence id. Neither means eps = 0 (C has no effect).
Backends: cuda (csrc/sampler_step.cu), triton (kernels/sampler_step.py), reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..reference import sampler_step as _reference
from . import dispatch

OP = "sampler_step"
IMPLEMENTED = ("cuda", "triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NOISE_MODES = {"none": 0, "tensor": 1, "philox": 2}


class SamplerStepResult(NamedTuple):
    x_next: torch.Tensor
    """(S, ...) in x's dtype."""
    mu: Optional[torch.Tensor]
    """(S, ...) in x's dtype, the transition's mean; None when return_mu=False."""
    sq_sum: torch.Tensor
    """(S,) fp32: sum over each sequence of (x_next - mu)^2."""
    count: int
    """Elements per sequence (the same for every sequence)."""


def noise_key(seed: int, sequence_ids, chunk: int, step: int, device=None) -> torch.Tensor:
    """Build the (S, 4) int64 ``noise_key`` for sequences ``sequence_ids`` at one chunk and step.

    seed is any integer in [0, 2**64) (stored as its two's-complement int64); sequence ids, chunk
    and step are counters in [0, 2**32).
    """
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"noise_key: argument 'seed' must be in [0, 2**64), got {seed}")
    ids = torch.as_tensor(sequence_ids, dtype=torch.int64).reshape(-1)
    for name, value in (("chunk", chunk), ("step", step)):
        if not 0 <= int(value) < 2**32:
            raise ValueError(f"noise_key: argument '{name}' must be in [0, 2**32), got {value}")
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < 2**32):
        raise ValueError(f"noise_key: argument 'sequence_ids' must be in [0, 2**32), got range [{int(ids.min())}, {int(ids.max())}]")
    key = torch.empty((ids.numel(), 4), dtype=torch.int64)
    key[:, 0] = seed - 2**64 if seed >= 2**63 else seed
    key[:, 1] = ids
    key[:, 2] = int(chunk)
    key[:, 3] = int(step)
    return key.to(device) if device is not None else key


def sampler_step(
    x: torch.Tensor,
    m: torch.Tensor,
    a,
    b,
    c,
    *,
    noise: torch.Tensor | None = None,
    noise_key: torch.Tensor | None = None,
    return_mu: bool = True,
    backend: str | None = None,
) -> SamplerStepResult:
    """Fused sampler step; see the module docstring.

    Args:
        x: (S, ...) current latents, bf16/fp16/fp32, contiguous.
        m: (S, ...) model output (velocity or x0), same shape/dtype/device as x.
        a, b, c: per-sequence scalars: floats, 0-d tensors or (S,) tensors on x's device.
        noise: optional (S, ...) noise tensor like x.
        noise_key: optional (S, 4) int64 tensor on x's device: (seed, sequence, chunk, step).
        return_mu: also return mu (skipping it saves a write of x's size).
        backend: "cuda" | "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    x = dispatch.check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    num_seqs, device = x.shape[0], x.device
    m = dispatch.check_tensor(OP, "m", m, shape=x.shape, dtypes=(x.dtype,), device=device)
    a = dispatch.per_sequence_scalar(OP, "a", a, num_seqs, device)
    b = dispatch.per_sequence_scalar(OP, "b", b, num_seqs, device)
    c = dispatch.per_sequence_scalar(OP, "c", c, num_seqs, device)
    if noise is not None and noise_key is not None:
        raise ValueError(f"{OP}: pass at most one of 'noise' and 'noise_key'")
    if noise is not None:
        dispatch.check_tensor(OP, "noise", noise, shape=x.shape, dtypes=(x.dtype,), device=device)
    if noise_key is not None:
        dispatch.check_tensor(OP, "noise_key", noise_key, shape=(num_seqs, 4), dtypes=(torch.int64,), device=device)
    chosen = dispatch.select_backend(OP, device, IMPLEMENTED, backend)
    count = x[0].numel() if num_seqs else 0
    x_next, mu, sq_sum = dispatch.invoke(_sampler_step_op, _sampler_step_impl, x, m, a, b, c, noise, noise_key,
                                         return_mu, chosen)
    return SamplerStepResult(x_next, mu if return_mu else None, sq_sum, count)


# ------------------------------------------------------------------ torch.library registration


def _sampler_step_impl(
    x: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    noise: Optional[torch.Tensor],
    noise_key: Optional[torch.Tensor],
    return_mu: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "reference":
        x_next, mu, sq_sum = _reference.sampler_step(x, m, a, b, c, noise, noise_key, return_mu)
        return x_next, (mu if mu is not None else x.new_empty(0)), sq_sum
    num_seqs = x.shape[0]
    x2 = x.view(num_seqs, -1)
    x_next = torch.empty_like(x2)
    mu = torch.empty_like(x2) if return_mu else None
    sq_sum = torch.empty(num_seqs, dtype=torch.float32, device=x.device)
    if x2.numel() == 0:
        sq_sum.zero_()
    else:
        mode = NOISE_MODES["tensor" if noise is not None else "philox" if noise_key is not None else "none"]
        noise2 = noise.view(num_seqs, -1) if noise is not None else None
        run = _run_cuda if backend == "cuda" else _run_triton
        run(x2, m.view(num_seqs, -1), a, b, c, noise2, noise_key, x_next, mu, sq_sum, mode)
    mu_out = mu.view(x.shape) if mu is not None else x.new_empty(0)
    return x_next.view(x.shape), mu_out, sq_sum


_sampler_step_op = torch.library.custom_op("spiral_rt::sampler_step", _sampler_step_impl, mutates_args=())


@_sampler_step_op.register_fake
def _(x, m, a, b, c, noise, noise_key, return_mu, backend):
    mu = torch.empty_like(x) if return_mu else x.new_empty(0)
    return torch.empty_like(x), mu, x.new_empty(x.shape[0], dtype=torch.float32)


# ------------------------------------------------------------------------------ backend glue

_TICKETS: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}


def _tickets(device: torch.device, stream: torch.cuda.Stream, n: int) -> torch.Tensor:
    """Zeroed uint32 tickets for the CUDA kernel's last-block reduction (it leaves them zero).

    One buffer per (device, stream), so concurrent streams never share tickets. Under CUDA graph
    capture the buffer is allocated and zeroed inside the graph (it lives in the graph's private
    memory pool) once per capture, not once per launch: the launches of one graph run in stream
    order and each leaves the tickets zero for the next.
    """
    key = (device.index, stream.cuda_stream)
    capture = dispatch.NATIVE.stream_capture_id(stream.cuda_stream) if torch.cuda.is_current_stream_capturing() else 0
    cached = _TICKETS.get(key)
    if cached is None or cached[0] != capture or cached[1].numel() < n:
        cached = (capture, torch.zeros(max(n, 64), dtype=torch.int32, device=device))
        _TICKETS[key] = cached
    return cached[1]


def _run_cuda(x, m, a, b, c, noise, noise_key, x_next, mu, sq_sum, mode):
    C = dispatch.NATIVE
    num_seqs, seq_len = x.shape
    dtype_code = C.DTYPES[str(x.dtype).replace("torch.", "")]
    partials = torch.empty(num_seqs * C.sampler_step_blocks_per_seq(seq_len, dtype_code), dtype=torch.float32, device=x.device)
    stream = torch.cuda.current_stream(x.device)
    C.sampler_step(
        x=x.data_ptr(), m=m.data_ptr(), a=a.data_ptr(), b=b.data_ptr(), c=c.data_ptr(),
        noise=noise.data_ptr() if noise is not None else 0,
        noise_key=noise_key.data_ptr() if noise_key is not None else 0,
        x_next=x_next.data_ptr(), mu=mu.data_ptr() if mu is not None else 0,
        partials=partials.data_ptr(), tickets=_tickets(x.device, stream, num_seqs).data_ptr(),
        sq_sum=sq_sum.data_ptr(), num_seqs=num_seqs, seq_len=seq_len, dtype=dtype_code,
        noise_mode=mode, device=x.device.index, stream=stream.cuda_stream,
    )


def _run_triton(x, m, a, b, c, noise, noise_key, x_next, mu, sq_sum, mode):
    from spiral_rt.kernels import sampler_step as kernel

    partials = torch.empty(x.shape[0] * kernel.blocks_per_seq(x.shape[1]), dtype=torch.float32, device=x.device)
    kernel.sampler_step(x, m, a, b, c, noise, noise_key, x_next, mu, partials, sq_sum, mode)
