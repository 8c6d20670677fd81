"""Run plumbing shared by the pre-training and fine-tuning loops: torchrun environment, devices, per-step seeds,
resumable sharding, progress bars and TensorBoard writers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment (0, 1, 0 without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(want: str | torch.device, local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. With ``local_rank`` (a training process)
    a CUDA device is that rank's, made current; without, the device asked for. No GPU for ``cuda`` is an error."""
    want = str(want)
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {want!r} was asked for but no CUDA GPU is available; use --device cpu or auto.")
        if local_rank is not None:
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
    return torch.device(want)


def init_distributed(device: torch.device, world_size: int) -> None:
    """Join the torchrun process group: NCCL on GPU, gloo on CPU."""
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def step_seed(seed: int, rank: int, epoch: int, micro: int, salt: int = 0) -> int:
    """The seed of one micro-batch: ranks differ, and a resumed run replays what the uninterrupted one drew."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729 + micro + salt) % (2**63 - 1)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way (for resume): skips the first ``start`` indices."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar in optimizer steps (None when disabled, e.g. on ranks other than 0)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def tensorboard_writer(log_dir: str | Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))
