"""Preprocessed cache (decode each .nii.gz once) and the pre-training crop dataset that reads from it.

Layout of ``root`` (one entry per study and preprocessing setting)::

    <safe study id>-<hash12>.npy         float16 (M, h, w, d): the foreground box, channels = present modalities
                                          in canonical order, values already scaled (p5..p95 -> 0..1)
    <safe study id>-<hash12>.label.npy   uint8 (h, w, d), only when the cache is built with_label
    <safe study id>-<hash12>.json        sidecar, written last (the entry's completion marker)

``hash12`` hashes (study id, source paths, preprocessing params + pipeline version, cached modalities), so a change
of any of these gives a new entry; a changed source file (size or mtime) at the same path rebuilds the entry in
place. The box is what the official "foreground crop, centred in the 240x240x155 atlas grid" produces minus the
zero padding: ``atlas_offset`` in the sidecar is the atlas index of box voxel (0, 0, 0), so
``paste_into_atlas(box, atlas_offset, atlas_size)`` equals the full ``build_preprocessing`` output (float16 aside).

Distributed building: every rank calls ``build(studies, rank=r, world_size=w)`` with the same list; the study at
position i of the id-sorted list is written only by rank ``i % w``, then each rank polls until all entries exist
(``wait_ready``, with a timeout). No process group is needed, so independent jobs on a shared file system work
too. Writes are atomic (hidden temp file + ``os.replace``), so readers never see partial files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import Study
from .modalities import MODALITIES, canonical_modalities
from .transforms import PreprocessingParams, atlas_placement, build_preprocessing, paste_into_atlas

if TYPE_CHECKING:
    from ..models._pretrained import PretrainedCfg

logger = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "CacheBuildStats", "MultiModalCropDataset", "PreprocessedCache"]

CACHE_FORMAT = 1
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class CacheBuildStats:
    """What ``PreprocessedCache.build`` did on this rank."""

    built: int = 0  # preprocessed and written by this rank
    reused: int = 0  # this rank's entries that were already fresh
    waited: int = 0  # entries owned by other ranks
    failed: list[tuple[str, str]] = field(default_factory=list)  # (study id, reason), with on_error="skip"


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a hidden temp file next to ``path``, then ``os.replace`` it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _root_cause(e: BaseException) -> BaseException:
    """The original error under MONAI's ``RuntimeError("applying transform ...")`` wrappers."""
    while isinstance(e, RuntimeError) and str(e).startswith("applying transform") and e.__cause__ is not None:
        e = e.__cause__
    return e


