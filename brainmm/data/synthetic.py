"""Multi-parametric brain MRI phantoms, written as real NIfTI files so the whole I/O path is exercised.

A phantom is a deformed ellipsoidal head (scalp, skull, CSF, folded cortical grey-matter ribbon, white matter,
deep grey nuclei, lateral ventricles, vessels) with an optional brain tumour (BraTS 2023 labels) or stroke-like
wedge lesion, imaged with tissue-dependent contrast in the 8 canonical modalities, a smooth multiplicative bias
field, Rician noise and a random per-scan intensity scale. Everything is vectorised: smooth random fields are sums
of plane waves evaluated as one matrix product over separable exponentials, so a 240x240x155 study takes a few
seconds and a 64x64x48 one well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .datasets import BRATS2023_SUFFIXES
from .modalities import MODALITIES, canonical_modalities

logger = logging.getLogger(__name__)

__all__ = ["CLASS_NAMES", "GENERATOR_VERSION", "TISSUES", "SyntheticStudy", "synthesize_study",
           "write_synthetic_dataset"]

GENERATOR_VERSION = "1"
CLASS_NAMES: tuple[str, ...] = ("healthy", "tumour", "stroke")
TISSUES: tuple[str, ...] = ("background", "scalp", "skull", "csf", "gm", "wm", "vessel")
_T = {name: i for i, name in enumerate(TISSUES)}

# Relative tissue intensities per modality, in TISSUES order. Orderings follow clinical appearance:
# T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR suppresses CSF; PD has low contrast; TOF-MRA shows bright flowing blood
# over a dark background; ADC is high in free water (CSF), DWI low there. Vessels are flow voids on T2/FLAIR and
# enhance on T1c.
_TISSUE_CONTRAST: dict[str, tuple[float, ...]] = {
    #        bg   scalp skull csf   gm    wm    vessel
    "flair": (0.0, 0.60, 0.06, 0.10, 0.62, 0.48, 0.15),
    "t1":    (0.0, 0.85, 0.10, 0.20, 0.52, 0.78, 0.45),
    "t1c":   (0.0, 0.85, 0.10, 0.20, 0.54, 0.78, 0.95),
    "t2":    (0.0, 0.55, 0.06, 1.00, 0.60, 0.42, 0.10),
    "mra":   (0.0, 0.40, 0.05, 0.08, 0.22, 0.26, 1.00),
    "pd":    (0.0, 0.80, 0.10, 0.90, 0.78, 0.64, 0.30),
    "dwi":   (0.0, 0.10, 0.03, 0.15, 0.52, 0.46, 0.10),
    "adc":   (0.0, 0.10, 0.02, 1.00, 0.28, 0.24, 0.35),
}
# Lesion intensities: (NETC, SNFH oedema, ET enhancing rim, acute stroke). ET enhances only on T1c; oedema is bright
# on FLAIR/T2; the acute infarct has restricted diffusion (DWI bright, ADC dark).
_LESION_CONTRAST: dict[str, tuple[float, float, float, float]] = {
    "flair": (0.50, 0.95, 0.75, 0.85),
    "t1":    (0.30, 0.55, 0.50, 0.45),
    "t1c":   (0.30, 0.58, 1.30, 0.48),
    "t2":    (0.92, 0.80, 0.68, 0.80),
    "mra":   (0.15, 0.24, 0.45, 0.22),
    "pd":    (0.92, 0.85, 0.80, 0.82),
    "dwi":   (0.30, 0.45, 0.65, 1.00),
    "adc":   (0.60, 0.45, 0.30, 0.10),
}
_NETC, _SNFH, _ET = 1, 2, 3  # BraTS 2023 label values

# Shell radii in units of the (deformed) head radius: scalp | skull | outer CSF | brain.
_R_SKULL, _R_CSF, _R_BRAIN = 0.93, 0.86, 0.82
_HEAD_SEMI_AXES = (0.38, 0.45, 0.44)  # fraction of the field of view per axis (LR, AP, SI)
_ORIGIN_SHIFT_MM = (1.5, -2.5, 4.0)  # keeps world (0,0,0) off the voxel centre: catches affine mix-ups


@dataclass
class SyntheticStudy:
    """One phantom study (arrays in RAS voxel order, shape ``(H, W, D)``).

    ``images``: present modality -> float32 image, canonical order. ``label``: uint8 BraTS 2023 tumour labels
    (0 background, 1 NETC, 2 SNFH, 3 ET). ``lesion``: uint8 stroke lesion mask (all zero unless ``kind == "stroke"``).
    ``tissue``: uint8 tissue codes (index into :data:`TISSUES`). ``affine``: 4x4 voxel-to-RAS-world (mm).
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    lesion: np.ndarray
    tissue: np.ndarray
    kind: str
    affine: np.ndarray
    seed: int

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.images)

    @property
    def class_index(self) -> int:
        return CLASS_NAMES.index(self.kind)


