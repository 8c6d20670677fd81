"""The BrainMVP pre-training loop: one process or many through torchrun (NCCL on GPU, gloo on CPU).

What it guarantees:
- the same data order on every rank and disjoint shards (a seeded ``DistributedSampler``; crops depend only on
  (seed, epoch, index), never on worker count or rank);
- gradient accumulation that steps once per ``accumulation`` micro-batches (DDP ``no_sync`` in between);
- AdamW (templates included, as the official code) with a cosine schedule over optimizer steps and optional warm-up;
- gradient clipping of the network only: the zero-initialised templates' first gradients are ~1e9 (min-max
  normalisation of a constant volume), and clipping them together would silence the network for the first steps;
- checkpoints (safetensors + JSON, atomic) with model, templates, optimizer, scheduler, scaler, RNG states and the
  data position, so a resumed run ends with the same weights as an uninterrupted one;
- progress bar (loss, volumes/s, ETA), TensorBoard scalars, PNG previews, and a Hub-ready export at the end.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .. import hub
from .._runtime import (
    ResumableSampler,
    dist_info,
    init_distributed,
    pick_device,
    progress_bar,
    step_seed,
    tensorboard_writer,
)
from ..data.modalities import MODALITIES
from ..models import create_model
from ..ops import depthwise_backend
from .checkpoint import latest_checkpoint, resume_from, save_checkpoint
from .config import PretrainConfig
from .objectives import BrainMVPObjective
from .templates import ModalityTemplates

logger = logging.getLogger(__name__)


def cosine_lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warm-up then cosine from 1 to ``min_ratio`` over ``total_steps`` optimizer steps."""

    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


