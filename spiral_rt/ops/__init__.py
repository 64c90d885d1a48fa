"""Public op API of spiral_rt.

Each op checks its inputs once (``ValueError`` naming the bad argument), allocates its outputs and
dispatches to a backend: ``cuda`` (csrc/ via ``spiral_rt._C``), ``triton`` (kernels/) or
``reference`` (spiral_rt/reference/). See ``spiral_rt.ops.dispatch`` for how the backend is chosen
and forced. Ops are registered as ``torch.ops.spiral_rt.*`` custom ops, so they trace through
``torch.compile`` and record into CUDA graphs.

Ops: ``sampler_step`` (fused stochastic sampler transition with Philox noise and log-prob terms).
"""

from . import sampler_step as _sampler_step_module
from .dispatch import available_backends, select_backend
from .sampler_step import SamplerStepResult, noise_key, sampler_step

# op name -> the backends that implement it (``spiral-rt info`` lists what runs where)
OP_BACKENDS = {m.OP: m.IMPLEMENTED for m in (_sampler_step_module,)}

__all__ = ["sampler_step", "SamplerStepResult", "noise_key", "available_backends", "select_backend", "OP_BACKENDS"]
