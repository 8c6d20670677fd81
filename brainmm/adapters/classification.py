"""Classification adapters: any brainmm encoder + pooling + an MLP (or linear) head.

The paper's protocol: global average pooling of the last stage map -> MLP -> softmax. Fine-tuning modes:

- ``full``: everything trains (optionally with layer-wise learning-rate decay, :func:`brainmm.adapters.base.
  param_groups`);
- ``freeze``: the encoder is frozen (no gradients, norm statistics fixed: kept in eval mode), the head trains;
- ``linear_probe``: ``freeze`` with a linear head (the standard representation-quality probe).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import Encoder, LoadReport
from .base import AdapterModel, load_adapter_folder, load_network_state, resolve_encoder
from .missing import TemplateBank

logger = logging.getLogger(__name__)

__all__ = ["FINETUNE_MODES", "HEADS", "POOLS", "ClassificationHead", "ClassificationModel",
           "create_classification_model"]

POOLS = ("avg", "max", "avgmax")
HEADS = ("mlp", "linear")
FINETUNE_MODES = ("full", "freeze", "linear_probe")


class ClassificationHead(nn.Module):
    """``(B, F, h, w, d)`` last stage map -> logits ``(B, K)``: pooling, dropout, then linear or a 2-layer MLP."""

    def __init__(self, num_features: int, num_classes: int, *, pool: str = "avg", head: str = "mlp",
                 hidden_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}.")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.pool = pool
        in_features = num_features * (2 if pool == "avgmax" else 1)
        self.norm = nn.LayerNorm(in_features)  # pooled features of different encoders live on very different scales
        self.drop = nn.Dropout(dropout)
        if head == "linear":
            self.fc = nn.Linear(in_features, num_classes)
        else:
            hidden = int(hidden_dim or num_features)
            self.fc = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, num_classes))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            z = fmap.mean(dim=(2, 3, 4))
        elif self.pool == "max":
            z = fmap.amax(dim=(2, 3, 4))
        else:
            z = torch.cat([fmap.mean(dim=(2, 3, 4)), fmap.amax(dim=(2, 3, 4))], dim=1)
        return self.fc(self.drop(self.norm(z)))


class ClassificationModel(AdapterModel):
    """Encoder + :class:`ClassificationHead`. ``(B, C, H, W, D)`` -> logits ``(B, K)``; ``class_names`` name the
    K outputs."""

    model_type = "classification"

    def __init__(self, encoder: Encoder, num_classes: int, *, class_names: Sequence[str] | None = None,
                 pool: str = "avg", head: str = "mlp", hidden_dim: int | None = None, dropout: float = 0.0,
                 mode: str = "full") -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        names = tuple(class_names) if class_names is not None else tuple(f"class{i}" for i in range(num_classes))
        if len(names) != num_classes or len(set(names)) != len(names):
            raise ValueError(f"class_names must be {num_classes} distinct names, got {list(names)}.")
        self.num_classes = int(num_classes)
        self.class_names = names
        self.encoder = encoder
        self.head = ClassificationHead(encoder.num_features, num_classes, pool=pool, head=head,
                                       hidden_dim=hidden_dim, dropout=dropout)
        self._head_args = {"pool": pool, "head": head, "hidden_dim": hidden_dim, "dropout": dropout}
        self.mode = "full"
        self.set_finetune_mode(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, D)`` -> logits ``(B, K)``."""
        return self.head(self.encoder.forward_features(x))

    def set_finetune_mode(self, mode: str) -> ClassificationModel:
        """``full`` | ``freeze`` | ``linear_probe`` (see the module docstring). Returns self."""
        if mode not in FINETUNE_MODES:
            raise ValueError(f"mode must be one of {', '.join(FINETUNE_MODES)}, got {mode!r}.")
        if mode == "linear_probe" and self._head_args["head"] != "linear":
            raise ValueError("mode='linear_probe' trains a linear head on frozen features: create the model with "
                             "head='linear' (or use mode='freeze' to train the MLP head on frozen features).")
        self.mode = mode
        frozen = mode != "full"
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> ClassificationModel:
        super().train(mode)
        if self.mode != "full":
            self.encoder.eval()  # frozen encoder: BatchNorm statistics and dropout stay in inference mode
        return self

    def card_fields(self) -> dict[str, Any]:
        a = self._head_args
        return {"head_text": f"{a['pool']} pooling of the last stage map and a {a['head']} head (trained in mode "
                             f"`{self.mode}`)", "outputs_text": ", ".join(self.class_names) + " (softmax)"}

    def adapter_config(self) -> dict[str, Any]:
        return {"task": "classification", "num_classes": self.num_classes, "class_names": list(self.class_names),
                **self._head_args, "mode": self.mode}


