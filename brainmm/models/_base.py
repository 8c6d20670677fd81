"""The encoder contract shared by every registered architecture."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._pretrained import PretrainedCfg


class Encoder(nn.Module):
    """Base class of brainmm encoders.

    Input is ``(B, C, H, W, D)`` in the MONAI axis convention. Subclasses implement ``_forward_intermediates`` and
    set ``in_chans``, ``feature_info`` (one dict per stage map: ``num_chs``, ``reduction``, ``module``),
    ``num_features``, ``stem_key`` (state-dict key of the input convolution, adapted when ``in_chans`` changes) and
    ``size_divisor`` (every spatial size must be a multiple of it).
    """

    in_chans: int
    num_features: int
    feature_info: list[dict[str, Any]]
    stem_key: str
    size_divisor: int
    model_args: dict[str, Any]
    pretrained_cfg: PretrainedCfg

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` for a wrong rank, channel count or a spatial size the network cannot take."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}.")
        if x.ndim != 5:
            raise ValueError(
                f"{type(self).__name__} expects a 5-D input (B, C, H, W, D), got shape {tuple(x.shape)} ({x.ndim}-D)."
            )
        if x.shape[1] != self.in_chans:
            mods = getattr(self.pretrained_cfg, "modalities", ())
            named = f" ({', '.join(mods)})" if len(mods) == self.in_chans else ""
            raise ValueError(
                f"{type(self).__name__} expects {self.in_chans} input channel(s){named}, got {x.shape[1]} in "
                f"shape {tuple(x.shape)}. Create the model with modalities=[...] (or in_chans=) matching your data."
            )
        bad = [s for s in x.shape[2:] if s % self.size_divisor]
        if bad:
            raise ValueError(
                f"{type(self).__name__} needs every spatial size to be a multiple of {self.size_divisor}, got "
                f"{tuple(x.shape[2:])}. Pad or crop the input (e.g. monai.transforms.DivisiblePad(k="
                f"{self.size_divisor}))."
            )

    def _forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All stage maps, finest first: ``[(B, feature_info[i]['num_chs'], H/r_i, W/r_i, D/r_i), ...]``."""
        self.check_input(x)
        return self._forward_intermediates(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage map ``(B, num_features, H/r, W/r, D/r)``."""
        return self.forward_intermediates(x)[-1]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pooling of the last map: ``(B, num_features, h, w, d) -> (B, num_features)``."""
        return features.mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, num_features)``."""
        return self.forward_head(self.forward_features(x))

    def build_reconstruction_decoder(self) -> nn.Module:
        """A fresh pre-training decoder for this encoder: last map -> ``(B, 1, H, W, D)`` (no skip connections)."""
        raise NotImplementedError(f"{type(self).__name__} has no reconstruction decoder.")


class FeatureListNet(nn.Module):
    """``features_only`` wrapper: ``forward(x)`` returns the selected stage maps as a list."""

    def __init__(self, encoder: Encoder, out_indices: tuple[int, ...] | None = None) -> None:
        super().__init__()
        n = len(encoder.feature_info)
        indices = tuple(range(n)) if out_indices is None else tuple(out_indices)
        norm = []
        for i in indices:
            if not -n <= i < n:
                raise ValueError(f"out_indices {indices} out of range for {n} feature maps (valid: 0..{n - 1}).")
            norm.append(i % n)
        self.encoder = encoder
        self.out_indices = tuple(norm)
        self.feature_info = [encoder.feature_info[i] for i in self.out_indices]
        self.pretrained_cfg = encoder.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.encoder.forward_intermediates(x)
        return [maps[i] for i in self.out_indices]


class LinearReconstructionDecoder(nn.Module):
    """Pre-training decoder without skips: ConvTranspose3d(k=2, s=2, no bias) per x2, then a 1x1x1 conv.

    Linear, no norm (the official UniFormer decoder): ``(B, channels[0], h, w, d) -> (B, 1, h*2^n, w*2^n, d*2^n)``
    with ``n = len(channels) - 1``.
    """

    def __init__(self, channels: Sequence[int], out_chans: int = 1) -> None:
        super().__init__()
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(channels[i], channels[i + 1], kernel_size=2, stride=2, bias=False)
            for i in range(len(channels) - 1)
        )
        self.head = nn.Conv3d(channels[-1], out_chans, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for up in self.ups:
            x = up(x)
        return self.head(x)