class Trainer:
    """Pre-train ``config.arch`` on ``config.data`` with the three proxy tasks. ``Trainer(cfg).fit()``."""

    def __init__(self, config: PretrainConfig, *, resume: bool = False, show_progress: bool = True) -> None:
        self.config = config
        self.resume = resume
        self.show_progress = show_progress
        self.rank, self.world_size, self.local_rank = dist_info()
        self.out = Path(config.out)
        self.device = pick_device(config.device, self.local_rank)
        init_distributed(self.device, self.world_size)
        self.is_main = self.rank == 0
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        np.random.seed(config.seed)

    # ------------------------------------------------------------------------------------------------ set-up
    @property
    def amp_dtype(self) -> torch.dtype | None:
        p = self.config.precision
        if p == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]

    def build_data(self) -> tuple[Any, Any, dict[str, Any]]:
        """Studies -> preprocessed cache (built once, rank-sharded) -> crop dataset.

        Returns (dataset, cache, data summary)."""
        from ..data.cache import MultiModalCropDataset, PreprocessedCache
        from ..data.datasets import discover_studies

        cfg = self.config
        data_path = cfg.data
        if data_path == "demo":
            from ..data.synthetic import write_synthetic_dataset

            data_path = str(self.out / "demo-data")
            if self.is_main:
                write_synthetic_dataset(data_path, n_studies=24, shape=tuple(cfg.atlas_size), seed=cfg.seed)
            self._barrier()
        studies = discover_studies(data_path)
        self._check_studies(studies)
        probe = create_model(cfg.arch)
        params = probe.pretrained_cfg.replace(atlas_size=tuple(cfg.atlas_size))
        cache = PreprocessedCache(cfg.cache_dir or self.out / "cache", params)
        stats = cache.build(studies, num_workers=min(cfg.num_workers, 4), rank=self.rank, world_size=self.world_size,
                            on_error="skip")
        # Every rank must train on the same list: rank 0's view of the cache (all entries resolved) decides.
        usable = [s.study_id for s in studies if cache.failure(s) is None]
        if self.world_size > 1:
            box = [usable]
            dist.broadcast_object_list(box, src=0)
            usable = box[0]
        skipped = len(studies) - len(usable)
        if skipped and self.is_main:
            logger.warning("%d of %d studies could not be preprocessed and are skipped (see the warnings above; "
                           "`brainmm check-data %s` lists the problems).", skipped, len(studies), cfg.data)
        if not usable:
            raise ValueError(f"No study of {cfg.data!r} could be preprocessed ({stats.failed[:3]}).")
        keep = set(usable)
        studies = [s for s in studies if s.study_id in keep]
        dataset = MultiModalCropDataset(cache, studies, cfg.crop_size, seed=cfg.seed,
                                        samples_per_study=cfg.samples_per_study)
        counts = {m: sum(1 for s in studies if m in s.images) for m in MODALITIES}
        summary = {"source": str(cfg.data), "studies": len(studies), "skipped_studies": skipped,
                   "modalities": {m: n for m, n in counts.items() if n}, "samples_per_epoch": len(dataset)}
        return dataset, cache, summary

    def _check_studies(self, studies: list[Any]) -> None:
        """Headers-only check of every study before anything long starts (``brainmm check-data`` reads values too)."""
        from ..data.check import check_studies

        report = check_studies(studies, crop_size=self.config.crop_size, atlas_size=self.config.atlas_size,
                               read_values=False)
        if not report.ok:
            shown = "; ".join(report.problems[:3])
            more = f" (+{len(report.problems) - 3} more)" if len(report.problems) > 3 else ""
            raise ValueError(f"{len(report.problems)} problem(s) in {self.config.data!r}: {shown}{more}. Run "
                             f"`brainmm check-data {self.config.data}` for the full report.")

    def _barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def build_objective(self) -> BrainMVPObjective:
        cfg = self.config
        encoder = create_model(cfg.arch, in_chans=1)
        if cfg.grad_checkpointing:
            encoder.set_grad_checkpointing(True)
        decoder = encoder.build_reconstruction_decoder()
        templates = ModalityTemplates(cfg.atlas_size)
        return BrainMVPObjective(encoder, decoder, templates, cfg.objective).to(self.device)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> Path:
        """Run (or resume) the pre-training; returns the export folder."""
        with depthwise_backend(self.config.depthwise):
            return self._fit()

    def _fit(self) -> Path:
        cfg = self.config
        dataset, _cache, data_summary = self.build_data()
        objective = self.build_objective()
        model: torch.nn.Module = objective
        if self.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                objective, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        forward = torch.compile(model) if cfg.compile else model

        sampler = ResumableSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=cfg.seed,
                                   drop_last=True)
        micro_per_epoch = sampler.num_samples // cfg.batch_size
        steps_per_epoch = micro_per_epoch // cfg.accumulation
        if steps_per_epoch < 1:
            raise ValueError(f"An epoch has {sampler.num_samples} samples per process: fewer than batch_size x "
                             f"accumulation = {cfg.batch_size * cfg.accumulation}. Use more data, samples_per_study or "
                             "a smaller batch.")
        total_steps = cfg.epochs * steps_per_epoch
        template_params = [objective.templates.weight]
        network_params = [p for n, p in objective.named_parameters() if not n.endswith("templates.weight")]
        optimizer = torch.optim.AdamW([{"params": network_params}, {"params": template_params}], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay, fused=self.device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_lr_lambda(total_steps, cfg.warmup_steps, cfg.min_lr / cfg.lr))
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        step, epoch, micro_done = 0, 1, 0
        ckpt_dir = self.out / "checkpoints"
        if self.resume:
            path = latest_checkpoint(ckpt_dir)
            if path is None:
                logger.warning("--resume: no checkpoint in %s, starting from scratch.", ckpt_dir)
            else:
                c = resume_from(path, objective, optimizer, scheduler, scaler)
                step, epoch, micro_done = c["step"], c["epoch"], c["micro_in_epoch"]
                if self.is_main:
                    logger.info("Resumed from %s at step %d (epoch %d, batch %d).", path, step, epoch, micro_done)

        writer = self._writer() if self.is_main else None
        if writer is not None and step == 0:
            writer.add_text("config", f"```\n{cfg.to_dict()}\n```")
        last_step = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
        bar = self._progress(last_step, step)
        t_last, crops_since, steps_since, skipped_samples = time.perf_counter(), 0, 0, 0
        running: dict[str, Any] = {}
        objective.train()
        while step < last_step and epoch <= cfg.epochs:
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            sampler.start = micro_done * cfg.batch_size
            loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                                drop_last=True, pin_memory=self.device.type == "cuda", collate_fn=_collate,
                                generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for batch in loader:
                # Randomness of a step (masks, modality choices, drop-path) is a function of (seed, rank, position):
                # ranks differ, and a resumed run replays exactly what the uninterrupted run would have drawn.
                torch.manual_seed(step_seed(cfg.seed, self.rank, epoch, micro_done))
                micro_done += 1
                batch = {k: (v.to(self.device, non_blocking=True) if k == "image" else v) for k, v in batch.items()}
                boundary = micro_done % cfg.accumulation == 0
                sync_ctx = model.no_sync() if (self.world_size > 1 and not boundary) else _nullcontext()
                preview = writer is not None and boundary and ((step + 1) % cfg.preview_every == 0
                                                               or step + 1 == last_step)
                with sync_ctx:
                    with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                        enabled=self.amp_dtype is not None):
                        out = forward(batch, epoch, with_preview=preview)
                        loss = out.loss + objective.unused_parameter_guard()
                    scaler.scale(loss / cfg.accumulation).backward()
                # Sums stay on the device: one host sync per log line, not four per micro-batch.
                for k in ("loss", "loss_template", "loss_cross_modal", "loss_contrastive"):
                    running[k] = running.get(k, 0.0) + out.logs[k].detach() / cfg.accumulation
                crops_since += int(out.logs["crops"])
                if batch["skipped"]:
                    skipped_samples += batch["skipped"]
                    logger.warning("%d unreadable cache entries skipped in this batch (%d so far).",
                                   batch["skipped"], skipped_samples)
                if not boundary:
                    continue
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(network_params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                steps_since += 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == last_step:
                    dt = time.perf_counter() - t_last
                    vps = crops_since * self.world_size / max(dt, 1e-9)
                    logs = {k: float(v) / steps_since for k, v in running.items()}
                    if bar is not None:
                        bar.set_postfix(loss=f"{logs['loss']:.4f}", vol_s=f"{vps:.1f}", epoch=epoch)
                    if writer is not None:
                        for k, v in logs.items():
                            writer.add_scalar(f"train/{k}", v, step)
                        writer.add_scalar("train/volumes_per_s", vps, step)
                        writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                        writer.add_scalar("train/epoch", epoch, step)
                        writer.add_scalar("train/skipped_samples", skipped_samples, step)
                    running, t_last, crops_since, steps_since = {}, time.perf_counter(), 0, 0
                if preview and out.preview:
                    self._write_preview(writer, out.preview, objective.templates, step)
                if step % cfg.checkpoint_every == 0 or step == last_step:
                    self._checkpoint(objective, optimizer, scheduler, scaler, step, epoch, micro_done, ckpt_dir)
                if step >= last_step:
                    break
            else:
                epoch += 1
                micro_done = 0
                continue
            break
        if bar is not None:
            bar.close()
        export = self._export(objective, data_summary, step)
        if writer is not None:
            writer.close()
        self._barrier()
        return export

    # ------------------------------------------------------------------------------------------------ outputs
    def _progress(self, total: int, initial: int) -> Any:
        return progress_bar(total, initial, f"pretrain {self.config.arch}", self.is_main and self.show_progress)

    def _writer(self) -> Any:
        return tensorboard_writer(self.out / "tensorboard")

    def _checkpoint(self, objective, optimizer, scheduler, scaler, step, epoch, micro_done, ckpt_dir) -> None:
        # The data position is saved as "epoch E, micro-batches done"; a finished epoch resumes at the next one.
        if self.is_main:
            save_checkpoint(ckpt_dir, f"step-{step:08d}", model_state=objective.state_dict(), optimizer=optimizer,
                            scheduler=scheduler, scaler=scaler,
                            counters={"step": step, "epoch": epoch, "micro_in_epoch": micro_done},
                            config=self.config.to_dict(), keep=self.config.keep_checkpoints)
        self._barrier()

    def _write_preview(self, writer, preview: dict[str, torch.Tensor], templates: ModalityTemplates, step: int) -> None:
        from .previews import preview_grid, templates_grid

        m, n = int(preview["modality"][0]), int(preview["source"][0])
        title = f"step {step}: target {MODALITIES[m]}, cross-modal fill from {MODALITIES[n] if n >= 0 else 'template'}"
        img = preview_grid(preview)
        tpl = templates_grid(templates.export())
        folder = self.out / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"step-{step:08d}-views.png")
        tpl.save(folder / f"step-{step:08d}-templates.png")
        writer.add_image("preview/views", np.asarray(img), step, dataformats="HWC")
        writer.add_image("preview/templates", np.asarray(tpl), step, dataformats="HWC")
        writer.add_text("preview/caption", title, step)

    def _export(self, objective: BrainMVPObjective, data_summary: dict[str, Any], step: int) -> Path:
        cfg = self.config
        folder = self.out / "export"
        if self.is_main:
            encoder = objective.encoder
            encoder.pretrained_cfg = encoder.pretrained_cfg.replace(
                modalities=(), template_modalities=MODALITIES, atlas_size=tuple(cfg.atlas_size),
                input_size=tuple(cfg.crop_size), tag="", hf_hub_id=None, status="local",
                description=f"{cfg.arch} pre-trained by brainmm with the three BrainMVP proxy tasks "
                            f"({step} optimizer steps).",
                data=(f"{data_summary['studies']} studies from {data_summary['source']}; modalities "
                      + ", ".join(f"{m} ({n})" for m, n in data_summary["modalities"].items())))
            if (folder / "README.md").exists():
                (folder / "README.md").unlink()  # the card of an earlier export of this run is regenerated
            recipe = _recipe_text(cfg, step)
            hub.save_pretrained(encoder, folder, templates=objective.templates.export(), decoder=objective.decoder,
                                provenance={"run_config": cfg.to_dict(), "config_hash": cfg.digest(),
                                            "optimizer_steps": step, "data": data_summary},
                                card={"recipe": recipe})
        return folder


