"""UniFormer 3D: the BrainMVP paper's recommended encoder (UniFormer-S, 22.0 M parameters).

Numerically the official network, with one deliberate difference: the official forward permutes its input
``(B, C, H, W, D) -> (B, C, D, H, W)`` before the first convolution. Here every kernel is stored already permuted to
(H, W, D) (``brainmm.convert`` does it for official checkpoints), so the network runs in the input's own axis order
and returns maps in that order without any transpose copies. Global attention over the flattened tokens does not
depend on the flattening order, so the two are the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ..ops import DepthwiseConv3d
from ._base import Encoder, LinearReconstructionDecoder
from ._pretrained import PretrainedCfg
from ._registry import register_model

__all__ = ["UniFormer3D"]


class PatchEmbed(nn.Module):
    """Conv3d(k=2, s=2) + LayerNorm over channels: ``(B, Ci, H, W, D) -> (B, Co, H/2, W/2, D/2)``."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        # The stage's layout decides which depthwise-convolution kernels run: on the CPU channels-last (oneDNN) is
        # twice as fast for the whole demo pre-training; on the GPU the official network runs contiguous tensors,
        # faster there than channels-last (brainmvp.md section 8), unless the model was made channels-last.
        channels_last = x.device.type == "cpu" or (x.is_contiguous(memory_format=torch.channels_last_3d)
                                                    and not x.is_contiguous())
        # LayerNorm over the channel axis without a flatten/transpose round trip
        x = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return x.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


class ConvMlp(nn.Module):
    """1x1x1-convolution MLP used by the convolution blocks."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ConvBlock(nn.Module):
    """Local relation aggregation (stages 1-2): depthwise 5^3 "attention" between 1x1 convs, BatchNorm pre-norms."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = DepthwiseConv3d(dim, 3)
        self.norm1 = nn.BatchNorm3d(dim)
        self.conv1 = nn.Conv3d(dim, dim, 1)
        self.conv2 = nn.Conv3d(dim, dim, 1)
        self.attn = DepthwiseConv3d(dim, 5)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm3d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Attention(nn.Module):
    """Global multi-head self-attention over all tokens, via fused scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class AttentionBlock(nn.Module):
    """Global relation aggregation (stages 3-4): pos-embed conv, then a pre-norm transformer block on tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = DepthwiseConv3d(dim, 3)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        b, c, h, w, d = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        t = t + self.drop_path(self.attn(self.norm1(t)))
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        return t.transpose(1, 2).reshape(b, c, h, w, d)


class UniFormer3D(Encoder):
    """UniFormer 3D encoder: four stages at strides 2, 4, 8, 16; conv blocks in stages 1-2, attention in 3-4.

    ``forward_intermediates(x)`` returns ``[x1, x2, x3, x4]`` with ``x4`` after the final BatchNorm3d, as the official
    encoder returns them.
    """

    stem_key = "patch_embed1.proj.weight"
    size_divisor = 16

    def __init__(self, in_chans: int = 1, depths: Sequence[int] = (3, 4, 8, 3),
                 dims: Sequence[int] = (64, 128, 320, 512), head_dim: int = 64, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"UniFormer3D needs 4 depths and 4 dims, got depths={depths}, dims={dims}.")
        bad = [d for d in dims[2:] if d % head_dim]
        if bad:
            raise ValueError(f"UniFormer3D attention dims {list(dims[2:])} must be multiples of head_dim={head_dim}.")
        self.in_chans = in_chans
        self.num_features = dims[-1]
        self.grad_checkpointing = grad_checkpointing
        self.model_args = dict(depths=list(depths), dims=list(dims), head_dim=head_dim, mlp_ratio=mlp_ratio,
                               qkv_bias=qkv_bias)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(4)]
        ins = [in_chans, *dims[:3]]
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(ins[i], dims[i]))
            if i < 2:
                blocks = [ConvBlock(dims[i], mlp_ratio, drop_rate, dpr[starts[i] + j]) for j in range(depths[i])]
            else:
                make = partial(AttentionBlock, dims[i], dims[i] // head_dim, mlp_ratio, qkv_bias, drop_rate,
                               attn_drop_rate)
                blocks = [make(dpr[starts[i] + j]) for j in range(depths[i])]
            setattr(self, f"blocks{i + 1}", nn.Sequential(*blocks))
        self.norm = nn.BatchNorm3d(dims[-1])
        self.feature_info = [dict(num_chs=dims[i], reduction=2 ** (i + 1), module=f"blocks{i + 1}") for i in range(4)]
        self.feature_info[-1]["module"] = "norm"
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _run_blocks(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for blk in blocks:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            return x
        return blocks(x)

    def _forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            x = self._run_blocks(getattr(self, f"blocks{i}"), x)
            if i == 4:
                x = self.norm(x)
            maps.append(x)
        return maps

    def build_reconstruction_decoder(self) -> LinearReconstructionDecoder:
        """The official pre-training decoder: ConvTranspose3d 512->320->128->64->64, then 1x1x1 conv to 1 channel."""
        dims = self.model_args["dims"]
        return LinearReconstructionDecoder([dims[3], dims[2], dims[1], dims[0], dims[0]])


def _cfg(**kwargs: Any) -> PretrainedCfg:
    return PretrainedCfg(stem=UniFormer3D.stem_key, **kwargs)


default_cfgs: dict[str, PretrainedCfg] = {
    "mmvp_uniformer.brainmvp": _cfg(
        hf_hub_id="brainmm/mmvp_uniformer.brainmvp",
        status="planned",
        description="UniFormer-S 3D pre-trained with BrainMVP (CMR + MD + MCL) on 16,022 multi-parametric brain MRI "
        "scans; converted from the official checkpoint with `brainmm convert-official`.",
        data="BraTS2021, BraTS2023-MEN, BraTS2023-SSA, IXI, UCSF-PDGM (SRI24 space, 1 mm)",
    ),
    "mmvp_uniformer_tiny": _cfg(description="Tiny UniFormer 3D for tests and CPU demos (random init)."),
}


@register_model
def mmvp_uniformer(**kwargs: Any) -> UniFormer3D:
    """UniFormer-S 3D, the BrainMVP encoder: depths 3-4-8-3, dims 64-128-320-512, head_dim 64."""
    return UniFormer3D(**{**dict(depths=(3, 4, 8, 3), dims=(64, 128, 320, 512), head_dim=64), **kwargs})


@register_model
def mmvp_uniformer_tiny(**kwargs: Any) -> UniFormer3D:
    """A 0.1 M-parameter UniFormer 3D (depths 1-1-1-1, dims 16-32-64-128) for tests and CPU demos."""
    return UniFormer3D(**{**dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), head_dim=32), **kwargs})
