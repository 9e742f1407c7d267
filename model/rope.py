"""Rotary position embedding: the pairwise rotation shared by FLUX (3-axis ids) and Wan (frame, row, col).

Each model computes its own angles (cos, sin of position times frequency, one per channel pair); both then rotate
consecutive channel pairs (x[2i], x[2i+1]) of their queries and keys by those angles.
"""

import torch
from torch import Tensor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of x [B, H, S, head_dim] by their angles, in float32.

    cos and sin broadcast against [..., S, head_dim / 2] (one angle per token and pair).

    Eagerly, each pair is read as the complex number x[2i] + i x[2i+1] and multiplied by cos + i sin: one vectorised
    kernel, where the same rotation in real arithmetic needs strided reads and an interleaving copy (about 5x the
    time on a CPU, bench/RESULTS.md). Under torch.compile the real form is used: inductor fuses it into its
    neighbours but cannot generate code for complex numbers. Both give the same values.
    """
    if torch.compiler.is_compiling():
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)