def _recipe_text(cfg: PretrainConfig, step: int) -> str:
    o = cfg.objective
    return (f"Pre-trained with `brainmm pretrain` for {step} optimizer steps ({cfg.epochs} scheduled epochs): AdamW "
            f"lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, cosine over optimizer steps (warm-up "
            f"{cfg.warmup_steps}), batch {cfg.batch_size} x accumulation {cfg.accumulation} per process; crops "
            f"{'x'.join(map(str, cfg.crop_size))}, block masks {o.block_size}^3 at ratio {o.mask_ratio}; losses "
            f"{o.template_weight:g} x template distillation + {o.cross_modal_weight:g} x cross-modal reconstruction "
            f"(from epoch {o.template_only_epochs + 1}) + {o.contrastive_weight:g} x InfoNCE (temperature "
            f"{o.temperature:g}, from epoch {o.contrastive_start_epoch}); modality sampling {o.modality_sampling}. "
            f"Run config hash `{cfg.digest()}`.")


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    stack = lambda key: torch.stack([s[key] for s in samples])  # noqa: E731
    return {"image": stack("image"), "present": stack("present"), "origin": stack("origin"),
            "study_id": [s["study_id"] for s in samples], "skipped": sum(s.get("skipped", 0) for s in samples)}


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def pretrain(config: PretrainConfig, *, resume: bool = False, show_progress: bool = True) -> Path:
    """Run a pre-training; returns the exported folder (loadable with ``create_model('local-dir:...')``)."""
    return Trainer(config, resume=resume, show_progress=show_progress).fit()
