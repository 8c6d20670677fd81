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

from ._runtime import pick_device
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

    dev = pick_device(device)
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


# ------------------------------------------------------------------------------------------------ variants
PRETRAIN_VARIANTS = "MODE-PRECISION[+triton][+cl]: MODE eager|compile, PRECISION fp32|bf16"


def parse_variant(variant: str) -> dict[str, Any]:
    """``compile-bf16+triton+cl`` -> mode, precision, depthwise backend, channels-last; errors name the variant."""
    head, *options = variant.split("+")
    mode, _, precision = head.partition("-")
    bad = [o for o in options if o not in ("triton", "cl")]
    if mode not in ("eager", "compile") or precision not in ("fp32", "bf16") or bad:
        raise ValueError(f"Unknown variant {variant!r}; variants are {PRETRAIN_VARIANTS} "
                         f"(e.g. eager-fp32, compile-bf16+triton).")
    return {"mode": mode, "precision": precision, "depthwise": "triton" if "triton" in options else "torch",
            "channels_last": "cl" in options}


def top_ops(prof: Any, steps: int, device: torch.device, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` operators / GPU kernels with the most self time per step (device time on CUDA)."""
    events = prof.key_averages()
    if device.type == "cuda":
        def self_us(e: Any) -> float:
            return float(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) or 0)
    else:
        def self_us(e: Any) -> float:
            return float(e.self_cpu_time_total)
    total = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:n]
    return [{"name": e.key[:90], "ms_per_step": self_us(e) / 1e3 / steps, "share": self_us(e) / total,
             "calls_per_step": e.count / steps} for e in ranked if self_us(e) > 0]


def profile_fn(fn: Callable[[], Any], device: torch.device, steps: int = 3) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    return top_ops(prof, steps, device)


def count_host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Host-device synchronisations in one call of ``fn`` (CUDA's sync debug mode); None on the CPU."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------------------ pretrain step
def _train_step(loss_of: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, device: torch.device,
                amp: bool) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _first_step(step: Callable[[], torch.Tensor], count_flops: bool) -> tuple[float, float | None]:
    """Run the first step: its loss (same seed, weights and masks in every variant, so the variants' first losses
    agree up to precision: a numerical check of compile/bf16/Triton) and, if asked, its FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    if not count_flops:
        return float(step()), None
    with FlopCounterMode(display=False) as counter:
        loss = float(step())
    return loss, counter.get_total_flops()


def _measure(step: Callable[[], None], *, device: torch.device, warmup: int, repeats: int, volumes: int,
             flops: float | None, profile: bool) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = statistics.median(time_fn(step, warmup=warmup, repeats=repeats, device=device))
    row: dict[str, Any] = {"seconds": t, "volumes_per_s": volumes / t}
    if flops:
        row["tflops"] = flops / t / 1e12
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["host_syncs"] = count_host_syncs(step, device)
    if profile:
        row["profile"] = profile_fn(step, device, steps=min(3, repeats))
    return row


def bench_pretrain_step(arch: str = "mmvp_uniformer", *, batch: int = 3, crop: int = 96,
                        atlas: tuple[int, int, int] = (240, 240, 155), variants: tuple[str, ...] = ("eager-fp32",),
                        warmup: int = 3, repeats: int = 10, device: str = "auto", channels_last: bool = False,
                        baseline: bool = False, baseline_batch: int = 2, profile: bool = False) -> dict[str, Any]:
    """Forward + backward + AdamW step of the full BrainMVP objective (two views, all three tasks on).

    Variants: ``MODE-PRECISION[+triton][+cl]`` (eager/compile, fp32/bf16, Triton depthwise convolutions,
    channels_last_3d). volumes/s counts samples (each one crop of one modality, encoded twice), as the official
    figures do. ``baseline`` adds MONAI SwinUNETR's (feature 48, 4 channels) train step at ``baseline_batch`` for
    each mode-precision asked for; ``profile`` records each variant's top operators / kernels per step."""
    from .models import create_model
    from .ops import depthwise_backend
    from .pretrain.objectives import BrainMVPObjective, ObjectiveConfig
    from .pretrain.templates import ModalityTemplates

    dev = pick_device(device)
    parsed = [(v, parse_variant(v)) for v in variants]
    rows = []
    g = torch.Generator().manual_seed(0)
    batch_data = {"image": torch.rand(batch, len(MODALITIES), crop, crop, crop, generator=g).to(dev),
                  "present": torch.ones(batch, len(MODALITIES), dtype=torch.bool),
                  "origin": torch.zeros(batch, 3, dtype=torch.long)}
    flops = None
    for variant, v in parsed:
        if v["depthwise"] == "triton" and dev.type != "cuda":
            raise ValueError(f"Variant {variant!r} needs a CUDA device (the Triton kernels run on the GPU).")
        torch.manual_seed(0)
        encoder = create_model(arch)
        objective = BrainMVPObjective(encoder, encoder.build_reconstruction_decoder(), ModalityTemplates(atlas),
                                      ObjectiveConfig(template_only_epochs=0, contrastive_start_epoch=0)).to(dev)
        if channels_last or v["channels_last"]:
            objective = objective.to(memory_format=torch.channels_last_3d)
        opt = torch.optim.AdamW(objective.parameters(), lr=3e-4)
        step_fn = torch.compile(objective) if v["mode"] == "compile" else objective
        step = _train_step(lambda f=step_fn: f(batch_data, epoch=2000).loss, opt, dev,
                           v["precision"] == "bf16")
        with depthwise_backend(v["depthwise"]):
            first_loss, counted = _first_step(step, flops is None)
            flops = flops or counted
            rows.append({"variant": variant, "first_loss": first_loss,
                         **_measure(step, device=dev, warmup=warmup, repeats=repeats, volumes=batch, flops=flops,
                                    profile=profile)})
        del objective, opt, step_fn, step
    if baseline:
        from monai.networks.nets import SwinUNETR

        x = torch.rand(baseline_batch, 4, crop, crop, crop, generator=g).to(dev)
        y = (torch.rand(baseline_batch, 3, crop, crop, crop, generator=g) > 0.5).float().to(dev)
        base_flops = None
        for head in dict.fromkeys(f"{v['mode']}-{v['precision']}" for _, v in parsed):
            mode, precision = head.split("-")
            torch.manual_seed(0)
            net = SwinUNETR(in_channels=4, out_channels=3, feature_size=48).to(dev)
            opt = torch.optim.AdamW(net.parameters(), lr=3e-4)
            fwd = torch.compile(net) if mode == "compile" else net
            step = _train_step(lambda f=fwd: torch.nn.functional.binary_cross_entropy_with_logits(
                f(x).float(), y), opt, dev, precision == "bf16")
            first_loss, counted = _first_step(step, base_flops is None)
            base_flops = base_flops or counted
            rows.append({"variant": f"MONAI SwinUNETR train step, batch {baseline_batch}, {head}",
                         "first_loss": first_loss,
                         **_measure(step, device=dev, warmup=warmup, repeats=repeats, volumes=baseline_batch,
                                    flops=base_flops, profile=False)})
            del net, opt, fwd, step
    return {"benchmark": "pretrain-step", "setting": f"{arch}, batch {batch}, {crop}^3, 2 views, 3 tasks on"
            + (", channels_last_3d" if channels_last else ""), "flop_per_step": flops, "rows": rows,
            "env": environment(dev)}


# ------------------------------------------------------------------------------------------------ operators
def _relative_error(conv: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, backend: str) -> float:
    """Largest error of ``backend``'s output, input and weight gradients against ``torch``'s, relative to the
    largest magnitude of each."""
    from .ops import depthwise_backend

    def outputs(name: str) -> list[torch.Tensor]:
        x.grad = None
        conv.zero_grad(set_to_none=True)
        with depthwise_backend(name):
            y = conv(x)
        y.backward(grad)
        return [y.detach().float(), x.grad.float(), conv.weight.grad.float()]

    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
               for a, b in zip(outputs(backend), outputs("torch")))


# UniFormer-S depthwise convolutions of one pre-training step: (stage, channels, stride, kernel, layers)
UNIFORMER_DEPTHWISE = ((1, 64, 2, 3, 3), (1, 64, 2, 5, 3), (2, 128, 4, 3, 4), (2, 128, 4, 5, 4),
                       (3, 320, 8, 3, 8), (4, 512, 16, 3, 3))


def bench_ops(*, batch: int = 3, crop: int = 96, precisions: tuple[str, ...] = ("fp32", "bf16"),
              channels_last: bool = True, warmup: int = 3, repeats: int = 10, device: str = "auto") -> dict[str, Any]:
    """Forward + backward of each depthwise convolution of UniFormer-S at its pre-training shape (``2 * batch``
    crops: two views), per backend and precision, and the per-step total (ms x layers). Backends: torch (contiguous,
    PyTorch's direct kernels on the GPU), torch on channels_last_3d (cuDNN), and triton (CUDA only)."""
    from .ops import DepthwiseConv3d, depthwise_backend

    dev = pick_device(device)
    cases = [("torch", p, False) for p in precisions]
    if channels_last:
        cases += [("torch", p, True) for p in precisions]
    if dev.type == "cuda":
        cases += [("triton", p, False) for p in precisions]
    rows = []
    for backend, precision, cl in cases:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        row: dict[str, Any] = {"variant": f"{backend}{' channels_last' if cl else ''} {precision}"}
        total = 0.0
        for stage, ch, stride, k, layers in UNIFORMER_DEPTHWISE:
            conv = DepthwiseConv3d(ch, k).to(dev, dtype)
            size = max(1, crop // stride)
            x = torch.randn(2 * batch, ch, size, size, size, device=dev, dtype=dtype)
            if cl:
                x = x.to(memory_format=torch.channels_last_3d)
            x.requires_grad_(True)
            grad = torch.randn_like(x)

            def run(conv: torch.nn.Module = conv, x: torch.Tensor = x, grad: torch.Tensor = grad) -> None:
                conv(x).backward(grad)

            with depthwise_backend(backend):
                t = statistics.median(time_fn(run, warmup=warmup, repeats=repeats, device=dev))
            row[f"s{stage}_k{k}_ms"] = t * 1e3
            total += t * layers
            if backend != "torch":  # the compiled kernels against PyTorch's, output and both gradients
                row["max_rel_err"] = max(row.get("max_rel_err", 0.0), _relative_error(conv, x, grad, backend))
        row["step_total_ms"] = total * 1e3
        rows.append(row)
    return {"benchmark": "ops", "setting": f"UniFormer-S depthwise convolutions, forward + backward, {2 * batch} crops "
            f"of {crop}^3 (ms per layer; step total = sum of ms x layers)", "rows": rows, "env": environment(dev)}


# ------------------------------------------------------------------------------------------------ output
def format_result(result: dict[str, Any], *, markdown: bool = False) -> str:
    """The result as an aligned text table (or a Markdown table), then each variant's profile, then the env."""
    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "variant" and not isinstance(r[k], list)))
    header = ["variant", *keys]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    table = [header] + [[r["variant"], *[fmt(r.get(k)) for k in keys]] for r in rows]
    lines = [f"{result['benchmark']}: {result['setting']}"]
    if markdown:
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    else:
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(2, "  ".join("-" * w for w in widths))
    for r in rows:
        for key, value in r.items():
            if isinstance(value, list) and value:
                lines.append(f"{key} of {r['variant']}: " + "; ".join(
                    f"{op['name']} {op['ms_per_step']:.3g} ms ({op['share']:.0%})" for op in value))
    env = result["env"]
    lines.append(("" if not markdown else "\n") + "env: " + ", ".join(f"{k} {v}" for k, v in env.items()))
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
    ``arch`` beside MONAI's SwinUNETR (feature 48) with the same windows. Variants: ``[compile-]fp32|bf16[+triton]``.
    Seconds per study; Dice agreement of each variant's mask with the eager fp32 one (on random weights and input, so
    only a numerical check)."""
    from monai.networks.nets import SwinUNETR

    from .adapters.inference import sliding_window_logits
    from .adapters.segmentation import create_segmentation_model
    from .ops import depthwise_backend

    dev = pick_device(device)
    parsed = [(v, parse_variant(v if "-" in v.split("+")[0] else f"eager-{v}")) for v in variants]
    torch.manual_seed(0)
    model = create_segmentation_model(arch, modalities=["t1", "t1c", "t2", "flair"], labels="brats2023").to(dev).eval()
    image = torch.rand(1, 4, *shape, generator=torch.Generator().manual_seed(0)).to(dev)
    candidates: list[tuple[str, torch.nn.Module, str, dict[str, Any]]] = [
        (f"brainmm {arch}", model, name, v) for name, v in parsed]
    if baseline:
        ref = SwinUNETR(in_channels=4, out_channels=3, feature_size=48).to(dev).eval()
        ref.size_divisor = 32  # type: ignore[attr-defined]
        candidates += [("MONAI SwinUNETR", ref, name, v) for name, v in parsed if v["depthwise"] == "torch"]
    rows, masks = [], {}
    for name, net, variant, v in candidates:
        if v["depthwise"] == "triton" and dev.type != "cuda":
            raise ValueError(f"Variant {variant!r} needs a CUDA device (the Triton kernels run on the GPU).")
        amp = torch.bfloat16 if v["precision"] == "bf16" else None
        runner = torch.compile(net) if v["mode"] == "compile" else net  # keeps size_divisor (attribute lookup)
        out: dict[str, torch.Tensor] = {}

        def run(net: torch.nn.Module = runner, amp: torch.dtype | None = amp, out: dict = out) -> None:
            out["logits"] = sliding_window_logits(net, image, (roi,) * 3, overlap=overlap, sw_batch_size=sw_batch_size,
                                                  device=dev, amp_dtype=amp)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with depthwise_backend(v["depthwise"]):
            t = statistics.median(time_fn(run, warmup=warmup, repeats=repeats, device=dev))
        mask = out["logits"] > 0
        row: dict[str, Any] = {"variant": f"{name} {variant}", "seconds_per_study": t}
        if variant in ("fp32", "eager-fp32"):
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


# ------------------------------------------------------------------------------------------------ suite
SUITE_PARTS = ("pretrain-uniformer", "ops", "inference", "compile-uniformer", "pretrain-swin")


def bench_suite(out: str | Path, *, parts: tuple[str, ...] = SUITE_PARTS, device: str = "auto", warmup: int = 3,
                repeats: int = 10, batch: int = 3, crop: int = 96, shape: tuple[int, int, int] = (240, 240, 155),
                tiny: bool = False) -> Path:
    """The performance targets' GPU benchmarks in one run, most important first. Each part's JSON and the growing
    Markdown report ``suite.md`` are written as soon as the part ends, so a run cut short keeps what it measured; a
    part that fails is recorded with its error and the suite goes on. ``tiny`` uses the ``*_tiny`` encoders (a
    smoke run); Triton variants are left out without CUDA."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [p for p in parts if p not in SUITE_PARTS]
    if unknown:
        raise ValueError(f"Unknown suite part(s) {unknown}; parts are {', '.join(SUITE_PARTS)}.")
    dev = pick_device(device)
    suffix = "_tiny" if tiny else ""

    def variants(*names: str, smoke_compile: bool = False) -> tuple[str, ...]:
        """Triton variants only on CUDA; compiled ones in a tiny smoke run only where compiling is the point."""
        return tuple(v for v in names if (dev.type == "cuda" or "+triton" not in v)
                     and (not tiny or smoke_compile or not v.startswith("compile")))

    common = {"warmup": warmup, "repeats": repeats, "device": str(dev)}
    step = {"batch": batch, "crop": crop, "profile": True, **common}
    jobs: dict[str, Callable[[], dict[str, Any]]] = {
        "pretrain-uniformer": lambda: bench_pretrain_step(
            f"mmvp_uniformer{suffix}", variants=variants("eager-fp32", "eager-bf16", "eager-bf16+triton"), **step),
        "ops": lambda: bench_ops(batch=batch, crop=crop, **common),
        # MONAI's SwinUNETR needs windows of 64^3 or more (a 1^3 bottleneck cannot be instance-normalised)
        "inference": lambda: bench_inference(f"mmvp_swin{suffix}", shape=shape, roi=max(crop, 64),
                                             variants=variants("fp32", "bf16", "compile-bf16"), sw_batch_size=8,
                                             **common),
        "pretrain-swin": lambda: bench_pretrain_step(
            f"mmvp_swin{suffix}", variants=variants("eager-bf16", "compile-bf16", smoke_compile=True), baseline=True,
            **step),
        "compile-uniformer": lambda: bench_pretrain_step(
            f"mmvp_uniformer{suffix}", variants=variants("compile-bf16", "compile-bf16+triton", smoke_compile=True),
            **step),
    }
    report = out / "suite.md"
    report.write_text(f"# brainmm bench suite\n\nparts: {', '.join(parts)}\n")
    results: dict[str, dict[str, Any]] = {}
    targets = target_summary(results)
    for part in parts:
        t0 = time.perf_counter()
        try:
            result = jobs[part]()
        except Exception as err:  # one broken part must not lose the others' figures
            text = f"{part}: FAILED after {time.perf_counter() - t0:.0f} s: {type(err).__name__}: {err}"
        else:
            results[part] = result
            write_json(result, out / f"{part}.json")
            text = format_result(result, markdown=True) + f"\n\n({part}: {time.perf_counter() - t0:.0f} s)"
        print(text, flush=True)
        with report.open("a") as f:
            f.write(f"\n## {part}\n\n{text}\n")
        targets = target_summary(results)
        (out / "targets.md").write_text(targets)
    print(targets, flush=True)
    return report


def target_summary(results: dict[str, dict[str, Any]]) -> str:
    """The performance targets (batch 3, 96^3 step; 240x240x155 inference) against what the suite measured."""
    def rows(*parts: str) -> list[dict[str, Any]]:
        return [r for p in parts if p in results for r in results[p]["rows"]]

    lines = ["| target | goal | measured | met |", "|---|---|---|---|"]
    uni = [r for r in rows("pretrain-uniformer", "compile-uniformer") if "volumes_per_s" in r]
    if uni:
        best = max(uni, key=lambda r: r["volumes_per_s"])
        memory = f", {best['peak_gib']:.1f} GiB peak" if "peak_gib" in best else ""
        lines.append(f"| 1. mmvp_uniformer pre-training step | >= 40 volumes/s | {best['volumes_per_s']:.1f} volumes/s "
                     f"({best['variant']}{memory}) | {'yes' if best['volumes_per_s'] >= 40 else 'no'} |")
    swin = rows("pretrain-swin")
    ours = [r for r in swin if not r["variant"].startswith("MONAI")]
    base = [r for r in swin if r["variant"].startswith("MONAI") and r["variant"].endswith("eager-bf16")]
    if ours and base:
        best = max(ours, key=lambda r: r["volumes_per_s"])
        ratio = best["volumes_per_s"] / base[0]["volumes_per_s"]
        lines.append(f"| 2. mmvp_swin step vs MONAI SwinUNETR eager bf16 | >= 2x | {ratio:.2f}x ({best['variant']}: "
                     f"{best['volumes_per_s']:.1f} vs {base[0]['volumes_per_s']:.1f} volumes/s; "
                     f"{best.get('tflops', 0):.0f} TFLOP/s of ~800) | {'yes' if ratio >= 2 else 'no'} |")
    inference = [r for r in rows("inference") if r["variant"].startswith("brainmm")
                 and r.get("dice_vs_fp32", 1.0) >= 0.995]
    if inference:
        best = min(inference, key=lambda r: r["seconds_per_study"])
        lines.append(f"| 3. 240x240x155 inference | <= 0.3 s, masks within 0.5 Dice points of fp32 | "
                     f"{best['seconds_per_study']:.3f} s ({best['variant']}) | "
                     f"{'yes' if best['seconds_per_study'] <= 0.3 else 'no'} |")
    env = next(iter(results.values()))["env"] if results else {}
    device = env.get("gpu") or env.get("device", "?")
    return "\n".join([f"# Targets ({device})", "", *lines, ""])
