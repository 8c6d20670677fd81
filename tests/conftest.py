"""Shared fixtures: the official BrainMVP parity data and a deterministic official-checkpoint builder."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "brainmvp_official"


def official_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """Rebuild the official state dict from its key layout with the fixture's per-key formula (fixture README)."""
    keys = json.loads((FIXTURES / f"{arch}_keys.json").read_text())
    sd = {}
    for key, shape in keys.items():
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if key.endswith("num_batches_tracked"):
            t = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            t = 1 + 0.1 * torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) <= 1 and key.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        sd[key] = t
    return sd


@pytest.fixture(scope="session")
def reference_outputs() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for arch in ("uniformer", "unet"):  # stored split by architecture (see the fixture README)
        out.update(load_file(str(FIXTURES / f"reference_outputs_{arch}.safetensors")))
    return out


@pytest.fixture(scope="session")
def official_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Official-format checkpoints on disk: UniFormer with ``module.`` + state_dict wrapper, UNet bare."""
    root = tmp_path_factory.mktemp("official")
    uni = {f"module.{k}": v for k, v in official_state_dict("uniformer").items()}
    torch.save({"state_dict": uni, "current_epoch": 1500, "best_loss": 0.01}, root / "uniformer.pt")
    torch.save(official_state_dict("unet"), root / "unet.pt")
    return {"mmvp_uniformer": root / "uniformer.pt", "mmvp_unet": root / "unet.pt"}