def _fingerprint(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"Source file {path} does not exist.") from None
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class PreprocessedCache:
    """Preprocess each study once into memory-mappable float16 arrays (see the module docstring for the layout).

    ``params``: a ``PretrainedCfg``, ``PreprocessingParams``, mapping or None (BrainMVP defaults); an atlas grid is
    required. ``modalities``: which modalities to cache (default all 8; a study keeps those it has).
    ``with_label``: also cache the label map (nearest-neighbour resampled, same box).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        params: PretrainedCfg | PreprocessingParams | Mapping[str, Any] | None = None,
        *,
        modalities: Sequence[str] = MODALITIES,
        with_label: bool = False,
    ) -> None:
        self.root = Path(root)
        self.params = PreprocessingParams.from_any(params)
        if self.params.atlas_size is None:
            raise ValueError("PreprocessedCache needs params with an atlas_size (the grid crops are placed in).")
        self.atlas_size: tuple[int, int, int] = tuple(self.params.atlas_size)  # type: ignore[assignment]
        self.modalities = canonical_modalities(modalities, argument="modalities")
        self.with_label = bool(with_label)
        self._digest = self.params.digest()
        self._index: dict[str, str] = {}  # study id -> entry name
        self._meta: dict[str, dict[str, Any]] = {}  # entry name -> sidecar (memoised)
        self._pipeline = None

    def __repr__(self) -> str:
        return (f"PreprocessedCache(root={str(self.root)!r}, params={self._digest}, "
                f"modalities={list(self.modalities)}, with_label={self.with_label})")

    # ------------------------------------------------------------------------------------------------ naming

    def _cached_images(self, study: Study) -> dict[str, Path]:
        images = {m: Path(p) for m, p in study.images.items() if m in self.modalities}
        if not images:
            raise ValueError(f"Study {study.study_id!r} has none of the cached modalities {list(self.modalities)} "
                             f"(it has {list(study.images)}).")
        return images

    def entry_name(self, study: Study) -> str:
        """Deterministic entry name ``<safe id>-<hash12>`` from (study id, source paths, params, modalities)."""
        images = self._cached_images(study)
        if self.with_label and study.label is None:
            raise ValueError(f"Study {study.study_id!r} has no label, but the cache was created with_label=True.")
        key = {"study_id": study.study_id, "images": {m: str(p.absolute()) for m, p in images.items()},
               "label": str(study.label.absolute()) if self.with_label and study.label else None,
               "params": self._digest, "modalities": list(self.modalities), "format": CACHE_FORMAT}
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        safe = _SAFE.sub("_", study.study_id).strip("._")[:64] or "study"
        return f"{safe}-{h}"

    def _paths(self, name: str) -> tuple[Path, Path, Path]:
        return self.root / f"{name}.npy", self.root / f"{name}.label.npy", self.root / f"{name}.json"

    def _sources(self, study: Study) -> dict[str, Any]:
        src = {m: _fingerprint(p) for m, p in self._cached_images(study).items()}
        if self.with_label and study.label is not None:
            src["label"] = _fingerprint(study.label)
        return src

    # ------------------------------------------------------------------------------------------------ freshness

    def _read_sidecar(self, name: str) -> dict[str, Any] | None:
        path = self._paths(name)[2]
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_fresh(self, study: Study) -> bool:
        """True when the entry exists, was made with these params and its sources are unchanged."""
        name = self.entry_name(study)
        meta = self._read_sidecar(name)
        if meta is None or meta.get("params_digest") != self._digest or meta.get("format") != CACHE_FORMAT:
            return False
        try:
            if meta.get("sources") != self._sources(study):
                return False
        except FileNotFoundError:
            return False
        npy, lab, _ = self._paths(name)
        if not npy.is_file() or npy.stat().st_size != meta.get("npy_bytes"):
            return False  # e.g. a crash after the rename on a file system without ordered metadata
        if self.with_label and not lab.is_file():
            return False
        self._meta[name] = meta
        self._index[study.study_id] = name
        return True

    # ------------------------------------------------------------------------------------------------ building

    def _failed_marker(self, study: Study) -> Path:
        return self.root / f"{self.entry_name(study)}.failed.json"

    def failure(self, study: Study) -> str | None:
        """Why the study could not be cached (``build(on_error="skip")``), or None."""
        marker = self._failed_marker(study)
        if not marker.is_file():
            return None
        try:
            return json.loads(marker.read_text())["error"]
        except (OSError, ValueError, KeyError):
            return "unreadable failure marker"

    def _build_or_mark(self, study: Study, on_error: str) -> dict[str, Any] | tuple[str, str]:
        try:
            sidecar = self._build_entry(study)
        except (RuntimeError, ValueError, OSError) as err:
            if on_error == "raise":
                raise
            reason = str(err).splitlines()[0]
            self.root.mkdir(parents=True, exist_ok=True)
            marker = json.dumps({"study_id": study.study_id, "error": reason}).encode()
            _atomic_write(self._failed_marker(study), lambda f: f.write(marker))
            logger.warning("Cache %s: skipping study %s: %s", self.root, study.study_id, reason)
            return (study.study_id, reason)
        self._failed_marker(study).unlink(missing_ok=True)
        return sidecar

    def _get_pipeline(self) -> Any:
        if self._pipeline is None:
            self._pipeline = build_preprocessing(self.params, self.modalities, with_label=self.with_label,
                                                 place_in_atlas=False)
        return self._pipeline

    def _build_entry(self, study: Study) -> dict[str, Any]:
        """Preprocess one study and write its entry; returns the sidecar."""
        name = self.entry_name(study)
        sources = self._sources(study)  # before reading: a file changing meanwhile makes the entry stale, not wrong
        try:
            out = self._get_pipeline()(study)
        except Exception as e:
            cause = _root_cause(e)
            raise RuntimeError(
                f"Preprocessing study {study.study_id!r} failed ({type(cause).__name__}: {cause})."
            ) from e
        img = out["image"]
        spatial = tuple(int(s) for s in img.shape[1:])
        if min(spatial) == 0:
            raise ValueError(f"Study {study.study_id!r}: the foreground crop is empty (every voxel of every modality "
                             f"is <= the threshold {self.params.foreground_threshold} after scaling).")
        src, dst, size = atlas_placement(spatial, self.atlas_size)
        box = tuple(slice(s, s + n) for s, n in zip(src, size, strict=True))
        arr = img.numpy()[(slice(None), *box)]
        if np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
            raise ValueError(f"Study {study.study_id!r}: values exceed the float16 range; use intensity scaling.")
        arr = np.ascontiguousarray(arr, dtype=np.float16)
        box_affine = img.affine.numpy().copy()
        box_affine[:3, 3] += box_affine[:3, :3] @ np.asarray(src, float)  # affine of box voxel (0, 0, 0)
        meta_in = img.meta
        fg_start = out.get("foreground_start_coord")
        fg_end = out.get("foreground_end_coord")
        npy, lab, side = self._paths(name)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.with_label:
            label = np.ascontiguousarray(np.rint(out["label"].numpy()[(0, *box)]), dtype=np.uint8)
            _atomic_write(lab, lambda f: np.save(f, label))
        _atomic_write(npy, lambda f: np.save(f, arr))
        sidecar = {
            "format": CACHE_FORMAT,
            "name": name,
            "study_id": study.study_id,
            "class_label": study.class_label,
            "modalities": list(out["modalities"]),
            "shape": list(arr.shape),
            "dtype": "float16",
            "npy_bytes": npy.stat().st_size,
            "label_file": lab.name if self.with_label else None,
            "atlas_size": list(self.atlas_size),
            "atlas_offset": list(dst),
            "box_start_in_resampled": [int(a) + int(b) for a, b in zip(fg_start if fg_start is not None else (0,) * 3,
                                                                          src, strict=True)],
            "foreground_start": None if fg_start is None else [int(v) for v in fg_start],
            "foreground_end": None if fg_end is None else [int(v) for v in fg_end],
            "affine": box_affine.tolist(),
            "original_shape": [int(v) for v in meta_in["spatial_shape"]],
            "original_affine": np.asarray(meta_in["original_affine"], float).tolist(),
            "sources": sources,
            "params": self.params.to_dict(),
            "params_digest": self._digest,
            "created": time.time(),
        }
        _atomic_write(side, lambda f: f.write(json.dumps(sidecar, indent=1).encode()))
        self._meta[name] = sidecar
        self._index[study.study_id] = name
        return sidecar

    def build(
        self,
        studies: Iterable[Study],
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        timeout: float = 24 * 3600.0,
        poll_interval: float = 2.0,
        on_error: str = "raise",
    ) -> CacheBuildStats:
        """Make every study's entry fresh; returns what this rank did.

        Each rank must pass the same studies. This rank writes the stale entries at positions ``i % world_size ==
        rank`` of the id-sorted list (with ``num_workers`` DataLoader worker processes), then waits up to
        ``timeout`` seconds for the other ranks' entries. ``on_error="skip"`` logs a study that cannot be
        preprocessed, records it (``stats.failed``, a ``.failed.json`` marker that other ranks also honour, see
        ``failure``) and goes on; ``"raise"`` stops at the first one.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        ordered = self._sorted(studies)
        mine = [s for i, s in enumerate(ordered) if i % world_size == rank]
        stale = [s for s in mine if not self.is_fresh(s)]
        stats = CacheBuildStats(reused=len(mine) - len(stale), waited=len(ordered) - len(mine))
        if stale:
            t0 = time.perf_counter()
            if num_workers > 0:
                loader = DataLoader(_BuildJobs(self, stale, on_error), batch_size=None, shuffle=False,
                                    num_workers=num_workers, collate_fn=_identity)
                results = list(loader)
            else:
                results = [self._build_or_mark(s, on_error) for s in stale]
            for res in results:
                if isinstance(res, tuple):
                    stats.failed.append(res)
                else:
                    self._meta[res["name"]] = res
                    self._index[res["study_id"]] = res["name"]
            stats.built = len(stale) - len(stats.failed)
            logger.info("Cache %s: rank %d built %d entries in %.1f s (%d reused).", self.root, rank, len(stale),
                        time.perf_counter() - t0, stats.reused)
        if world_size > 1:
            self.wait_ready(ordered, timeout=timeout, poll_interval=poll_interval, world_size=world_size)
        return stats

    def wait_ready(self, studies: Iterable[Study], *, timeout: float = 24 * 3600.0, poll_interval: float = 2.0,
                   world_size: int = 1) -> None:
        """Poll until every study's entry is fresh (or marked failed by its owner with ``on_error="skip"``);
        ``TimeoutError`` naming the missing ones after ``timeout`` s."""
        ordered = self._sorted(studies)
        pending = [(i, s) for i, s in enumerate(ordered) if not self._resolved(s)]
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                shown = ", ".join(f"{s.study_id} (rank {i % world_size})" for i, s in pending[:5])
                raise TimeoutError(
                    f"Cache {self.root}: {len(pending)} entries still missing after {timeout:.0f} s: {shown}"
                    f"{' ...' if len(pending) > 5 else ''}. Did every rank call build() with the same studies?"
                )
            time.sleep(poll_interval)
            pending = [(i, s) for i, s in pending if not self._resolved(s)]

    def _resolved(self, study: Study) -> bool:
        return self.is_fresh(study) or self.failure(study) is not None

    @staticmethod
    def _sorted(studies: Iterable[Study]) -> list[Study]:
        ordered = sorted(studies, key=lambda s: s.study_id)
        ids = [s.study_id for s in ordered]
        dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
        if dup:
            raise ValueError(f"Duplicate study ids: {', '.join(dup[:5])}; study ids must be unique in a cache.")
        return ordered

    # ------------------------------------------------------------------------------------------------ reading

    def _resolve(self, study: Study | str) -> str:
        if isinstance(study, Study):
            name = self.entry_name(study)
            self._index.setdefault(study.study_id, name)
            return name
        if study not in self._index:
            self._scan()
        if study not in self._index:
            raise FileNotFoundError(f"No cache entry for study {study!r} in {self.root} (params {self._digest}); "
                                    f"run cache.build(studies) first.")
        return self._index[study]

    def _scan(self) -> None:
        """Index the entries on disk made with these params (for ``load(study_id)`` in a fresh process)."""
        found: dict[str, list[str]] = {}
        for side in sorted(self.root.glob("*.json")):
            meta = self._read_sidecar(side.stem)
            if meta and meta.get("params_digest") == self._digest and meta.get("format") == CACHE_FORMAT:
                found.setdefault(meta["study_id"], []).append(side.stem)
                self._meta[side.stem] = meta
        for sid, names in found.items():
            if sid in self._index:
                continue
            if len(names) > 1:
                raise ValueError(f"Cache {self.root} has {len(names)} entries for study {sid!r} (different source "
                                 f"files: {names}); pass the Study instead of its id.")
            self._index[sid] = names[0]

    def study_ids(self) -> list[str]:
        """Ids of the studies indexed so far (after ``build``/``wait_ready``, else those on disk)."""
        if not self._index:
            self._scan()
        return sorted(self._index)

    def load_meta(self, study: Study | str) -> dict[str, Any]:
        """The sidecar of a study's entry."""
        name = self._resolve(study)
        if name not in self._meta:
            meta = self._read_sidecar(name)
            if meta is None:
                sid = study.study_id if isinstance(study, Study) else study
                raise FileNotFoundError(f"No cache entry for study {sid!r} at {self._paths(name)[2]}; run "
                                        f"cache.build(studies) first.")
            self._meta[name] = meta
        return self._meta[name]

    def load(self, study: Study | str) -> tuple[np.memmap, dict[str, Any]]:
        """Memory-mapped ``(M, h, w, d)`` float16 box (channels = ``meta["modalities"]``) and its sidecar."""
        meta = self.load_meta(study)
        return np.load(self._paths(meta["name"])[0], mmap_mode="r"), meta

    def load_label(self, study: Study | str) -> np.memmap:
        """Memory-mapped ``(h, w, d)`` uint8 label box (cache built ``with_label``)."""
        meta = self.load_meta(study)
        if not meta.get("label_file"):
            raise ValueError(f"Cache entry of study {meta['study_id']!r} has no label; create the cache with "
                             f"with_label=True.")
        return np.load(self.root / meta["label_file"], mmap_mode="r")

    def load_atlas(self, study: Study | str) -> tuple[np.ndarray, dict[str, Any]]:
        """The entry placed in the full atlas grid: ``(M, *atlas_size)`` float32, as ``build_preprocessing`` gives."""
        arr, meta = self.load(study)
        return paste_into_atlas(np.asarray(arr, np.float32), meta["atlas_offset"], self.atlas_size), meta

    def prune(self, keep: Iterable[Study]) -> int:
        """Delete entries of this cache's params not belonging to ``keep``; returns how many were removed.

        Do not run while another process builds into the same folder.
        """
        wanted = {self.entry_name(s) for s in keep}
        removed = 0
        for side in self.root.glob("*.json"):
            meta = self._read_sidecar(side.stem)
            if not meta or meta.get("params_digest") != self._digest or side.stem in wanted:
                continue
            for p in self._paths(side.stem)[:2]:
                p.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
            self._meta.pop(side.stem, None)
            self._index = {k: v for k, v in self._index.items() if v != side.stem}
            removed += 1
        return removed


