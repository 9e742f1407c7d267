"""Helpers shared by the oracle tests: random weights that exercise every parameter, and a max-abs figure."""

import torch
from torch import nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random, non-trivial value (deterministic in `seed`), in place.

    Matrices and kernels get N(0, 1/fan_in) so activations stay O(1) through many layers; vectors that start
    as all ones (norm scales) become 1 + U(-0.2, 0.2), other vectors (biases) U(-0.2, 0.2). Zero-initialised
    layers (common for output projections and gates) thereby take part in the comparison too.
    """
    generator = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
        else:
            base = 1.0 if bool((p == 1).all()) else 0.0
            p.copy_(base + (torch.rand(p.shape, generator=generator) - 0.5) * 0.4)
    return model


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()
