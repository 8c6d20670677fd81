"""The official BrainMVP UNet variant: pre-activation residual blocks (GroupNorm -> ReLU -> Conv3^3, twice).

Encoder maps: ``[c1d 64@/2, c2d 128@/4, c3d 256@/8, c4d 256@/8]`` (channels for ``init_channels=32``). The
pre-training decoder has no skip connections. Key names follow the official flat layout (``conv1a``, ``ds1`` ...),
so official weights load with only their prefix removed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Encoder
from ._pretrained import PretrainedCfg
from ._registry import register_model

__all__ = ["UNetEncoder", "UNetReconstructionDecoder"]


class PreActResBlock(nn.Module):
    """``x + conv2(relu(gn2(conv1(relu(gn1(x))))))`` with 3^3 convolutions, channel count unchanged."""

    def __init__(self, channels: int, groups: int = 8) -> None:
        super().__init__()
        self.gn1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.gn1(x)))
        y = self.conv2(F.relu(self.gn2(y)))
        return x + y


class UNetEncoder(Encoder):
    """Residual 3D UNet encoder: stem conv + block at full resolution, then three stride-2 stages.

    ``(B, C, H, W, D) -> [(B, 2c, H/2, ...), (B, 4c, H/4, ...), (B, 8c, H/8, ...), (B, 8c, H/8, ...)]`` with
    ``c = init_channels``; the first full-resolution map is computed but, as in the official code, not returned.
    """

    stem_key = "conv1a.weight"
    size_divisor = 8

    def __init__(self, in_chans: int = 1, init_channels: int = 32, groups: int = 8,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        c = init_channels
        if c % groups:
            raise ValueError(f"UNetEncoder init_channels={c} must be a multiple of groups={groups}.")
        self.in_chans = in_chans
        self.num_features = 8 * c
        self.grad_checkpointing = grad_checkpointing
        self.model_args = dict(init_channels=c, groups=groups)
        self.conv1a = nn.Conv3d(in_chans, c, 3, padding=1)
        self.conv1b = PreActResBlock(c, groups)
        self.ds1 = nn.Conv3d(c, 2 * c, 3, stride=2, padding=1)
        self.conv2a = PreActResBlock(2 * c, groups)
        self.conv2b = PreActResBlock(2 * c, groups)
        self.ds2 = nn.Conv3d(2 * c, 4 * c, 3, stride=2, padding=1)
        self.conv3a = PreActResBlock(4 * c, groups)
        self.conv3b = PreActResBlock(4 * c, groups)
        self.ds3 = nn.Conv3d(4 * c, 8 * c, 3, stride=2, padding=1)
        self.conv4a = PreActResBlock(8 * c, groups)
        self.conv4b = PreActResBlock(8 * c, groups)
        self.conv4c = PreActResBlock(8 * c, groups)
        self.conv4d = PreActResBlock(8 * c, groups)
        self.feature_info = [
            dict(num_chs=2 * c, reduction=2, module="ds1"),
            dict(num_chs=4 * c, reduction=4, module="ds2"),
            dict(num_chs=8 * c, reduction=8, module="ds3"),
            dict(num_chs=8 * c, reduction=8, module="conv4d"),
        ]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _seq(self, x: torch.Tensor, *mods: nn.Module) -> torch.Tensor:
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for m in mods:
            x = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False) if ckpt else m(x)
        return x

    def _forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self._seq(x, self.conv1a, self.conv1b)
        c1d = self.ds1(c1)
        c2d = self.ds2(self._seq(c1d, self.conv2a, self.conv2b))
        c3d = self.ds3(self._seq(c2d, self.conv3a, self.conv3b))
        c4d = self._seq(c3d, self.conv4a, self.conv4b, self.conv4c, self.conv4d)
        return [c1d, c2d, c3d, c4d]

    def build_reconstruction_decoder(self) -> UNetReconstructionDecoder:
        return UNetReconstructionDecoder(self.model_args["init_channels"], self.model_args["groups"])


class UNetReconstructionDecoder(nn.Module):
    """The official pre-training decoder without skips: 1x1 conv halves channels, nearest x2, residual block.

    ``(B, 8c, H/8, W/8, D/8) -> (B, 1, H, W, D)``.
    """

    def __init__(self, init_channels: int = 32, groups: int = 8, out_chans: int = 1) -> None:
        super().__init__()
        c = init_channels
        self.up4conva = nn.Conv3d(8 * c, 4 * c, 1)
        self.up4convb = PreActResBlock(4 * c, groups)
        self.up3conva = nn.Conv3d(4 * c, 2 * c, 1)
        self.up3convb = PreActResBlock(2 * c, groups)
        self.up2conva = nn.Conv3d(2 * c, c, 1)
        self.up2convb = PreActResBlock(c, groups)
        self.up1conv = nn.Conv3d(c, out_chans, 1)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        # Nearest-neighbour, as the official decoder (checked against the reference reconstruction).
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up4convb(self._up(self.up4conva(x)))
        x = self.up3convb(self._up(self.up3conva(x)))
        x = self.up2convb(self._up(self.up2conva(x)))
        return self.up1conv(x)


def _cfg(**kwargs: Any) -> PretrainedCfg:
    return PretrainedCfg(stem=UNetEncoder.stem_key, **kwargs)


default_cfgs: dict[str, PretrainedCfg] = {
    "mmvp_unet.brainmvp": _cfg(
        hf_hub_id="brainmm/mmvp_unet.brainmvp",
        status="planned",
        description="Residual 3D UNet pre-trained with BrainMVP; converted from the official checkpoint.",
        data="BraTS2021, BraTS2023-MEN, BraTS2023-SSA, IXI, UCSF-PDGM (SRI24 space, 1 mm)",
    ),
    "mmvp_unet_tiny": _cfg(description="Tiny residual 3D UNet for tests and CPU demos (random init)."),
}


@register_model
def mmvp_unet(**kwargs: Any) -> UNetEncoder:
    """The official BrainMVP UNet encoder (init channels 32; maps 64/128/256/256 at strides 2/4/8/8)."""
    return UNetEncoder(**{**dict(init_channels=32, groups=8), **kwargs})


@register_model
def mmvp_unet_tiny(**kwargs: Any) -> UNetEncoder:
    """A tiny residual UNet (init channels 8) for tests and CPU demos."""
    return UNetEncoder(**{**dict(init_channels=8, groups=4), **kwargs})
