"""Position embeddings: fixed 2-D sin-cos tables and resizing a learned table to another grid.

`resize_pos_embed` is the one place that changes a model's resolution; the model calls it on the fly and the
checkpoint converter calls it to write a model for a new image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_2d(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of a (rows, cols) grid, shape (rows * cols, dim), rows-major like the patches.

    A quarter of the channels each for sin(y), cos(y), sin(x), cos(x), with geometrically spaced frequencies.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    rows, cols = grid_size
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y = y.reshape(-1, 1) * omega
    x = x.reshape(-1, 1) * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).float()


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize a (1, prefix + rows * cols, dim) table to `new_grid` by 2-D bicubic interpolation.

    Prefix tokens (the class token) are kept apart and unchanged. Interpolation is done in fp32 with antialiasing,
    as timm does, so weights moved between the two give the same outputs at any resolution.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid is None:
        side = round(grid.shape[1] ** 0.5)
        if side * side != grid.shape[1]:
            raise ValueError(f"position embedding has {grid.shape[1]} entries; pass old_grid for a non-square grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
