"""``mmvp_swin``: MONAI's 3D Swin transformer (the ``swinViT`` of SwinUNETR) as a brainmm encoder.

The state dict is exactly that of ``monai.networks.nets.SwinUNETR(..., feature_size=48).swinViT``, so weights move
between the two unchanged, and brainmm's Swin segmentation adapter can stay weight-compatible with SwinUNETR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets.swin_unetr import SwinTransformer

from ._base import Encoder, LinearReconstructionDecoder
from ._pretrained import PretrainedCfg
from ._registry import register_model

__all__ = ["SwinEncoder"]


class SwinEncoder(Encoder, SwinTransformer):
    """Swin 3D encoder: patch 2, window 7, merging between stages.

    ``forward_intermediates(x)`` returns the five maps SwinUNETR consumes, each layer-normalised over channels
    (``normalize=True``, as SwinUNETR does): strides 2, 4, 8, 16, 32 with ``f, 2f, 4f, 8f, 16f`` channels.
    """

    stem_key = "patch_embed.proj.weight"
    size_divisor = 32

    def __init__(self, in_chans: int = 1, feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, patch_size: int = 2,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, normalize: bool = True, use_v2: bool = False,
                 grad_checkpointing: bool = False) -> None:
        SwinTransformer.__init__(
            self, in_chans=in_chans, embed_dim=feature_size, window_size=(window_size,) * 3,
            patch_size=(patch_size,) * 3, depths=depths, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            use_checkpoint=grad_checkpointing, spatial_dims=3, use_v2=use_v2,
        )
        self.in_chans = in_chans
        self.normalize = normalize
        self.num_features = feature_size * 2 ** len(depths)
        self.model_args = dict(feature_size=feature_size, depths=list(depths), num_heads=list(num_heads),
                               window_size=window_size, patch_size=patch_size, mlp_ratio=mlp_ratio,
                               qkv_bias=qkv_bias, normalize=normalize, use_v2=use_v2)
        self.size_divisor = patch_size * 2 ** len(depths)
        self.feature_info = [dict(num_chs=feature_size, reduction=patch_size, module="patch_embed")] + [
            dict(num_chs=feature_size * 2 ** (i + 1), reduction=patch_size * 2 ** (i + 1), module=f"layers{i + 1}")
            for i in range(len(depths))
        ]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layers in (self.layers1, self.layers2, self.layers3, self.layers4):
            for layer in layers:
                layer.use_checkpoint = enable

    def _forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        return SwinTransformer.forward(self, x, self.normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Encoder.forward(self, x)

    def build_reconstruction_decoder(self) -> LinearReconstructionDecoder:
        """Linear decoder (this project's, in the spirit of the official UniFormer one): 16f -> 8f -> ... -> f -> 1."""
        f = self.model_args["feature_size"]
        n = len(self.model_args["depths"])
        chans = [f * 2**i for i in range(n, -1, -1)] + [f]
        return LinearReconstructionDecoder(chans)


def _cfg(**kwargs: Any) -> PretrainedCfg:
    return PretrainedCfg(stem=SwinEncoder.stem_key, **kwargs)


default_cfgs: dict[str, PretrainedCfg] = {
    "mmvp_swin.brainmvp": _cfg(
        hf_hub_id="brainmm/mmvp_swin.brainmvp",
        status="planned",
        description="MONAI Swin 3D (feature 48) pre-trained with the three BrainMVP tasks by brainmm.",
        data="BraTS2021, BraTS2023-MEN, BraTS2023-SSA, IXI, UCSF-PDGM (SRI24 space, 1 mm)",
    ),
    "mmvp_swin_tiny": _cfg(description="Tiny Swin 3D (feature 12) for tests and CPU demos (random init)."),
}


@register_model
def mmvp_swin(**kwargs: Any) -> SwinEncoder:
    """SwinUNETR's Swin 3D encoder: feature 48, depths 2-2-2-2, heads 3-6-12-24, window 7, patch 2."""
    return SwinEncoder(**{**dict(feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)), **kwargs})


@register_model
def mmvp_swin_tiny(**kwargs: Any) -> SwinEncoder:
    """A tiny Swin 3D (feature 12, depths 1-1-1-1, heads 1-2-4-8) for tests and CPU demos."""
    return SwinEncoder(**{**dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)), **kwargs})