class _BuildJobs(Dataset):
    """One cache entry per item, so ``DataLoader`` workers preprocess in parallel."""

    def __init__(self, cache: PreprocessedCache, studies: Sequence[Study], on_error: str = "raise") -> None:
        self.cache = cache
        self.studies = list(studies)
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> dict[str, Any] | tuple[str, str]:
        return self.cache._build_or_mark(self.studies[i], self.on_error)


def _identity(x: Any) -> Any:
    return x


# ----------------------------------------------------------------------------------------------------------------
# pre-training crops


class MultiModalCropDataset(Dataset):
    """Random crops of cached studies for BrainMVP pre-training.

    Item ``i`` is study ``i // samples_per_study``. Its crop is drawn by ``np.random.default_rng([seed, epoch, i])``,
    so it depends only on (seed, epoch, index), not on worker count or rank; call ``set_epoch`` every epoch (with
    ``persistent_workers=True`` the workers keep the epoch they were started with, so use non-persistent workers or
    recreate the loader). The crop centre is a random voxel of the cached foreground box; up to ``max_tries`` draws
    are made until at least ``min_foreground`` of the crop is foreground (any channel > 0), else the best is used.

    Sample: ``image`` float32 ``(8, *crop_size)`` with all canonical modality slots (zeros where absent),
    ``present`` bool ``(8,)``, ``origin`` int64 ``(3,)`` = crop start in atlas-grid coordinates (the modality
    templates' window), ``study_id`` str.
    """

    def __init__(
        self,
        cache: PreprocessedCache,
        studies: Sequence[Study | str] | None = None,
        crop_size: Sequence[int] = (96, 96, 96),
        *,
        seed: int = 0,
        samples_per_study: int = 1,
        min_modalities: int = 1,
        min_foreground: float = 0.05,
        max_tries: int = 10,
    ) -> None:
        self.cache = cache
        self.crop_size = tuple(int(c) for c in crop_size)
        if len(self.crop_size) != 3 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be 3 positive sizes, got {tuple(crop_size)}.")
        too_big = [c > a for c, a in zip(self.crop_size, cache.atlas_size, strict=True)]
        if any(too_big):
            raise ValueError(f"crop_size {self.crop_size} exceeds the atlas grid {cache.atlas_size}; crops are taken "
                             f"inside the atlas grid.")
        if samples_per_study < 1 or max_tries < 1:
            raise ValueError(f"samples_per_study and max_tries must be >= 1, got {samples_per_study}, {max_tries}.")
        self.seed = int(seed)
        self.samples_per_study = int(samples_per_study)
        self.min_foreground = float(min_foreground)
        self.max_tries = int(max_tries)
        self.epoch = 0
        items = studies if studies is not None else cache.study_ids()
        self.entries: list[tuple[str, dict[str, Any]]] = []
        skipped = []
        for s in items:
            meta = cache.load_meta(s)
            if len(meta["modalities"]) < min_modalities:
                skipped.append(meta["study_id"])
                continue
            self.entries.append((cache._resolve(s), meta))
        if skipped:
            logger.info("MultiModalCropDataset: skipping %d studies with fewer than %d modalities (e.g. %s).",
                        len(skipped), min_modalities, skipped[0])
        if not self.entries:
            raise ValueError(f"No usable studies in cache {cache.root} (min_modalities={min_modalities}).")

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch`` (call before each epoch's iteration)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries) * self.samples_per_study

    def _read(self, vol: np.ndarray, offset: Sequence[int], start: np.ndarray) -> np.ndarray:
        """``(M, *crop_size)`` float32 window at atlas index ``start``; zeros where it leaves the cached box."""
        out = np.zeros((vol.shape[0], *self.crop_size), np.float32)
        dst, src = [], []
        for o, n, s, c in zip(offset, vol.shape[1:], start, self.crop_size, strict=True):
            lo, hi = max(int(s), int(o)), min(int(s) + c, int(o) + n)
            if hi <= lo:
                return out
            dst.append(slice(lo - int(s), hi - int(s)))
            src.append(slice(lo - int(o), hi - int(o)))
        out[(slice(None), *dst)] = vol[(slice(None), *src)]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of ``index``; if its cache entry has become unreadable, the next readable study's sample with
        ``skipped`` counting the unreadable ones (a warning is logged; the trainer sums and reports them)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples.")
        n = len(self)
        for skipped in range(len(self.entries)):
            i = (index + skipped * self.samples_per_study) % n
            name, meta = self.entries[i // self.samples_per_study]
            try:
                vol = np.load(self.cache.root / f"{name}.npy", mmap_mode="r")
                if vol.ndim != 4 or vol.shape[0] != len(meta["modalities"]):
                    raise ValueError(f"shape {vol.shape} does not match its sidecar")
                sample = self._sample(i, vol, meta)
            except (OSError, ValueError) as err:
                logger.warning("Skipping study %s: its cache entry %s is unreadable (%s).", meta["study_id"],
                               name, err)
                continue
            sample["skipped"] = skipped
            return sample
        raise RuntimeError(f"Every cache entry in {self.cache.root} is unreadable.")

    def _sample(self, index: int, vol: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
        offset = np.asarray(meta["atlas_offset"], np.int64)
        box = np.asarray(vol.shape[1:], np.int64)
        crop = np.asarray(self.crop_size, np.int64)
        hi = np.asarray(self.cache.atlas_size, np.int64) - crop
        rng = np.random.default_rng([self.seed, self.epoch, index])
        best, best_frac, best_start = None, -1.0, None
        for _ in range(self.max_tries):
            centre = offset + rng.integers(0, box)  # a voxel of the foreground box, in atlas coordinates
            start = np.clip(centre - crop // 2, 0, hi)
            window = self._read(vol, offset, start)
            frac = float((window > 0).any(axis=0).mean())
            if frac > best_frac:
                best, best_frac, best_start = window, frac, start
            if frac >= self.min_foreground:
                break
        image = torch.zeros((len(MODALITIES), *self.crop_size), dtype=torch.float32)
        present = torch.zeros(len(MODALITIES), dtype=torch.bool)
        for c, m in enumerate(meta["modalities"]):
            k = MODALITIES.index(m)
            image[k] = torch.from_numpy(best[c])
            present[k] = True
        return {"image": image, "present": present, "origin": torch.as_tensor(best_start, dtype=torch.int64),
                "study_id": meta["study_id"]}
