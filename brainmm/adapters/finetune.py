"""Fine-tuning of segmentation and classification adapters: one process or many through torchrun.

The defaults are the BrainMVP paper's downstream recipe (brainmvp.md section 4): segmentation with 0.7 soft Dice +
0.3 BCE per region channel (sigmoid; TC/WT/ET for BraTS) or Dice + CE for integer classes (softmax), deep
supervision at 1/2 and 1/4 (weight 1 each), Adam lr 3e-4, cosine decay per epoch over 300 epochs, batch 2, 96^3
crops, sliding-window validation (overlap 0.5); classification: the whole foreground box resized to the input size,
cross-entropy, same optimiser. bf16 autocast on GPU, fp32 on CPU.

What the trainer guarantees (as the pre-training trainer does):
- seeded train/validation split by study id; ``label_fraction`` takes a seeded, nested subset of the *training*
  studies only, so runs with different fractions share one validation set;
- samples depend on (seed, epoch, index) only; DDP shards are disjoint (seeded ``DistributedSampler``);
- atomic checkpoints (safetensors + JSON; model, optimiser, scheduler, scaler, RNG, counters, best score) after
  each epoch and at the end; ``resume=True`` continues from the latest one (mid-epoch included);
- best-checkpoint selection on the validation score (segmentation: mean Dice; classification: accuracy, then
  lower loss), exported as a brainmm folder ``OUT/best`` (and ``OUT/last``), loadable with
  ``create_segmentation_model("local-dir:OUT/best")``;
- progress bar, TensorBoard scalars, PNG overlays of validation predictions (``OUT/overlays``), ``OUT/metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .. import hub
from .._config import RunConfig
from .._runtime import (
    ResumableSampler,
    dist_info,
    init_distributed,
    pick_device,
    progress_bar,
    step_seed,
    tensorboard_writer,
)
from ..data.modalities import canonical_modalities
from ..ops import depthwise_backend
from .base import AdapterModel, param_groups
from .evaluation import classification_scores, prepare_data, segmentation_scores
from .inference import amp_dtype_for
from .labels import LabelScheme

logger = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FinetuneResult", "Finetuner", "RegionDiceBCELoss", "build_loss", "finetune"]

TASKS = {"seg": "segmentation", "segmentation": "segmentation", "cls": "classification",
         "classification": "classification"}


@dataclass
class FinetuneConfig(RunConfig):
    """Everything a fine-tuning run depends on. Defaults: the paper's downstream recipe on BraTS-style data."""

    setting_kind = "fine-tuning"

    task: str = "seg"  # seg | cls
    encoder: str = "mmvp_uniformer"  # registry name, hf-hub:..., local-dir:... (an encoder export)
    pretrained: bool = True  # load the registry weights of a tagged name (locations always load theirs)
    data: str = "demo"
    labels: str = "brats2023"  # segmentation label scheme (brainmm.adapters.labels)
    classes: tuple[str, ...] | None = None  # classification class names (default: sorted classes of the data)
    modalities: tuple[str, ...] = ("flair", "t1", "t1c", "t2")
    out: str = "runs/finetune"
    cache_dir: str | None = None  # default <out>/cache
    atlas_size: tuple[int, int, int] | None = None  # default: the encoder's (its templates' grid)
    crop_size: tuple[int, int, int] = (96, 96, 96)  # segmentation crops / sliding-window ROI; cls input size
    epochs: int = 300
    max_steps: int | None = None  # stop after this many optimizer steps (the cosine still spans `epochs`)
    batch_size: int = 2
    samples_per_study: int = 1
    lr: float = 3e-4
    optimizer: str = "adam"  # adam (paper) | adamw
    weight_decay: float = 0.0
    layer_decay: float = 1.0  # layer-wise lr decay over encoder stages (1 = off)
    min_lr: float = 0.0
    grad_clip: float = 0.0
    # segmentation
    decoder: str = "auto"
    deep_supervision: bool = True
    feature_size: int | None = None
    dice_weight: float = 0.7
    ce_weight: float = 0.3
    pos_fraction: float = 0.5
    sw_overlap: float = 0.5
    sw_batch_size: int = 2
    # classification
    mode: str = "full"  # full | freeze | linear_probe
    pool: str = "avg"
    head: str = "mlp"
    # data, augmentation, evaluation
    val_fraction: float = 0.2
    label_fraction: float = 1.0
    modality_dropout: float = 0.0
    augment: bool = True
    val_every: int = 1  # epochs
    max_val_studies: int | None = None
    overlays: int = 2  # validation studies drawn as PNG overlays per validation (0 = none)
    # runtime
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    depthwise: str = "torch"  # UniFormer's depthwise convolutions: torch | triton (GPU kernels, brainmm.ops)
    device: str = "auto"
    num_workers: int = 2
    seed: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    demo_studies: int = 24
    demo_shape: tuple[int, int, int] = (64, 64, 48)

    def __post_init__(self) -> None:
        self.task = TASKS.get(str(self.task).lower(), self.task)
        if self.task not in ("segmentation", "classification"):
            raise ValueError(f"task must be 'seg' or 'cls', got {self.task!r}.")
        self.modalities = canonical_modalities(self.modalities, argument="modalities")
        self.crop_size = tuple(int(c) for c in self.crop_size)  # type: ignore[assignment]
        self.demo_shape = tuple(int(c) for c in self.demo_shape)  # type: ignore[assignment]
        if self.atlas_size is not None:
            self.atlas_size = tuple(int(c) for c in self.atlas_size)  # type: ignore[assignment]
        if self.classes is not None:
            self.classes = tuple(str(c) for c in self.classes)
        checks = [
            (len(self.crop_size) == 3 and min(self.crop_size) > 0, f"crop_size must be 3 sizes, got {self.crop_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.optimizer in ("adam", "adamw"), f"optimizer must be adam or adamw, got {self.optimizer!r}"),
            (0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (0 < self.label_fraction <= 1, f"label_fraction must be in (0, 1], got {self.label_fraction}"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.val_every >= 1, f"val_every must be >= 1, got {self.val_every}"),
            (self.mode in ("full", "freeze", "linear_probe"),
             f"mode must be full, freeze or linear_probe, got {self.mode!r}"),
        ]
        self.validate(checks)

    @classmethod
    def demo(cls, task: str = "seg", *, encoder: str = "mmvp_uniformer_tiny", out: str = "runs/finetune-demo",
             **changes: Any) -> FinetuneConfig:
        """A CPU-sized run on synthetic phantoms (64x64x48): 32^3 crops, a few epochs, 4 modalities."""
        base: dict[str, Any] = dict(task=task, encoder=encoder, data="demo", out=out, crop_size=(32, 32, 32),
                                    atlas_size=(64, 64, 48), epochs=20, batch_size=2, samples_per_study=4,
                                    num_workers=0, log_every=5, val_every=5, pretrained=False)
        if TASKS.get(task) == "classification":
            base.update(crop_size=(48, 48, 32), samples_per_study=1, batch_size=4)
        base.update(changes)
        return cls.from_dict(base)


class RegionDiceBCELoss(nn.Module):
    """``dice_weight * soft Dice (sigmoid) + ce_weight * BCE-with-logits``, each averaged over the region channels.

    Not MONAI's ``DiceCELoss(sigmoid=True)``: with more than one channel that applies a *softmax* cross-entropy,
    which is wrong for overlapping regions (TC inside WT)."""

    def __init__(self, dice_weight: float = 0.7, ce_weight: float = 0.3) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True)
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()  # sums over 96^3 voxels need fp32 even under bf16 autocast
        return (self.dice_weight * self.dice(logits, target)
                + self.ce_weight * F.binary_cross_entropy_with_logits(logits, target))


def build_loss(scheme: LabelScheme, *, dice_weight: float = 0.7, ce_weight: float = 0.3,
               deep_supervision: bool = True) -> nn.Module:
    """The segmentation loss for a scheme, wrapped in MONAI's ``DeepSupervisionLoss`` (weights 1, 1, 1; targets
    resized with nearest neighbours to each head's resolution)."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    if scheme.kind == "regions":
        loss: nn.Module = RegionDiceBCELoss(dice_weight, ce_weight)
    else:
        loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=dice_weight, lambda_ce=ce_weight)
    return DeepSupervisionLoss(loss, weight_mode="same") if deep_supervision else loss


@dataclass
class FinetuneResult:
    """Where a run wrote its models and what it reached."""

    out: Path
    best: Path
    last: Path
    best_score: float
    best_epoch: int
    metrics: dict[str, float] = field(default_factory=dict)  # validation metrics of the best checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


class Finetuner:
    """Fine-tune ``config.encoder`` on ``config.data``. ``Finetuner(cfg).fit()`` -> :class:`FinetuneResult`."""

    def __init__(self, config: FinetuneConfig, *, resume: bool = False, show_progress: bool = True,
                 model: AdapterModel | None = None) -> None:
        self.config = config
        self.resume = resume
        self.show_progress = show_progress
        self.rank, self.world_size, self.local_rank = dist_info()
        self.is_main = self.rank == 0
        self.out = Path(config.out)
        self.device = pick_device(config.device, self.local_rank)
        init_distributed(self.device, self.world_size)
        self.amp_dtype = amp_dtype_for(self.device, config.precision)
        torch.manual_seed(config.seed)  # identical initial heads on every rank
        np.random.seed(config.seed)
        self._given_model = model

    # ------------------------------------------------------------------------------------------------ set-up
    def build_model(self, class_names: tuple[str, ...] | None = None) -> AdapterModel:
        cfg = self.config
        if self._given_model is not None:
            return self._given_model
        if cfg.task == "segmentation":
            from .segmentation import create_segmentation_model

            return create_segmentation_model(cfg.encoder, modalities=cfg.modalities, labels=cfg.labels,
                                             pretrained=cfg.pretrained, decoder=cfg.decoder,
                                             deep_supervision=cfg.deep_supervision, feature_size=cfg.feature_size)
        from .classification import create_classification_model

        return create_classification_model(cfg.encoder, modalities=cfg.modalities, class_names=class_names,
                                           pretrained=cfg.pretrained, pool=cfg.pool, head=cfg.head, mode=cfg.mode)

    def build_data(self, model: AdapterModel) -> dict[str, Any]:
        """Cache, split, label-fraction subset and the datasets."""
        from .datasets import (
            ClassificationDataset,
            SegmentationCropDataset,
            StudyVolumeDataset,
            label_fraction_subset,
            split_studies,
        )
        from .missing import ModalityDropout

        cfg = self.config
        seg = cfg.task == "segmentation"
        studies, cache = prepare_data(cfg.data, model, with_label=seg, with_class=not seg, out_dir=self.out,
                                      cache_dir=cfg.cache_dir, atlas_size=cfg.atlas_size,
                                      num_workers=min(cfg.num_workers, 4), demo_studies=cfg.demo_studies,
                                      demo_shape=cfg.demo_shape, seed=cfg.seed)
        train_all, val = split_studies(studies, cfg.val_fraction, seed=cfg.seed, stratify=not seg)
        train = label_fraction_subset(train_all, cfg.label_fraction, seed=cfg.seed)
        if cfg.max_val_studies is not None:
            val = val[:cfg.max_val_studies]
        dropout = ModalityDropout(cfg.modality_dropout)
        mods = model.modalities
        if seg:
            train_ds = SegmentationCropDataset(cache, train, modalities=mods, templates=model.templates,
                                               scheme=model.label_scheme, crop_size=cfg.crop_size, seed=cfg.seed,
                                               samples_per_study=cfg.samples_per_study,
                                               pos_fraction=cfg.pos_fraction, dropout=dropout, augment=cfg.augment)
            val_ds = StudyVolumeDataset(cache, val, modalities=mods, templates=model.templates) if val else None
        else:
            names = model.class_names
            train_ds = ClassificationDataset(cache, train, modalities=mods, templates=model.templates,
                                             class_names=names, input_size=cfg.crop_size, seed=cfg.seed,
                                             dropout=dropout, augment=cfg.augment)
            val_ds = ClassificationDataset(cache, val, modalities=mods, templates=model.templates, class_names=names,
                                           input_size=cfg.crop_size) if val else None
        summary = {"source": str(cfg.data), "studies": len(studies), "train_available": len(train_all),
                   "train": len(train), "val": len(val), "label_fraction": cfg.label_fraction,
                   "train_ids": [s.study_id for s in train], "val_ids": [s.study_id for s in val]}
        return {"train": train_ds, "val": val_ds, "summary": summary}

    def _class_names(self) -> tuple[str, ...]:
        cfg = self.config
        if cfg.classes:
            return tuple(cfg.classes)
        from ..data.datasets import discover_studies

        path = self.out / "demo-data" if cfg.data == "demo" else Path(cfg.data)
        if cfg.data == "demo":
            from ..data.synthetic import CLASS_NAMES

            return CLASS_NAMES
        found = sorted({s.class_label for s in discover_studies(path) if s.class_label is not None})
        if len(found) < 2:
            raise ValueError(f"Classification needs at least 2 classes; {str(path)!r} has {found or 'none'} "
                             "(labels.csv with study_id,class, or a manifest with a class column).")
        return tuple(found)

    def _loss(self, model: AdapterModel) -> nn.Module:
        cfg = self.config
        if cfg.task == "segmentation":
            return build_loss(model.label_scheme, dice_weight=cfg.dice_weight, ce_weight=cfg.ce_weight,
                              deep_supervision=cfg.deep_supervision)
        return nn.CrossEntropyLoss()

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> FinetuneResult:
        """Train (or resume), validating every ``val_every`` epochs; returns the best and last results."""
        with depthwise_backend(self.config.depthwise):
            return self._fit()

    def _fit(self) -> FinetuneResult:
        from ..pretrain.checkpoint import latest_checkpoint, resume_from

        cfg = self.config
        t_start = time.perf_counter()
        seg = cfg.task == "segmentation"
        model = self.build_model(None if seg else self._class_names())
        data = self.build_data(model)
        train_ds, val_ds = data["train"], data["val"]
        model.pretrained_cfg = model.pretrained_cfg.replace(input_size=tuple(cfg.crop_size))
        model.to(self.device)
        net: nn.Module = model
        if self.world_size > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[self.local_rank]
                                                      if self.device.type == "cuda" else None)
        loss_fn = self._loss(model).to(self.device)

        sampler = ResumableSampler(train_ds, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                   seed=cfg.seed, drop_last=False)
        micro_per_epoch = math.ceil(sampler.num_samples / cfg.batch_size)
        groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
        opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        optimizer = opt_cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self.device.type == "cuda")
        min_ratio = cfg.min_lr / cfg.lr
        # Cosine per epoch (the paper's schedule): the factor of epoch e (1-based) is applied during that epoch.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(e, cfg.epochs)
                                                                                     / cfg.epochs)))
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        step, epoch, micro_done = 0, 1, 0
        best_score, best_epoch, best_metrics, history = -math.inf, 0, {}, []
        ckpt_dir = self.out / "checkpoints"
        if self.resume:
            path = latest_checkpoint(ckpt_dir)
            if path is None:
                logger.warning("resume: no checkpoint in %s, starting from scratch.", ckpt_dir)
            else:
                c = resume_from(path, model, optimizer, scheduler, scaler)
                step, epoch, micro_done = c["step"], c["epoch"], c["micro_in_epoch"]
                best_score, best_epoch = c["best_score"], c["best_epoch"]
                best_metrics, history = c.get("best_metrics", {}), c.get("history", [])
                if self.is_main:
                    logger.info("Resumed from %s at step %d (epoch %d, batch %d).", path, step, epoch, micro_done)

        writer = self._writer() if self.is_main else None
        if writer is not None and step == 0:
            writer.add_text("config", f"```\n{json.dumps(cfg.to_dict(), indent=1)}\n```")
            writer.add_text("data", f"```\n{json.dumps(data['summary'], indent=1)}\n```")
        total_steps = cfg.epochs * micro_per_epoch
        last_step = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
        bar = self._progress(last_step, step)
        running, n_running, t_last = 0.0, 0, time.perf_counter()

        def validate_and_keep(ep: int) -> None:
            nonlocal best_score, best_epoch, best_metrics
            if val_ds is None:
                metrics, score = {}, float(ep)  # no validation set: the latest epoch is "best"
            else:
                metrics, score = self._validate(model, val_ds, ep, writer)
            history.append({"epoch": ep, "step": step, **metrics})
            if score > best_score:
                best_score, best_epoch, best_metrics = score, ep, metrics
                self._export(model, self.out / "best", data["summary"], metrics, ep, step)

        model.train()
        while step < last_step and epoch <= cfg.epochs:
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            sampler.start = micro_done * cfg.batch_size
            loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                                drop_last=False, pin_memory=self.device.type == "cuda", collate_fn=_collate,
                                generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for batch in loader:
                torch.manual_seed(step_seed(cfg.seed, self.rank, epoch, micro_done, salt=17))
                micro_done += 1
                x = batch["image"].to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    if seg:
                        y = model.label_scheme.to_target(batch["label"]).to(self.device, non_blocking=True)
                        loss = loss_fn(net(x, return_aux=cfg.deep_supervision), y)
                    else:
                        loss = loss_fn(net(x).float(), batch["target"].to(self.device))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                running += float(loss.detach())
                n_running += 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == last_step:
                    dt = time.perf_counter() - t_last
                    avg = running / max(n_running, 1)
                    if bar is not None:
                        bar.set_postfix(loss=f"{avg:.4f}", epoch=epoch,
                                        samples_s=f"{n_running * cfg.batch_size * self.world_size / dt:.1f}")
                    if writer is not None:
                        writer.add_scalar("train/loss", avg, step)
                        writer.add_scalar("train/lr", optimizer.param_groups[-1]["lr"], step)
                        writer.add_scalar("train/epoch", epoch, step)
                    running, n_running, t_last = 0.0, 0, time.perf_counter()
                if step >= last_step:
                    break
            else:  # the epoch finished
                with warnings.catch_warnings():
                    # After a resume at an epoch boundary no optimizer step precedes this one in this process;
                    # the restored schedule is still right, so PyTorch's order warning does not apply.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                            category=UserWarning)
                    scheduler.step()
                if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
                    validate_and_keep(epoch)
                epoch += 1
                micro_done = 0
                self._checkpoint(model, optimizer, scheduler, scaler, step, epoch, micro_done, best_score,
                                 best_epoch, best_metrics, history, ckpt_dir)
                continue
            break
        if bar is not None:
            bar.close()
        stopped_mid_epoch = micro_done > 0
        if stopped_mid_epoch:
            self._checkpoint(model, optimizer, scheduler, scaler, step, epoch, micro_done, best_score, best_epoch,
                             best_metrics, history, ckpt_dir)
        if not history or history[-1]["step"] != step:
            validate_and_keep(epoch if stopped_mid_epoch else max(1, epoch - 1))
        self._export(model, self.out / "last", data["summary"], history[-1] if history else {}, epoch, step)
        if self.is_main:
            hub.write_json(self.out / "metrics.json", {"best_epoch": best_epoch, "best_score": best_score,
                                                       "best_metrics": best_metrics, "history": history,
                                                       "data": data["summary"], "config": cfg.to_dict()})
        if writer is not None:
            writer.close()
        if self.world_size > 1:
            dist.barrier()
        return FinetuneResult(out=self.out, best=self.out / "best", last=self.out / "last", best_score=best_score,
                              best_epoch=best_epoch, metrics=best_metrics, history=history, steps=step,
                              seconds=time.perf_counter() - t_start)

    # ------------------------------------------------------------------------------------------------ pieces
    def _validate(self, model: AdapterModel, val_ds: Any, epoch: int, writer: Any) -> tuple[dict[str, float], float]:
        cfg = self.config
        if cfg.task == "segmentation":
            metrics, previews = segmentation_scores(model, val_ds, roi_size=cfg.crop_size, overlap=cfg.sw_overlap,
                                                    sw_batch_size=cfg.sw_batch_size, device=self.device,
                                                    amp_dtype=self.amp_dtype,
                                                    return_predictions=cfg.overlays if self.is_main else 0)
            score = metrics["dice_mean"]
            if previews and self.is_main:
                self._write_overlays(previews, epoch, writer)
        else:
            metrics, _ = classification_scores(model, val_ds, device=self.device, amp_dtype=self.amp_dtype)
            score = metrics["accuracy"] - 1e-6 * metrics["loss"]  # accuracy first, lower loss breaks ties
        if writer is not None:
            for k, v in metrics.items():
                if k != "n":
                    writer.add_scalar(f"val/{k}", v, epoch)
        if self.is_main:
            logger.info("epoch %d validation: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics, score

    def _write_overlays(self, previews: list[dict[str, Any]], epoch: int, writer: Any) -> None:
        from .previews import overlay

        folder = self.out / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        mods = self.config.modalities
        channel = next((mods.index(m) for m in ("flair", "t1c", "t2", "t1") if m in mods), 0)
        for p in previews:
            img = overlay(p["image"][channel], p["ref"], p["pred"], p["names"],
                          title=f"epoch {epoch}: {p['study_id']} ({mods[channel]})")
            img.save(folder / f"epoch-{epoch:04d}-{p['study_id']}.png")
            if writer is not None:
                writer.add_image(f"val/overlay/{p['study_id']}", np.asarray(img), epoch, dataformats="HWC")

    def _checkpoint(self, model: AdapterModel, optimizer: Any, scheduler: Any, scaler: Any, step: int, epoch: int,
                    micro_done: int, best_score: float, best_epoch: int, best_metrics: dict[str, float],
                    history: list[dict[str, Any]], ckpt_dir: Path) -> None:
        from ..pretrain.checkpoint import save_checkpoint

        if self.is_main:
            save_checkpoint(ckpt_dir, f"step-{step:08d}", model_state=model.state_dict(), optimizer=optimizer,
                            scheduler=scheduler, scaler=scaler,
                            counters={"step": step, "epoch": epoch, "micro_in_epoch": micro_done,
                                      "best_score": best_score, "best_epoch": best_epoch,
                                      "best_metrics": best_metrics, "history": history},
                            config=self.config.to_dict(), keep=self.config.keep_checkpoints)
        if self.world_size > 1:
            dist.barrier()

    def _export(self, model: AdapterModel, folder: Path, data: dict[str, Any], metrics: dict[str, float], epoch: int,
                step: int) -> None:
        if not self.is_main:
            return
        cfg = self.config
        task = "segmentation" if cfg.task == "segmentation" else "classification"
        what = (f"labels {model.label_scheme.name} ({', '.join(model.label_scheme.names)})" if task == "segmentation"
                else f"classes {', '.join(model.class_names)}")
        located = cfg.encoder.startswith(("local-dir:", "hf-hub:"))
        init = "pre-trained weights" if cfg.pretrained or located else "random initialisation"
        model.pretrained_cfg = model.pretrained_cfg.replace(
            tag="", hf_hub_id=None, status="local", input_size=tuple(cfg.crop_size),
            metrics={k: round(v, 4) for k, v in metrics.items() if k not in ("epoch", "step")},
            description=f"{task.capitalize()} model fine-tuned by brainmm from `{cfg.encoder}` ({init}); {what}; "
                        f"inputs {', '.join(model.modalities)}.",
            data=f"{data['train']} training studies ({cfg.label_fraction:g} of {data['train_available']}), "
                 f"{data['val']} validation studies, from {data['source']}.")
        recipe = _recipe_text(cfg, epoch, step)
        model.save_pretrained(folder, card={"recipe": recipe},
                              provenance={"finetune_config": cfg.to_dict(), "config_hash": cfg.digest(),
                                          "epoch": epoch, "optimizer_steps": step})

    def _writer(self) -> Any:
        return tensorboard_writer(self.out / "tensorboard")

    def _progress(self, total: int, initial: int) -> Any:
        return progress_bar(total, initial, f"finetune {self.config.task}", self.is_main and self.show_progress)


def _recipe_text(cfg: FinetuneConfig, epoch: int, step: int) -> str:
    if cfg.task == "segmentation":
        loss = (f"{cfg.dice_weight:g} x soft Dice + {cfg.ce_weight:g} x "
                f"{'BCE per region (sigmoid)' if cfg.labels.startswith('brats') else 'CE (softmax)'}"
                f"{', deep supervision at 1/2 and 1/4 (weight 1 each)' if cfg.deep_supervision else ''}; "
                f"{'x'.join(map(str, cfg.crop_size))} crops, sliding-window validation (overlap {cfg.sw_overlap:g})")
    else:
        loss = (f"cross-entropy, {cfg.pool} pooling + {cfg.head} head, mode {cfg.mode}; input: foreground box "
                f"resized to {'x'.join(map(str, cfg.crop_size))}")
    return (f"Fine-tuned with `brainmm finetune --task {cfg.task[:3]}` for {step} optimizer steps (epoch {epoch} of "
            f"{cfg.epochs}): {cfg.optimizer} lr {cfg.lr:g}, cosine per epoch, batch {cfg.batch_size}, layer decay "
            f"{cfg.layer_decay:g}; {loss}; modality dropout {cfg.modality_dropout:g} (template fill); label fraction "
            f"{cfg.label_fraction:g}, seed {cfg.seed}. Config hash `{cfg.digest()}`.")


def finetune(config: FinetuneConfig, *, resume: bool = False, show_progress: bool = True,
             model: AdapterModel | None = None) -> FinetuneResult:
    """Run (or resume) a fine-tuning; see :class:`Finetuner`."""
    return Finetuner(config, resume=resume, show_progress=show_progress, model=model).fit()
