"""spiral_rt: a streaming runtime for autoregressive (chunk-by-chunk, KV-cached) video diffusion
world models, with SPIRAL's plan-act-critic loop and GRPO rollouts.

Layout (each subpackage's docstring says more):
  spiral_rt.ops        public op API: checks, backend dispatch (cuda | triton | reference)
  spiral_rt.reference  readable PyTorch oracles of every op
  spiral_rt.kernels    Triton kernels (the top-level kernels/ folder)
  spiral_rt._C         CUDA kernels bound with pybind11 (csrc/)
  spiral_rt.models     Wan causal DiT, streaming VAE, text encoders, checkpoint loaders
  spiral_rt.cache      paged KV cache manager
  spiral_rt.sampling   flow-matching schedules and step policies
"""

__version__ = "0.1.0"
