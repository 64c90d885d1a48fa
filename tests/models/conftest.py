"""Fixtures of the model tests (helpers live in model_helpers.py)."""

import pytest


@pytest.fixture
def tiny_cfg():
    from spiral_rt.models.config import tiny_test

    return tiny_test()
