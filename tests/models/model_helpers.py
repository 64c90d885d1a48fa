"""Helpers shared by the model tests: random weights (every parameter, not the default init, so a
wrong key map or a skipped norm shows up) and error measures."""

import torch


def randomize_(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with fresh random values (norm weights around 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "norm_q.weight", "norm_k.weight")) or ".norm" in name and name.endswith("weight"):
                p.copy_(1 + std * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
