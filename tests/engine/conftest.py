"""Engine tests run without autograd (what the engine does itself)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield
