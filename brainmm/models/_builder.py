"""``create_model``: names -> encoders, pretrained weights, stem adaptation by modality, load reports."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.modalities import MODALITIES, canonical_modalities
from ._base import Encoder, FeatureListNet
from ._pretrained import PretrainedCfg
from ._registry import get_pretrained_cfg, model_entrypoint, split_model_name_tag

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What happened to each tensor when weights were loaded into a model."""

    source: str = ""
    copied: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)  # key -> how it was adapted
    initialised: list[str] = field(default_factory=list)  # keys of the model not found in the weights
    ignored: list[str] = field(default_factory=list)  # keys of the weights the model does not have
    extras: dict[str, list[str]] = field(default_factory=dict)  # e.g. {"templates": [...], "decoder": [...]}

    def summary(self) -> str:
        parts = [f"{len(self.copied)} copied", f"{len(self.adapted)} adapted", f"{len(self.initialised)} newly "
                 f"initialised", f"{len(self.ignored)} ignored"]
        lines = [f"Loaded {self.source}: {', '.join(parts)}."]
        lines += [f"  adapted {k}: {how}" for k, how in self.adapted.items()]
        if self.initialised:
            lines.append(f"  newly initialised: {', '.join(self.initialised[:10])}"
                         + (" ..." if len(self.initialised) > 10 else ""))
        if self.ignored:
            lines.append(f"  ignored: {', '.join(self.ignored[:10])}" + (" ..." if len(self.ignored) > 10 else ""))
        for name, keys in self.extras.items():
            lines.append(f"  {name} (kept beside the encoder): {len(keys)} tensors")
        return "\n".join(lines)

    __str__ = summary


def adapt_stem_weight(weight: torch.Tensor, *, src_modalities: tuple[str, ...], dst_modalities: tuple[str, ...],
                      dst_chans: int) -> tuple[torch.Tensor, str]:
    """Derive a ``dst_chans``-channel input kernel from a pre-trained one ``(O, C_src, k, k, k)``.

    - one source channel (BrainMVP encoders are modality-agnostic): copy it into every channel and divide by the
      channel count, so an input with the same image in every channel gives the pre-trained response;
    - named source and destination modalities: each destination channel takes the source channel of the same
      modality; a modality the source never saw takes the mean of the source kernels; all are scaled by
      ``C_src / C_dst`` to keep the summed response;
    - otherwise (unnamed, different counts): the mean source kernel, repeated and scaled likewise.
    Returns the new kernel and a sentence describing what was done.
    """
    c_src = weight.shape[1]
    if c_src == dst_chans and (not src_modalities or not dst_modalities or src_modalities == dst_modalities):
        return weight, "unchanged"
    if c_src == 1:
        new = weight.repeat(1, dst_chans, 1, 1, 1) / dst_chans
        names = f" ({', '.join(dst_modalities)})" if dst_modalities else ""
        how = f"1 -> {dst_chans} channels{names}: pre-trained kernel copied into each channel, divided by {dst_chans}"
        return new, how
    mean = weight.mean(dim=1, keepdim=True)
    if src_modalities and dst_modalities and len(src_modalities) == c_src:
        chans, how = [], []
        for m in dst_modalities:
            if m in src_modalities:
                chans.append(weight[:, src_modalities.index(m): src_modalities.index(m) + 1])
                how.append(f"{m}<-{m}")
            else:
                chans.append(mean)
                how.append(f"{m}<-mean")
        new = torch.cat(chans, dim=1) * (c_src / dst_chans)
        mapping = ", ".join(how)
        return new, f"{c_src} -> {dst_chans} channels by modality name ({mapping}), scaled by {c_src}/{dst_chans}"
    new = mean.repeat(1, dst_chans, 1, 1, 1) * (c_src / dst_chans)
    return new, f"{c_src} -> {dst_chans} channels: mean source kernel repeated, scaled by {c_src}/{dst_chans}"


