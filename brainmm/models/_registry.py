"""Model registry: timm-style entrypoints, default pretrained configs per tag, close-match errors."""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._pretrained import PretrainedCfg

logger = logging.getLogger(__name__)

_model_entrypoints: dict[str, Callable[..., Any]] = {}
_model_family: dict[str, str] = {}
# architecture -> {tag: PretrainedCfg}; the first tag registered is the default tag.
_pretrained_cfgs: dict[str, dict[str, PretrainedCfg]] = {}


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator registering a model entrypoint under its function name (timm style).

    The function's module may define ``default_cfgs: dict[str, PretrainedCfg]`` keyed ``"arch.tag"`` or ``"arch"``;
    those become the architecture's pretrained tags.
    """
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"Model {name!r} is registered twice ({fn.__module__} and {_model_family[name]}).")
    _model_entrypoints[name] = fn
    _model_family[name] = fn.__module__
    import sys

    mod = sys.modules.get(fn.__module__)
    cfgs = getattr(mod, "default_cfgs", {}) or {}
    tags: dict[str, PretrainedCfg] = {}
    for full, cfg in cfgs.items():
        arch, _, tag = full.partition(".")
        if arch == name:
            tags[tag] = cfg.replace(architecture=name, tag=tag)
    if not tags:
        tags[""] = PretrainedCfg(architecture=name)
    _pretrained_cfgs[name] = tags
    return fn


def register_pretrained_cfg(cfg: PretrainedCfg, *, overwrite: bool = False) -> None:
    """Add (or replace) a pretrained tag at run time, e.g. a locally converted official weight."""
    if cfg.architecture not in _model_entrypoints:
        raise ValueError(_unknown_model_message(cfg.architecture))
    tags = _pretrained_cfgs[cfg.architecture]
    if cfg.tag in tags and tags[cfg.tag].has_weights and not overwrite:
        raise ValueError(f"Pretrained tag {cfg.name!r} already exists; pass overwrite=True to replace it.")
    if cfg.tag:
        tags.pop("", None)  # an architecture with real tags no longer needs its untagged placeholder
    tags[cfg.tag] = cfg


def _local_registry_path() -> Path:
    """Where ``brainmm register-local`` records folders: ``$BRAINMM_HOME/local_registry.json``
    (default ``~/.cache/brainmm``)."""
    home = os.environ.get("BRAINMM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "brainmm")
    return Path(home) / "local_registry.json"


def register_local(directory: str | Path, name: str, *, overwrite: bool = False) -> PretrainedCfg:
    """Register a brainmm folder as the weight ``arch.tag`` on this machine (persisted), so that
    ``create_model(name, pretrained=True)`` loads it offline."""
    arch, tag = split_model_name_tag(name)
    if not tag:
        raise ValueError(f"register-local needs a name with a tag, e.g. '{arch}.brainmvp', got {name!r}.")
    directory = Path(directory).expanduser().resolve()
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a brainmm folder (no config.json); create one with "
                                "save_pretrained or `brainmm convert-official`.")
    config = json.loads(config_path.read_text())
    if config.get("architecture") != arch:
        raise ValueError(f"{str(directory)!r} holds a {config.get('architecture')!r} model, not {arch!r}.")
    base = PretrainedCfg.from_dict(config.get("pretrained_cfg", {}))
    cfg = base.replace(architecture=arch, tag=tag, local_dir=str(directory), hf_hub_id=None, status="local",
                       sha256=config.get("provenance", {}).get("sha256"))
    register_pretrained_cfg(cfg, overwrite=True if overwrite else _is_replaceable(arch, tag))
    path = _local_registry_path()
    entries = json.loads(path.read_text()) if path.is_file() else {}
    entries[f"{arch}.{tag}"] = str(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=2))
    os.replace(tmp, path)
    return cfg


def _is_replaceable(arch: str, tag: str) -> bool:
    """A planned (not yet published) or local tag may be replaced by a local folder."""
    cfg = _pretrained_cfgs.get(arch, {}).get(tag)
    return cfg is None or cfg.status in ("planned", "local")


def load_local_registry() -> None:
    """Re-register the folders recorded by ``register_local`` (skipping ones that no longer exist)."""
    path = _local_registry_path()
    if not path.is_file():
        return
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("Ignoring unreadable local registry %s: %s", path, err)
        return
    for name, directory in entries.items():
        try:
            arch, tag = split_model_name_tag(name)
            if arch in _model_entrypoints and Path(directory, "config.json").is_file():
                config = json.loads(Path(directory, "config.json").read_text())
                base = PretrainedCfg.from_dict(config.get("pretrained_cfg", {}))
                _pretrained_cfgs[arch][tag] = base.replace(
                    architecture=arch, tag=tag, local_dir=directory, hf_hub_id=None, status="local",
                    sha256=config.get("provenance", {}).get("sha256"))
        except (OSError, ValueError) as err:
            logger.warning("Skipping local weight %s (%s): %s", name, directory, err)


def _unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(_model_entrypoints), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"Unknown model {name!r}.{hint} See brainmm.list_models() for the {len(_model_entrypoints)} models."


def split_model_name_tag(name: str) -> tuple[str, str]:
    """``"mmvp_swin.brainmvp"`` -> ``("mmvp_swin", "brainmvp")``; no tag -> ``("mmvp_swin", "")``."""
    arch, _, tag = name.partition(".")
    return arch, tag


def is_model(name: str) -> bool:
    return split_model_name_tag(name)[0] in _model_entrypoints


def model_entrypoint(name: str) -> Callable[..., Any]:
    arch, _ = split_model_name_tag(name)
    if arch not in _model_entrypoints:
        raise ValueError(_unknown_model_message(arch))
    return _model_entrypoints[arch]


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    """The PretrainedCfg of ``arch`` (its default tag) or ``arch.tag``. Unknown tag: ValueError listing the tags."""
    arch, tag = split_model_name_tag(name)
    if arch not in _pretrained_cfgs:
        raise ValueError(_unknown_model_message(arch))
    tags = _pretrained_cfgs[arch]
    if not tag:
        return next(iter(tags.values()))
    if tag not in tags:
        valid = [t for t in tags if t]
        close = difflib.get_close_matches(tag, valid, n=1, cutoff=0.6)
        hint = f" Did you mean '{arch}.{close[0]}'?" if close else ""
        listing = ", ".join(f"'{arch}.{t}'" for t in valid) if valid else "none"
        raise ValueError(f"Unknown pretrained tag {tag!r} for {arch!r}.{hint} Valid tags: {listing}.")
    return tags[tag]


def list_models(filter: str | list[str] = "", pretrained: bool = False) -> list[str]:  # noqa: A002 (timm name)
    """Sorted architecture names matching the fnmatch ``filter``; with ``pretrained=True``, ``arch.tag`` names of
    the weights that can be downloaded."""
    names = list_pretrained() if pretrained else sorted(_model_entrypoints)
    patterns = [filter] if isinstance(filter, str) else list(filter)
    patterns = [p for p in patterns if p]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return sorted(names)


def list_pretrained(filter: str = "") -> list[str]:  # noqa: A002
    """Sorted ``arch.tag`` names that have weights (a Hub repo or a locally registered folder)."""
    out = [cfg.name for tags in _pretrained_cfgs.values() for cfg in tags.values() if cfg.tag and cfg.has_weights]
    if filter:
        out = [n for n in out if fnmatch.fnmatch(n, filter)]
    return sorted(out)


def list_tags(arch: str) -> list[str]:
    return [t for t in _pretrained_cfgs.get(arch, {}) if t]


def model_family(arch: str) -> str:
    return _model_family[split_model_name_tag(arch)[0]].rsplit(".", 1)[-1]
