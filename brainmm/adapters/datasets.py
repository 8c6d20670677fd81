"""Fine-tuning data: seeded splits and label-fraction subsets, and datasets that read the preprocessed cache.

Every sample is a function of (seed, epoch, index) only (``np.random.default_rng([seed, epoch, index])``), never of
worker count or rank, so DDP shards and resumed runs see the same crops, flips and modality dropouts. Absent (and
dropped) modalities are filled in the dataset with the exact template window at the sample's atlas position
(:class:`~brainmm.adapters.missing.TemplateBank`), so the model always gets its C channels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.cache import PreprocessedCache
from ..data.datasets import Study
from .labels import LabelScheme, check_label_values
from .missing import ModalityDropout, TemplateBank

logger = logging.getLogger(__name__)

__all__ = ["ClassificationDataset", "SegmentationCropDataset", "StudyVolumeDataset", "label_fraction_subset",
           "split_studies"]


def _permutation(ids: Sequence[str], seed: int, salt: int) -> list[int]:
    # Seeded by (seed, salt) only: the order depends on the sorted ids, not on the order studies were listed in.
    return list(np.random.default_rng([int(seed), salt]).permutation(len(ids)))


def split_studies(studies: Sequence[Study], val_fraction: float = 0.2, *, seed: int = 0,
                  stratify: bool = False) -> tuple[list[Study], list[Study]]:
    """Deterministic train/validation split by study id: ``(train, val)``, both sorted by id.

    ``stratify`` splits each ``class_label`` group separately (classification), so every class reaches the
    validation set when it has at least 2 studies. At least one study stays in training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    ordered = sorted(studies, key=lambda s: s.study_id)
    groups: dict[Any, list[Study]] = {}
    for s in ordered:
        groups.setdefault(s.class_label if stratify else None, []).append(s)
    val: list[Study] = []
    for gi, key in enumerate(sorted(groups, key=str)):
        members = groups[key]
        n_val = int(round(len(members) * val_fraction))
        if val_fraction > 0 and n_val == 0 and len(members) >= 2 and stratify:
            n_val = 1
        n_val = min(n_val, len(members) - 1)
        perm = _permutation([s.study_id for s in members], seed, 1_000 + gi)
        val += [members[i] for i in perm[:n_val]]
    val_ids = {s.study_id for s in val}
    return [s for s in ordered if s.study_id not in val_ids], sorted(val, key=lambda s: s.study_id)


def label_fraction_subset(studies: Sequence[Study], fraction: float, *, seed: int = 0) -> list[Study]:
    """The labelled subset for data-efficiency studies: ``ceil(fraction * n)`` studies (at least 1), chosen by a
    seeded permutation of the id-sorted list. Deterministic, and nested: a larger fraction with the same seed
    contains every study of a smaller one. Returned sorted by id."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}.")
    ordered = sorted(studies, key=lambda s: s.study_id)
    if not ordered:
        return []
    k = max(1, math.ceil(fraction * len(ordered) - 1e-9))
    perm = _permutation([s.study_id for s in ordered], seed, 2_000)
    chosen = sorted(perm[:k])
    return [ordered[i] for i in chosen]


class _CacheReader:
    """Shared helpers: the model-channel view of a cache entry and its template fill."""

    def __init__(self, cache: PreprocessedCache, studies: Sequence[Study], modalities: Sequence[str],
                 templates: TemplateBank) -> None:
        if tuple(templates.modalities) != tuple(modalities):
            raise ValueError(f"templates are for {list(templates.modalities)}, the model's inputs are "
                             f"{list(modalities)}.")
        if tuple(templates.atlas_size) != tuple(cache.atlas_size):
            raise ValueError(f"templates live in the atlas grid {templates.atlas_size} but the cache uses "
                             f"{cache.atlas_size}; call model.set_atlas_size(cache.atlas_size).")
        self.cache = cache
        self.modalities = tuple(modalities)
        self.templates = templates
        self.entries: list[dict[str, Any]] = []
        for s in studies:
            meta = cache.load_meta(s)
            present = [m in meta["modalities"] for m in self.modalities]
            if not any(present):
                raise ValueError(f"Study {meta['study_id']!r} has none of the model's modalities "
                                 f"{list(self.modalities)} (it has {meta['modalities']}).")
            self.entries.append(meta)

    def _box(self, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(C, *box)`` float16 memmap-backed channels in model order (zeros where absent) and ``present (C,)``."""
        vol, _ = self.cache.load(meta["study_id"])
        present = np.array([m in meta["modalities"] for m in self.modalities])
        return vol, present

    def _channels(self, meta: dict[str, Any], vol: np.ndarray, start_in_box: Sequence[int],
                  size: Sequence[int]) -> np.ndarray:
        """Window ``(C, *size)`` of the box at box index ``start_in_box`` in model channel order, zeros outside."""
        out = np.zeros((len(self.modalities), *map(int, size)), np.float32)
        overlap = _overlap(start_in_box, size, vol.shape[1:])
        if overlap is None:
            return out
        dst, src = overlap
        for c, m in enumerate(self.modalities):
            if m in meta["modalities"]:
                out[(c, *dst)] = vol[(meta["modalities"].index(m), *src)]
        return out