def load_encoder_weights(model: Encoder, state_dict: dict[str, torch.Tensor], *, source: str,
                         src_modalities: tuple[str, ...] = (), strict: bool = True,
                         extras: dict[str, list[str]] | None = None) -> LoadReport:
    """Load ``state_dict`` into ``model``, adapting the input stem; returns (and logs) the LoadReport.

    ``strict=True`` raises on missing or unexpected keys and on shape mismatches other than the stem's.
    """
    report = LoadReport(source=source, extras=extras or {})
    own = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    mismatched = []
    dst_mods = tuple(model.pretrained_cfg.modalities)
    for k, v in state_dict.items():
        if k not in own:
            report.ignored.append(k)
            continue
        if k == model.stem_key and (v.shape != own[k].shape or (src_modalities and dst_mods != src_modalities)):
            new, how = adapt_stem_weight(v, src_modalities=src_modalities, dst_modalities=dst_mods,
                                         dst_chans=own[k].shape[1])
            if new.shape != own[k].shape:
                mismatched.append(f"{k}: weights {tuple(v.shape)} vs model {tuple(own[k].shape)}")
                continue
            to_load[k] = new.to(own[k].dtype)
            if how == "unchanged":
                report.copied.append(k)
            else:
                report.adapted[k] = how
            continue
        if v.shape != own[k].shape:
            mismatched.append(f"{k}: weights {tuple(v.shape)} vs model {tuple(own[k].shape)}")
            continue
        to_load[k] = v
        report.copied.append(k)
    report.initialised = [k for k in own if k not in to_load]
    if strict and (mismatched or report.ignored or report.initialised):
        problems = []
        if mismatched:
            problems.append(f"shape mismatch for {len(mismatched)} tensor(s): {'; '.join(mismatched[:5])}")
        if report.initialised:
            problems.append(f"{len(report.initialised)} model tensor(s) missing from the weights, e.g. "
                            f"{report.initialised[:5]}")
        if report.ignored:
            problems.append(f"{len(report.ignored)} unexpected tensor(s), e.g. {report.ignored[:5]}")
        raise ValueError(f"Weights from {source} do not fit {type(model).__name__} ({'; '.join(problems)}). Check the "
                         "architecture and model_args, or pass strict=False to load what fits.")
    if mismatched:
        report.initialised += [m.split(":")[0] for m in mismatched if m.split(":")[0] not in report.initialised]
    model.load_state_dict(to_load, strict=False)
    logger.info("%s", report.summary())
    return report


def _resolve_weights(name: str, cfg: PretrainedCfg, *, checkpoint_path: str | Path | None, revision: str | None,
                     cache_dir: str | Path | None) -> tuple[Path, str, dict[str, Any] | None]:
    """Find the weight file for a registry name: (path, description, folder config if any)."""
    from .. import hub

    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if path.is_dir():
            config = hub.read_config(hub.HubLocation(local_dir=path))
            return path / hub.WEIGHTS_NAME, f"local-dir:{path}", config
        return path, str(path), None
    if not cfg.has_weights:
        tags = [t for t in _tags(cfg.architecture) if t]
        hint = f" Pretrained tags: {', '.join(cfg.architecture + '.' + t for t in tags)}." if tags else ""
        raise ValueError(f"{name!r} has no pretrained weights.{hint} Use pretrained=False, a tag with weights, or "
                         "checkpoint_path=.")
    if cfg.local_dir:
        loc = hub.HubLocation(local_dir=Path(cfg.local_dir))
    else:
        loc = hub.HubLocation(repo_id=cfg.hf_hub_id, revision=revision or cfg.hf_hub_revision)
    try:
        path = hub.resolve_file(loc, cfg.file, cache_dir=cache_dir, name_for_help=cfg.name)
    except hub.WeightsNotFoundError as err:
        if cfg.status != "planned":
            raise
        raise hub.WeightsNotFoundError(
            f"{cfg.name!r} is not published on the Hub yet ({cfg.hf_hub_id} is reserved for it). Convert the official "
            f"checkpoint and register it on this machine: `brainmm convert-official CKPT.pt DIR --arch "
            f"{cfg.architecture}` then `brainmm register-local DIR --name {cfg.name}`; or pass checkpoint_path=. "
            f"({err})") from err
    hub.verify_sha256(path, cfg.sha256, name=cfg.name)
    try:
        config = hub.read_config(loc, cache_dir=cache_dir)
    except FileNotFoundError:
        config = None
    return path, loc.display, config


