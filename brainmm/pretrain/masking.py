"""Block masking, batched on the device (no per-sample CPU loop, no host-device synchronisation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def num_kept_blocks(num_blocks: int, mask_ratio: float) -> int:
    """Blocks kept visible: ``floor(N * (1 - p))``, as the official code."""
    return int(num_blocks * (1.0 - mask_ratio))


def block_grid(spatial: Sequence[int], block_size: int) -> tuple[int, int, int]:
    """Blocks per axis; every spatial size must be a multiple of ``block_size``."""
    bad = [s for s in spatial if s % block_size]
    if bad:
        raise ValueError(f"crop size {tuple(spatial)} must be divisible by the mask block size {block_size} "
                         f"(offending sizes: {bad}).")
    return tuple(s // block_size for s in spatial)  # type: ignore[return-value]


def random_block_grid(batch: int, spatial: Sequence[int], block_size: int = 8, mask_ratio: float = 0.8, *,
                      device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh random mask per sample at block resolution: ``(B, 1, H/b, W/b, D/b)`` bool, True = visible block.

    Exactly ``floor(N * (1 - mask_ratio))`` of the ``N`` blocks are visible in every sample, chosen uniformly: the
    ranks of i.i.d. uniform noise (one argsort per batch on the device, no host sync).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    grid = block_grid(spatial, block_size)
    n = grid[0] * grid[1] * grid[2]
    keep = num_kept_blocks(n, mask_ratio)
    noise = torch.rand(batch, n, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each block's noise within its sample
    return (ranks < keep).view(batch, 1, *grid)


def random_block_mask(batch: int, spatial: Sequence[int], block_size: int = 8, mask_ratio: float = 0.8, *,
                      device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The voxel-resolution mask of ``random_block_grid``: ``(B, 1, H, W, D)`` bool, True where visible."""
    grid = random_block_grid(batch, spatial, block_size, mask_ratio, device=device, generator=generator)
    b = block_size
    g = grid.shape[2:]
    return grid[:, :, :, None, :, None, :, None].expand(batch, 1, g[0], b, g[1], b, g[2], b).reshape(batch, 1,
                                                                                                       *spatial)


def fill_masked(image: torch.Tensor, fill: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Keep ``image`` where ``visible``, take ``fill`` elsewhere. Shapes broadcast: (B, 1, H, W, D)."""
    return torch.where(visible, image, fill)
