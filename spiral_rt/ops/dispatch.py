"""Backend selection and argument checks shared by every op in ``spiral_rt.ops``.

An op is implemented by up to three backends:

- ``"cuda"``: a kernel in ``csrc/`` bound through pybind11 (``spiral_rt._C``), CUDA tensors only;
- ``"triton"``: a kernel in ``kernels/`` (``spiral_rt.kernels``), CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1`` (how the CPU tests run Triton code);
- ``"reference"``: eager PyTorch from ``spiral_rt.reference``, any device.

The choice is, in order: the op's ``backend=`` argument; the ``SPIRAL_RT_BACKEND`` environment
variable, either one name for every op (``triton``) or per op (``sampler_step=cuda,
chunk_attention=reference``); otherwise the fastest backend available for the tensors' device
(cuda > triton > reference on a GPU, reference on a CPU). A forced backend that cannot run the
given tensors is an error naming why, never a silent fallback.

Checks raise ``ValueError`` naming the op and the argument, with what was expected and what came.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Iterable, Sequence

import torch

BACKENDS = ("cuda", "triton", "reference")
AUTO_ORDER = ("cuda", "triton", "reference")
ENV_VAR = "SPIRAL_RT_BACKEND"


def _load_native():
    try:
        from spiral_rt import _C
    except ImportError:
        return None
    return _C


# Facts about this installation, fixed at import (plain values, so torch.compile traces through).
NATIVE = _load_native()
"""``spiral_rt._C``, or None when the package was not built (e.g. a plain source checkout)."""
CUDA_KERNELS_BUILT = bool(NATIVE is not None and NATIVE.build_info()["cuda"])
"""Whether ``spiral_rt._C`` was compiled with its CUDA kernels (nvcc found at build time)."""
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _requested_from_env(op: str) -> str | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if "=" not in value:
        return value
    for item in value.split(","):
        name, _, backend = item.partition("=")
        if name.strip() == op:
            return backend.strip()
    return None


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got tensors on {device}"
        if not CUDA_KERNELS_BUILT:
            return "spiral_rt._C was built without CUDA (no nvcc at build time); rebuild on a CUDA machine"
    elif backend == "triton":
        if not TRITON_INSTALLED:
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreting():
            return "the triton backend runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend does not run on {device}"
    return None


def requested_backend(op: str, requested: str | None = None) -> str | None:
    """The backend asked for explicitly (the argument, else SPIRAL_RT_BACKEND), None for auto."""
    if requested in (None, "auto"):
        requested = _requested_from_env(op)
    return None if requested in (None, "auto") else requested


@torch.compiler.assume_constant_result
def select_backend(op: str, device: torch.device, implemented: Sequence[str], requested: str | None = None) -> str:
    """The backend that runs ``op`` on tensors on ``device`` (see the module docstring).

    Under torch.compile the choice is made once, at trace time, and baked into the graph.
    """
    source = "backend" if requested not in (None, "auto") else ENV_VAR
    requested = requested_backend(op, requested)
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op}: {source}={requested!r} is not a backend; choose one of {BACKENDS} or 'auto'")
        if requested not in implemented:
            raise ValueError(f"{op}: {source}={requested!r}, but {op} has only {tuple(implemented)}")
        reason = _unavailable_reason(requested, device)
        if reason is not None:
            raise ValueError(f"{op}: {source}={requested!r} cannot run here: {reason}")
        return requested
    for backend in AUTO_ORDER:
        if backend not in implemented:
            continue
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is a test tool, never the automatic choice
        if _unavailable_reason(backend, device) is None:
            return backend
    raise ValueError(f"{op}: no backend of {tuple(implemented)} can run tensors on {device}")


def available_backends(op_backends: Iterable[str], device: torch.device | str) -> list[str]:
    """The subset of an op's backends that can run tensors on ``device``."""
    device = torch.device(device)
    return [b for b in op_backends if _unavailable_reason(b, device) is None]


def invoke(op, impl, *args):
    """Run a registered custom op: ``impl`` directly in eager mode (the dispatcher costs tens of
    microseconds a call), the registered ``op`` while torch.compile traces."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


# ----------------------------------------------------------------------------- argument checks


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensor(
    op: str,
    name: str,
    value,
    *,
    shape: Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
    min_dim: int | None = None,
) -> torch.Tensor:
    """Check one tensor argument; raises ValueError naming ``name`` and what was expected."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if min_dim is not None and value.dim() < min_dim:
        raise ValueError(f"{op}: argument '{name}' must have at least {min_dim} dimension(s), got shape {_fmt_shape(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{op}: argument '{name}' must have shape {_fmt_shape(shape)}, got {_fmt_shape(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: argument '{name}' must have dtype in ({allowed}), got {str(value.dtype).replace('torch.', '')}")
    if device is not None and value.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on {device} (where the other inputs are), got {value.device}")
    if contiguous and not value.is_contiguous():
        raise ValueError(
            f"{op}: argument '{name}' must be contiguous (strides {tuple(value.stride())} for shape "
            f"{_fmt_shape(value.shape)} are not supported); pass {name}.contiguous()"
        )
    return value


def per_sequence_scalar(op: str, name: str, value, num_seqs: int, device: torch.device) -> torch.Tensor:
    """A per-sequence fp32 vector of shape (num_seqs,) from a float, a 0-d tensor or a (num_seqs,) tensor."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((num_seqs,), float(value), dtype=torch.float32, device=device)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: argument '{name}' must be a float or a tensor of shape ({num_seqs},), got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{op}: argument '{name}' must be floating point, got {str(value.dtype).replace('torch.', '')}")
    if value.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on {device} (where the other inputs are), got {value.device}")
    if value.dim() == 0:
        return value.to(torch.float32).expand(num_seqs).contiguous()
    if tuple(value.shape) != (num_seqs,):
        raise ValueError(f"{op}: argument '{name}' must have shape ({num_seqs},) (one value per sequence), got {_fmt_shape(value.shape)}")
    return value.to(torch.float32).contiguous()
