"""The three BrainMVP proxy tasks and the objective that composes them.

Each task is a module that owns its loss. ``BrainMVPObjective`` builds the two masked views of a batch, runs the
encoder once on both (2B crops) and the no-skip decoder, and sums the weighted task losses. The trainer only sees
``objective(batch, epoch) -> StepOutput``.

Semantics follow the official code (``docs``: brainmvp.md section 2):
- view A (modality template distillation): modality m, masked blocks filled from m's learned template window at the
  crop's atlas position; loss ``MSE(recon_A, x_m)`` over all voxels, weight 10;
- view B (cross-modal reconstruction): masked blocks filled with the co-registered voxels of another *present*
  modality n != m of the same study; loss ``MSE(recon_B, x_m)``, weight 1. Up to ``template_only_epochs`` (300)
  view B is template-filled too (its own mask). A study with a single modality has no n: its view B is
  template-filled (counted in the logs as ``cmr_fallback``);
- modality-aware contrastive learning: symmetric InfoNCE between the two views' last stage maps (flattened,
  L2-normalised; temperature 1), weight 1, from ``contrastive_start_epoch`` (1000).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.modalities import MODALITIES
from .masking import fill_masked, random_block_mask
from .templates import ModalityTemplates

MODALITY_SAMPLING = ("per_sample", "shared", "all")


@dataclass
class ObjectiveConfig:
    """Schedule and weights of the proxy tasks (defaults: the official code; paper values in comments)."""

    mask_ratio: float = 0.8  # paper: 0.875
    block_size: int = 8
    template_weight: float = 10.0  # paper: 1
    cross_modal_weight: float = 1.0
    contrastive_weight: float = 1.0
    template_only_epochs: int = 300  # view B template-filled while epoch <= this
    contrastive_start_epoch: int = 1000  # contrastive loss is 0 before this epoch
    temperature: float = 1.0
    projector: str = "none"  # "none" (official: flattened last map) or "mlp" (pooled -> 2-layer MLP)
    projector_dim: int = 256
    gather_negatives: bool = False  # all-gather features across DDP ranks for more negatives
    modality_sampling: str = "per_sample"  # official code: "shared" (one m per batch); paper: "all"

    def __post_init__(self) -> None:
        if self.modality_sampling not in MODALITY_SAMPLING:
            raise ValueError(f"modality_sampling must be one of {MODALITY_SAMPLING}, got {self.modality_sampling!r}.")
        if self.projector not in ("none", "mlp"):
            raise ValueError(f"projector must be 'none' or 'mlp', got {self.projector!r}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")


class TemplateDistillation(nn.Module):
    """View A: masked blocks of modality m filled from m's normalised template window; loss MSE over all voxels."""

    def __init__(self, templates: ModalityTemplates, weight: float = 10.0) -> None:
        super().__init__()
        self.templates = templates
        self.weight = weight

    def fill(self, modality: torch.Tensor, origin: torch.Tensor, crop: tuple[int, ...]) -> torch.Tensor:
        """Normalised template windows ``(B, 1, *crop)`` for modalities ``(B,)`` at atlas origins ``(B, 3)``."""
        return self.templates.windows(modality, origin, crop)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(recon.float(), target.float())


