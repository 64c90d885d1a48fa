"""Test configuration shared by every test.

Without a CUDA GPU (CI), Triton kernels run through the interpreter on CPU tensors:
TRITON_INTERPRET must be set before any ``@triton.jit`` function is created, hence here, at the
top. Tests marked ``gpu`` are skipped when no GPU is present; run them with ``pytest -m gpu``.
"""

import os
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import spiral_rt  # noqa: E402,F401  (before any test module: the repository's kernels/ must not hide the installed `kernels`)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the H100 machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_device() -> torch.device:
    """Where Triton kernels run in this session: the GPU, or the CPU through the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
