"""Modality-aware study manifests: BraTS folders, BIDS trees, BrainMVP json lists and CSV/JSON tables.

Every reader returns ``list[Study]`` sorted by study id, with image keys in canonical modality names
(see :mod:`brainmm.data.modalities`). Readers only list and parse file names; they never open the images
(use :func:`brainmm.data.check.check_studies` to validate the files themselves).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .modalities import MODALITIES, aliases, canonical_modality

logger = logging.getLogger(__name__)

__all__ = [
    "BRATS2023_SUFFIXES",
    "LABEL_SUFFIXES",
    "Study",
    "discover_studies",
    "from_bids",
    "from_brainmvp_json",
    "from_brats_folder",
    "from_table",
    "modality_from_filename",
    "nifti_stem",
]

# File-name suffix written for each canonical modality in BraTS-2023 style folders. BraTS has names for the four
# structural scans only; the others use the canonical name (the alias table maps them back).
BRATS2023_SUFFIXES: dict[str, str] = {
    "flair": "t2f", "t1": "t1n", "t1c": "t1c", "t2": "t2w", "mra": "mra", "pd": "pd", "dwi": "dwi", "adc": "adc",
}
# Suffixes of segmentation files in BraTS folders (not a modality).
LABEL_SUFFIXES: tuple[str, ...] = ("seg",)

_NIFTI_EXTS = (".nii.gz", ".nii")
_TOKEN_SPLIT = re.compile(r"[-_.\s]+")


@dataclass
class Study:
    """One subject/session: co-registered images of several modalities, an optional label map and class.

    ``images`` maps canonical modality names to files (aliases are canonicalised on construction and kept in the
    canonical order); ``label`` is a segmentation file in the same grid; ``class_label`` a study-level class.
    """

    study_id: str
    images: dict[str, Path]
    label: Path | None = None
    class_label: str | None = None

    def __post_init__(self) -> None:
        if not self.study_id or not isinstance(self.study_id, str):
            raise ValueError(f"Study.study_id must be a non-empty string, got {self.study_id!r}.")
        if not self.images:
            raise ValueError(f"Study {self.study_id!r} has no images; at least one modality is needed.")
        canon: dict[str, Path] = {}
        for name, path in self.images.items():
            mod = canonical_modality(name, argument=f"modality of study {self.study_id!r}")
            if mod in canon:
                raise ValueError(
                    f"Study {self.study_id!r} has two files for modality {mod!r}: {canon[mod]} and {path}."
                )
            canon[mod] = Path(path)
        self.images = {m: canon[m] for m in MODALITIES if m in canon}
        if self.label is not None:
            self.label = Path(self.label)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Present modalities in canonical order."""
        return tuple(self.images)

    def files(self) -> list[Path]:
        """All files of the study (images in canonical order, then the label)."""
        return [*self.images.values(), *([self.label] if self.label is not None else [])]

    def to_dict(self) -> dict[str, Any]:
        """MONAI-style dict: ``{"study_id", <modality>: str path, ..., ["label"], ["class"]}``."""
        d: dict[str, Any] = {"study_id": self.study_id}
        d.update({m: str(p) for m, p in self.images.items()})
        if self.label is not None:
            d["label"] = str(self.label)
        if self.class_label is not None:
            d["class"] = self.class_label
        return d


# ----------------------------------------------------------------------------------------------------------------
# helpers


def nifti_stem(name: str | os.PathLike[str]) -> str | None:
    """File name without ``.nii.gz`` / ``.nii`` (None for other files)."""
    base = Path(name).name
    for ext in _NIFTI_EXTS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return None


def _is_nifti(p: Path) -> bool:
    # hidden files are editor/partial-write leftovers (our own atomic writes use ".<name>.tmp...").
    return p.is_file() and not p.name.startswith(".") and nifti_stem(p.name) is not None


