"""Pre-training run configuration: defaults of the official run, YAML files and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .._config import RunConfig, coerce_numbers
from .objectives import ObjectiveConfig


@dataclass
class PretrainConfig(RunConfig):
    """Everything a pre-training run depends on. Defaults: the official BrainMVP run (brainmvp.md section 6)."""

    setting_kind = "pre-training"

    arch: str = "mmvp_uniformer"
    data: str = "demo"
    out: str = "runs/pretrain"
    cache_dir: str | None = None  # default: <out>/cache
    crop_size: tuple[int, int, int] = (96, 96, 96)
    atlas_size: tuple[int, int, int] = (240, 240, 155)  # SRI24 grid; the demo uses its phantoms' grid
    epochs: int = 1500
    max_steps: int | None = None  # stop after this many optimizer steps (the cosine still spans `epochs`)
    batch_size: int = 3  # per process
    accumulation: int = 2
    lr: float = 3e-4
    weight_decay: float = 1e-5  # applied to the templates too, as in the official code
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.0  # 0 = off (official). Clips the network only: see Trainer docstring
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    grad_checkpointing: bool = False
    compile: bool = False
    depthwise: str = "torch"  # UniFormer's depthwise convolutions: torch | triton (GPU kernels, brainmm.ops)
    num_workers: int = 4
    samples_per_study: int = 1  # crops per study per epoch
    seed: int = 0
    log_every: int = 10
    preview_every: int = 200
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    device: str = "auto"
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        if isinstance(self.objective, dict):
            self.objective = ObjectiveConfig(**coerce_numbers(ObjectiveConfig, self.objective))
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in coerce_numbers(type(self), current).items():
            setattr(self, k, v)
        self.crop_size = tuple(int(c) for c in self.crop_size)  # type: ignore[assignment]
        self.atlas_size = tuple(int(c) for c in self.atlas_size)  # type: ignore[assignment]
        checks = [
            (len(self.crop_size) == 3, f"crop_size must have 3 sizes, got {self.crop_size}"),
            (all(c <= a for c, a in zip(self.crop_size, self.atlas_size)),
             f"crop_size {self.crop_size} must fit in atlas_size {self.atlas_size}"),
            (all(c % self.objective.block_size == 0 for c in self.crop_size),
             f"crop_size {self.crop_size} must be divisible by the mask block size {self.objective.block_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.accumulation >= 1, f"accumulation must be >= 1, got {self.accumulation}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
        ]
        self.validate(checks)


def demo_config(out: str = "runs/demo", arch: str = "mmvp_uniformer_tiny") -> PretrainConfig:
    """A CPU-sized run on synthetic phantoms: tiny encoder, 32^3 crops, the official schedule (template-only until
    20 % of the epochs, contrastive from 2/3) scaled to 40 epochs of 24 studies x 2 crops."""
    return PretrainConfig(
        arch=arch, data="demo", out=out, crop_size=(32, 32, 32), atlas_size=(64, 64, 48), epochs=40,
        batch_size=4, accumulation=1, lr=1e-3, warmup_steps=5, grad_clip=1.0, num_workers=0, samples_per_study=2,
        log_every=5, preview_every=25, checkpoint_every=50,
        objective=ObjectiveConfig(template_only_epochs=8, contrastive_start_epoch=27),
    )
