"""``brainmm demo``: does BrainMVP pre-training help? End to end on synthetic phantoms, on the CPU.

1. Pre-train a tiny encoder with the three proxy tasks on unlabelled phantoms (``brainmm.pretrain.demo_config``,
   the official schedule scaled to ``pretrain_steps``).
2. Fine-tune segmentation (BraTS 2023 regions TC/WT/ET) on a small labelled subset of *other* phantoms, from (a)
   the pre-trained encoder (stem built from the pre-trained one, templates filling the missing modalities) and
   (b) a random initialisation, with the same data, steps and seed; the same for classification
   (healthy / tumour / stroke).
3. With ``ablation``: pre-train again with cross-modal reconstruction only, then + template distillation, and
   fine-tune segmentation from each (the full model is the third row).
4. Print and save the table (``OUT/results.md``) and everything measured (``OUT/results.json``).

The datasets are disjoint: pre-training phantoms (seed ``seed``), segmentation phantoms (all with a tumour,
seed ``seed + 1``), classification phantoms (balanced classes, seed ``seed + 2``). Numbers on phantoms say whether
the pipeline works and how pre-training behaves at this tiny scale; they are not the paper's results.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DemoConfig", "format_demo_table", "run_demo"]

# Pre-training variants of the ablation: ObjectiveConfig overrides (epochs are scaled in `_pretrain_config`).
ABLATION = {
    "cmr": {"template_weight": 0.0, "template_only_epochs": 0, "contrastive_weight": 0.0},
    "cmr+md": {"contrastive_weight": 0.0},
    "cmr+md+mcl": {},
}
LABELS = {"scratch": "scratch (random init)", "cmr": "pre-trained: CMR only", "cmr+md": "pre-trained: CMR + MD",
          "cmr+md+mcl": "pre-trained: CMR + MD + MCL (BrainMVP)"}


@dataclass
class DemoConfig:
    """Settings of ``brainmm demo``. The defaults (``demo_config``'s 480 pre-training steps; 600 segmentation and
    300 classification steps per arm at the paper's Adam 3e-4) take about 8 minutes on 2 CPU cores."""

    out: str = "runs/demo"
    arch: str = "mmvp_uniformer_tiny"
    pretrain_steps: int = 480
    finetune_steps: int = 600
    cls_steps: int = 300
    label_fraction: float = 0.25  # of the segmentation training studies
    pretrain_studies: int = 24
    seg_studies: int = 20
    cls_studies: int = 48
    val_fraction: float = 0.3
    max_val_studies: int | None = None
    shape: tuple[int, int, int] = (64, 64, 48)
    classification: bool = True
    ablation: bool = False
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
        for name in ("pretrain_steps", "finetune_steps", "cls_steps", "pretrain_studies", "seg_studies",
                     "cls_studies"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}.")


def _crops(arch: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(segmentation crop, classification input) that the encoder's stride allows on the 64x64x48 phantoms."""
    from ..models import create_model

    div = create_model(arch).size_divisor
    if div >= 32:  # Swin: a 32^3 crop would leave a 1-voxel bottleneck, which instance norm cannot normalise
        return (64, 64, 32), (64, 64, 32)
    return (32, 32, 32), (48, 48, 32)


def _pretrain_config(cfg: DemoConfig, variant: str, data: Path, out: Path) -> Any:
    from ..pretrain.config import demo_config

    base = demo_config(out=str(out), arch=cfg.arch)
    steps_per_epoch = max(1, cfg.pretrain_studies * base.samples_per_study // base.batch_size)
    epochs = max(1, math.ceil(cfg.pretrain_steps / steps_per_epoch))
    # The official schedule, scaled: template-only for the first 20 % of the epochs, contrastive from 2/3.
    objective = {"template_only_epochs": max(0, round(0.2 * epochs)),
                 "contrastive_start_epoch": max(1, round(2 * epochs / 3))}
    objective.update(ABLATION[variant])
    overrides = {"data": str(data), "cache_dir": str(out.parent / "cache-pretrain"), "epochs": epochs,
                 "max_steps": cfg.pretrain_steps, "seed": cfg.seed, "device": cfg.device,
                 "preview_every": max(1, cfg.pretrain_steps), "checkpoint_every": max(1, cfg.pretrain_steps),
                 "warmup_steps": min(base.warmup_steps, max(0, cfg.pretrain_steps - 1))}
    overrides.update({f"objective.{k}": v for k, v in objective.items()})
    return base.with_overrides(overrides)


def run_demo(cfg: DemoConfig, *, show_progress: bool = True,
             echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the demo; returns the results dict (also written to ``OUT/results.json``, the table to
    ``OUT/results.md``)."""
    from .. import hub
    from ..data.synthetic import CLASS_NAMES, write_synthetic_dataset
    from ..pretrain.trainer import pretrain
    from .finetune import FinetuneConfig, finetune

    say = echo or (lambda s: logger.info("%s", s))
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seg_crop, cls_input = _crops(cfg.arch)
    timings: dict[str, float] = {}

    say(f"[demo] writing phantoms to {out / 'data'} (pre-training {cfg.pretrain_studies}, segmentation "
        f"{cfg.seg_studies}, classification {cfg.cls_studies}; {'x'.join(map(str, cfg.shape))} voxels)")
    t = time.perf_counter()
    pre_data = write_synthetic_dataset(out / "data" / "pretrain", cfg.pretrain_studies, cfg.shape, seed=cfg.seed)
    seg_data = write_synthetic_dataset(out / "data" / "segmentation", cfg.seg_studies, cfg.shape,
                                       seed=cfg.seed + 1, kinds=["tumour"] * cfg.seg_studies)
    cls_data = None
    if cfg.classification:
        cls_data = write_synthetic_dataset(out / "data" / "classification", cfg.cls_studies, cfg.shape,
                                           seed=cfg.seed + 2)
    timings["data"] = time.perf_counter() - t

    variants = list(ABLATION) if cfg.ablation else ["cmr+md+mcl"]
    encoders: dict[str, str] = {"scratch": cfg.arch}
    for v in variants:
        say(f"[demo] pre-training {cfg.arch} ({LABELS[v]}), {cfg.pretrain_steps} steps")
        t = time.perf_counter()
        export = pretrain(_pretrain_config(cfg, v, pre_data, out / f"pretrain-{v.replace('+', '-')}"),
                          show_progress=show_progress)
        timings[f"pretrain {v}"] = time.perf_counter() - t
        encoders[v] = f"local-dir:{Path(export).resolve()}"

    def timed_finetune(fc: FinetuneConfig, timing_key: str) -> dict[str, Any]:
        t = time.perf_counter()
        res = finetune(fc, show_progress=show_progress)
        timings[timing_key] = time.perf_counter() - t
        summary = _summary(res.out)
        return {"metrics": res.metrics, "best_epoch": res.best_epoch, "steps": res.steps, "model": str(res.best),
                "seconds": res.seconds, "train_studies": summary["train"], "val_studies": summary["val"]}

    def seg_run(name: str, encoder: str) -> dict[str, Any]:
        steps_per_epoch = _steps_per_epoch(cfg.seg_studies, cfg.val_fraction, cfg.label_fraction, 4, 2)
        epochs = max(1, math.ceil(cfg.finetune_steps / steps_per_epoch))
        fc = FinetuneConfig.demo(
            "seg", encoder=encoder, out=str(out / "finetune" / f"seg-{name.replace('+', '-')}"),
            data=str(seg_data), cache_dir=str(out / "finetune" / "cache-seg"), crop_size=seg_crop,
            atlas_size=cfg.shape, epochs=epochs, max_steps=cfg.finetune_steps, val_every=max(1, epochs // 2),
            label_fraction=cfg.label_fraction, val_fraction=cfg.val_fraction, max_val_studies=cfg.max_val_studies,
            seed=cfg.seed, device=cfg.device, sw_batch_size=4, overlays=1, pretrained=False)
        say(f"[demo] fine-tuning segmentation from {LABELS[name]}: {cfg.finetune_steps} steps")
        return timed_finetune(fc, f"segmentation {name}")

    def cls_run(name: str, encoder: str) -> dict[str, Any]:
        steps_per_epoch = _steps_per_epoch(cfg.cls_studies, 0.25, 1.0, 1, 4)  # FinetuneConfig.demo("cls") batch 4
        epochs = max(1, math.ceil(cfg.cls_steps / steps_per_epoch))
        fc = FinetuneConfig.demo(
            "cls", encoder=encoder, out=str(out / "finetune" / f"cls-{name.replace('+', '-')}"),
            data=str(cls_data), cache_dir=str(out / "finetune" / "cache-cls"), crop_size=cls_input,
            atlas_size=cfg.shape, epochs=epochs, max_steps=cfg.cls_steps, val_every=max(1, epochs // 2),
            val_fraction=0.25, classes=CLASS_NAMES, seed=cfg.seed, device=cfg.device, pretrained=False)
        say(f"[demo] fine-tuning classification from {LABELS[name]}: {cfg.cls_steps} steps")
        return timed_finetune(fc, f"classification {name}")

    runs: dict[str, dict[str, Any]] = {}
    for name in ["scratch", *variants]:
        runs[name] = {"segmentation": seg_run(name, encoders[name])}
        if cls_data is not None and (name in ("scratch", "cmr+md+mcl")):
            runs[name]["classification"] = cls_run(name, encoders[name])
    timings["total"] = time.perf_counter() - t0
    results = {"config": {**asdict(cfg), "seg_crop": list(seg_crop), "cls_input": list(cls_input)},
               "encoders": encoders, "runs": runs, "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    table = format_demo_table(results)
    hub.write_json(out / "results.json", results)
    (out / "results.md").write_text(table + "\n")
    return results


def _steps_per_epoch(n: int, val_fraction: float, label_fraction: float, samples_per_study: int,
                     batch_size: int) -> int:
    train = max(1, n - int(round(n * val_fraction)))
    labelled = max(1, math.ceil(label_fraction * train - 1e-9))
    return max(1, math.ceil(labelled * samples_per_study / batch_size))


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())["data"]


def format_demo_table(results: dict[str, Any]) -> str:
    """The demo's result table (Markdown): one row per encoder initialisation."""
    cfg = results["config"]
    runs = results["runs"]
    first = next(iter(runs.values()))["segmentation"]
    cls_first = next((r["classification"] for r in runs.values() if "classification" in r), None)
    head = (f"BrainMVP demo: {cfg['arch']} on synthetic phantoms ({'x'.join(map(str, cfg['shape']))}). Segmentation: "
            f"{first['train_studies']} labelled training studies ({cfg['label_fraction']:g} of the training split), "
            f"{first['val_studies']} validation studies, {cfg['finetune_steps']} steps"
            + (f"; classification (healthy/tumour/stroke): {cls_first['train_studies']} training, "
               f"{cls_first['val_studies']} validation studies, {cfg['cls_steps']} steps" if cls_first else "")
            + f"; pre-training {cfg['pretrain_steps']} steps.")
    rows = [["encoder initialisation", "Dice TC", "Dice WT", "Dice ET", "Dice mean", "cls accuracy"]]
    for name, r in runs.items():
        m = r["segmentation"]["metrics"]
        acc = r.get("classification", {}).get("metrics", {}).get("accuracy")
        rows.append([LABELS.get(name, name), *(f"{m.get(k, float('nan')):.4f}" for k in
                                               ("dice_TC", "dice_WT", "dice_ET", "dice_mean")),
                     "-" if acc is None else f"{acc:.4f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    t = results["timings_s"]
    timing = "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + "."
    return "\n".join([head, "", *lines, "", timing])
