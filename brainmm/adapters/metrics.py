"""Segmentation metrics per region (MONAI ``DiceMetric`` / ``HausdorffDistanceMetric``) with an explicit
empty-mask policy, and the evaluation of a folder of predicted masks against the reference labels.

Empty-mask policy (per region, per study):

==========================  ======  =====================================================================
prediction / reference      Dice    HD95
==========================  ======  =====================================================================
both non-empty              usual   95th percentile of the symmetric surface distances, in mm (spacing)
both empty                  1       0
exactly one empty           0       ``hd95_empty="nan"`` (default): NaN, left out of the HD95 mean (the
                                    count of such cases is reported); ``"max"``: the diagonal of the volume
                                    in mm (the largest possible distance; 373.1 mm for 240x240x155 at 1 mm,
                                    the BraTS 2023 convention)
==========================  ======  =====================================================================
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import Study
from .labels import LabelScheme, check_label_values

logger = logging.getLogger(__name__)

__all__ = ["HD95_EMPTY", "evaluate_predictions", "find_prediction", "format_metric_table", "region_metrics",
           "summarise"]

HD95_EMPTY = ("nan", "max")


def region_metrics(pred: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, names: Sequence[str], *,
                   spacing: Sequence[float] = (1.0, 1.0, 1.0), hd95_empty: str = "nan") -> dict[str, dict[str, float]]:
    """Dice and HD95 of each channel of binary masks ``pred``, ``ref`` ``(K, H, W, D)``.

    Returns ``{name: {"dice": d, "hd95": h}}``; see the module docstring for empty masks.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    if hd95_empty not in HD95_EMPTY:
        raise ValueError(f"hd95_empty must be one of {', '.join(HD95_EMPTY)}, got {hd95_empty!r}.")
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).bool()
    r = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref).bool()
    if p.shape != r.shape or p.ndim != 4:
        raise ValueError(f"pred and ref must be (K, H, W, D) masks of one shape, got {tuple(p.shape)} and "
                         f"{tuple(r.shape)}.")
    if len(names) != p.shape[0]:
        raise ValueError(f"{len(names)} names for {p.shape[0]} channels.")
    spacing = [float(s) for s in spacing]
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(
        p[None].float(), r[None].float())[0]
    diag = math.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape[1:], spacing)))
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(names):
        pe, re_ = not bool(p[k].any()), not bool(r[k].any())
        if pe and re_:
            d, h = 1.0, 0.0
        elif pe or re_:
            d, h = 0.0, (diag if hd95_empty == "max" else float("nan"))
        else:
            d = float(dice[k])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # a MONAI-internal deprecation, not ours
                h = float(hd_metric(p[None, k:k + 1].float(), r[None, k:k + 1].float(), spacing=spacing)[0, 0])
        out[name] = {"dice": d, "hd95": h}
    return out


def summarise(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean Dice / HD95 per region over per-study rows (``dice_<name>``, ``hd95_<name>``), plus ``mean`` (per study
    the mean over regions first). NaN HD95 values are left out of the means and counted in ``hd95_undefined``."""

    def study_mean_hd(r: dict[str, Any]) -> float:
        vals = [r[f"hd95_{n}"] for n in names if not math.isnan(r[f"hd95_{n}"])]
        return float(np.mean(vals)) if vals else float("nan")

    columns = {n: ([r[f"dice_{n}"] for r in rows], [r[f"hd95_{n}"] for r in rows]) for n in names}
    columns["mean"] = ([float(np.mean([r[f"dice_{n}"] for n in names])) for r in rows],
                       [study_mean_hd(r) for r in rows])
    summary: dict[str, dict[str, float]] = {}
    for name, (dices, hds) in columns.items():
        finite = [h for h in hds if not math.isnan(h)]
        summary[name] = {"dice": float(np.mean(dices)) if dices else float("nan"),
                         "hd95": float(np.mean(finite)) if finite else float("nan"),
                         "hd95_undefined": float(len(hds) - len(finite)), "n": float(len(rows))}
    return summary


def format_metric_table(summary: dict[str, dict[str, float]], title: str = "") -> str:
    """A plain-text table: one row per region (and the mean): Dice, HD95 (mm), number of undefined HD95."""
    rows = [("region", "Dice", "HD95 (mm)", "HD95 undefined", "studies")]
    for name, m in summary.items():
        rows.append((name, f"{m['dice']:.4f}", "nan" if math.isnan(m["hd95"]) else f"{m['hd95']:.2f}",
                     str(int(m["hd95_undefined"])), str(int(m["n"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return (f"{title}\n" if title else "") + "\n".join(lines)


def find_prediction(pred_dir: Path, study_id: str) -> Path | None:
    """``<study_id>.nii.gz`` (what ``brainmm predict`` writes), or ``<study_id>-seg`` / ``_seg`` variants."""
    for name in (f"{study_id}.nii.gz", f"{study_id}.nii", f"{study_id}-seg.nii.gz", f"{study_id}_seg.nii.gz"):
        if (pred_dir / name).is_file():
            return pred_dir / name
    return None


def evaluate_predictions(pred_dir: str | Path, studies: Sequence[Study], scheme: LabelScheme, *,
                         hd95_empty: str = "nan", output_csv: str | Path | None = None
                         ) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Score the masks in ``pred_dir`` against each study's reference label (same grid required).

    Returns ``(per-study rows, summary)``; ``output_csv`` also writes the rows. Studies without a label are
    skipped (logged); a missing prediction is an error naming the file expected.
    """
    import nibabel as nib

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"Prediction folder {str(pred_dir)!r} does not exist.")
    names = list(scheme.foreground_names)
    rows: list[dict[str, Any]] = []
    for s in studies:
        if s.label is None:
            logger.info("Study %s has no reference label; skipped.", s.study_id)
            continue
        path = find_prediction(pred_dir, s.study_id)
        if path is None:
            raise FileNotFoundError(f"No prediction for study {s.study_id!r} in {str(pred_dir)!r} (expected "
                                    f"{s.study_id}.nii.gz, as written by `brainmm predict`).")
        ref_img = nib.load(str(s.label))
        pred_img = nib.load(str(path))
        ref = np.rint(np.asarray(ref_img.dataobj)).astype(np.int64)
        pred = np.rint(np.asarray(pred_img.dataobj)).astype(np.int64)
        if ref.shape != pred.shape or not np.allclose(ref_img.affine, pred_img.affine, atol=1e-3):
            raise ValueError(f"Prediction {path} (shape {pred.shape}) is not in the grid of the reference "
                             f"{s.label} (shape {ref.shape}); predictions must be in the original grid.")
        check_label_values(np.unique(ref), scheme, source=str(s.label))
        check_label_values(np.unique(pred), scheme, source=str(path))
        to_masks = lambda a: scheme.to_onehot(torch.from_numpy(a)[None, None])[0]  # noqa: E731
        p, r = to_masks(pred), to_masks(ref)
        if scheme.kind == "classes":
            p, r = p[1:], r[1:]
        spacing = ref_img.header.get_zooms()[:3]
        m = region_metrics(p, r, names, spacing=spacing, hd95_empty=hd95_empty)
        row: dict[str, Any] = {"study_id": s.study_id}
        row.update({f"dice_{n}": m[n]["dice"] for n in names})
        row.update({f"hd95_{n}": m[n]["hd95"] for n in names})
        rows.append(row)
    if not rows:
        raise ValueError("No study with a reference label to evaluate.")
    if output_csv is not None:
        write_csv(output_csv, rows)
    return rows, summarise(rows, names)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path
