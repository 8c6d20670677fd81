"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a folder ``step-XXXXXXXX/`` holding ``state.safetensors`` (model, decoder, templates, optimizer
moments, RNG byte states) and ``state.json`` (counters, optimizer hyper-parameters, scheduler, scaler, numpy and
Python RNG states, the run config). It is first written to a hidden temp folder and renamed into place, then
``latest`` (a text file with the folder name) is replaced atomically: a crash never leaves a half checkpoint that a
resume would pick up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        plain["state"][str(pid)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value
            else:
                plain["state"][str(pid)][name] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    plain = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": _py_state(random.getstate())}
    return tensors, plain


def _py_state(state: Any) -> Any:
    return [state[0], list(state[1]), state[2]]


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    n = plain["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = plain["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(directory: str | Path, name: str, *, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, counters: dict[str, Any],
                    config: dict[str, Any], keep: int = 2) -> Path:
    """Write ``directory/name`` atomically, point ``latest`` at it, keep the newest ``keep`` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_plain = rng_state()
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    plain = {"format": 1, "counters": counters, "optimizer": opt_plain, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
             "rng": rng_plain, "config": config}
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{name}."))
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(plain, indent=1, default=_json_default))
        final = directory / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    pointer = directory / f".{LATEST}.tmp"
    pointer.write_text(name)
    os.replace(pointer, directory / LATEST)
    existing = sorted(p for p in directory.glob("step-*") if p.is_dir())
    for old in existing[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return directory / name


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def latest_checkpoint(directory: str | Path) -> Path | None:
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    return path if (path / "state.json").is_file() and (path / "state.safetensors").is_file() else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint folder: (tensors, plain state). Model tensors are under ``model.``."""
    path = Path(path)
    if not (path / "state.safetensors").is_file() or not (path / "state.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a brainmm training checkpoint (needs state.safetensors and "
                                "state.json).")
    return load_file(str(path / "state.safetensors")), json.loads((path / "state.json").read_text())


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      plain: dict[str, Any]) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(tensors, plain["optimizer"]))


def resume_from(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: Any) -> dict[str, Any]:
    """Restore a run from checkpoint ``path``: model (strict), optimizer, scheduler, scaler and every RNG; returns
    the saved counters (step, epoch, micro-batches done, and whatever else the loop saved)."""
    tensors, plain = load_checkpoint(path)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    restore_optimizer(optimizer, tensors, plain)
    scheduler.load_state_dict(plain["scheduler"])
    if plain.get("scaler"):
        scaler.load_state_dict(plain["scaler"])
    set_rng_state(tensors, plain["rng"])
    return plain["counters"]