class CrossModalReconstruction(nn.Module):
    """View B: masked blocks of m filled from another present modality n != m of the same study."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    @staticmethod
    def choose_source(present: torch.Tensor, modality: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """``present (B, M)`` bool, ``modality (B,)`` -> source index ``(B,)`` drawn uniformly among the other
        present modalities; -1 where the study has no other modality. CPU tensors."""
        weights = present.float().clone()
        weights[torch.arange(len(modality)), modality] = 0.0
        has_other = weights.sum(1) > 0
        weights[~has_other] = 1.0  # placeholder row for multinomial; replaced by -1 below
        source = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        return torch.where(has_other, source, torch.full_like(source, -1))

    def make_view(self, images: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, source: torch.Tensor,
                  template_fill: torch.Tensor) -> torch.Tensor:
        """``images (B, M, *crop)`` all modality slots; ``source (B,)`` (device) with -1 -> use ``template_fill``."""
        idx = source.clamp_min(0).view(-1, 1, 1, 1, 1).expand(-1, 1, *images.shape[2:])
        fill = images.gather(1, idx)
        fill = torch.where((source >= 0).view(-1, 1, 1, 1, 1), fill, template_fill)
        return fill_masked(target, fill, visible)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(recon.float(), target.float())


class ModalityContrastive(nn.Module):
    """Symmetric InfoNCE between the two views of each sample; the other samples (of all ranks, optionally) are
    the negatives."""

    def __init__(self, num_features: int, weight: float = 1.0, temperature: float = 1.0, projector: str = "none",
                 projector_dim: int = 256, gather_negatives: bool = False) -> None:
        super().__init__()
        self.weight = weight
        self.temperature = temperature
        self.gather_negatives = gather_negatives
        self.projector = (nn.Sequential(nn.Linear(num_features, num_features), nn.GELU(),
                                        nn.Linear(num_features, projector_dim)) if projector == "mlp" else None)

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        """Last stage map ``(B, C, h, w, d)`` -> L2-normalised embedding ``(B, K)``."""
        z = self.projector(fmap.mean(dim=(2, 3, 4))) if self.projector is not None else fmap.flatten(1)
        return F.normalize(z.float(), dim=1)

    def forward(self, fmap_a: torch.Tensor, fmap_b: torch.Tensor) -> torch.Tensor:
        za, zb = self.embed(fmap_a), self.embed(fmap_b)
        offset = 0
        if self.gather_negatives and torch.distributed.is_available() and torch.distributed.is_initialized():
            import torch.distributed.nn.functional as dist_fn

            offset = torch.distributed.get_rank() * za.shape[0]
            zb_all = torch.cat(dist_fn.all_gather(zb), 0)
            za_all = torch.cat(dist_fn.all_gather(za), 0)
        else:
            za_all, zb_all = za, zb
        labels = torch.arange(za.shape[0], device=za.device) + offset
        loss_ab = F.cross_entropy(za @ zb_all.t() / self.temperature, labels)
        loss_ba = F.cross_entropy(zb @ za_all.t() / self.temperature, labels)
        return 0.5 * (loss_ab + loss_ba)


def info_nce_reference(za: torch.Tensor, zb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Plain-loop InfoNCE (for tests and documentation): mean over both directions of -log softmax of positives."""
    za, zb = F.normalize(za.float(), dim=1), F.normalize(zb.float(), dim=1)
    total = 0.0
    n = za.shape[0]
    for i in range(n):
        sims_ab = torch.stack([za[i] @ zb[j] for j in range(n)]) / temperature
        sims_ba = torch.stack([zb[i] @ za[j] for j in range(n)]) / temperature
        total = total - torch.log_softmax(sims_ab, 0)[i] - torch.log_softmax(sims_ba, 0)[i]
    return total / (2 * n)


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)
    preview: dict[str, torch.Tensor] = field(default_factory=dict)