def _find_modality_token(tokens: Sequence[str]) -> tuple[int, str] | None:
    """(index of the first token of the modality tag, canonical modality), scanning from the end."""
    table = aliases()
    low = [t.lower() for t in tokens]
    for i in range(len(low) - 1, -1, -1):
        if i > 0 and low[i - 1] + low[i] in table:
            return i - 1, table[low[i - 1] + low[i]]
        if low[i] in table:
            return i, table[low[i]]
    return None


def _split_stem(path: str | os.PathLike[str]) -> list[str]:
    """Stem split into alternating tokens and separators: ``"a_b-c"`` -> ``["a", "_", "b", "-", "c"]``."""
    stem = nifti_stem(path) or Path(path).name.split(".")[0]
    return [p for p in re.split(r"([-_.\s]+)", stem) if p]


def modality_from_filename(path: str | os.PathLike[str]) -> str | None:
    """Infer the canonical modality from a file name, or None.

    The stem is split on ``- _ .`` and scanned from the end (the modality is usually the last tag:
    ``BraTS2021_00000_t1ce``, ``IXI002-Guys-0828-T2``, ``UCSF-PDGM-0004_T1c_bias``); at each position the pair joined
    with the previous token is tried first so that ``t1_gd`` / ``t2_flair`` resolve to ``t1c`` / ``flair``.
    """
    tokens = [t for t in _split_stem(path) if not _TOKEN_SPLIT.fullmatch(t)]
    found = _find_modality_token(tokens)
    return None if found is None else found[1]


