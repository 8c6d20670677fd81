"""What segmentation and classification adapters share: encoder resolution, templates, save/load, parameter groups.

An adapter folder is a brainmm folder like an encoder's (``model.safetensors`` + ``config.json`` + ``README.md``):

- ``model.safetensors``: the whole network (``encoder.*`` / ``swinViT.*`` plus the decoder or head) and the
  learned templates of its input modalities (``templates.<modality>``, atlas grid, min-max normalised);
- ``config.json``: the encoder part of the schema unchanged (``architecture``, ``model_args`` incl. ``in_chans``,
  ``pretrained_cfg`` with the input modalities, atlas grid and training crop), ``model_type`` ``segmentation`` or
  ``classification``, and an ``adapter`` dict with everything needed to rebuild the heads (classes, label scheme,
  decoder layout, ...).

``brainmm.create_model`` refuses adapter folders with a pointer to ``create_segmentation_model`` /
``create_classification_model``, which rebuild the network from the config and load the weights strictly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hub
from ..data.modalities import canonical_modalities
from ..models import Encoder, LoadReport, PretrainedCfg, create_model, load_templates, model_entrypoint
from .missing import TemplateBank

logger = logging.getLogger(__name__)

__all__ = ["AdapterModel", "load_adapter_folder", "param_groups", "resolve_encoder"]


def resolve_encoder(encoder: str | Encoder, modalities: Sequence[str] | None, *, pretrained: bool = False,
                    revision: str | None = None, cache_dir: str | Path | None = None,
                    strict: bool = True) -> tuple[Encoder, dict[str, torch.Tensor] | None, str]:
    """Build (or check) the encoder of an adapter: ``(encoder, templates or None, description of the weights)``.

    ``encoder``: a registry name (``arch`` / ``arch.tag``; weights when ``pretrained``), ``hf-hub:`` / ``local-dir:``
    (always with weights), or an ``Encoder`` instance (its ``in_chans`` must match ``modalities``). The C-channel
    stem is derived from the pre-trained one by modality name (see ``brainmm.models.adapt_stem_weight``).
    """
    if modalities is None:
        raise ValueError("modalities=[...] must name the adapter's input channels (e.g. ['t1', 't1c', 't2', "
                         "'flair']); absent ones are filled with the learned templates.")
    mods = canonical_modalities(modalities, argument="modalities")
    if isinstance(encoder, nn.Module):
        if not isinstance(encoder, Encoder):
            raise TypeError(f"encoder must be a brainmm Encoder or a model name, got {type(encoder).__name__}.")
        if encoder.in_chans != len(mods):
            raise ValueError(f"The encoder takes {encoder.in_chans} channel(s) but modalities={list(mods)} names "
                             f"{len(mods)}; create it with brainmm.create_model(name, modalities={list(mods)}).")
        encoder.pretrained_cfg = encoder.pretrained_cfg.replace(modalities=mods)
        return encoder, None, "the given encoder instance"
    if not isinstance(encoder, str) or not encoder:
        raise ValueError(f"encoder must be a model name or an Encoder, got {encoder!r}.")
    loc = hub.parse_location(encoder)
    with_weights = pretrained or loc is not None
    model = create_model(encoder, pretrained=with_weights, modalities=mods, revision=revision, cache_dir=cache_dir,
                         strict=strict)
    templates = None
    source = model.load_report.source
    if with_weights and model.load_report.extras.get("templates"):
        templates = load_templates(encoder, revision=revision, cache_dir=cache_dir)
    return model, templates, source


class AdapterModel(nn.Module):
    """Base of the task adapters: exposes the encoder's contract attributes so that ``brainmm.save_pretrained`` and
    the model card see the encoder's architecture, and carries the :class:`TemplateBank` of its input modalities.

    Subclasses set ``model_type`` and implement ``encoder`` and :meth:`adapter_config`.
    """

    model_type: str = ""
    # Subclasses provide ``encoder`` (a registered submodule or a property); no base property here, since a class
    # property would shadow the submodule nn.Module registers under the same name.
    encoder: Encoder
    templates: TemplateBank
    load_report: LoadReport

    # The encoder's contract, seen through the adapter (what hub.build_config and the card read).
    @property
    def pretrained_cfg(self) -> PretrainedCfg:
        return self.encoder.pretrained_cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: PretrainedCfg) -> None:
        self.encoder.pretrained_cfg = cfg

    @property
    def architecture(self) -> str:
        return getattr(self.encoder, "architecture", self.encoder.pretrained_cfg.architecture)

    @property
    def model_args(self) -> dict[str, Any]:
        return dict(self.encoder.model_args)

    @property
    def in_chans(self) -> int:
        return self.encoder.in_chans

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        return self.encoder.feature_info

    @property
    def size_divisor(self) -> int:
        return self.encoder.size_divisor

    @property
    def num_features(self) -> int:
        return self.encoder.num_features

    @property
    def modalities(self) -> tuple[str, ...]:
        """Input channels, in order (canonical modality names)."""
        return tuple(self.pretrained_cfg.modalities)

    def adapter_config(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def set_atlas_size(self, atlas_size: Sequence[int]) -> None:
        """Use another atlas grid (e.g. a fine-tuning dataset's): templates are centre-placed into it."""
        atlas = tuple(int(s) for s in atlas_size)
        if atlas != self.templates.atlas_size:
            self.templates = TemplateBank(self.modalities, self.templates.export(), atlas, warn=False)
        self.pretrained_cfg = self.pretrained_cfg.replace(atlas_size=atlas)

    def save_pretrained(self, directory: str | Path, *, card: dict[str, Any] | None = None,
                        provenance: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` (network + templates), ``config.json`` and the model card into ``directory``.

        Load it back with ``brainmm.create_{segmentation,classification}_model("local-dir:DIR")``."""
        # The card of an earlier save into the same folder would be kept by hub.save_pretrained: regenerate it.
        readme = Path(directory) / hub.CARD_NAME
        if readme.exists() and (card is not None or provenance is not None):
            readme.unlink()
        missing = self.templates.missing_templates
        facts = {"local_name": f"local-dir:{Path(directory).resolve()}",
                 "templates_text": "none available: zeros are used" if not self.templates.has_templates else (
                     "available for every input" if not missing else
                     f"zeros for {', '.join(missing)}, which the encoder weight had no template for"),
                 **self.card_fields()}
        return hub.save_pretrained(self, directory, templates=self.templates.export(), model_type=self.model_type,
                                   provenance=provenance, card={**facts, **(card or {})},
                                   template_dtype=torch.float16, extra_config={"adapter": self.adapter_config()})

    def card_fields(self) -> dict[str, Any]:
        """Task-specific fields of the model card template (``model_cards/<model_type>.md``)."""
        return {}


def load_adapter_folder(name: str, model_type: str, *, revision: str | None = None,
                        cache_dir: str | Path | None = None) -> tuple[dict[str, Any], Encoder,
                                                                      dict[str, torch.Tensor],
                                                                      dict[str, torch.Tensor], str]:
    """Read an adapter folder/repo: ``(config, encoder (untrained, right shape), network tensors, templates,
    source)``. Raises ``ValueError`` when it holds another model type."""
    loc = hub.parse_location(name)
    if loc is None:
        raise ValueError(f"{name!r} is not an adapter location (expected 'local-dir:PATH' or 'hf-hub:org/repo').")
    if revision is not None and loc.repo_id is not None:
        loc = hub.HubLocation(repo_id=loc.repo_id, revision=revision)
    config = hub.read_config(loc, cache_dir=cache_dir)
    found = config.get("model_type", "encoder")
    if found != model_type:
        how = ("brainmm.create_model(...) or pass it as the encoder of create_"
               f"{model_type}_model(NAME, modalities=..., num_classes=...)" if found == "encoder"
               else f"brainmm.create_{found}_model(...)")
        raise ValueError(f"{name!r} holds a {found} model, not a {model_type} model; load it with {how}.")
    if "adapter" not in config:
        raise ValueError(f"{loc.display}/{hub.CONFIG_NAME} has model_type {model_type!r} but no 'adapter' section; "
                         "the folder was not written by brainmm's save_pretrained.")
    arch = config["architecture"]
    model_args = dict(config.get("model_args", {}))
    in_chans = int(model_args.pop("in_chans", 1))
    try:
        encoder = model_entrypoint(arch)(in_chans=in_chans, **model_args)
    except TypeError as err:
        raise ValueError(f"{loc.display}: bad model_args for {arch!r}: {err}.") from err
    encoder.architecture = arch
    encoder.pretrained_cfg = PretrainedCfg.from_dict(config.get("pretrained_cfg", {})).replace(architecture=arch)
    weights = hub.resolve_file(loc, hub.WEIGHTS_NAME, cache_dir=cache_dir, name_for_help=name)
    sd = hub.load_safetensors(weights)
    net, templates, decoder = hub.split_state_dict(sd)
    if decoder:  # an adapter never stores a reconstruction decoder; "decoder.*" keys are its own modules
        net.update({f"decoder.{k}": v for k, v in decoder.items()})
    return config, encoder, net, templates, loc.display


def load_network_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> LoadReport:
    """Strictly load an adapter's own weights; a clear ``ValueError`` instead of PyTorch's key dump."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes, e.g. {shapes[:2]}")
        raise ValueError(f"Weights in {source} do not fit the model its config.json describes ({'; '.join(parts)}). "
                         "The folder is corrupt or was edited by hand.")
    model.load_state_dict(state, strict=True)
    return LoadReport(source=source, copied=list(own))


def param_groups(model: AdapterModel, lr: float, weight_decay: float = 0.0,
                 layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise learning-rate decay (BEiT/timm style) over the encoder stages.

    Encoder stage ``i`` of ``n`` (from ``feature_info``: every top-level encoder module up to and including stage
    i's module belongs to it) gets ``lr * layer_decay ** (n - i)``; the decoder/head gets ``lr``. Biases and
    1-D parameters (norms) get no weight decay. Frozen parameters are left out. ``layer_decay=1`` is plain
    fine-tuning. Each group carries ``lr_scale`` (schedulers multiply it in through LambdaLR's base lrs).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    encoder = model.encoder
    stage_of = _encoder_stage_map(encoder)
    n = len(encoder.feature_info)
    enc_ids = {id(p) for p in encoder.parameters()}
    enc_prefix = {id(p): name for name, p in encoder.named_parameters()}
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in enc_ids:
            top = enc_prefix[id(p)].split(".", 1)[0]
            scale = layer_decay ** (n - stage_of.get(top, n - 1))
        else:
            scale = 1.0
        wd = 0.0 if p.ndim <= 1 else weight_decay
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "lr": lr * scale, "weight_decay": wd, "lr_scale": scale}
            for (scale, wd), ps in sorted(groups.items(), key=lambda kv: kv[0])]


def _encoder_stage_map(encoder: Encoder) -> dict[str, int]:
    """Top-level encoder module name -> stage index (0-based), from registration order and feature_info."""
    names = [name for name, _ in encoder.named_children()]
    stage_modules = [f["module"].split(".", 1)[0] for f in encoder.feature_info]
    bounds = [names.index(m) if m in names else None for m in stage_modules]
    out: dict[str, int] = {}
    for pos, name in enumerate(names):
        stage = len(stage_modules) - 1
        for i, b in enumerate(bounds):
            if b is not None and pos <= b:
                stage = i
                break
        out[name] = stage
    return out