class BrainMVPObjective(nn.Module):
    """Encoder + no-skip decoder + templates + the three tasks. ``forward(batch, epoch)`` -> StepOutput.

    ``batch``: ``image (B, 8, *crop)`` (all canonical modality slots, absent ones zero), ``present (B, 8)`` bool,
    ``origin (B, 3)`` crop start in atlas voxels. The encoder sees one modality per crop (1 channel).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, templates: ModalityTemplates,
                 config: ObjectiveConfig | None = None) -> None:
        super().__init__()
        self.config = config or ObjectiveConfig()
        if tuple(templates.modalities) != MODALITIES:
            raise ValueError("BrainMVPObjective expects templates for all canonical modalities in canonical order.")
        if getattr(encoder, "in_chans", 1) != 1:
            raise ValueError(f"Pre-training encodes one modality per crop: the encoder must have 1 input channel, "
                             f"got {encoder.in_chans}.")
        c = self.config
        self.encoder = encoder
        self.decoder = decoder
        self.distill = TemplateDistillation(templates, c.template_weight)
        self.cross_modal = CrossModalReconstruction(c.cross_modal_weight)
        self.contrastive = ModalityContrastive(encoder.num_features, c.contrastive_weight, c.temperature, c.projector,
                                               c.projector_dim, c.gather_negatives)

    @property
    def templates(self) -> ModalityTemplates:
        return self.distill.templates

    def unused_parameter_guard(self) -> torch.Tensor:
        """``0 x sum(projector)`` while the contrastive task is off, so DDP never sees unused parameters (the
        official code needed find_unused_parameters). Exactly zero; costs one tiny reduction."""
        if self.contrastive.projector is None:
            return torch.zeros((), device=self.templates.weight.device)
        return 0.0 * sum(p.sum() for p in self.contrastive.projector.parameters())

    def choose_modalities(self, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows to train on: ``(sample_index (R,), modality (R,))`` on the CPU."""
        b = present.shape[0]
        mode = self.config.modality_sampling
        if mode == "all":
            rows = present.nonzero()
            return rows[:, 0], rows[:, 1]
        if mode == "shared":
            counts = present.sum(0).float()
            m = torch.multinomial(counts / counts.sum(), 1).item()
            own = torch.multinomial(present.float(), 1).squeeze(1)
            modality = torch.where(present[:, m], torch.full_like(own, m), own)
            return torch.arange(b), modality
        return torch.arange(b), torch.multinomial(present.float(), 1).squeeze(1)

    def forward(self, batch: dict[str, Any], epoch: int, *, with_preview: bool = False) -> StepOutput:
        c = self.config
        present = batch["present"].cpu().bool()
        if not present.any(1).all():
            raise ValueError("Every sample needs at least one present modality.")
        sample, modality = self.choose_modalities(present)
        origin = batch["origin"].cpu()[sample]
        images = batch["image"]
        device = images.device
        if c.modality_sampling == "all":  # one row per present modality of each sample
            images = images.index_select(0, sample.to(device))
        target = images.gather(1, modality.to(device).view(-1, 1, 1, 1, 1).expand(-1, 1, *images.shape[2:]))
        crop = target.shape[2:]
        r = target.shape[0]

        vis_a = random_block_mask(r, crop, c.block_size, c.mask_ratio, device=device)
        vis_b = random_block_mask(r, crop, c.block_size, c.mask_ratio, device=device)
        template_fill = self.distill.fill(modality, origin, tuple(crop)).to(target.dtype)
        view_a = fill_masked(target, template_fill, vis_a)
        cross_modal_on = epoch > c.template_only_epochs
        if cross_modal_on:
            source = self.cross_modal.choose_source(present[sample], modality)
            view_b = self.cross_modal.make_view(images, target, vis_b, source.to(device), template_fill)
            fallback = (source < 0).sum()  # a CPU tensor: no host sync, no graph break under torch.compile
        else:
            source = torch.full_like(modality, -1)
            view_b = fill_masked(target, template_fill, vis_b)
            fallback = torch.zeros((), dtype=torch.long)

        maps = self.encoder.forward_intermediates(torch.cat([view_a, view_b], 0))
        last = maps[-1]
        recon = self.decoder(last)
        recon_a, recon_b = recon[:r], recon[r:]
        loss_a = self.distill(recon_a, target)
        loss_b = self.cross_modal(recon_b, target)
        contrastive_on = epoch >= c.contrastive_start_epoch and c.contrastive_weight > 0
        loss_c = self.contrastive(last[:r], last[r:]) if contrastive_on else torch.zeros((), device=device)
        total = self.distill.weight * loss_a + self.cross_modal.weight * loss_b + self.contrastive.weight * loss_c
        logs = {"loss": total.detach(), "loss_template": loss_a.detach(), "loss_cross_modal": loss_b.detach(),
                "loss_contrastive": loss_c.detach(), "cross_modal_on": float(cross_modal_on),
                "contrastive_on": float(contrastive_on), "cmr_fallback": fallback, "crops": r}
        preview = {}
        if with_preview:
            preview = {"target": target[:1].detach(), "view_template": view_a[:1].detach(),
                       "view_cross_modal": view_b[:1].detach(), "recon_template": recon_a[:1].detach(),
                       "recon_cross_modal": recon_b[:1].detach(), "modality": modality[:1], "source": source[:1]}
        return StepOutput(loss=total, logs=logs, preview=preview)