def _resolve(path: str, base: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else base / p


def _read_class_csv(path: Path) -> dict[str, str]:
    """``labels.csv`` with columns ``study_id`` (or ``id``) and ``class``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        id_col = next((c for c in ("study_id", "id") if c in cols), None)
        if id_col is None or "class" not in cols:
            raise ValueError(f"{path}: expected columns 'study_id' and 'class', found {cols}.")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return {r[id_col]: r["class"] for r in rows if r.get(id_col) and r.get("class")}


def _sorted_unique(studies: Iterable[Study], source: Path) -> list[Study]:
    out: dict[str, Study] = {}
    for s in studies:
        if s.study_id in out:
            raise ValueError(
                f"{source}: study id {s.study_id!r} occurs twice (files {out[s.study_id].files()[0]} and "
                f"{s.files()[0]}); study ids must be unique."
            )
        out[s.study_id] = s
    return [out[k] for k in sorted(out)]


# ----------------------------------------------------------------------------------------------------------------
# BraTS


def _brats_suffix(stem: str, study_dir: str) -> str:
    # Prefer stripping the folder name ("BraTS-GLI-00000-000" + "-t2f"): the ids themselves contain '-' and '_'.
    if stem.startswith(study_dir) and len(stem) > len(study_dir) and stem[len(study_dir)] in "-_.":
        return stem[len(study_dir) + 1 :]
    return _TOKEN_SPLIT.split(stem)[-1]


def from_brats_folder(root: str | os.PathLike[str], *, labels_csv: str | os.PathLike[str] | None = None) -> list[Study]:
    """Read BraTS-style study folders below ``root``.

    Every folder that directly contains NIfTI files is one study, its name the study id. Supported names:
    BraTS 2021 ``BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz``, BraTS 2023
    ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`` and the extra suffixes
    ``-mra, -pd, -dwi, -adc`` (any modality alias works). ``labels.csv`` (``study_id,class``) in ``root`` — or
    ``labels_csv`` — fills ``class_label``. Raises ``ValueError`` for an unknown suffix and ``FileNotFoundError``
    when no study is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BraTS folder {root} does not exist or is not a directory.")
    allowed = sorted(set(aliases()) | set(LABEL_SUFFIXES))
    studies: list[Study] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        d = Path(dirpath)
        niftis = sorted(d / f for f in filenames if _is_nifti(d / f))
        if not niftis:
            continue
        images: dict[str, Path] = {}
        label: Path | None = None
        for p in niftis:
            suffix = _brats_suffix(nifti_stem(p.name) or "", d.name).lower()
            if suffix in LABEL_SUFFIXES:
                label = p
                continue
            try:
                mod = canonical_modality(suffix)
            except ValueError:
                raise ValueError(
                    f"Unknown modality suffix {suffix!r} in BraTS file {p}. Allowed suffixes: {', '.join(allowed)}."
                ) from None
            if mod in images:
                raise ValueError(f"Study folder {d} has two files for modality {mod!r}: {images[mod].name}, {p.name}.")
            images[mod] = p
        if not images:
            logger.warning("Skipping %s: it holds a label but no image.", d)
            continue
        studies.append(Study(d.name, images, label))
    if not studies:
        raise FileNotFoundError(
            f"No BraTS studies found in {root}: expected folders such as BraTS2021_00000/BraTS2021_00000_t1.nii.gz "
            f"or BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz."
        )
    csv_path = Path(labels_csv) if labels_csv is not None else root / "labels.csv"
    if labels_csv is not None or csv_path.is_file():
        classes = _read_class_csv(csv_path)
        for s in studies:
            s.class_label = classes.get(s.study_id)
    return _sorted_unique(studies, root)


# ----------------------------------------------------------------------------------------------------------------
# BIDS

# BIDS suffix -> canonical modality; other suffixes fall back to the alias table (e.g. "ADC"), else are skipped.
_BIDS_SUFFIXES: dict[str, str] = {"T1w": "t1", "T2w": "t2", "FLAIR": "flair", "PDw": "pd", "PD": "pd",
                                  "angio": "mra", "dwi": "dwi"}


def _bids_entities(stem: str) -> tuple[dict[str, str], str]:
    parts = stem.split("_")
    ents = dict(p.split("-", 1) for p in parts[:-1] if "-" in p)
    return ents, parts[-1]


def from_bids(root: str | os.PathLike[str]) -> list[Study]:
    """Read a BIDS tree: ``sub-*/[ses-*/]anat/*_{T1w,T2w,FLAIR,PDw,angio}.nii.gz`` and ``.../dwi/*_dwi.nii.gz``.

    Study id is ``sub-X`` or ``sub-X_ses-Y``. ``T1w`` with a ``ce-`` entity is ``t1c``. Suffixes BIDS uses for other
    contrasts (``T2starw``, ``bold``, ...) are skipped; when several runs of one modality exist, the first in
    sorted order is used (logged). ``derivatives/`` is ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BIDS folder {root} does not exist or is not a directory.")
    studies: list[Study] = []
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        sessions = sorted(p for p in sub.glob("ses-*") if p.is_dir()) or [sub]
        for ses in sessions:
            study_id = sub.name if ses is sub else f"{sub.name}_{ses.name}"
            images: dict[str, Path] = {}
            for datatype in ("anat", "dwi"):
                for p in sorted(q for q in (ses / datatype).glob("*.nii*") if _is_nifti(q)):
                    ents, suffix = _bids_entities(nifti_stem(p.name) or "")
                    mod = _BIDS_SUFFIXES.get(suffix)
                    if mod is None:
                        try:
                            mod = canonical_modality(suffix)
                        except ValueError:
                            logger.debug("BIDS: skipping %s (suffix %r is not a supported modality).", p, suffix)
                            continue
                    if mod == "t1" and "ce" in ents:
                        mod = "t1c"
                    if mod in images:
                        logger.warning("BIDS %s: several %s files; using %s, ignoring %s.", study_id, mod,
                                       images[mod].name, p.name)
                        continue
                    images[mod] = p
            if images:
                studies.append(Study(study_id, images))
    if not studies:
        raise FileNotFoundError(
            f"No BIDS studies found in {root}: expected sub-*/[ses-*/]anat/*_T1w.nii.gz (or _T2w, _FLAIR, _PDw, "
            f"_angio) or sub-*/[ses-*/]dwi/*_dwi.nii.gz."
        )
    return _sorted_unique(studies, root)


# ----------------------------------------------------------------------------------------------------------------
# BrainMVP json list


def _load_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _json_entries(data: Any, path: Path, split: str) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in (split, "studies"):
            if isinstance(data.get(key), list):
                return data[key]
        raise ValueError(f"{path}: expected a list, or a dict with a {split!r} list; found keys {sorted(data)}.")
    raise ValueError(f"{path}: expected a JSON list of entries, got {type(data).__name__}.")


def _study_id_from_files(paths: Sequence[Path]) -> str:
    """Common name of a study's files once the modality tag (and what trails it) is removed, else the folder name."""
    stems = []
    for p in paths:
        parts = _split_stem(p)
        token_pos = [i for i, t in enumerate(parts) if not _TOKEN_SPLIT.fullmatch(t)]
        found = _find_modality_token([parts[i] for i in token_pos])
        stems.append("".join(parts[: token_pos[found[0]]]) if found else "".join(parts))
    prefix = os.path.commonprefix(stems).rstrip("-_. ")
    return prefix or paths[0].parent.name


def from_brainmvp_json(
    path: str | os.PathLike[str], *, data_root: str | os.PathLike[str] | None = None, split: str = "training"
) -> list[Study]:
    """Read the official BrainMVP data list.

    The JSON is a list (or a dict with a ``split`` list, default ``"training"``) of entries ``{"image": [paths...],
    ["label": path], ["modality"/"modalities": [names...]], ["study_id"/"id"/"name": str], ["class": str]}``.
    Without explicit modality names each file's modality is inferred from its name
    (:func:`modality_from_filename`). Relative paths are resolved against ``data_root`` (default: the JSON's folder).
    The study id defaults to the files' common name without the modality tag.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BrainMVP json list {path} does not exist.")
    base = Path(data_root) if data_root is not None else path.parent
    entries = _json_entries(_load_json(path), path, split)
    studies: list[Study] = []
    for k, entry in enumerate(entries):
        if isinstance(entry, (str, list)):
            entry = {"image": entry}
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise ValueError(f"{path}: entry {k} has no 'image' list: {entry!r}.")
        files = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        paths = [_resolve(str(f), base) for f in files]
        names = entry.get("modality", entry.get("modalities"))
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            if len(names) != len(paths):
                raise ValueError(f"{path}: entry {k} lists {len(paths)} images but {len(names)} modality names.")
            mods = [canonical_modality(n, argument=f"modality of entry {k} in {path}") for n in names]
        else:
            mods = []
            for p in paths:
                m = modality_from_filename(p)
                if m is None:
                    raise ValueError(
                        f"{path}: entry {k}: cannot infer the modality of {p.name} from its name; known modalities: "
                        f"{', '.join(MODALITIES)} (and aliases). Add a 'modality' list to the entry."
                    )
                mods.append(m)
        dup = sorted({m for m in mods if mods.count(m) > 1})
        if dup:
            raise ValueError(f"{path}: entry {k} has several images of modality {', '.join(dup)}: {files}.")
        study_id = next((str(entry[key]) for key in ("study_id", "id", "name") if entry.get(key)), None)
        study_id = study_id or _study_id_from_files(paths)
        label = _resolve(str(entry["label"]), base) if entry.get("label") else None
        cls = entry.get("class")
        studies.append(Study(study_id, dict(zip(mods, paths, strict=True)), label, None if cls is None else str(cls)))
    if not studies:
        raise FileNotFoundError(f"BrainMVP json list {path} has no entries.")
    return _sorted_unique(studies, path)


# ----------------------------------------------------------------------------------------------------------------
# CSV / JSON table

_ID_COLUMNS = ("study_id", "id")
_LABEL_COLUMNS = ("label", "seg")
_CLASS_COLUMNS = ("class", "class_label")


def _table_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".json":
        rows = _json_entries(_load_json(path), path, "studies")
        bad = [i for i, r in enumerate(rows) if not isinstance(r, Mapping)]
        if bad:
            raise ValueError(f"{path}: table entries must be objects; entry {bad[0]} is {rows[bad[0]]!r}.")
        return [dict(r) for r in rows]
    raise ValueError(f"Unsupported table {path}: expected a .csv, .tsv or .json file.")


def from_table(path: str | os.PathLike[str]) -> list[Study]:
    """Read a CSV/TSV/JSON table ``{study_id, <modality>: path, ..., [label], [class]}``.

    Modality columns may use any alias (``t1ce``, ``T1w``, ...); empty cells mean "absent". Relative paths are
    resolved against the table's folder. Columns that are neither modalities nor known keys are ignored (logged).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Table {path} does not exist.")
    rows = _table_rows(path)
    if not rows:
        raise FileNotFoundError(f"Table {path} has no rows.")
    base = path.parent
    columns = list(dict.fromkeys(k.strip() for r in rows for k in r if k is not None))
    id_col = next((c for c in _ID_COLUMNS if c in columns), None)
    if id_col is None:
        raise ValueError(f"Table {path} needs a 'study_id' column; found columns {columns}.")
    label_col = next((c for c in _LABEL_COLUMNS if c in columns), None)
    class_col = next((c for c in _CLASS_COLUMNS if c in columns), None)
    mod_cols: dict[str, str] = {}
    ignored = []
    for c in columns:
        if c in (id_col, label_col, class_col):
            continue
        try:
            mod = canonical_modality(c)
        except ValueError:
            ignored.append(c)
            continue
        if mod in mod_cols.values():
            raise ValueError(f"Table {path}: columns {c!r} and {next(k for k, v in mod_cols.items() if v == mod)!r} "
                             f"both name modality {mod!r}.")
        mod_cols[c] = mod
    if not mod_cols:
        raise ValueError(f"Table {path} has no modality column; found {columns}, known modalities: "
                         f"{', '.join(MODALITIES)} (and aliases).")
    if ignored:
        logger.warning("Table %s: ignoring columns that are not modalities: %s.", path, ", ".join(ignored))
    studies = []
    for i, row in enumerate(rows):
        row = {k.strip(): v for k, v in row.items() if k is not None}
        sid = str(row.get(id_col) or "").strip()
        if not sid:
            raise ValueError(f"Table {path}: row {i + 1} has an empty {id_col!r}.")
        images = {mod: _resolve(str(row[c]).strip(), base) for c, mod in mod_cols.items()
                  if row.get(c) not in (None, "") and str(row[c]).strip()}
        if not images:
            raise ValueError(f"Table {path}: study {sid!r} (row {i + 1}) has no image path in any modality column.")
        label = _resolve(str(row[label_col]).strip(), base) if label_col and str(row.get(label_col) or "").strip() \
            else None
        cls = str(row[class_col]).strip() if class_col and str(row.get(class_col) or "").strip() else None
        studies.append(Study(sid, images, label, cls))
    return _sorted_unique(studies, path)


# ----------------------------------------------------------------------------------------------------------------
# auto-detection


def discover_studies(path: str | os.PathLike[str]) -> list[Study]:
    """Find the studies at ``path``, auto-detecting the layout.

    A directory is a BIDS tree when it has ``sub-*`` folders, else a BraTS-style folder; a ``.json`` is a BrainMVP
    list when its entries carry an ``image`` key, else a table; ``.csv``/``.tsv`` is a table.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Data path {path} does not exist.")
    if path.is_dir():
        if any(p.is_dir() for p in path.glob("sub-*")):
            return from_bids(path)
        return from_brats_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        entries = _json_entries(_load_json(path), path, "training") if path.stat().st_size else []
        if not entries:
            raise FileNotFoundError(f"{path} lists no studies.")
        first = entries[0]
        if isinstance(first, (str, list)) or (isinstance(first, Mapping) and "image" in first):
            return from_brainmvp_json(path)
        return from_table(path)
    if suffix in (".csv", ".tsv"):
        return from_table(path)
    raise ValueError(
        f"Cannot read studies from {path}: expected a directory (BraTS folders or BIDS), a BrainMVP .json list, or "
        f"a .csv/.tsv/.json table."
    )