# ----------------------------------------------------------------------------------------------------------------
# smooth random fields


def _random_field(
    rng: np.random.Generator, axes: Sequence[np.ndarray], n_terms: int, freq: tuple[float, float]
) -> np.ndarray:
    """Smooth random field ``(H, W, D)`` float32, zero mean and about unit std: a sum of random plane waves.

    ``axes`` are the 1-D normalised coordinates; ``freq`` the range of angular frequencies (rad per unit).
    cos(k.u + phi) = Re(e^{i kx x} e^{i ky y} e^{i kz z + phi}) separates per axis, so the whole sum is one real
    matrix product ``(H*W, 2n) @ (2n, D)`` instead of n full-volume cos() evaluations.
    """
    x, y, z = (np.asarray(a, np.float64) for a in axes)
    dirs = rng.normal(size=(n_terms, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True) + 1e-12
    k = dirs * rng.uniform(freq[0], freq[1], size=(n_terms, 1))
    phase = rng.uniform(0.0, 2 * np.pi, size=n_terms)
    amp = rng.uniform(0.5, 1.0, size=n_terms)
    exy = np.exp(1j * (np.outer(x, k[:, 0]) + phase))[:, None, :] * np.exp(1j * np.outer(y, k[:, 1]))[None, :, :]
    ez = amp * np.exp(1j * np.outer(z, k[:, 2]))
    exy = exy.reshape(-1, n_terms)
    # Re(a b) = Re a Re b - Im a Im b, computed as one float32 product of stacked real/imaginary parts.
    left = np.concatenate([exy.real, -exy.imag], axis=1).astype(np.float32)
    right = np.concatenate([ez.real, ez.imag], axis=1).astype(np.float32)
    field = (left @ right.T).reshape(len(x), len(y), len(z))
    field *= np.float32(1.0 / np.sqrt(0.5 * np.sum(amp**2)))
    return field


# ----------------------------------------------------------------------------------------------------------------
# anatomy


def _ellipsoid(u: Sequence[np.ndarray], centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoidal radius ``(H, W, D)`` (1 on the surface) from broadcastable coordinate axes."""
    x, y, z = u
    return np.sqrt(((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
                   + ((z - centre[2]) / semi[2]) ** 2)


def _anatomy(rng: np.random.Generator, axes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue map ``(H, W, D)`` uint8, the deformed head radius and a texture field (both float32)."""
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    r = np.sqrt(x * x + y * y + z * z).astype(np.float32)
    # Low-frequency shape deformation (head shape differs between subjects).
    rh = r * (1.0 + 0.05 * _random_field(rng, axes, 6, (1.5, 3.0)))
    tissue = np.zeros(rh.shape, np.uint8)
    tissue[rh <= 1.0] = _T["scalp"]
    tissue[rh <= _R_SKULL] = _T["skull"]
    tissue[rh <= _R_CSF] = _T["csf"]
    brain = rh <= _R_BRAIN
    # Cortex: sulci are thin CSF sheets along the zero set of a folding field, reaching ``depth`` below the brain
    # surface; grey matter lines the surface and both walls of every sulcus; gyral cores are white matter.
    fold = _random_field(rng, axes, 16, (18.0, 28.0))
    depth = 0.17 * (1.0 + 0.25 * _random_field(rng, axes, 4, (2.0, 4.0)))
    cortex = brain & (rh > _R_BRAIN - depth)
    tissue[brain] = _T["wm"]
    tissue[(cortex & (np.abs(fold) < 0.75)) | (brain & (rh > _R_BRAIN - 0.045))] = _T["gm"]
    tissue[cortex & (np.abs(fold) < 0.12)] = _T["csf"]
    # Interhemispheric fissure above the ventricles.
    tissue[brain & (np.abs(x) < 0.015) & (z > 0.1) & (rh > 0.35)] = _T["csf"]
    # Deep grey nuclei (thalamus / basal ganglia) and lateral ventricles, mirrored about the midline.
    jitter = rng.uniform(-0.02, 0.02, size=6)
    for side in (-1.0, 1.0):
        deep = _ellipsoid((x, y, z), (side * (0.17 + jitter[0]), -0.03 + jitter[1], 0.0), (0.09, 0.15, 0.1))
        tissue[deep <= 1.0] = _T["gm"]
        vent = _ellipsoid((x, y, z), (side * (0.07 + jitter[2]), 0.04 + jitter[3], 0.13 + jitter[4]),
                          (0.05 + jitter[5] / 2, 0.27, 0.08))
        tissue[vent <= 1.0] = _T["csf"]
    # Vessels: the intersection of the zero sets of two smooth fields is a network of curves; a tube around it.
    v1 = _random_field(rng, axes, 8, (4.0, 8.0))
    v2 = _random_field(rng, axes, 8, (4.0, 8.0))
    tissue[(rh <= _R_CSF) & (v1 * v1 + v2 * v2 < 0.012)] = _T["vessel"]
    texture = _random_field(rng, axes, 12, (10.0, 30.0))
    return tissue, rh, texture


def _tumour(rng: np.random.Generator, axes: Sequence[np.ndarray], tissue: np.ndarray, rh: np.ndarray) -> np.ndarray:
    """BraTS 2023 labels: NETC core, enhancing rim (ET), and oedema (SNFH) spreading mostly through white matter."""
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    side = rng.choice([-1.0, 1.0])
    centre = (side * rng.uniform(0.2, 0.4), rng.uniform(-0.3, 0.3), rng.uniform(-0.05, 0.3))
    radius = rng.uniform(0.16, 0.22)
    rt = _ellipsoid((x, y, z), centre, (radius,) * 3) * (1.0 + 0.15 * _random_field(rng, axes, 6, (4.0, 9.0)))
    brain = rh <= _R_BRAIN
    label = np.zeros(tissue.shape, np.uint8)
    label[brain & (rt < 1.0 + 0.6) & (tissue == _T["wm"])] = _SNFH
    label[brain & (rt < 1.0 + 0.15) & (tissue == _T["gm"])] = _SNFH
    label[brain & (rt < 0.8)] = _ET
    label[brain & (rt < 0.45)] = _NETC
    return label


def _stroke(rng: np.random.Generator, axes: Sequence[np.ndarray], tissue: np.ndarray, rh: np.ndarray) -> np.ndarray:
    """A wedge (vascular-territory-like cone from deep brain out to the cortex) restricted to grey/white matter."""
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    d = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.0), rng.uniform(-0.6, 0.6), rng.uniform(-0.2, 0.4)])
    d /= np.linalg.norm(d)
    apex = 0.12 * d
    px, py, pz = x - apex[0], y - apex[1], z - apex[2]
    dist = np.sqrt(px * px + py * py + pz * pz) + 1e-6
    cos_angle = (px * d[0] + py * d[1] + pz * d[2]) / dist
    half_angle = rng.uniform(0.25, 0.4) * (1.0 + 0.15 * _random_field(rng, axes, 6, (4.0, 8.0)))
    wedge = (cos_angle > np.cos(half_angle)) & (dist > 0.2) & (rh <= _R_BRAIN)
    return (wedge & ((tissue == _T["gm"]) | (tissue == _T["wm"]))).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# imaging


