"""Host <-> device copies: index tables up without a host sync, results down through pinned memory.

Plans (KV-cache page tables, attention work lists) are built on the host once per chunk and read
by every layer and step on the device. ``upload_tensors`` packs any number of host tensors (any
dtypes and shapes) into one buffer, pinned when the target is a GPU, copies it with one
``non_blocking`` transfer and returns typed views into the one device buffer. PyTorch's caching
host allocator keeps a pinned staging buffer alive until its copy has run, so nothing here waits
on the device.

Results (frames, rollout records) come down with ``to_host``: into pinned memory, because a copy
into pageable memory is staged by the driver at a fraction of the bus speed (a GRPO rollout's 776 MB
of frames took ~1 s that way). Boundaries: memory movement only; callers own what the data mean.
"""

from __future__ import annotations

from typing import Mapping

import torch

_ALIGN = 16  # bytes; covers every dtype's alignment


def pack(tensors: Mapping[str, torch.Tensor | None], pin_memory: bool = False) -> tuple[torch.Tensor, list]:
    """Pack tensors into one uint8 buffer (each section aligned); returns (buffer, layout)."""
    layout, total = [], 0
    for name, t in tensors.items():
        if t is None:
            layout.append((name, None, None, None, None))
            continue
        layout.append((name, total, t.dtype, tuple(t.shape), t.numel()))
        total += (t.numel() * t.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN
    buffer = torch.empty(max(total, _ALIGN), dtype=torch.uint8, pin_memory=pin_memory)
    for (name, offset, dtype, shape, count), t in zip(layout, tensors.values()):
        if t is not None:
            buffer[offset: offset + count * dtype.itemsize].view(dtype).copy_(t.reshape(-1))
    return buffer, layout


def unpack(buffer: torch.Tensor, layout: list) -> dict[str, torch.Tensor | None]:
    """Typed views into a packed buffer (on any device): the inverse of ``pack``."""
    out = {}
    for name, offset, dtype, shape, count in layout:
        out[name] = None if offset is None else buffer[offset: offset + count * dtype.itemsize].view(dtype).view(shape)
    return out


def upload_tensors(tensors: Mapping[str, torch.Tensor | None], device, pin_memory: bool = True) -> dict[str, torch.Tensor | None]:
    """Copy host tensors to ``device`` in one non-blocking transfer; None entries stay None.

    On the CPU the tensors are returned as they are (no copy).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return dict(tensors)
    buffer, layout = pack(tensors, pin_memory=pin_memory and device.type == "cuda")
    return unpack(buffer.to(device, non_blocking=True), layout)


def to_host(t: torch.Tensor, *, wait: bool = True) -> torch.Tensor:
    """A host copy of ``t``; from CUDA through pinned memory. ``wait=False`` only enqueues the copy on
    the current stream (several copies, then one ``synchronize`` before any is read)."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    if wait:
        torch.cuda.current_stream(t.device).synchronize()
    return out
