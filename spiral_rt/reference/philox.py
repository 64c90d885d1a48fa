"""Philox4x32-10 noise in plain PyTorch: the readable oracle for every backend's noise.

The stream is keyed by (seed, sequence id, chunk index, step index). Element ``e`` of a sequence's
noise is lane ``e % 4`` of the Philox block with counter ``(e // 4, sequence, chunk, step)`` and key
``(seed mod 2**32, seed >> 32)``; lanes (0, 1) and (2, 3) become normals by Box-Muller:
``r = sqrt(-2 ln u0)``, ``theta = 2 pi u1 - pi``, ``(r cos theta, r sin theta)``, where
``u = (2 * (bits >> 9) + 1) * 2**-24``. The CUDA header ``csrc/philox.h`` and the Triton kernel
``kernels/philox.py`` compute the same function.

uint32 values are held in int64 tensors (torch has no general uint32 arithmetic); the high half of
a 32x32-bit product is formed from 16-bit pieces so no intermediate overflows int64.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a constant a and uint32 values b (int64 tensor)."""
    lo = (a * b) & MASK32  # int64 wraps, the low 32 bits stay exact
    p_hi = (a >> 16) * b  # < 2**48
    p_lo = (a & 0xFFFF) * b  # < 2**48
    hi = ((p_hi + (p_lo >> 16)) >> 16) & MASK32
    return hi, lo


def philox4x32(counter, key, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on uint32 counters and keys held in int64 tensors or ints (broadcastable)."""
    device = next((c.device for c in (*counter, *key) if isinstance(c, torch.Tensor)), None)
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(c, dtype=torch.int64, device=device) & MASK32 for c in (*counter, *key))
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_WEYL[0]) & MASK32, (k1 + PHILOX_WEYL[1]) & MASK32
    return torch.broadcast_tensors(c0, c1, c2, c3)


def unit_open(bits: torch.Tensor) -> torch.Tensor:
    """uint32 bits -> fp32 uniforms in (0, 1), odd multiples of 2**-24 (exact in fp32)."""
    return (((bits >> 9) << 1) | 1).to(torch.float32) * 2.0**-24


def box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint32 lanes -> two standard normals, in fp32."""
    radius = torch.sqrt(-2.0 * torch.log(unit_open(a)))
    theta = unit_open(b) * torch.tensor(6.28318530717958647692, dtype=torch.float32) - torch.tensor(
        3.14159265358979323846, dtype=torch.float32
    )
    return radius * torch.cos(theta), radius * torch.sin(theta)


def philox_normal_keyed(noise_key: torch.Tensor, numel: int) -> torch.Tensor:
    """(S, numel) fp32 normals, row s keyed by ``noise_key[s] = (seed, sequence, chunk, step)``.

    Pure tensor code on noise_key's device: no host sync, so it records into CUDA graphs.
    """
    key = noise_key.to(torch.int64).reshape(-1, 4, 1)
    seed, sequence, chunk, step = key.unbind(1)
    quads = torch.arange((numel + 3) // 4, dtype=torch.int64, device=noise_key.device)
    r0, r1, r2, r3 = philox4x32((quads, sequence, chunk, step), (seed, seed >> 32))
    z0, z1 = box_muller(r0, r1)
    z2, z3 = box_muller(r2, r3)
    return torch.stack((z0, z1, z2, z3), dim=-1).reshape(key.shape[0], -1)[:, :numel]


def philox_normal(seed: int, sequence: int, chunk: int, step: int, numel: int, device=None) -> torch.Tensor:
    """The first ``numel`` standard normals (fp32) of the noise stream keyed by the four ids."""
    key = torch.tensor([[seed, sequence, chunk, step]], dtype=torch.int64, device=device)
    return philox_normal_keyed(key, numel)[0]
