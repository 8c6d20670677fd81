"""``brainmm bench``: measured speed of the parts that cost GPU hours (and the CPU parts that feed them).

Each benchmark times repeated runs after a warm-up and reports the median, with the device and versions, as a table
and as JSON. Variants (eager vs compile, fp32 vs bf16, brainmm vs a reference implementation) run side by side in
one process so their ratio is meaningful. Benchmarks never run in the test suite (tests only run one tiny iteration).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.modalities import MODALITIES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call for ``repeats`` calls after ``warmup`` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def environment(device: torch.device) -> dict[str, Any]:
    import monai

    from . import __version__

    env = {"brainmm": __version__, "torch": torch.__version__, "monai": monai.__version__,
           "python": platform.python_version(), "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available.")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------ masking
def reference_masking_step(target: torch.Tensor, templates: torch.Tensor, modality: list[int],
                           origin: list[list[int]], block: int, ratio: float) -> torch.Tensor:
    """The official code's way, kept for comparison: a mask per sample built with NumPy on the CPU, the whole
    template normalised again for every sample, then copied to the device. Same semantics as brainmm's."""
    views = []
    crop = target.shape[2:]
    grid = [c // block for c in crop]
    n = grid[0] * grid[1] * grid[2]
    keep = int(n * (1 - ratio))
    for i in range(target.shape[0]):
        mask = np.zeros(n, dtype=bool)
        mask[np.random.permutation(n)[:keep]] = True
        mask = mask.reshape(grid)
        mask = np.repeat(np.repeat(np.repeat(mask, block, 0), block, 1), block, 2)
        t = templates[modality[i]]
        t = (t - t.min()) / (t.max() - t.min() + 1e-9)
        o = origin[i]
        window = t[o[0]:o[0] + crop[0], o[1]:o[1] + crop[1], o[2]:o[2] + crop[2]]
        m = torch.from_numpy(mask).to(target.device)
        views.append(torch.where(m, target[i, 0], window))
    return torch.stack(views)[:, None]


def bench_masking(*, batch: int = 3, crop: int = 96, atlas: tuple[int, int, int] = (240, 240, 155),
                  block: int = 8, ratio: float = 0.8, warmup: int = 2, repeats: int = 10,
                  device: str = "cpu") -> dict[str, Any]:
    """Two views' masks + template fill for a batch: brainmm (batched) vs the per-sample reference."""
    from .pretrain.masking import fill_masked, random_block_mask
    from .pretrain.templates import ModalityTemplates

    dev = _device(device)
    templates = ModalityTemplates(atlas).to(dev)
    with torch.no_grad():
        templates.weight.normal_()
    target = torch.rand(batch, 1, crop, crop, crop, device=dev)
    g = np.random.default_rng(0)
    modality = torch.as_tensor(g.integers(0, len(MODALITIES), batch))
    origin = torch.as_tensor(np.stack([g.integers(0, a - crop + 1, batch) for a in atlas], 1))

    @torch.no_grad()
    def ours() -> None:
        fill = templates.windows(modality, origin, (crop,) * 3)
        for _ in range(2):  # two views, each with its own mask
            fill_masked(target, fill, random_block_mask(batch, (crop,) * 3, block, ratio, device=dev))

    @torch.no_grad()
    def reference() -> None:
        for _ in range(2):
            reference_masking_step(target, templates.weight, modality.tolist(), origin.tolist(), block, ratio)

    rows = []
    for name, fn in (("per-sample loop (official style)", reference), ("brainmm batched", ours)):
        t = statistics.median(time_fn(fn, warmup=warmup, repeats=repeats, device=dev))
        rows.append({"variant": name, "seconds": t, "steps_per_s": 1 / t})
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    return {"benchmark": "masking", "setting": f"batch {batch}, {crop}^3 crops, 2 views, atlas {atlas}",
            "rows": rows, "env": environment(dev)}


# ------------------------------------------------------------------------------------------------ loader
def bench_loader(data: str, *, out: str = "runs/bench-loader", crop: int = 96,
                 atlas: tuple[int, int, int] | None = None, studies: int = 8, epochs: int = 2,
                 num_workers: int = 2) -> dict[str, Any]:
    """Studies/s of the preprocessed cache + crop dataset vs MONAI LoadImaged + the same transforms on .nii.gz."""
    from monai.transforms import Compose, RandSpatialCropd
    from torch.utils.data import DataLoader, Dataset

    from .data.cache import MultiModalCropDataset, PreprocessedCache
    from .data.datasets import discover_studies
    from .data.transforms import PreprocessingParams, build_preprocessing

    out_dir = Path(out)
    if data == "demo":
        from .data.synthetic import write_synthetic_dataset

        shape = atlas or (96, 96, 96)
        data = str(write_synthetic_dataset(out_dir / "data", n_studies=studies, shape=shape, seed=0))
    found = discover_studies(data)[:studies]
    if not found:
        raise ValueError(f"No studies in {data!r}.")
    params = PreprocessingParams.from_any(None, atlas_size=atlas) if atlas else PreprocessingParams()
    crop3 = tuple(min(crop, a) for a in params.atlas_size)
    monai_pipeline = Compose([build_preprocessing(params, MODALITIES),
                              RandSpatialCropd("image", roi_size=crop3, random_size=False)])

    class MonaiStudies(Dataset):
        def __len__(self) -> int:
            return len(found)

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.as_tensor(np.asarray(monai_pipeline(found[i])["image"]))

    def run(dataset: Any, set_epoch: Callable[[int], None] | None) -> float:
        t0 = time.perf_counter()
        n = 0
        for epoch in range(epochs):
            if set_epoch:
                set_epoch(epoch)
            for item in DataLoader(dataset, batch_size=None, num_workers=num_workers, shuffle=True,
                                   collate_fn=lambda x: x):
                n += 1
                del item
        return n / (time.perf_counter() - t0)

    cache = PreprocessedCache(out_dir / "cache", params)
    t0 = time.perf_counter()
    cache.build(found, num_workers=num_workers)
    build_s = time.perf_counter() - t0
    crops = MultiModalCropDataset(cache, found, crop3, seed=0)
    rows = [{"variant": "MONAI LoadImaged + transforms (.nii.gz each epoch)",
             "studies_per_s": run(MonaiStudies(), None)},
            {"variant": "brainmm preprocessed cache (memory-mapped float16)",
             "studies_per_s": run(crops, crops.set_epoch)}]
    rows[1]["speedup"] = rows[1]["studies_per_s"] / rows[0]["studies_per_s"]
    return {"benchmark": "loader", "setting": f"{len(found)} studies, {epochs} epochs, {num_workers} workers, crop "
            f"{crop3}; one-off cache build {build_s:.1f} s", "rows": rows, "env": environment(torch.device("cpu"))}


# ------------------------------------------------------------------------------------------------ pretrain step
def bench_pretrain_step(arch: str = "mmvp_uniformer", *, batch: int = 3, crop: int = 96,
                        atlas: tuple[int, int, int] = (240, 240, 155), variants: tuple[str, ...] = ("eager-fp32",),
                        warmup: int = 3, repeats: int = 10, device: str = "auto",
                        channels_last: bool = False) -> dict[str, Any]:
    """Forward + backward + AdamW step of the full BrainMVP objective (two views, all three tasks on).

    Variants: ``eager-fp32``, ``eager-bf16``, ``compile-fp32``, ``compile-bf16``. volumes/s counts samples
    (each one 96^3 crop of one modality, encoded twice), as the official figures do."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models import create_model
    from .pretrain.objectives import BrainMVPObjective, ObjectiveConfig
    from .pretrain.templates import ModalityTemplates

    dev = _device(device)
    rows = []
    g = torch.Generator().manual_seed(0)
    batch_data = {"image": torch.rand(batch, len(MODALITIES), crop, crop, crop, generator=g).to(dev),
                  "present": torch.ones(batch, len(MODALITIES), dtype=torch.bool),
                  "origin": torch.zeros(batch, 3, dtype=torch.long)}
    flops = None
    for variant in variants:
        mode, _, precision = variant.partition("-")
        if mode not in ("eager", "compile") or precision not in ("fp32", "bf16"):
            raise ValueError(f"Unknown variant {variant!r}; use eager-fp32, eager-bf16, compile-fp32, compile-bf16.")
        torch.manual_seed(0)
        encoder = create_model(arch)
        objective = BrainMVPObjective(encoder, encoder.build_reconstruction_decoder(), ModalityTemplates(atlas),
                                      ObjectiveConfig(template_only_epochs=0, contrastive_start_epoch=0)).to(dev)
        if channels_last:
            objective = objective.to(memory_format=torch.channels_last_3d)
        opt = torch.optim.AdamW(objective.parameters(), lr=3e-4)
        step_fn = torch.compile(objective) if mode == "compile" else objective
        amp = precision == "bf16"

        def step(step_fn: Any = step_fn, opt: Any = opt, amp: bool = amp) -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                loss = step_fn(batch_data, epoch=2000).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if flops is None:
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = statistics.median(time_fn(step, warmup=warmup, repeats=repeats, device=dev))
        row = {"variant": variant, "seconds": t, "volumes_per_s": batch / t, "tflops": flops / t / 1e12}
        if dev.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        rows.append(row)
    return {"benchmark": "pretrain-step", "setting": f"{arch}, batch {batch}, {crop}^3, 2 views, 3 tasks on"
            + (", channels_last_3d" if channels_last else ""), "flop_per_step": flops, "rows": rows,
            "env": environment(dev)}


# ------------------------------------------------------------------------------------------------ output
def format_result(result: dict[str, Any]) -> str:
    rows = result["rows"]
    keys = [k for k in rows[0] if k != "variant"] + [k for r in rows for k in r if k not in rows[0]]
    keys = list(dict.fromkeys(keys))
    header = ["variant", *keys]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    table = [header] + [[r["variant"], *[fmt(r.get(k)) for k in keys]] for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = [f"{result['benchmark']}: {result['setting']}"]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(2, "  ".join("-" * w for w in widths))
    env = result["env"]
    lines.append("env: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


# ------------------------------------------------------------------------------------------------ inference
def bench_inference(arch: str = "mmvp_swin", *, shape: tuple[int, int, int] = (240, 240, 155), roi: int = 96,
                    overlap: float = 0.5, sw_batch_size: int = 4, variants: tuple[str, ...] = ("fp32", "bf16"),
                    baseline: bool = True, warmup: int = 1, repeats: int = 5, device: str = "auto") -> dict[str, Any]:
    """Sliding-window segmentation of one four-modality volume (gaussian blending), brainmm's segmentation model of
    ``arch`` beside MONAI's SwinUNETR (feature 48) with the same windows. Seconds per study; Dice agreement of each
    variant's mask with the fp32 one (on random weights and input, so only a numerical check)."""
    from monai.networks.nets import SwinUNETR

    from .adapters.inference import sliding_window_logits
    from .adapters.segmentation import create_segmentation_model

    dev = _device(device)
    torch.manual_seed(0)
    model = create_segmentation_model(arch, modalities=["t1", "t1c", "t2", "flair"], labels="brats2023").to(dev).eval()
    image = torch.rand(1, 4, *shape, generator=torch.Generator().manual_seed(0)).to(dev)
    candidates: list[tuple[str, torch.nn.Module, str]] = [(f"brainmm {arch}", model, v) for v in variants]
    if baseline:
        ref = SwinUNETR(in_channels=4, out_channels=3, feature_size=48).to(dev).eval()
        ref.size_divisor = 32  # type: ignore[attr-defined]
        candidates += [("MONAI SwinUNETR", ref, v) for v in variants]
    rows, masks = [], {}
    for name, net, precision in candidates:
        amp = torch.bfloat16 if precision == "bf16" else None
        out: dict[str, torch.Tensor] = {}

        def run(net: torch.nn.Module = net, amp: torch.dtype | None = amp, out: dict = out) -> None:
            out["logits"] = sliding_window_logits(net, image, (roi,) * 3, overlap=overlap, sw_batch_size=sw_batch_size,
                                                  device=dev, amp_dtype=amp)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = statistics.median(time_fn(run, warmup=warmup, repeats=repeats, device=dev))
        mask = out["logits"] > 0
        row: dict[str, Any] = {"variant": f"{name} {precision}", "seconds_per_study": t}
        if precision == "fp32":
            masks[name] = mask
        elif name in masks:
            ref_mask = masks[name]
            inter = (mask & ref_mask).sum().item()
            row["dice_vs_fp32"] = 2 * inter / max(1, mask.sum().item() + ref_mask.sum().item())
        if dev.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        rows.append(row)
    return {"benchmark": "inference", "setting": f"{'x'.join(map(str, shape))}, 4 modalities, roi {roi}^3, overlap "
            f"{overlap}, sw batch {sw_batch_size}", "rows": rows, "env": environment(dev)}
