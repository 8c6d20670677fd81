"""Missing modalities: learned templates fill absent (or randomly dropped) input channels.

The templates come from the encoder's pre-training export (``brainmm.load_templates``): one min-max normalised
volume per modality in the **atlas grid** (RAS, 1 mm, ``atlas_size``). brainmm's preprocessing places every study's
foreground box in that grid (``brainmm.data.transforms.atlas_placement``; the cache records the box's
``atlas_offset``), so in the preprocessed space the template window of a crop or box is an exact integer slice:
:meth:`TemplateBank.window`. Data in any other grid is filled by resampling the template through the affines
(template voxel = ``inv(atlas_affine) @ image_affine @ image voxel``, trilinear): :meth:`TemplateBank.resample`.

A weight without templates (random initialisation, an encoder trained elsewhere) falls back to zeros, and the
fallback is logged once when the bank is built.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.modalities import canonical_modalities
from ..data.transforms import atlas_placement

logger = logging.getLogger(__name__)

__all__ = ["ModalityDropout", "TemplateBank", "modality_subsets", "resample_to_grid"]


class TemplateBank:
    """Templates of a model's input modalities, in channel order, on one atlas grid.

    ``templates``: modality -> ``(H, W, D)`` tensor (normalised); modalities without one are zeros and listed in
    :attr:`missing_templates`. ``atlas_size``: the grid of the preprocessing the model is used with; templates of
    another size (same 1 mm spacing) are centre-placed into it with the preprocessing's own symmetric pad/crop rule,
    so integer windows stay exact. Stored as float16 (templates are in [0, 1]: 3 significant digits are plenty, and
    it halves the memory the data-loader workers share). ``warn``: log the zero fallback (once per model).
    """

    def __init__(self, modalities: Sequence[str], templates: Mapping[str, torch.Tensor] | None,
                 atlas_size: Sequence[int], *, source: str = "", warn: bool = True) -> None:
        self.modalities = canonical_modalities(modalities, argument="modalities")
        self.atlas_size = tuple(int(s) for s in atlas_size)
        if len(self.atlas_size) != 3 or min(self.atlas_size) < 1:
            raise ValueError(f"atlas_size must be 3 positive sizes, got {tuple(atlas_size)}.")
        given = {canonical_modalities([k], argument="templates key")[0]: v for k, v in (templates or {}).items()}
        vols = np.zeros((len(self.modalities), *self.atlas_size), np.float16)
        self.missing_templates: tuple[str, ...] = tuple(m for m in self.modalities if m not in given)
        for c, m in enumerate(self.modalities):
            if m in given:
                vols[c] = _place(np.asarray(given[m].detach().float().cpu().numpy()), self.atlas_size)
        self.volumes = vols  # (C, *atlas) float16, numpy so that forked data-loader workers share it
        if self.missing_templates and warn:
            logger.warning("%s carries no learned template for %s: absent or dropped channels of these modalities "
                           "are filled with zeros.", source or "The encoder weight",
                           ", ".join(self.missing_templates))

    def __repr__(self) -> str:
        return (f"TemplateBank(modalities={list(self.modalities)}, atlas_size={self.atlas_size}, "
                f"missing_templates={list(self.missing_templates)})")

    @property
    def has_templates(self) -> bool:
        return len(self.missing_templates) < len(self.modalities)

    def export(self) -> dict[str, torch.Tensor]:
        """Modality -> ``(H, W, D)`` float32 tensor for the modalities that have a real template (for saving)."""
        return {m: torch.from_numpy(self.volumes[c].astype(np.float32)) for c, m in enumerate(self.modalities)
                if m not in self.missing_templates}

    def window(self, origin: Sequence[int], size: Sequence[int], channels: Sequence[int] | None = None) -> np.ndarray:
        """Exact template window ``(C', *size)`` float32 whose voxel 0 is atlas index ``origin`` (zeros outside the
        grid). ``channels`` selects channel indices (all by default)."""
        chans = list(range(len(self.modalities))) if channels is None else list(channels)
        out = np.zeros((len(chans), *map(int, size)), np.float32)
        if not chans:
            return out
        dst, src = [], []
        for o, n, a in zip(origin, size, self.atlas_size, strict=True):
            lo, hi = max(int(o), 0), min(int(o) + int(n), a)
            if hi <= lo:
                return out
            dst.append(slice(lo - int(o), hi - int(o)))
            src.append(slice(lo, hi))
        out[(slice(None), *dst)] = self.volumes[(chans, *src)]
        return out

    def fill(self, image: np.ndarray, keep: Sequence[bool], origin: Sequence[int]) -> np.ndarray:
        """``image (C, *S)`` in the atlas grid (voxel 0 at ``origin``): channels with ``keep[c] == False`` are
        replaced by the template window. Returns a new float32 array."""
        image = np.asarray(image, np.float32)
        if image.shape[0] != len(self.modalities):
            raise ValueError(f"image has {image.shape[0]} channels; the model's modalities are "
                             f"{list(self.modalities)}.")
        out = np.array(image, np.float32, copy=True)
        absent = [c for c, k in enumerate(keep) if not k]
        if absent:
            out[absent] = self.window(origin, image.shape[1:], absent)
        return out

    def resample(self, image_affine: np.ndarray | torch.Tensor, atlas_affine: np.ndarray | torch.Tensor,
                 shape: Sequence[int], channels: Sequence[int] | None = None) -> torch.Tensor:
        """Templates resampled into an arbitrary grid: ``(C', *shape)`` float32.

        ``image_affine``: voxel -> world (mm) of the target grid; ``atlas_affine``: voxel -> world of the atlas grid
        of the same study (e.g. the ``affine`` of ``build_preprocessing``'s output). Trilinear; zeros outside.
        """
        chans = list(range(len(self.modalities))) if channels is None else list(channels)
        vol = torch.from_numpy(self.volumes[chans].astype(np.float32))
        return resample_to_grid(vol, atlas_affine, image_affine, shape)


def _place(template: np.ndarray, atlas_size: tuple[int, ...]) -> np.ndarray:
    """Centre a template of another grid size into ``atlas_size`` (symmetric pad / centre crop, as preprocessing)."""
    if template.ndim != 3:
        raise ValueError(f"A template must be a 3-D (H, W, D) volume, got shape {template.shape}.")
    if tuple(template.shape) == atlas_size:
        return template
    src, dst, size = atlas_placement(template.shape, atlas_size)
    out = np.zeros(atlas_size, np.float32)
    out[tuple(slice(d, d + n) for d, n in zip(dst, size))] = template[tuple(slice(s, s + n) for s, n in zip(src, size))]
    logger.info("Template grid %s centre-placed into the atlas grid %s.", template.shape, atlas_size)
    return out


def resample_to_grid(volume: torch.Tensor, src_affine: np.ndarray | torch.Tensor, dst_affine: np.ndarray | torch.Tensor,
                     dst_shape: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resample ``volume (C, *src)`` with voxel->world ``src_affine`` into the grid ``dst_shape`` / ``dst_affine``.

    Returns ``(C, *dst_shape)``; points outside the source grid are 0. ``mode``: ``bilinear`` (trilinear in 3-D) or
    ``nearest``. Exact (up to float rounding) for integer shifts and axis flips.
    """
    if volume.ndim != 4:
        raise ValueError(f"volume must be (C, H, W, D), got shape {tuple(volume.shape)}.")
    src = torch.as_tensor(np.asarray(src_affine, np.float64))
    dst = torch.as_tensor(np.asarray(dst_affine, np.float64))
    if src.shape != (4, 4) or dst.shape != (4, 4):
        raise ValueError(f"affines must be 4x4, got {tuple(src.shape)} and {tuple(dst.shape)}.")
    vox = torch.linalg.inv(src) @ dst  # destination voxel -> source voxel
    axes = [torch.arange(int(n), dtype=torch.float64) for n in dst_shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*dst, 3)
    coords = grid @ vox[:3, :3].T + vox[:3, 3]
    # grid_sample wants (x, y, z) = (last, middle, first) input axis, normalised to [-1, 1] (align_corners=True).
    sizes = torch.tensor(volume.shape[1:], dtype=torch.float64)
    norm = 2.0 * coords / (sizes - 1).clamp_min(1) - 1.0
    norm = norm.flip(-1).to(torch.float32).unsqueeze(0)
    out = F.grid_sample(volume.float().unsqueeze(0), norm, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0]


class ModalityDropout:
    """Training augmentation: drop each present modality with probability ``p`` (the template replaces it),
    keeping at least ``min_keep`` real modalities per sample.

    Deterministic: ``__call__(present, rng)`` takes a ``numpy.random.Generator`` that the dataset seeds from
    (seed, epoch, index), so a sample's dropped channels do not depend on worker count or rank.
    """

    def __init__(self, p: float = 0.0, min_keep: int = 1) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"modality dropout probability must be in [0, 1), got {p}.")
        if min_keep < 1:
            raise ValueError(f"min_keep must be >= 1, got {min_keep}.")
        self.p = float(p)
        self.min_keep = int(min_keep)

    def __call__(self, present: Sequence[bool], rng: np.random.Generator) -> np.ndarray:
        """``present (C,)`` bool -> ``keep (C,)`` bool, a subset of ``present``."""
        present = np.asarray(present, bool)
        if self.p == 0.0:
            return present.copy()
        keep = present & (rng.random(present.shape[0]) >= self.p)
        need = min(self.min_keep, int(present.sum()))
        if keep.sum() < need:
            dropped = np.flatnonzero(present & ~keep)
            keep[rng.choice(dropped, size=need - int(keep.sum()), replace=False)] = True
        return keep


def modality_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modalities`` (order kept), largest first: 2^C - 1 subsets."""
    mods = tuple(modalities)
    out = [s for r in range(len(mods), 0, -1) for s in itertools.combinations(mods, r)]
    return out
