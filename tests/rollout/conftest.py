"""Rollout tests run without autograd and on one CPU thread (tiny tensors: thread hand-offs cost more
than they save, and the CI machine has 2 cores); the thread count is restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_no_grad():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads)