def create_classification_model(encoder: str | Encoder, *, modalities: Sequence[str] | None = None,
                                 num_classes: int | None = None, class_names: Sequence[str] | None = None,
                                 pretrained: bool = False, pool: str = "avg", head: str = "mlp",
                                 hidden_dim: int | None = None, dropout: float = 0.0, mode: str = "full",
                                 revision: str | None = None, cache_dir: str | Path | None = None,
                                 strict: bool = True) -> ClassificationModel:
    """A classification model on any brainmm encoder, or a saved one (``local-dir:`` / ``hf-hub:`` of a
    classification folder).

    ``num_classes`` defaults to ``len(class_names)``. ``pool``: ``avg`` (paper), ``max``, ``avgmax``. ``head``:
    ``mlp`` (paper) or ``linear``. ``mode``: ``full``, ``freeze`` or ``linear_probe``. Other arguments as in
    :func:`brainmm.adapters.create_segmentation_model`.
    """
    from .. import hub

    loc = hub.parse_location(encoder) if isinstance(encoder, str) else None
    if loc is not None and hub.read_config(loc, cache_dir=cache_dir).get("model_type") == "classification":
        return _load_saved(encoder, modalities=modalities, num_classes=num_classes, class_names=class_names,
                           revision=revision, cache_dir=cache_dir)
    if num_classes is None:
        if class_names is None:
            raise ValueError("Pass num_classes=K or class_names=[...] to create_classification_model.")
        num_classes = len(class_names)
    enc, templates, source = resolve_encoder(encoder, modalities, pretrained=pretrained, revision=revision,
                                             cache_dir=cache_dir, strict=strict)
    model = ClassificationModel(enc, num_classes, class_names=class_names, pool=pool, head=head,
                                hidden_dim=hidden_dim, dropout=dropout, mode=mode)
    model.templates = TemplateBank(model.modalities, templates, enc.pretrained_cfg.atlas_size, source=source)
    report = getattr(enc, "load_report", None) or LoadReport(source=source)
    model.load_report = LoadReport(source=report.source, copied=[f"encoder.{k}" for k in report.copied],
                                   adapted={f"encoder.{k}": v for k, v in report.adapted.items()},
                                   initialised=[f"encoder.{k}" for k in report.initialised]
                                   + [k for k in model.state_dict() if k.startswith("head.")],
                                   ignored=list(report.ignored), extras=dict(report.extras))
    return model


def _load_saved(name: str, *, modalities: Sequence[str] | None, num_classes: int | None,
                class_names: Sequence[str] | None, revision: str | None,
                cache_dir: str | Path | None) -> ClassificationModel:
    from .segmentation import _canon, _check_same

    config, encoder, state, templates, source = load_adapter_folder(name, "classification", revision=revision,
                                                                    cache_dir=cache_dir)
    a = config["adapter"]
    _check_same("num_classes", num_classes, a["num_classes"], name)
    _check_same("class_names", None if class_names is None else list(class_names), a["class_names"], name)
    _check_same("modalities", None if modalities is None else list(_canon(modalities)),
                list(encoder.pretrained_cfg.modalities), name)
    model = ClassificationModel(encoder, int(a["num_classes"]), class_names=a["class_names"], pool=a["pool"],
                                head=a["head"], hidden_dim=a.get("hidden_dim"), dropout=float(a.get("dropout", 0.0)),
                                mode=a.get("mode", "full"))
    model.load_report = load_network_state(model, state, source=source)
    model.templates = TemplateBank(model.modalities, templates, encoder.pretrained_cfg.atlas_size, source=source)
    model.eval()
    return model