def _tags(arch: str) -> list[str]:
    from ._registry import list_tags

    return list_tags(arch)


def create_model(name: str, pretrained: bool = False, *, modalities: list[str] | tuple[str, ...] | None = None,
                 in_chans: int | None = None, features_only: bool = False, out_indices: tuple[int, ...] | None = None,
                 checkpoint_path: str | Path | None = None, revision: str | None = None,
                 cache_dir: str | Path | None = None, strict: bool = True, **kwargs: Any) -> nn.Module:
    """Create an encoder by name: ``arch``, ``arch.tag``, ``hf-hub:org/repo[@revision]`` or ``local-dir:PATH``.

    ``modalities`` names the input channels (canonical names or aliases); the input stem is derived from the
    pre-trained one (see ``adapt_stem_weight``). ``in_chans`` sets the channel count without names. Explicit keyword
    arguments win over the architecture's configuration. ``features_only=True`` returns a module whose forward gives
    the list of stage maps (``out_indices`` selects them). The load report is ``model.load_report``.
    """
    from .. import hub

    if not isinstance(name, str) or not name:
        raise ValueError(f"create_model needs a model name string, got {name!r}.")
    if modalities is not None:
        modalities = canonical_modalities(modalities, argument="modalities")
        if in_chans is not None and in_chans != len(modalities):
            raise ValueError(f"in_chans={in_chans} contradicts modalities={list(modalities)} ({len(modalities)} "
                             "channels); pass one of them.")
    if in_chans is not None and (not isinstance(in_chans, int) or in_chans < 1):
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}.")

    loc = hub.parse_location(name)
    folder_config: dict[str, Any] | None = None
    weights_path: Path | None = None
    source = ""
    if loc is not None:
        if revision is not None:
            loc = hub.HubLocation(repo_id=loc.repo_id, revision=revision, local_dir=loc.local_dir)
        folder_config = hub.read_config(loc, cache_dir=cache_dir)
        if folder_config.get("model_type", "encoder") != "encoder":
            raise ValueError(f"{name!r} holds a {folder_config['model_type']} model, not an encoder; load it with "
                             f"brainmm.create_{folder_config['model_type']}_model(...).")
        arch = folder_config["architecture"]
        cfg = PretrainedCfg.from_dict(folder_config.get("pretrained_cfg", {})).replace(architecture=arch)
        if checkpoint_path is None:
            weights_path = hub.resolve_file(loc, hub.WEIGHTS_NAME, cache_dir=cache_dir, name_for_help=name)
            source = loc.display
        pretrained = True
    else:
        arch, _tag = split_model_name_tag(name)
        model_entrypoint(arch)  # raises the close-match error for unknown names
        cfg = get_pretrained_cfg(name)
        if pretrained or checkpoint_path is not None:
            weights_path, source, folder_config = _resolve_weights(name, cfg, checkpoint_path=checkpoint_path,
                                                                   revision=revision, cache_dir=cache_dir)
    if loc is not None and checkpoint_path is not None:
        weights_path, source, _ = _resolve_weights(name, cfg, checkpoint_path=checkpoint_path, revision=None,
                                                   cache_dir=cache_dir)

    src_modalities = tuple(cfg.modalities)
    src_in_chans = cfg.in_chans
    model_args: dict[str, Any] = {}
    if folder_config is not None:
        model_args = dict(folder_config.get("model_args", {}))
        src_in_chans = int(model_args.pop("in_chans", src_in_chans))
        if folder_config.get("architecture") not in (None, arch):
            raise ValueError(f"Weights at {source} are for {folder_config['architecture']!r}, not {arch!r}.")
    # Explicit arguments win over the stored configuration.
    model_args.update(kwargs)
    if modalities is not None:
        dst_in_chans = len(modalities)
    elif in_chans is not None:
        dst_in_chans = in_chans
    else:
        dst_in_chans = src_in_chans
    dst_modalities = tuple(modalities) if modalities is not None else (
        src_modalities if dst_in_chans == len(src_modalities) else ())
    model_args["in_chans"] = dst_in_chans

    try:
        model = model_entrypoint(arch)(**model_args)
    except TypeError as err:
        raise ValueError(f"Bad argument for {arch!r}: {err}.") from err
    model.architecture = arch
    model.pretrained_cfg = cfg.replace(modalities=dst_modalities)

    if weights_path is not None:
        sd = hub.load_safetensors(weights_path)
        net, templates, decoder = hub.split_state_dict(sd)
        extras = {}
        if templates:
            extras["templates"] = sorted(templates)
        if decoder:
            extras["decoder"] = sorted(decoder)
        model.load_report = load_encoder_weights(model, net, source=source, src_modalities=src_modalities,
                                                 strict=strict, extras=extras)
    else:
        model.load_report = LoadReport(source="random initialisation", initialised=list(model.state_dict()))
    model.pretrained_cfg = model.pretrained_cfg.replace(
        template_modalities=tuple(model.load_report.extras.get("templates", cfg.template_modalities)))
    if features_only:
        wrapped = FeatureListNet(model, out_indices)
        wrapped.load_report = model.load_report
        return wrapped
    if out_indices is not None:
        raise ValueError("out_indices is only used with features_only=True.")
    return model


