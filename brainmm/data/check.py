"""Validate studies before training: readable, 3-D, consistent grids, finite, non-empty, big enough.

Reads NIfTI headers plus one pass over each file's data (``nibabel`` ``dataobj``), nothing else: no resampling.

Size policy: preprocessing always places the (foreground-cropped) volume into the atlas grid, padding with zeros,
so a crop of ``crop_size`` is possible for every volume as long as ``crop_size`` fits the atlas grid. A volume whose
extent after resampling to ``spacing`` is smaller than the crop along some axis therefore only yields crops that
are partly zero padding: that is a **warning**, not a problem. A crop larger than the atlas grid is a problem.
The foreground box is not computed here (it needs the intensity scaling); it can only shrink the volume, which
again only adds padding to some crops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .datasets import Study
from .modalities import MODALITIES

logger = logging.getLogger(__name__)

__all__ = ["DataReport", "check_studies"]


@dataclass
class DataReport:
    """Result of :func:`check_studies`.

    ``problems``/``warnings``: one line each, ``"<study>: <file>: <what is wrong>"``. ``ok`` is True when there
    are no problems (warnings allowed).
    """

    studies: list[Study]
    modality_counts: dict[str, int]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_labels: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format_table(self, max_lines: int = 50) -> str:
        """Human-readable summary: study count, per-modality presence, classes, problems and warnings."""
        n = len(self.studies)
        lines = [f"studies: {n}   with label: {self.n_labels}"]
        if self.class_counts:
            lines.append("classes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.class_counts.items())))
        lines.append(f"{'modality':<10}{'studies':>9}{'share':>8}")
        for m, c in self.modality_counts.items():
            lines.append(f"{m:<10}{c:>9}{(100.0 * c / n if n else 0.0):>7.0f}%")
        for title, items in (("problems", self.problems), ("warnings", self.warnings)):
            lines.append(f"{title}: {len(items)}")
            lines.extend(f"  {p}" for p in items[:max_lines])
            if len(items) > max_lines:
                lines.append(f"  ... and {len(items) - max_lines} more")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


@dataclass
class _FileInfo:
    shape: tuple[int, ...] | None = None
    affine: np.ndarray | None = None
    zooms: tuple[float, ...] | None = None
    problems: list[str] = field(default_factory=list)
    integer_valued: bool = True


def _inspect(path: Path, read_values: bool, is_label: bool) -> _FileInfo:
    """Header + one pass over the data of one file."""
    import nibabel as nib

    info = _FileInfo()
    if not path.is_file():
        info.problems.append("file not found")
        return info
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for corrupt files
        info.problems.append(f"unreadable by nibabel ({type(e).__name__}: {e})")
        return info
    info.shape = tuple(int(s) for s in img.shape)
    info.affine = np.asarray(img.affine, float)
    info.zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if len(info.shape) != 3:
        info.problems.append(f"{len(info.shape)}-D image of shape {info.shape}; expected a 3-D volume")
        return info
    if not np.all(np.isfinite(info.affine)) or abs(np.linalg.det(info.affine[:3, :3])) < 1e-12:
        info.problems.append("invalid affine (non-finite or singular)")
    if not read_values:
        return info
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        info.problems.append(f"data unreadable ({type(e).__name__}: {e})")
        return info
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        n_bad = int(data.size - np.count_nonzero(finite))
        if n_bad:
            info.problems.append(f"{n_bad} non-finite values (NaN/Inf)")
            data = data[finite]
        if is_label and data.size and not np.array_equal(data, np.rint(data)):
            info.integer_valued = False
            info.problems.append("label has non-integer values")
    if data.size == 0:
        info.problems.append("no finite values")
    elif not is_label:
        lo, hi = float(data.min()), float(data.max())
        if lo == hi:
            info.problems.append(f"empty volume (every voxel is {lo:g})")
    return info


def _resampled_extent(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]) -> list[int]:
    """Voxels per world axis (R, A, S order) after resampling to ``spacing``."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    extent = [0] * 3
    for vox_axis, (world_axis, _) in enumerate(ornt):
        w = int(world_axis)
        extent[w] = int(math.floor(shape[vox_axis] * zooms[vox_axis] / spacing[w] + 0.5))
    return extent