def _overlap(start: Sequence[int], size: Sequence[int],
             shape: Sequence[int]) -> tuple[list[slice], list[slice]] | None:
    """Where a window of ``size`` at ``start`` (may be negative) meets an array of ``shape``: (window slices,
    array slices), or None where they do not meet."""
    dst, src = [], []
    for s, n, b in zip(start, size, shape, strict=True):
        lo, hi = max(int(s), 0), min(int(s) + int(n), int(b))
        if hi <= lo:
            return None
        dst.append(slice(lo - int(s), hi - int(s)))
        src.append(slice(lo, hi))
    return dst, src


def _read_label(label: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    out = np.zeros(tuple(map(int, size)), np.int64)
    overlap = _overlap(start, size, label.shape)
    if overlap is not None:
        out[tuple(overlap[0])] = label[tuple(overlap[1])]
    return out


def _augment(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
             intensity: float = 0.1) -> tuple[np.ndarray, np.ndarray | None]:
    """Random flips along each axis (p = 0.5, image and label together), then per-channel intensity scale and
    shift in ``[-intensity, intensity]`` (MONAI's RandScaleIntensity / RandShiftIntensity, BraTS recipe)."""
    for axis in range(3):
        if rng.random() < 0.5:
            image = np.flip(image, axis=axis + 1)
            if label is not None:
                label = np.flip(label, axis=axis)
    c = image.shape[0]
    scale = 1.0 + rng.uniform(-intensity, intensity, size=(c, 1, 1, 1)).astype(np.float32)
    shift = rng.uniform(-intensity, intensity, size=(c, 1, 1, 1)).astype(np.float32)
    image = image * scale + shift
    return np.ascontiguousarray(image), None if label is None else np.ascontiguousarray(label)


class SegmentationCropDataset(_CacheReader, Dataset):
    """Random training crops with labels. Item ``i`` is study ``i // samples_per_study``.

    The crop centre is a random label voxel with probability ``pos_fraction`` (when the study has any), else a
    random voxel of the foreground box (MONAI's RandCropByPosNegLabel idea, without its per-call cost). Sample:
    ``image (C, *crop)`` float32 (absent/dropped channels template-filled), ``label (1, *crop)`` int64 raw label
    values, ``present (C,)`` bool (after dropout), ``origin (3,)`` atlas index of the crop, ``study_id``.
    """

    def __init__(self, cache: PreprocessedCache, studies: Sequence[Study], *, modalities: Sequence[str],
                 templates: TemplateBank, scheme: LabelScheme, crop_size: Sequence[int], seed: int = 0,
                 samples_per_study: int = 1, pos_fraction: float = 0.5, dropout: ModalityDropout | None = None,
                 augment: bool = True) -> None:
        _CacheReader.__init__(self, cache, studies, modalities, templates)
        self.crop_size = tuple(int(c) for c in crop_size)
        if len(self.crop_size) != 3 or any(c > a for c, a in zip(self.crop_size, cache.atlas_size)):
            raise ValueError(f"crop_size {self.crop_size} must be 3 sizes within the atlas grid {cache.atlas_size}.")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}.")
        self.scheme = scheme
        self.seed = int(seed)
        self.samples_per_study = int(samples_per_study)
        self.pos_fraction = float(pos_fraction)
        self.dropout = dropout or ModalityDropout(0.0)
        self.augment = bool(augment)
        self.epoch = 0
        self._fg: dict[str, np.ndarray] = {}
        for meta in self.entries:
            lab = cache.load_label(meta["study_id"])
            counts = np.bincount(np.asarray(lab).ravel(), minlength=1)
            check_label_values(np.flatnonzero(counts), scheme, source=f"of study {meta['study_id']!r}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries) * self.samples_per_study

    def _foreground(self, meta: dict[str, Any], label: np.ndarray) -> np.ndarray:
        sid = meta["study_id"]
        if sid not in self._fg:  # per worker process; label boxes are small (uint8)
            self._fg[sid] = np.flatnonzero(np.asarray(label) > 0)
        return self._fg[sid]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples.")
        meta = self.entries[index // self.samples_per_study]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        vol, present = self._box(meta)
        label = self.cache.load_label(meta["study_id"])
        box = np.asarray(vol.shape[1:], np.int64)
        crop = np.asarray(self.crop_size, np.int64)
        offset = np.asarray(meta["atlas_offset"], np.int64)
        fg = self._foreground(meta, label)
        if len(fg) and rng.random() < self.pos_fraction:
            centre = np.asarray(np.unravel_index(fg[rng.integers(len(fg))], label.shape), np.int64)
        else:
            centre = rng.integers(0, box)
        # In atlas coordinates, kept inside the grid so that the template window is always complete.
        origin = np.clip(offset + centre - crop // 2, 0, np.asarray(self.cache.atlas_size) - crop)
        start = origin - offset
        image = self._channels(meta, vol, start, crop)
        keep = self.dropout(present, rng)
        image = self.templates.fill(image, keep, origin)
        lab = _read_label(label, start, crop)
        if self.augment:
            image, lab = _augment(image, lab, rng)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(lab[None]),
                "present": torch.from_numpy(keep), "origin": torch.from_numpy(origin), "study_id": meta["study_id"]}


class StudyVolumeDataset(_CacheReader, Dataset):
    """Whole foreground boxes for validation / evaluation (batch size 1: boxes differ in size).

    ``keep`` restricts the real modalities (the others are template-filled even when present): the
    missing-modality evaluation. Sample: ``image (C, *box)`` float32, ``label (1, *box)`` int64 (if the cache has
    labels), ``present (C,)``, ``offset (3,)`` atlas index of the box, ``study_id``, ``class_label``.
    """

    def __init__(self, cache: PreprocessedCache, studies: Sequence[Study], *, modalities: Sequence[str],
                 templates: TemplateBank, keep: Sequence[str] | None = None) -> None:
        _CacheReader.__init__(self, cache, studies, modalities, templates)
        self.keep = None if keep is None else {str(m) for m in keep}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        meta = self.entries[index]
        vol, present = self._box(meta)
        if self.keep is not None:
            present = present & np.array([m in self.keep for m in self.modalities])
        image = self._channels(meta, vol, (0, 0, 0), vol.shape[1:])
        image = self.templates.fill(image, present, meta["atlas_offset"])
        out: dict[str, Any] = {"image": torch.from_numpy(image), "present": torch.from_numpy(present),
                               "offset": torch.as_tensor(meta["atlas_offset"]), "study_id": meta["study_id"],
                               "class_label": meta.get("class_label")}
        if self.cache.with_label:
            out["label"] = torch.from_numpy(np.asarray(self.cache.load_label(meta["study_id"]), np.int64)[None])
        return out


def resize_volume(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(C, *S)`` -> ``(C, *size)`` trilinear (the classification input: the whole foreground box, resized)."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    return F.interpolate(image[None].float(), size=tuple(int(s) for s in size), mode="trilinear",
                         align_corners=False)[0]


class ClassificationDataset(_CacheReader, Dataset):
    """The whole foreground box of each study, template-filled, resized to ``input_size``; target = class index.

    Training (``augment``): modality dropout, flips, intensity scale/shift. ``keep`` as in
    :class:`StudyVolumeDataset`.
    """

    def __init__(self, cache: PreprocessedCache, studies: Sequence[Study], *, modalities: Sequence[str],
                 templates: TemplateBank, class_names: Sequence[str], input_size: Sequence[int], seed: int = 0,
                 dropout: ModalityDropout | None = None, augment: bool = False,
                 keep: Sequence[str] | None = None) -> None:
        _CacheReader.__init__(self, cache, studies, modalities, templates)
        self.class_names = tuple(class_names)
        self.input_size = tuple(int(s) for s in input_size)
        self.seed = int(seed)
        self.dropout = dropout or ModalityDropout(0.0)
        self.augment = bool(augment)
        self.keep = None if keep is None else {str(m) for m in keep}
        self.epoch = 0
        for meta in self.entries:
            if meta.get("class_label") not in self.class_names:
                raise ValueError(f"Study {meta['study_id']!r} has class {meta.get('class_label')!r}, not one of "
                                 f"{list(self.class_names)} (labels.csv / the manifest's class column).")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        meta = self.entries[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        vol, present = self._box(meta)
        if self.keep is not None:
            present = present & np.array([m in self.keep for m in self.modalities])
        keep = self.dropout(present, rng) if self.augment else present
        image = self._channels(meta, vol, (0, 0, 0), vol.shape[1:])
        image = self.templates.fill(image, keep, meta["atlas_offset"])
        if self.augment:
            image, _ = _augment(image, None, rng)
        x = resize_volume(torch.from_numpy(image), self.input_size)
        return {"image": x, "target": torch.tensor(self.class_names.index(meta["class_label"])),
                "present": torch.from_numpy(keep), "study_id": meta["study_id"]}