def load_templates(name_or_dir: str | Path, *, revision: str | None = None,
                   cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The learned modality templates of a weight, min-max normalised, float32, keyed by canonical modality.

    Accepts the names ``create_model`` takes (a registry tag with weights, ``hf-hub:``, ``local-dir:``) or a folder.
    """
    from .. import hub

    path = _weights_file(name_or_dir, revision=revision, cache_dir=cache_dir)
    _, templates, _ = hub.split_state_dict(hub.load_safetensors(path))
    if not templates:
        raise ValueError(f"{str(name_or_dir)!r} carries no modality templates (only pre-training exports do).")
    order = sorted(templates, key=lambda m: MODALITIES.index(m) if m in MODALITIES else len(MODALITIES))
    return {m: hub.normalise_template(templates[m]) for m in order}


def load_decoder(name_or_dir: str | Path, encoder: Encoder | None = None, *, revision: str | None = None,
                 cache_dir: str | Path | None = None) -> nn.Module:
    """The pre-training reconstruction decoder saved beside an encoder (``decoder.*`` tensors), loaded strictly."""
    from .. import hub

    if encoder is None:
        encoder = create_model(str(name_or_dir) if not isinstance(name_or_dir, Path) else f"local-dir:{name_or_dir}",
                               pretrained=True, revision=revision, cache_dir=cache_dir)
    path = _weights_file(name_or_dir, revision=revision, cache_dir=cache_dir)
    _, _, dec_sd = hub.split_state_dict(hub.load_safetensors(path))
    if not dec_sd:
        raise ValueError(f"{str(name_or_dir)!r} carries no reconstruction decoder (decoder.* tensors).")
    decoder = encoder.build_reconstruction_decoder()
    decoder.load_state_dict(dec_sd, strict=True)
    return decoder


def _weights_file(name_or_dir: str | Path, *, revision: str | None, cache_dir: str | Path | None) -> Path:
    from .. import hub

    if isinstance(name_or_dir, Path) or (isinstance(name_or_dir, str) and Path(name_or_dir).is_dir()):
        return hub.resolve_file(hub.HubLocation(local_dir=Path(name_or_dir)), hub.WEIGHTS_NAME)
    loc = hub.parse_location(name_or_dir)
    if loc is not None:
        if revision:
            loc = hub.HubLocation(repo_id=loc.repo_id, revision=revision, local_dir=loc.local_dir)
        return hub.resolve_file(loc, hub.WEIGHTS_NAME, cache_dir=cache_dir, name_for_help=name_or_dir)
    cfg = get_pretrained_cfg(name_or_dir)
    path, _, _ = _resolve_weights(name_or_dir, cfg, checkpoint_path=None, revision=revision, cache_dir=cache_dir)
    return path