def _check_study(study: Study, crop_size: Sequence[int], spacing: Sequence[float], affine_tol: float,
                 read_values: bool) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    warnings: list[str] = []
    ref_name, ref = None, None
    for name, path in [*study.images.items(), *([("label", study.label)] if study.label is not None else [])]:
        info = _inspect(Path(path), read_values, is_label=name == "label")
        problems.extend(f"{study.study_id}: {name} {path}: {p}" for p in info.problems)
        if info.shape is None or len(info.shape) != 3 or info.affine is None:
            continue
        if ref is None:
            ref_name, ref = name, info
            continue
        if info.shape != ref.shape:
            problems.append(f"{study.study_id}: {name} {path}: shape {info.shape} differs from {ref_name} "
                            f"{ref.shape}")
        elif not np.allclose(info.affine, ref.affine, atol=affine_tol, rtol=0):
            diff = float(np.abs(info.affine - ref.affine).max())
            problems.append(f"{study.study_id}: {name} {path}: affine differs from {ref_name} by up to {diff:.4g} "
                            f"(tolerance {affine_tol:g}); the modalities must be co-registered on one grid")
    if ref is not None and ref.shape is not None and ref.affine is not None:
        extent = _resampled_extent(ref.shape, ref.affine, spacing)
        small = [f"{e} < {c}" for e, c in zip(extent, crop_size, strict=True) if e < c]
        if small:
            warnings.append(f"{study.study_id}: volume is {tuple(extent)} voxels at {tuple(spacing)} mm, smaller than "
                            f"the crop {tuple(crop_size)} ({', '.join(small)}); crops will include zero padding")
    return problems, warnings


def check_studies(
    studies: Iterable[Study],
    crop_size: Sequence[int] = (96, 96, 96),
    affine_tol: float = 1e-3,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    atlas_size: Sequence[int] | None = (240, 240, 155),
    read_values: bool = True,
    num_workers: int = 0,
) -> DataReport:
    """Validate every study and return a :class:`DataReport`.

    Problems: missing/unreadable file, not 3-D, shape or affine (beyond ``affine_tol`` mm) differing across the
    modalities and label of a study, non-finite values, constant (empty) image, non-integer label, a crop larger
    than the atlas grid. Warnings: volume smaller than the crop (see the module docstring). ``read_values=False``
    checks headers only. ``num_workers`` threads read files in parallel (gzip decoding releases the GIL).
    """
    studies = list(studies)
    crop = tuple(int(c) for c in crop_size)
    if len(crop) != 3 or min(crop) < 1:
        raise ValueError(f"crop_size must be 3 positive sizes, got {tuple(crop_size)}.")
    spacing_t = tuple(float(s) for s in spacing)
    counts = {m: sum(m in s.images for s in studies) for m in MODALITIES}
    classes: dict[str, int] = {}
    for s in studies:
        if s.class_label is not None:
            classes[s.class_label] = classes.get(s.class_label, 0) + 1
    report = DataReport(studies=studies, modality_counts=counts, n_labels=sum(s.label is not None for s in studies),
                        class_counts=classes)
    if atlas_size is not None and any(c > a for c, a in zip(crop, atlas_size, strict=True)):
        report.problems.append(f"crop_size {crop} is larger than the atlas grid {tuple(atlas_size)}: no crop fits")

    def run(s: Study) -> tuple[list[str], list[str]]:
        return _check_study(s, crop, spacing_t, affine_tol, read_values)

    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            results = list(pool.map(run, studies))
    else:
        results = [run(s) for s in studies]
    for problems, warnings in results:
        report.problems.extend(problems)
        report.warnings.extend(warnings)
    logger.info("Checked %d studies: %d problems, %d warnings.", len(studies), len(report.problems),
                len(report.warnings))
    return report
