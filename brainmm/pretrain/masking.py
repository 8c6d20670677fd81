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
    # the `keep` largest of i.i.d. uniform noise are a uniformly drawn subset of exactly `keep` blocks; a partial
    # top-k is several times cheaper than ranking all blocks with a full sort
    kept = noise.topk(keep, dim=1, sorted=False).indices
    visible = torch.zeros(batch, n, dtype=torch.bool, device=noise.device).scatter_(1, kept, True)
    return visible.view(batch, 1, *grid)


# word types whose bytes can carry several neighbouring bool voxels at once
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def expand_block_grid(grid: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block-resolution mask ``(B, 1, h, w, d)`` bool -> voxel mask ``(B, 1, h*b, w*b, d*b)`` bool.

    A plain 8-D ``expand(...).reshape`` copies one byte at a time with a size-``b`` innermost loop, which dominates
    the masking step on the CPU. Instead each block's run of ``b`` voxels along the last axis is written as whole
    machine words whose bytes are all 0x01 or all 0x00 (byte order does not matter), ~10x faster for b = 8.
    """
    b = block_size
    batch, _, h, w, d = grid.shape
    width = next(k for k in _WORDS if b % k == 0)
    word = _WORDS[width]
    ones = int.from_bytes(b"\x01" * width, "little")
    words = grid.to(word) * ones  # (B, 1, h, w, d) words of 0x01 / 0x00 bytes
    reps = b // width  # words per block along the last axis
    voxels = words[:, :, :, None, :, None, :, None].expand(batch, 1, h, b, w, b, d, reps)
    return voxels.reshape(batch, 1, h * b, w * b, d * reps).view(torch.bool)


def random_block_mask(batch: int, spatial: Sequence[int], block_size: int = 8, mask_ratio: float = 0.8, *,
                      device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The voxel-resolution mask of ``random_block_grid``: ``(B, 1, H, W, D)`` bool, True where visible."""
    grid = random_block_grid(batch, spatial, block_size, mask_ratio, device=device, generator=generator)
    return expand_block_grid(grid, block_size)


def fill_masked(image: torch.Tensor, fill: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Keep ``image`` where ``visible``, take ``fill`` elsewhere. Shapes broadcast: (B, 1, H, W, D)."""
    return torch.where(visible, image, fill)