def _region_codes(tissue: np.ndarray, label: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """One uint8 code per voxel: tissue index, or ``len(TISSUES) + k`` for lesion class k (NETC, SNFH, ET, stroke).

    Computed once per study so that each modality is a single lookup-table gather.
    """
    codes = tissue.copy()
    n = len(TISSUES)
    codes[label == _NETC] = n
    codes[label == _SNFH] = n + 1
    codes[label == _ET] = n + 2
    codes[lesion > 0] = n + 3
    return codes


def _image(
    rng: np.random.Generator, modality: str, codes: np.ndarray, texture: np.ndarray, axes: Sequence[np.ndarray]
) -> np.ndarray:
    """One scan ``(H, W, D)`` float32: contrast lookup, partial-volume blur, bias field, scale, Rician noise."""
    # Per-study contrast jitter (a few %) keeps the tissue orderings while making studies differ.
    jitter = np.exp(np.clip(rng.normal(0.0, 0.03, len(TISSUES) + 4), -0.06, 0.06))
    lut = (np.asarray(_TISSUE_CONTRAST[modality] + _LESION_CONTRAST[modality]) * jitter).astype(np.float32)
    img = lut[codes]
    img *= texture
    img = ndimage.gaussian_filter(img, sigma=0.6, truncate=2.0)  # partial-volume effect at tissue boundaries
    scale = np.exp(rng.uniform(np.log(200.0), np.log(2000.0)))
    # Smooth multiplicative bias field (coil sensitivity), a different one per scan.
    img *= np.exp(rng.uniform(0.05, 0.2) * _random_field(rng, axes, 4, (0.5, 2.0)) + np.float32(np.log(scale)))
    sigma = np.float32(rng.uniform(0.015, 0.035) * scale)
    # Rician noise: magnitude of a complex signal with Gaussian noise on both channels.
    img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.hypot(img, sigma * rng.standard_normal(img.shape, dtype=np.float32))


def _affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = -(np.asarray(shape, float) - 1.0) / 2.0 * np.asarray(spacing, float) + np.asarray(_ORIGIN_SHIFT_MM)
    return aff


def _check_shape_spacing(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    shape_t = tuple(int(s) for s in shape)
    spacing_t = tuple(float(s) for s in spacing)
    if len(shape_t) != 3 or min(shape_t) < 8:
        raise ValueError(f"shape must be 3 sizes of at least 8 voxels, got {tuple(shape)}.")
    if len(spacing_t) != 3 or min(spacing_t) <= 0:
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {tuple(spacing)}.")
    return shape_t, spacing_t


def synthesize_study(
    seed: int,
    shape: Sequence[int] = (64, 64, 48),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    kind: str | None = None,
    missing_prob: float = 0.2,
    modalities: Sequence[str] = MODALITIES,
) -> SyntheticStudy:
    """Generate one phantom study, deterministic in ``seed``.

    ``kind`` is one of :data:`CLASS_NAMES` (random when None). Each of ``modalities`` is absent with probability
    ``missing_prob``, but at least two (or all, if fewer are requested) are always present so that cross-modal
    reconstruction is possible. Independent random streams are used for anatomy, lesion, presence and each
    modality, so e.g. the T1 of a seed does not change when other modalities are dropped.
    """
    shape_t, spacing_t = _check_shape_spacing(shape, spacing)
    mods = canonical_modalities(modalities, argument="modalities")
    if not 0.0 <= missing_prob <= 1.0:
        raise ValueError(f"missing_prob must be in [0, 1], got {missing_prob}.")
    if kind is not None and kind not in CLASS_NAMES:
        raise ValueError(f"kind must be one of {', '.join(CLASS_NAMES)} or None, got {kind!r}.")
    ss = np.random.SeedSequence(int(seed))
    rng_kind, rng_anat, rng_lesion, rng_presence, *rng_mods = (np.random.default_rng(s)
                                                               for s in ss.spawn(4 + len(MODALITIES)))
    kind = kind if kind is not None else CLASS_NAMES[int(rng_kind.integers(len(CLASS_NAMES)))]

    # Normalised coordinates: 1.0 is the head surface along each axis (so anatomy scales with the field of view).
    fov = np.asarray(shape_t) * np.asarray(spacing_t)
    axes = [((np.arange(n) - (n - 1) / 2.0) * sp / (f * semi)).astype(np.float32)
            for n, sp, f, semi in zip(shape_t, spacing_t, fov, _HEAD_SEMI_AXES, strict=True)]
    tissue, rh, texture = _anatomy(rng_anat, axes)
    label = _tumour(rng_lesion, axes, tissue, rh) if kind == "tumour" else np.zeros(shape_t, np.uint8)
    lesion = _stroke(rng_lesion, axes, tissue, rh) if kind == "stroke" else np.zeros(shape_t, np.uint8)

    present = rng_presence.random(len(mods)) >= missing_prob
    need = min(2, len(mods))
    if present.sum() < need:
        missing = np.flatnonzero(~present)
        present[rng_presence.choice(missing, size=need - int(present.sum()), replace=False)] = True
    chosen = [m for m, keep in zip(mods, present, strict=True) if keep]
    codes = _region_codes(tissue, label, lesion)
    texture = 1.0 + 0.03 * texture  # mild intra-tissue inhomogeneity, shared by all scans (it is anatomy)
    images = {m: _image(rng_mods[MODALITIES.index(m)], m, codes, texture, axes) for m in MODALITIES if m in chosen}
    return SyntheticStudy(images=images, label=label, lesion=lesion, tissue=tissue, kind=kind,
                          affine=_affine(shape_t, spacing_t), seed=int(seed))


# ----------------------------------------------------------------------------------------------------------------
# writing


def _save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI file via a hidden temp file in the same folder and ``os.replace`` (never a partial file)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    # nibabel picks the format from the extension, so the temp name keeps ".nii.gz"; the leading dot hides it from
    # the manifest readers.
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.tmp{os.getpid()}.nii.gz")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _study_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def write_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    n_studies: int,
    shape: Sequence[int] = (64, 64, 48),
    seed: int = 0,
    missing_prob: float = 0.2,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    modalities: Sequence[str] = MODALITIES,
    kinds: Sequence[str] | None = None,
    prefix: str = "BraTS-SYN",
    image_dtype: str = "int16",
    overwrite: bool = False,
) -> Path:
    """Write ``n_studies`` phantoms as a BraTS-2023-style folder and return ``out_dir``.

    Layout: ``out_dir/{prefix}-00000-000/{prefix}-00000-000-{t2f,t1n,t1c,t2w,mra,pd,dwi,adc,seg}.nii.gz`` (absent
    modalities have no file; ``-seg`` always exists, all zero for non-tumour studies), ``labels.csv``
    (``study_id,class``) and ``dataset.json`` (generator version and parameters, per-study seed/kind/modalities).
    Study ``i`` has seed ``SeedSequence([seed, i])`` and kind ``kinds[i]`` (default: ``CLASS_NAMES[i % 3]``, i.e.
    balanced classes). Images are stored as ``image_dtype``: int16 (rounded; like most scanner output, and 4x faster
    to gzip than float32 noise) or float32 (bit-exact). ``dataset.json`` is written last and marks completion: a
    complete dataset with the same parameters is left untouched; different parameters raise ``FileExistsError``
    unless ``overwrite``.
    """
    out = Path(out_dir)
    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}.")
    shape_t, spacing_t = _check_shape_spacing(shape, spacing)
    mods = canonical_modalities(modalities, argument="modalities")
    if kinds is None:
        kinds = [CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(n_studies)]
    kinds = list(kinds)
    if image_dtype not in ("int16", "float32"):
        raise ValueError(f"image_dtype must be 'int16' or 'float32', got {image_dtype!r}.")
    if len(kinds) != n_studies or any(k not in CLASS_NAMES for k in kinds):
        raise ValueError(f"kinds must list {n_studies} values from {', '.join(CLASS_NAMES)}, got {kinds}.")
    params = {"generator": "brainmm.data.synthetic", "version": GENERATOR_VERSION, "seed": int(seed),
              "n_studies": int(n_studies), "shape": list(shape_t), "spacing": list(spacing_t),
              "missing_prob": float(missing_prob), "modalities": list(mods), "kinds": kinds, "prefix": prefix,
              "image_dtype": image_dtype}

    marker = out / "dataset.json"
    if marker.is_file():
        try:
            existing = json.loads(marker.read_text())
        except json.JSONDecodeError:
            existing = {}
        if existing.get("params") == params:
            files = [out / f for s in existing.get("studies", []) for f in s.get("files", [])]
            if files and all(f.is_file() for f in files):
                logger.info("Synthetic dataset in %s is complete (same parameters); nothing to do.", out)
                return out
        elif not overwrite:
            raise FileExistsError(
                f"{out} already holds a synthetic dataset with other parameters ({marker}); pass overwrite=True to "
                f"replace it or choose another folder."
            )
        marker.unlink()  # an interrupted rewrite must not look complete
        for old in out.glob(f"{prefix}-*"):
            if old.is_dir():
                shutil.rmtree(old)

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_studies):
        study_id = f"{prefix}-{i:05d}-000"
        s = synthesize_study(_study_seed(seed, i), shape_t, spacing_t, kinds[i], missing_prob, mods)
        folder = out / study_id
        folder.mkdir(exist_ok=True)
        files = []
        for mod, arr in s.images.items():
            name = f"{study_id}-{BRATS2023_SUFFIXES[mod]}.nii.gz"
            if image_dtype == "int16":  # intensities are < 2^15 by construction (scale <= 2000, contrast <= 1.3)
                arr = np.clip(np.rint(arr), 0, np.iinfo(np.int16).max).astype(np.int16)
            _save_nifti_atomic(arr, s.affine, folder / name)
            files.append(f"{study_id}/{name}")
        name = f"{study_id}-seg.nii.gz"
        _save_nifti_atomic(s.label, s.affine, folder / name)
        files.append(f"{study_id}/{name}")
        records.append({"study_id": study_id, "class": s.kind, "seed": s.seed, "modalities": list(s.modalities),
                        "files": files})
        logger.debug("Wrote synthetic study %s (%s, %s).", study_id, s.kind, ", ".join(s.modalities))

    _write_text_atomic(out / "labels.csv", "study_id,class\n" + "".join(f"{r['study_id']},{r['class']}\n"
                                                                         for r in records))
    meta = {"name": "brainmm synthetic multi-parametric brain phantoms", "params": params,
            "class_names": list(CLASS_NAMES), "label_values": {"0": "background", "1": "NETC", "2": "SNFH", "3": "ET"},
            "studies": records}
    _write_text_atomic(marker, json.dumps(meta, indent=1))
    logger.info("Wrote %d synthetic studies to %s.", n_studies, out)
    return out

