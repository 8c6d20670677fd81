"""Learnable modality templates in atlas space (BrainMVP's modality template distillation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data.modalities import MODALITIES, canonical_modalities


class ModalityTemplates(nn.Module):
    """One learnable volume per modality, zero-initialised: parameter ``(M, *atlas_size)``.

    At each use the *whole* template of a modality is min-max normalised ``(T - min) / (max - min + 1e-9)`` and the
    crop-sized window at the crop's atlas position is taken; gradients reach the template through the filled voxels
    and through min/max, as in the official code.
    """

    def __init__(self, atlas_size: Sequence[int] = (240, 240, 155), modalities: Sequence[str] = MODALITIES) -> None:
        super().__init__()
        self.modalities = canonical_modalities(modalities)
        self.atlas_size = tuple(int(s) for s in atlas_size)
        self.weight = nn.Parameter(torch.zeros(len(self.modalities), *self.atlas_size))

    def normalised(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Min-max normalised templates ``(K, *atlas)`` for template rows ``indices`` (all when None).

        Computed once per step for the modalities the step uses, not once per sample.
        """
        t = self.weight if indices is None else self.weight.index_select(0, indices)
        flat = t.flatten(1)
        lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
        hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
        return (t - lo) / (hi - lo + 1e-9)

    # eager on purpose: the windows' positions are host data (a graph break anyway), and the in-place normalisation
    # below is only valid when the stacked buffer is not an output of a compiled graph that saved it for backward
    @torch.compiler.disable
    def windows(self, modality: torch.Tensor, origin: torch.Tensor, crop: Sequence[int]) -> torch.Tensor:
        """Template windows for a batch: ``modality (B,)`` template row per sample, ``origin (B, 3)`` crop start in
        atlas voxels (CPU tensors: no device sync) -> ``(B, 1, *crop)``, min-max normalised over the whole template."""
        if origin.device.type != "cpu":
            origin = origin.cpu()
        crop = tuple(int(c) for c in crop)
        for o in origin.tolist():
            if any(s < 0 or s + c > a for s, c, a in zip(o, crop, self.atlas_size)):
                raise ValueError(f"crop at atlas origin {o} of size {crop} leaves the atlas grid {self.atlas_size}.")
        modality = modality.cpu()
        # min/max of each *whole* template used in the step (one read-only pass each, once per step), then only the
        # crop windows are normalised: the same values and gradients as normalising the whole volume first, without
        # writing a normalised copy of a 240x240x155 volume per sample.
        stats = {m: torch.aminmax(self.weight[m]) for m in sorted(set(modality.tolist()))}
        windows = torch.stack([self.weight[m, s0:s0 + crop[0], s1:s1 + crop[1], s2:s2 + crop[2]]
                               for m, (s0, s1, s2) in zip(modality.tolist(), origin.tolist())])
        lo = torch.stack([stats[m][0] for m in modality.tolist()]).view(-1, 1, 1, 1)
        hi = torch.stack([stats[m][1] for m in modality.tolist()]).view(-1, 1, 1, 1)
        # normalised in place: one buffer for the batch's windows (a fresh 10 MB allocation is page faults on the
        # CPU); autograd keeps what the backward needs, so gradients equal the out-of-place form's
        return windows.sub_(lo).mul_(1.0 / (hi - lo + 1e-9)).unsqueeze(1)

    def export(self) -> dict[str, torch.Tensor]:
        """Normalised templates by modality name (what ``save_pretrained`` stores)."""
        with torch.no_grad():
            norm = self.normalised()
        return {m: norm[i].detach().cpu() for i, m in enumerate(self.modalities)}

    def index_of(self, modality: str) -> int:
        return self.modalities.index(modality)
