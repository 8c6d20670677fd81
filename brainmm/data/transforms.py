"""Preprocessing as MONAI dictionary transforms, built from a ``PretrainedCfg`` (or explicit arguments).

Pipeline (keys ``image`` and optionally ``label``)::

    GatherModalitiesd  study dict/Study -> image: [paths of the present modalities, in the requested order]
    LoadImaged         (image_only=False: MetaTensor + *_meta_dict), EnsureChannelFirstd -> (M, X, Y, Z)
    Orientationd       cfg.orientation (RAS)
    Spacingd           cfg.spacing, bilinear for images, nearest for labels
    ScaleIntensityRangePercentilesd   per channel p5..p95 -> 0..1, clipped (BrainMVP)
    CropForegroundd    bounding box of (any channel > threshold); start/end stored in the data dict
    ResizeWithPadOrCropd  symmetric pad/centre crop to the atlas grid cfg.atlas_size (240x240x155)

The last two steps reproduce the official "foreground crop, centred in the atlas grid": the placement of the
foreground box in the atlas grid is :func:`atlas_placement` (exactly MONAI's symmetric pad / centre crop), so the
atlas position of any voxel is known (the modality templates live in that grid). Every spatial step is invertible:
``monai.transforms.Invertd(keys, transform=pipeline, orig_keys=...)`` maps predictions back to the input grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from .modalities import MODALITIES, canonical_modalities, canonical_modality

if TYPE_CHECKING:
    from ..models._pretrained import PretrainedCfg

logger = logging.getLogger(__name__)

__all__ = [
    "PIPELINE_VERSION",
    "ForegroundAbove",
    "GatherModalitiesd",
    "PreprocessingParams",
    "atlas_placement",
    "build_preprocessing",
    "paste_into_atlas",
]

# Bump when the numerical output of the pipeline changes: it is part of the cache key.
PIPELINE_VERSION = "1"
_INTENSITY_METHODS = ("percentile", "none")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _default_intensity() -> dict[str, Any]:
    return {"method": "percentile", "lower": 5.0, "upper": 95.0, "b_min": 0.0, "b_max": 1.0, "clip": True,
            "channel_wise": True}


@dataclass(frozen=True)
class PreprocessingParams:
    """Everything that determines the preprocessed array (and therefore the cache key).

    Defaults equal ``PretrainedCfg``'s (BrainMVP): RAS, 1 mm, foreground crop, per-channel p5..p95 -> 0..1 clipped,
    atlas grid 240x240x155. ``atlas_size=None`` skips the atlas placement. ``foreground_threshold``: a voxel is
    foreground when any channel's *scaled* value is above it (0 = the official ``x > 0``).
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    atlas_size: tuple[int, int, int] | None = (240, 240, 155)
    foreground_crop: bool = True
    foreground_threshold: float = 0.0
    intensity: Mapping[str, Any] = field(default_factory=_default_intensity)

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {self.spacing}.")
        object.__setattr__(self, "spacing", spacing)
        if not isinstance(self.orientation, str) or len(self.orientation) != 3:
            raise ValueError(f"orientation must be 3 axis codes such as 'RAS', got {self.orientation!r}.")
        object.__setattr__(self, "orientation", self.orientation.upper())
        if self.atlas_size is not None:
            atlas = tuple(int(s) for s in self.atlas_size)
            if len(atlas) != 3 or min(atlas) < 1:
                raise ValueError(f"atlas_size must be 3 positive sizes (or None), got {self.atlas_size}.")
            object.__setattr__(self, "atlas_size", atlas)
        intensity = {**_default_intensity(), **dict(self.intensity)}
        if intensity["method"] not in _INTENSITY_METHODS:
            raise ValueError(
                f"intensity method {intensity['method']!r} is not supported; allowed: {', '.join(_INTENSITY_METHODS)}."
            )
        object.__setattr__(self, "intensity", intensity)
        object.__setattr__(self, "foreground_threshold", float(self.foreground_threshold))

    @classmethod
    def from_any(cls, cfg: PretrainedCfg | PreprocessingParams | Mapping[str, Any] | None = None,
                 **overrides: Any) -> PreprocessingParams:
        """From a ``PretrainedCfg`` (duck-typed), a ``PreprocessingParams``, a mapping (e.g. ``cfg.to_dict()``) or
        None (defaults); non-None ``overrides`` win."""
        names = ("spacing", "orientation", "atlas_size", "foreground_crop", "foreground_threshold", "intensity")
        if cfg is None:
            base: dict[str, Any] = {}
        elif isinstance(cfg, Mapping):
            base = {k: cfg[k] for k in names if k in cfg}
        else:
            base = {k: getattr(cfg, k) for k in names if hasattr(cfg, k)}
            if not base:
                raise TypeError(f"Expected a PretrainedCfg, PreprocessingParams or mapping, got {type(cfg).__name__}.")
        base.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(base) - set(names))
        if unknown:
            raise TypeError(f"Unknown preprocessing parameter(s) {unknown}; allowed: {', '.join(names)}.")
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["intensity"] = dict(self.intensity)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def digest(self) -> str:
        """Stable hash of the parameters and :data:`PIPELINE_VERSION` (hex, 16 chars)."""
        payload = json.dumps({"version": PIPELINE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ForegroundAbove:
    """``select_fn`` for ``CropForegroundd``: ``x > threshold`` (a class, not a lambda, so pipelines pickle)."""

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = float(threshold)

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        return x > self.threshold

    def __repr__(self) -> str:
        return f"ForegroundAbove({self.threshold})"


class GatherModalitiesd(MapTransform):
    """Turn a study into ``{image: [paths...], modalities: (names...)}`` in the order of ``modalities``.

    Input: a :class:`~brainmm.data.datasets.Study` or a dict ``{<modality or alias>: path, ..., [label], ...}``
    (``Study.to_dict()``). Only the requested modalities that are present are kept; none present is an error.
    """

    def __init__(self, modalities: Sequence[str] = MODALITIES, image_key: str = "image") -> None:
        super().__init__(keys=[image_key])
        self.modalities = canonical_modalities(modalities)
        self.image_key = image_key

    def __call__(self, data: Any) -> dict[Hashable, Any]:
        if hasattr(data, "images") and hasattr(data, "study_id"):  # a Study
            data = data.to_dict()
        d = dict(data)
        if isinstance(d.get(self.image_key), (list, tuple)) and "modalities" in d:
            return d  # already gathered
        by_mod: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(k, str) and v not in (None, ""):
                try:
                    by_mod[canonical_modality(k)] = v
                except ValueError:
                    continue  # not a modality key (study_id, label, class, ...)
        present = [m for m in self.modalities if m in by_mod]
        if not present:
            raise ValueError(
                f"Study {d.get('study_id', '?')!r} has none of the requested modalities {list(self.modalities)}; "
                f"it has {sorted(by_mod) or 'no modality keys'}."
            )
        d[self.image_key] = [str(by_mod[m]) for m in present]
        d["modalities"] = tuple(present)
        return d


def atlas_placement(
    shape: Sequence[int], atlas_size: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Where a volume of ``shape`` lands in the atlas grid under symmetric pad / centre crop.

    Returns ``(src_start, dst_start, size)`` per axis: ``atlas[dst:dst+size] = volume[src:src+size]``. Matches
    ``monai.transforms.ResizeWithPadOrCrop(method="symmetric")``: pad ``(A - S) // 2`` before, crop from
    ``S // 2 - A // 2``.
    """
    src, dst, size = [], [], []
    for s, a in zip(shape, atlas_size, strict=True):
        s, a = int(s), int(a)
        if s <= a:
            src.append(0)
            dst.append((a - s) // 2)
            size.append(s)
        else:
            src.append(s // 2 - a // 2)
            dst.append(0)
            size.append(a)
    return tuple(src), tuple(dst), tuple(size)


def paste_into_atlas(volume: np.ndarray | torch.Tensor, offset: Sequence[int], atlas_size: Sequence[int],
                     fill: float = 0.0) -> np.ndarray:
    """Place a ``(C, h, w, d)`` box whose voxel 0 sits at atlas index ``offset`` into a ``(C, *atlas_size)`` grid.

    Parts of the box outside the grid are dropped (offsets may be negative).
    """
    vol = np.asarray(volume)
    out = np.full((vol.shape[0], *map(int, atlas_size)), fill, dtype=vol.dtype)
    dst, src = [], []
    for o, n, a in zip(offset, vol.shape[1:], atlas_size, strict=True):
        lo, hi = max(int(o), 0), min(int(o) + n, int(a))
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo - int(o), hi - int(o)))
    out[(slice(None), *dst)] = vol[(slice(None), *src)]
    return out


def build_preprocessing(
    cfg: PretrainedCfg | PreprocessingParams | Mapping[str, Any] | None = None,
    modalities: Sequence[str] | None = None,
    *,
    with_label: bool = False,
    atlas_size: Sequence[int] | None = None,
    place_in_atlas: bool = True,
    spacing: Sequence[float] | None = None,
    orientation: str | None = None,
    foreground_crop: bool | None = None,
    foreground_threshold: float | None = None,
    intensity: Mapping[str, Any] | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> Compose:
    """MONAI ``Compose`` mapping a study to ``{image: (M, *atlas_size) float32 MetaTensor, [label: (1, ...)], ...}``.

    ``cfg``: a ``PretrainedCfg`` / ``PreprocessingParams`` / mapping / None (BrainMVP defaults); explicit keyword
    arguments override it. ``modalities`` (default: ``cfg.modalities`` if it has them, else all 8) fixes the
    channel order; only the present ones are stacked, and their names are in ``out["modalities"]``. The files of a
    study must share one grid (the stack takes the first file's affine; :func:`~brainmm.data.check.check_studies`
    verifies this).
    ``place_in_atlas=False`` stops after the foreground crop (the preprocessed cache places the box itself, using
    :func:`atlas_placement`). The foreground box (in the resampled grid) is in ``out["foreground_start_coord"]`` /
    ``out["foreground_end_coord"]``.
    """
    params = PreprocessingParams.from_any(cfg, spacing=spacing, orientation=orientation, atlas_size=atlas_size,
                                          foreground_crop=foreground_crop, foreground_threshold=foreground_threshold,
                                          intensity=intensity)
    if modalities is None:
        modalities = getattr(cfg, "modalities", None) if cfg is not None and not isinstance(cfg, Mapping) else None
        modalities = modalities or MODALITIES
    mods = canonical_modalities(modalities, argument="modalities")
    keys = [image_key, label_key] if with_label else [image_key]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    steps: list[Any] = [
        GatherModalitiesd(mods, image_key=image_key),
        LoadImaged(keys, image_only=False, dtype=np.float32),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes=params.orientation, labels=_RAS_LABELS),
        # float32 instead of MONAI's float64 default: 8 channels of 240x240x155 would need 570 MB in float64.
        Spacingd(keys, pixdim=params.spacing, mode=modes, dtype=np.float32),
    ]
    it = params.intensity
    if it["method"] == "percentile":
        steps.append(ScaleIntensityRangePercentilesd(
            image_key, lower=float(it["lower"]), upper=float(it["upper"]), b_min=float(it["b_min"]),
            b_max=float(it["b_max"]), clip=bool(it["clip"]), channel_wise=bool(it["channel_wise"]), dtype=np.float32))
    if params.foreground_crop:
        # allow_smaller: a box larger than the image is never padded here; padding happens in the atlas placement.
        steps.append(CropForegroundd(keys, source_key=image_key, select_fn=ForegroundAbove(params.foreground_threshold),
                                     margin=0, allow_smaller=True))
    if place_in_atlas and params.atlas_size is not None:
        steps.append(ResizeWithPadOrCropd(keys, spatial_size=params.atlas_size, method="symmetric", mode="constant"))
    return Compose(steps)
