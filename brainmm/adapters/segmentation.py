"""Segmentation adapters: any brainmm encoder + a UNETR-style decoder with skips and deep-supervision heads.

Two decoder layouts, both built from MONAI blocks (``UnetrBasicBlock``, ``UnetrUpBlock``, ``UnetOutBlock``,
instance norm, residual blocks):

- ``"unetr"`` (every encoder; the BrainMVP paper's downstream decoder): the input is embedded by a full-resolution
  ``UnetrBasicBlock``; starting from the deepest map, each ``UnetrUpBlock`` upsamples by the ratio of the two
  reductions and fuses the next finer map (UniFormer: x4+x3 -> x2 -> x1 -> embedded input; the UNet's two 1/8 maps
  are fused with a stride-1 up block). Output channels of every up block = the channels of the map it fuses.
- ``"swinunetr"`` (``mmvp_swin*``): exactly MONAI's ``SwinUNETR`` (same module names, same blocks): the state dict
  minus the ``ds_heads.*`` keys loads into ``monai.networks.nets.SwinUNETR(in_channels=C, out_channels=K,
  feature_size=f)`` and gives identical outputs.

Deep supervision (paper: weight 1 each): 1x1x1 heads on the decoder outputs at 1/2 and 1/4 resolution;
``forward(x, return_aux=True)`` returns ``[full, 1/2, 1/4]`` logits (MONAI ``DeepSupervisionLoss`` order).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from ..models import Encoder, LoadReport
from .base import AdapterModel, load_adapter_folder, load_network_state, resolve_encoder
from .labels import LabelScheme, get_label_scheme
from .missing import TemplateBank

logger = logging.getLogger(__name__)

__all__ = ["DECODERS", "SegmentationModel", "SwinUNETRSegmentation", "UNETRSegmentation",
           "create_segmentation_model"]

DECODERS = ("auto", "unetr", "swinunetr")
DS_REDUCTIONS = (2, 4)


class SegmentationModel(AdapterModel):
    """Encoder + decoder + output head (+ deep-supervision heads). Input ``(B, C, H, W, D)`` with each spatial size
    a multiple of ``size_divisor``; output logits ``(B, K, H, W, D)``.

    ``label_scheme`` says how the K channels are read (sigmoid regions or softmax classes; see
    :mod:`brainmm.adapters.labels`).
    """

    model_type = "segmentation"
    decoder_name = ""

    def __init__(self, num_classes: int, label_scheme: LabelScheme, deep_supervision: bool) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.label_scheme = label_scheme
        self.deep_supervision = bool(deep_supervision)

    def _decode(self, x: torch.Tensor, maps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (full-resolution decoder features, [features at 1/2, 1/4] for the deep-supervision heads)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_aux: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)``; with ``return_aux`` a list ``[full, 1/2, 1/4]``."""
        maps = self.encoder.forward_intermediates(x)
        feats, aux = self._decode(x, maps)
        logits = self.out(feats)
        if not return_aux:
            return logits
        return [logits, *(head(f) for head, f in zip(self.ds_heads, aux))]

    def adapter_config(self) -> dict[str, Any]:
        return {"task": "segmentation", "num_classes": self.num_classes, "decoder": self.decoder_name,
                "deep_supervision": self.deep_supervision, "label_scheme": self.label_scheme.to_dict(),
                **self._layout_args()}

    def _layout_args(self) -> dict[str, Any]:
        return {}

    def card_fields(self) -> dict[str, Any]:
        s = self.label_scheme
        act = "sigmoid per region" if s.kind == "regions" else "softmax over classes"
        ds = ", deep-supervision heads at 1/2 and 1/4" if self.deep_supervision else ""
        layout = ("MONAI SwinUNETR decoder (weight-compatible with `monai.networks.nets.SwinUNETR`)"
                  if self.decoder_name == "swinunetr" else "UNETR-style decoder with skips (MONAI blocks)")
        return {"decoder_text": layout + ds, "outputs_text": f"{self.num_classes} channels ({', '.join(s.names)}), "
                f"{act}", "labels_text": f"`{s.name}`: {s.description}".replace("|", "\\|")}  # Markdown table cell


