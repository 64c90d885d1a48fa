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


def _unshadow_installed_kernels() -> None:
    """Keep the source tree's top-level ``kernels/`` folder (installed as ``spiral_rt.kernels``) from
    hiding the Hugging Face ``kernels`` package that recent transformers import, when the repository
    root is on ``sys.path`` (Python or pytest started there): import the installed one first, with
    the root left out of the search, so ``sys.modules['kernels']`` is the real package."""
    import importlib
    import importlib.util
    import os
    import sys

    if "kernels" in sys.modules:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    on_path = [p for p in sys.path if os.path.abspath(p or os.curdir) == root]
    if not on_path or not os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p not in on_path]
    try:
        if importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
    except Exception:  # a broken install of it is transformers' problem, not a reason to fail here
        pass
    finally:
        sys.path[:] = saved


_unshadow_installed_kernels()
