"""Shared behaviour of run configurations (pre-training, fine-tuning): dict/YAML round trips, hashing, overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C", bound="RunConfig")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # auto: bf16 on GPU, fp32 on CPU


class RunConfig:
    """Mixin for ``@dataclass`` run configurations. ``setting_kind`` names them in error messages."""

    setting_kind = "run"

    def validate(self, checks: list[tuple[bool, str]]) -> None:
        """Raise ``ValueError`` for the first failed ``(ok, message)``, after the settings every run has
        (``precision``, ``depthwise``)."""
        from .ops import BACKENDS

        precision, depthwise = self.precision, self.depthwise  # type: ignore[attr-defined]
        shared = [(precision in PRECISIONS, f"precision must be auto, bf16, fp16 or fp32, got {precision!r}"),
                  (depthwise in BACKENDS, f"depthwise must be one of {', '.join(BACKENDS)}, got {depthwise!r}")]
        for ok, msg in [*checks, *shared]:
            if not ok:
                raise ValueError(msg + ".")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))  # type: ignore[call-overload]

    def digest(self) -> str:
        """A short hash of the configuration (provenance)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.setting_kind} setting(s) {unknown}; known: {', '.join(sorted(known))}.")
        return cls(**coerce_numbers(cls, d))

    @classmethod
    def from_yaml(cls: type[C], path: str | Path) -> C:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{str(path)!r} must hold a YAML mapping of settings.")
        return cls.from_dict(data)

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})

    def with_overrides(self: C, overrides: list[str] | dict[str, Any]) -> C:
        """Apply ``key=value`` overrides (YAML-parsed values; ``objective.mask_ratio=0.875`` for nested keys)."""
        d = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
        for key, value in items:
            target = d
            parts = key.split(".")
            for p in parts[:-1]:
                if p not in target or not isinstance(target[p], dict):
                    raise ValueError(f"Unknown setting {key!r}.")
                target = target[p]
            if parts[-1] not in target:
                raise ValueError(f"Unknown setting {key!r}; known: {', '.join(sorted(target))}.")
            target[parts[-1]] = value
        return type(self).from_dict(d)


def coerce_numbers(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``3e-4`` as a string: convert strings of numeric settings to the default's type."""
    out = dict(values)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for k, v in values.items():
        d = defaults.get(k)
        if isinstance(v, str) and isinstance(d, (int, float)) and not isinstance(d, bool):
            try:
                out[k] = type(d)(float(v)) if isinstance(d, float) else int(v)
            except ValueError as err:
                raise ValueError(f"Setting {k!r} must be a number, got {v!r}.") from err
    return out


def given_settings(namespace: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The command-line flags among ``keys`` the user gave (argparse leaves the others None)."""
    return {k: getattr(namespace, k) for k in keys if getattr(namespace, k) is not None}


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, YAML-parsed value)``."""
    if "=" not in item:
        raise ValueError(f"Override {item!r} must look like key=value (e.g. objective.mask_ratio=0.875).")
    key, value = item.split("=", 1)
    return key.strip(), yaml.safe_load(value)