class UNETRSegmentation(SegmentationModel):
    """Generic UNETR-style decoder over ``encoder.feature_info`` (see the module docstring)."""

    decoder_name = "unetr"

    def __init__(self, encoder: Encoder, num_classes: int, *, label_scheme: LabelScheme, deep_supervision: bool = True,
                 feature_size: int | None = None, skip_blocks: bool = False, norm_name: str = "instance") -> None:
        super().__init__(num_classes, label_scheme, deep_supervision)
        info = encoder.feature_info
        chans = [int(f["num_chs"]) for f in info]
        reds = [int(f["reduction"]) for f in info]
        fs = int(feature_size or chans[0])
        self.feature_size = fs
        self.use_skip_blocks = bool(skip_blocks)
        self.norm_name = norm_name
        self.encoder = encoder
        # "conv-embedded input": the full-resolution skip of the last up block.
        self.embed = UnetrBasicBlock(3, encoder.in_chans, fs, kernel_size=3, stride=1, norm_name=norm_name,
                                     res_block=True)
        self.skip_blocks = nn.ModuleList(
            UnetrBasicBlock(3, c, c, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)
            for c in chans[:-1]) if skip_blocks else None
        ups, out_chans, out_reds = [], [], []
        cur_c, cur_r = chans[-1], reds[-1]
        for c, r in [*zip(chans[-2::-1], reds[-2::-1]), (fs, 1)]:
            if cur_r % r:
                raise ValueError(f"{type(encoder).__name__}: stage reductions {reds} are not integer multiples of "
                                 "each other; the UNETR decoder needs integer upsampling ratios.")
            ups.append(UnetrUpBlock(3, cur_c, c, kernel_size=3, upsample_kernel_size=cur_r // r, norm_name=norm_name,
                                    res_block=True))
            out_chans.append(c)
            out_reds.append(r)
            cur_c, cur_r = c, r
        self.decoders = nn.ModuleList(ups)
        self.out = UnetOutBlock(3, fs, num_classes)
        # Deep-supervision heads on the decoder outputs at 1/2 and 1/4 (the last up block of that resolution).
        self._ds_index = [max(i for i, r in enumerate(out_reds) if r == red) for red in DS_REDUCTIONS
                          if red in out_reds] if deep_supervision else []
        self.ds_heads = nn.ModuleList(UnetOutBlock(3, out_chans[i], num_classes) for i in self._ds_index)

    def _decode(self, x: torch.Tensor, maps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = list(maps[:-1])
        if self.skip_blocks is not None:
            skips = [blk(s) for blk, s in zip(self.skip_blocks, skips)]
        skips = [*skips[::-1], self.embed(x)]
        h = maps[-1]
        outs = []
        for up, skip in zip(self.decoders, skips):
            h = up(h, skip)
            outs.append(h)
        return h, [outs[i] for i in self._ds_index]

    def _layout_args(self) -> dict[str, Any]:
        return {"feature_size": self.feature_size, "skip_blocks": self.use_skip_blocks, "norm_name": self.norm_name}


class SwinUNETRSegmentation(SegmentationModel):
    """MONAI ``SwinUNETR`` with deep-supervision heads; module names identical to SwinUNETR's (``swinViT``,
    ``encoder1..4``, ``encoder10``, ``decoder1..5``, ``out``) so the weights move between the two unchanged."""

    decoder_name = "swinunetr"

    def __init__(self, encoder: Encoder, num_classes: int, *, label_scheme: LabelScheme, deep_supervision: bool = True,
                 norm_name: str = "instance") -> None:
        super().__init__(num_classes, label_scheme, deep_supervision)
        f = int(encoder.model_args.get("feature_size", 0))
        if len(encoder.feature_info) != 5 or not f:
            raise ValueError(f"decoder='swinunetr' needs a 4-stage Swin encoder (5 maps, feature_size set); "
                             f"{getattr(encoder, 'architecture', type(encoder).__name__)} has "
                             f"{len(encoder.feature_info)} maps. Use decoder='unetr'.")
        self.norm_name = norm_name
        c = encoder.in_chans
        self.swinViT = encoder
        block = dict(spatial_dims=3, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)
        up = dict(spatial_dims=3, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True)
        self.encoder1 = UnetrBasicBlock(in_channels=c, out_channels=f, **block)
        self.encoder2 = UnetrBasicBlock(in_channels=f, out_channels=f, **block)
        self.encoder3 = UnetrBasicBlock(in_channels=2 * f, out_channels=2 * f, **block)
        self.encoder4 = UnetrBasicBlock(in_channels=4 * f, out_channels=4 * f, **block)
        self.encoder10 = UnetrBasicBlock(in_channels=16 * f, out_channels=16 * f, **block)
        self.decoder5 = UnetrUpBlock(in_channels=16 * f, out_channels=8 * f, **up)
        self.decoder4 = UnetrUpBlock(in_channels=8 * f, out_channels=4 * f, **up)
        self.decoder3 = UnetrUpBlock(in_channels=4 * f, out_channels=2 * f, **up)
        self.decoder2 = UnetrUpBlock(in_channels=2 * f, out_channels=f, **up)
        self.decoder1 = UnetrUpBlock(in_channels=f, out_channels=f, **up)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=num_classes)
        # dec0 (f channels, 1/2) and dec1 (2f channels, 1/4).
        self.ds_heads = nn.ModuleList([UnetOutBlock(3, f, num_classes), UnetOutBlock(3, 2 * f, num_classes)]
                                      if deep_supervision else [])

    @property
    def encoder(self) -> Encoder:
        return self.swinViT

    def _decode(self, x: torch.Tensor, maps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # SwinUNETR.forward, line by line.
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(maps[0])
        enc2 = self.encoder3(maps[1])
        enc3 = self.encoder4(maps[2])
        dec4 = self.encoder10(maps[4])
        dec3 = self.decoder5(dec4, maps[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        out = self.decoder1(dec0, enc0)
        return out, [dec0, dec1]

    def _layout_args(self) -> dict[str, Any]:
        return {"norm_name": self.norm_name}

    def swinunetr_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the deep-supervision heads: loads into MONAI's ``SwinUNETR`` strictly."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("ds_heads.")}


def _build(encoder: Encoder, num_classes: int, *, label_scheme: LabelScheme, decoder: str, deep_supervision: bool,
           feature_size: int | None, skip_blocks: bool, norm_name: str) -> SegmentationModel:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}.")
    is_swin = "feature_size" in encoder.model_args and len(encoder.feature_info) == 5
    if decoder == "auto":
        decoder = "swinunetr" if is_swin else "unetr"
    if decoder == "swinunetr":
        if feature_size not in (None, encoder.model_args.get("feature_size")) or skip_blocks:
            raise ValueError("decoder='swinunetr' is MONAI's SwinUNETR layout: its width is the encoder's "
                             "feature_size and it always has skip blocks; do not pass feature_size/skip_blocks.")
        return SwinUNETRSegmentation(encoder, num_classes, label_scheme=label_scheme,
                                     deep_supervision=deep_supervision, norm_name=norm_name)
    return UNETRSegmentation(encoder, num_classes, label_scheme=label_scheme, deep_supervision=deep_supervision,
                             feature_size=feature_size, skip_blocks=skip_blocks, norm_name=norm_name)


def create_segmentation_model(encoder: str | Encoder, *, modalities: Sequence[str] | None = None,
                              num_classes: int | None = None, labels: str | LabelScheme | None = None,
                              pretrained: bool = False, decoder: str = "auto", deep_supervision: bool = True,
                              feature_size: int | None = None, skip_blocks: bool = False,
                              norm_name: str = "instance", revision: str | None = None,
                              cache_dir: str | Path | None = None, strict: bool = True) -> SegmentationModel:
    """A segmentation model on any brainmm encoder, or a saved one.

    ``encoder``: an encoder name (``mmvp_uniformer``, ``mmvp_swin.brainmvp``, ``hf-hub:...``, ``local-dir:...`` of
    an encoder export; ``pretrained`` loads registry weights, locations always load) or an ``Encoder``; or the
    ``local-dir:`` / ``hf-hub:`` location of a saved segmentation model (then the other arguments must be left out,
    except ``modalities``/``num_classes`` equal to the saved ones).
    ``modalities``: input channels by name (the stem is built from the pre-trained 1-channel stem; absent channels
    are filled with the encoder's learned templates). ``labels``: a label scheme (``brats2023``, ``brats2021``,
    ``classes:K``, ...); ``num_classes`` defaults to its channel count (and without ``labels`` means ``classes:K``).
    ``decoder``: ``auto`` (``swinunetr`` for Swin encoders, else ``unetr``), ``unetr`` or ``swinunetr``.
    ``feature_size`` (unetr): width of the full-resolution embedding (default: the first stage's channels).
    """
    from .. import hub

    loc = hub.parse_location(encoder) if isinstance(encoder, str) else None
    if loc is not None and hub.read_config(loc, cache_dir=cache_dir).get("model_type") == "segmentation":
        return _load_saved(encoder, modalities=modalities, num_classes=num_classes, labels=labels, revision=revision,
                           cache_dir=cache_dir)
    scheme = _scheme(labels, num_classes)
    enc, templates, source = resolve_encoder(encoder, modalities, pretrained=pretrained, revision=revision,
                                             cache_dir=cache_dir, strict=strict)
    model = _build(enc, scheme.num_channels, label_scheme=scheme, decoder=decoder, deep_supervision=deep_supervision,
                   feature_size=feature_size, skip_blocks=skip_blocks, norm_name=norm_name)
    model.templates = TemplateBank(model.modalities, templates, enc.pretrained_cfg.atlas_size, source=source)
    report = getattr(enc, "load_report", None) or LoadReport(source=source)
    prefix = "swinViT." if isinstance(model, SwinUNETRSegmentation) else "encoder."
    new = [k for k in model.state_dict() if not k.startswith(prefix)]
    model.load_report = LoadReport(source=report.source, copied=[prefix + k for k in report.copied],
                                   adapted={prefix + k: v for k, v in report.adapted.items()},
                                   initialised=[prefix + k for k in report.initialised] + new,
                                   ignored=list(report.ignored), extras=dict(report.extras))
    return model


def _scheme(labels: str | LabelScheme | None, num_classes: int | None) -> LabelScheme:
    if labels is None:
        if num_classes is None:
            raise ValueError("Pass num_classes=K or labels='brats2023' / 'brats2021' / 'classes:K' to "
                             "create_segmentation_model.")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} without labels=: softmax classes need K >= 2 (background "
                             "included); for one sigmoid region pass labels=... with a region scheme.")
        return get_label_scheme(f"classes:{num_classes}")
    scheme = get_label_scheme(labels)
    if num_classes is not None and num_classes != scheme.num_channels:
        raise ValueError(f"num_classes={num_classes} contradicts labels={scheme.name!r}, which has "
                         f"{scheme.num_channels} output channels ({', '.join(scheme.names)}).")
    return scheme


def _load_saved(name: str, *, modalities: Sequence[str] | None, num_classes: int | None,
                labels: str | LabelScheme | None, revision: str | None,
                cache_dir: str | Path | None) -> SegmentationModel:
    config, encoder, state, templates, source = load_adapter_folder(name, "segmentation", revision=revision,
                                                                    cache_dir=cache_dir)
    a = config["adapter"]
    scheme = LabelScheme.from_dict(a["label_scheme"])
    _check_same("num_classes", num_classes, a["num_classes"], name)
    _check_same("modalities", None if modalities is None else list(_canon(modalities)),
                list(encoder.pretrained_cfg.modalities), name)
    if labels is not None and get_label_scheme(labels).name != scheme.name:
        raise ValueError(f"{name!r} was trained with labels {scheme.name!r}, not {get_label_scheme(labels).name!r}.")
    model = _build(encoder, int(a["num_classes"]), label_scheme=scheme, decoder=a["decoder"],
                   deep_supervision=bool(a["deep_supervision"]), feature_size=a.get("feature_size"),
                   skip_blocks=bool(a.get("skip_blocks", False)), norm_name=a.get("norm_name", "instance"))
    model.load_report = load_network_state(model, state, source=source)
    model.templates = TemplateBank(model.modalities, templates, encoder.pretrained_cfg.atlas_size, source=source)
    model.eval()
    return model


def _canon(modalities: Sequence[str]) -> tuple[str, ...]:
    from ..data.modalities import canonical_modalities

    return canonical_modalities(modalities, argument="modalities")


def _check_same(arg: str, given: Any, saved: Any, name: str) -> None:
    if given is not None and given != saved:
        raise ValueError(f"{arg}={given!r} differs from the saved model {name!r} ({saved!r}); leave {arg} out when "
                         "loading a saved model (absent modalities are filled with its templates).")
