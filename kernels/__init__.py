"""Triton kernels of spiral_rt (installed as ``spiral_rt.kernels``).

A kernel file holds ``@triton.jit`` functions and a thin launcher that takes already-checked
tensors and preallocated outputs; validation and backend choice live in ``spiral_rt.ops``.
Importing a kernel module imports triton; this package itself does not.
"""
