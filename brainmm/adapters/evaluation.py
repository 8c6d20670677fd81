"""Evaluation in the preprocessed space (validation during fine-tuning, ``brainmm evaluate --model``), and the
missing-modality table: every non-empty subset of the model's modalities, the others template-filled.

Scores are computed on the cached foreground boxes (the space the model was trained in); DDP ranks score disjoint
studies and the sums are all-reduced, so every rank returns the same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.cache import PreprocessedCache
from ..data.datasets import Study
from .base import AdapterModel
from .datasets import ClassificationDataset, StudyVolumeDataset
from .inference import sliding_window_logits
from .missing import modality_subsets

logger = logging.getLogger(__name__)

__all__ = ["classification_scores", "evaluate_modality_subsets", "format_subset_table", "prepare_data",
           "segmentation_scores"]


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()


def prepare_data(data: str | Path, model: AdapterModel, *, with_label: bool, with_class: bool, out_dir: Path,
                 cache_dir: str | Path | None = None, atlas_size: Sequence[int] | None = None, num_workers: int = 0,
                 demo_studies: int = 24, demo_shape: Sequence[int] = (64, 64, 48), seed: int = 0,
                 ) -> tuple[list[Study], PreprocessedCache]:
    """Studies -> preprocessed cache with the model's preprocessing and modalities (built once, rank-sharded).

    ``data == "demo"`` writes synthetic phantoms to ``out_dir/demo-data`` first. Studies without a label
    (``with_label``) or class (``with_class``), or without any of the model's modalities, are left out (logged).
    The model's templates are moved to the cache's atlas grid.
    """
    from ..data.datasets import discover_studies

    rank, world = _dist()
    path = Path(data) if str(data) != "demo" else out_dir / "demo-data"
    if str(data) == "demo":
        from ..data.synthetic import write_synthetic_dataset

        if rank == 0:
            write_synthetic_dataset(path, n_studies=demo_studies, shape=tuple(demo_shape), seed=seed)
        if world > 1:
            dist.barrier()
    studies = discover_studies(path)
    mods = set(model.modalities)
    keep, skipped = [], {"label": 0, "class": 0, "modalities": 0}
    for s in studies:
        if with_label and s.label is None:
            skipped["label"] += 1
        elif with_class and s.class_label is None:
            skipped["class"] += 1
        elif not mods & set(s.images):
            skipped["modalities"] += 1
        else:
            keep.append(s)
    for why, n in skipped.items():
        if n:
            logger.warning("Left out %d of %d studies without a %s.", n, len(studies),
                           {"label": "label map", "class": "class label", "modalities":
                            f"single modality of {sorted(mods)}"}[why])
    if not keep:
        raise ValueError(f"No usable study in {str(path)!r} (need {'a label map, ' if with_label else ''}"
                         f"{'a class label, ' if with_class else ''}and one of the modalities {sorted(mods)}).")
    atlas = tuple(int(s) for s in (atlas_size or model.pretrained_cfg.atlas_size))
    model.set_atlas_size(atlas)
    cache = PreprocessedCache(cache_dir or out_dir / "cache", model.pretrained_cfg, modalities=model.modalities,
                              with_label=with_label)
    cache.build(keep, num_workers=num_workers, rank=rank, world_size=world)
    return keep, cache


def segmentation_scores(model: torch.nn.Module, dataset: StudyVolumeDataset, *, roi_size: Sequence[int],
                        overlap: float = 0.5, sw_batch_size: int = 2, device: torch.device,
                        amp_dtype: torch.dtype | None = None, threshold: float = 0.5,
                        return_predictions: int = 0) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean Dice per output region over the dataset's studies (DDP-sharded), by sliding-window inference.

    Returns ``({"dice_<name>": ..., "dice_mean": ..., "n": ...}, previews)`` where ``previews`` holds the image,
    reference and predicted masks of the first ``return_predictions`` studies of this rank (for PNG overlays).
    """
    from monai.metrics import DiceMetric

    # Same empty-mask policy as brainmm.adapters.metrics: both empty -> 1, one empty -> 0.
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    scheme = model.label_scheme
    names = list(scheme.foreground_names)
    rank, world = _dist()
    sums = torch.zeros(len(names) + 1, dtype=torch.float64)
    previews: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    for i in range(rank, len(dataset), world):
        item = dataset[i]
        logits = sliding_window_logits(model, item["image"][None].to(device), roi_size, overlap=overlap,
                                       sw_batch_size=sw_batch_size, device=device, amp_dtype=amp_dtype)
        pred = scheme.logits_to_masks(logits, threshold)[0].cpu()
        ref = scheme.to_onehot(item["label"][None])[0]
        if scheme.kind == "classes":
            pred, ref = pred[1:], ref[1:]
        # Dice only: HD95 per validation round would dominate the time on CPU; `brainmm evaluate` reports it.
        sums[:-1] += dice_metric(pred[None], ref[None])[0].double()
        sums[-1] += 1
        if len(previews) < return_predictions:
            previews.append({"study_id": item["study_id"], "image": item["image"], "ref": ref, "pred": pred,
                             "names": names})
    model.train(was_training)
    sums = _all_reduce(sums, device)
    n = max(1.0, float(sums[-1]))
    out = {f"dice_{name}": float(sums[k] / n) for k, name in enumerate(names)}
    out["dice_mean"] = float(np.mean([out[f"dice_{name}"] for name in names]))
    out["n"] = float(sums[-1])
    return out, previews


def classification_scores(model: torch.nn.Module, dataset: ClassificationDataset, *, device: torch.device,
                          amp_dtype: torch.dtype | None = None, batch_size: int = 4
                          ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Accuracy, balanced accuracy and mean cross-entropy over the dataset (DDP-sharded); per-study probabilities of
    this rank."""
    rank, world = _dist()
    k = model.num_classes
    conf = torch.zeros(k, k, dtype=torch.float64)  # rows: truth, cols: prediction
    loss_sum = torch.zeros(1, dtype=torch.float64)
    rows: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    idx = list(range(rank, len(dataset), world))
    for start in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[start:start + batch_size]]
        x = torch.stack([it["image"] for it in items]).to(device)
        y = torch.stack([it["target"] for it in items])
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                             enabled=amp_dtype is not None):
            logits = model(x).float().cpu()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        probs = torch.softmax(logits, 1)
        for it, p, t in zip(items, probs, y):
            conf[int(t), int(p.argmax())] += 1
            rows.append({"study_id": it["study_id"], "target": model.class_names[int(t)],
                         **{f"p_{n}": float(v) for n, v in zip(model.class_names, p)}})
    model.train(was_training)
    flat = _all_reduce(torch.cat([conf.flatten(), loss_sum]), device)
    conf, loss_sum = flat[:-1].view(k, k), flat[-1]
    n = float(conf.sum())
    per_class = [float(conf[c, c] / conf[c].sum()) for c in range(k) if conf[c].sum() > 0]
    return {"accuracy": float(conf.diag().sum() / n) if n else float("nan"),
            "balanced_accuracy": float(np.mean(per_class)) if per_class else float("nan"),
            "loss": float(loss_sum / n) if n else float("nan"), "n": n}, rows


def evaluate_modality_subsets(model: AdapterModel, cache: PreprocessedCache, studies: Sequence[Study], *,
                              device: torch.device, amp_dtype: torch.dtype | None = None, overlap: float = 0.5,
                              sw_batch_size: int = 2, roi_size: Sequence[int] | None = None,
                              subsets: Sequence[Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """Score the model with every non-empty subset of its modalities (the rest template-filled): one row per
    subset with its metrics (Dice per region for segmentation; accuracy for classification)."""
    mods = model.modalities
    subsets = [tuple(s) for s in (subsets or modality_subsets(mods))]
    rows = []
    for subset in subsets:
        if model.model_type == "segmentation":
            ds = StudyVolumeDataset(cache, studies, modalities=mods, templates=model.templates, keep=subset)
            scores, _ = segmentation_scores(model, ds, roi_size=roi_size or model.pretrained_cfg.input_size,
                                            overlap=overlap, sw_batch_size=sw_batch_size, device=device,
                                            amp_dtype=amp_dtype)
        else:
            ds = ClassificationDataset(cache, studies, modalities=mods, templates=model.templates,
                                       class_names=model.class_names, input_size=model.pretrained_cfg.input_size,
                                       keep=subset)
            scores, _ = classification_scores(model, ds, device=device, amp_dtype=amp_dtype)
        rows.append({"modalities": "+".join(subset), "filled": "+".join(m for m in mods if m not in subset) or "-",
                     **scores})
    return rows


def format_subset_table(rows: Sequence[dict[str, Any]]) -> str:
    """The missing-modality table: one line per subset, metric columns as returned by the scorers."""
    if not rows:
        return "(no subsets)"
    metric_keys = [k for k in rows[0] if k not in ("modalities", "filled", "n")]
    header = ["input modalities", "template-filled", *metric_keys]
    body = [[r["modalities"], r["filled"], *(_fmt(r[k]) for k in metric_keys)] for r in rows]
    table = [header, *body]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)
