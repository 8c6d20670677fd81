"""The ``brainmm`` command line. Every error is one clear line on stderr and a non-zero exit (``--debug`` shows
the traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("brainmm")

# Errors that are the user's input, not a bug: printed as one line.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                                                 KeyError, TypeError, RuntimeError, OSError)


def _cmd_list(args: argparse.Namespace) -> int:
    import brainmm

    names = brainmm.list_models(args.filter or "", pretrained=args.pretrained)
    if not names:
        print(f"No {'pretrained weights' if args.pretrained else 'models'} match {args.filter!r}.")
        return 1
    rows = []
    for name in names:
        cfg = brainmm.get_pretrained_cfg(name)
        if args.pretrained:
            where = cfg.local_dir or cfg.hf_hub_id or "-"
            rows.append((name, cfg.status, _is_available(cfg), cfg.license, where, cfg.data or "-"))
        else:
            model = brainmm.create_model(name)
            n = sum(p.numel() for p in model.parameters())
            tags = brainmm.models.list_tags(name)
            rows.append((name, f"{n / 1e6:.2f} M", ", ".join(f"{name}.{t}" for t in tags) or "-"))
    if args.pretrained:
        header: tuple[str, ...] = ("weight", "status", "local", "licence", "location", "data")
    else:
        header = ("model", "params", "pretrained tags")
    print(_markdown([header, *rows]) if args.markdown else _table([header, *rows]))
    return 0


def _is_available(cfg: Any) -> str:
    """Whether a weight can be loaded offline now: a registered folder, or the file in the Hugging Face cache."""
    if cfg.local_dir:
        return "yes" if Path(cfg.local_dir, cfg.file).is_file() else "missing"
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(cfg.hf_hub_id, cfg.file, revision=cfg.hf_hub_revision)
    return "cached" if isinstance(hit, str) else "no"


def _markdown(rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def _table(rows: Sequence[Sequence[Any]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    import brainmm

    model = brainmm.create_model(args.name, pretrained=args.pretrained, cache_dir=args.cache_dir,
                                 revision=args.revision)
    cfg = model.pretrained_cfg
    n = sum(p.numel() for p in model.parameters())
    info = {
        "name": args.name,
        "architecture": getattr(model, "architecture", cfg.architecture),
        "parameters": f"{n:,} ({n / 1e6:.2f} M)",
        "model_args": {**model.model_args, "in_chans": model.in_chans},
        "input": f"(B, {model.in_chans}, H, W, D), spatial sizes multiples of {model.size_divisor}",
        "modalities": list(cfg.modalities) or "modality-agnostic (1 channel, one modality at a time)",
        "stage maps": [f"{f['num_chs']} ch @ 1/{f['reduction']}" for f in model.feature_info],
        "pooled features": model.num_features,
        "weights": (cfg.local_dir or cfg.hf_hub_id or "none (random init only)"),
        "status": f"{cfg.status}; offline: {_is_available(cfg)}" if cfg.has_weights else "-",
        "data": cfg.data or "-",
        "metrics": cfg.metrics or "-",
        "sha256": cfg.sha256 or "-",
        "tags": brainmm.models.list_tags(getattr(model, "architecture", cfg.architecture)),
        "preprocessing": {"orientation": cfg.orientation, "spacing": list(cfg.spacing),
                          "foreground_crop": cfg.foreground_crop, "intensity": cfg.intensity,
                          "atlas_size": list(cfg.atlas_size), "input_size": list(cfg.input_size)},
        "licence": cfg.license,
        "description": cfg.description,
    }
    if args.pretrained:
        info["load report"] = model.load_report.summary()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:>16}: {v}")
    return 0


def _cmd_convert_official(args: argparse.Namespace) -> int:
    from brainmm.convert import convert_official

    out = convert_official(args.checkpoint, args.out_dir, arch=args.arch, strict=not args.allow_unmapped)
    print(f"Wrote {out}. Load it with: brainmm.create_model('local-dir:{Path(out).resolve()}')")
    return 0


def _cmd_convert_monai_swin(args: argparse.Namespace) -> int:
    from brainmm.convert import convert_monai_swin, convert_monai_swinunetr

    if args.segmentation:
        if not args.modalities:
            raise ValueError("--segmentation needs --modalities naming the checkpoint's input channels in order.")
        out = convert_monai_swinunetr(args.checkpoint, args.out_dir, modalities=args.modalities, labels=args.labels,
                                      strict=not args.allow_unmapped)
        print(f"Wrote {out}. Load it with: brainmm.create_segmentation_model('local-dir:{Path(out).resolve()}')")
        return 0
    out = convert_monai_swin(args.checkpoint, args.out_dir, strict=not args.allow_unmapped)
    print(f"Wrote {out}. Load it with: brainmm.create_model('local-dir:{Path(out).resolve()}')")
    return 0


def _cmd_register_local(args: argparse.Namespace) -> int:
    from brainmm.models import register_local

    cfg = register_local(args.directory, args.name, overwrite=args.overwrite)
    print(f"Registered {cfg.name} -> {cfg.local_dir}. Load it with: brainmm.create_model('{cfg.name}', "
          "pretrained=True)")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from brainmm import hub
    from brainmm.models import get_pretrained_cfg

    loc = hub.parse_location(args.name)
    if loc is None:
        cfg = get_pretrained_cfg(args.name)
        if not cfg.hf_hub_id:
            raise ValueError(f"{args.name!r} has no Hub weights to download (tags with weights: "
                             f"{', '.join(__import__('brainmm').list_pretrained()) or 'none'}).")
        loc = hub.HubLocation(repo_id=cfg.hf_hub_id, revision=args.revision or cfg.hf_hub_revision)
    elif loc.local_dir is not None:
        raise ValueError(f"{args.name!r} is already a local folder; nothing to download.")
    paths = [hub.resolve_file(loc, f, cache_dir=args.cache_dir, name_for_help=args.name)
             for f in (hub.WEIGHTS_NAME, hub.CONFIG_NAME)]
    print(f"Cached {loc.display} at {paths[0].parent}")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from brainmm.features import extract_features_to_file

    out = extract_features_to_file(args.model, args.input, args.output, modalities=args.modalities,
                                   pretrained=not args.random_init, device=args.device, save_maps=args.save_maps)
    print(f"Wrote {out}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from brainmm.data.synthetic import write_synthetic_dataset

    out = write_synthetic_dataset(args.out_dir, n_studies=args.studies, shape=tuple(args.shape), seed=args.seed,
                                  missing_prob=args.missing_prob, overwrite=args.overwrite)
    print(f"Wrote {args.studies} synthetic studies ({'x'.join(map(str, args.shape))}, BraTS-2023 naming) to {out}")
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from brainmm.data.check import check_studies
    from brainmm.data.datasets import discover_studies

    studies = discover_studies(args.data)
    report = check_studies(studies, crop_size=tuple(args.crop), atlas_size=tuple(args.atlas),
                           read_values=not args.headers_only, num_workers=args.workers)
    print(report.format_table())
    if not report.ok:
        for line in report.problems:
            print(line, file=sys.stderr)
        return 1
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from brainmm.pretrain.config import PretrainConfig, demo_config
    from brainmm.pretrain.trainer import pretrain

    if args.config:
        cfg = PretrainConfig.from_yaml(args.config)
    elif args.data == "demo":
        cfg = demo_config()
    else:
        cfg = PretrainConfig()
    from brainmm._config import given_settings

    overrides = given_settings(args, ("data", "arch", "out", "epochs", "max_steps", "batch_size", "accumulation", "lr",
                                      "precision", "num_workers", "seed", "device"))
    if args.crop is not None:
        overrides["crop_size"] = list(args.crop)
    if args.mask_ratio is not None:
        overrides["objective.mask_ratio"] = args.mask_ratio
    if args.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    if args.compile:
        overrides["compile"] = True
    cfg = cfg.with_overrides(overrides).with_overrides(args.set or [])
    export = pretrain(cfg, resume=args.resume, show_progress=not args.no_progress)
    if int(__import__("os").environ.get("RANK", 0)) == 0:
        print(f"Exported the pre-trained encoder, templates and decoder to {export}. Load it with: "
              f"brainmm.create_model('local-dir:{Path(export).resolve()}')")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from brainmm import bench

    if args.what == "suite":
        report = bench.bench_suite(args.out, parts=tuple(args.parts or bench.SUITE_PARTS), device=args.device,
                                   warmup=args.warmup, repeats=args.repeats, batch=args.batch, crop=args.crop,
                                   shape=tuple(args.shape), tiny=args.tiny)
        print(f"Wrote {report}")
        return 0
    if args.what == "masking":
        result = bench.bench_masking(batch=args.batch, crop=args.crop, warmup=args.warmup, repeats=args.repeats,
                                     device=args.device)
    elif args.what == "loader":
        result = bench.bench_loader(args.data, out=args.out, crop=args.crop, studies=args.studies,
                                    num_workers=args.workers, atlas=tuple(args.atlas) if args.atlas else None)
    elif args.what == "ops":
        result = bench.bench_ops(batch=args.batch, crop=args.crop, warmup=args.warmup, repeats=args.repeats,
                                 device=args.device,
                                 precisions=tuple(args.variants) if args.variants else ("fp32", "bf16"))
    elif args.what == "pretrain-step":
        result = bench.bench_pretrain_step(args.arch, batch=args.batch, crop=args.crop,
                                           variants=tuple(args.variants or ["eager-fp32"]), warmup=args.warmup,
                                           repeats=args.repeats, device=args.device,
                                           channels_last=args.channels_last, baseline=args.baseline,
                                           baseline_batch=args.baseline_batch,
                                           profile=args.profile,
                                           atlas=tuple(args.atlas) if args.atlas else (240, 240, 155))
    else:
        result = bench.bench_inference(args.arch, shape=tuple(args.shape), roi=args.crop,
                                       variants=tuple(args.variants or ["fp32", "bf16"]),
                                       sw_batch_size=args.batch, warmup=args.warmup, repeats=args.repeats,
                                       device=args.device, baseline=not args.no_baseline)
    print(bench.format_result(result))
    if args.json:
        print(f"Wrote {bench.write_json(result, args.json)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainmm",
        description="BrainMVP multi-modal pre-training for 3D brain MRI: encoders, weights, pre-training.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=fn)
        return p

    p = add("list", _cmd_list, "list registered models (or pretrained weights) matching an optional filter")
    p.add_argument("filter", nargs="?", default="", help="fnmatch pattern, e.g. 'mmvp_*'")
    p.add_argument("--pretrained", action="store_true", help="list 'arch.tag' weights instead of architectures")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (as in the README)")

    p = add("info", _cmd_info, "print a model's configuration, parameters, modalities and preprocessing")
    p.add_argument("name", help="arch, arch.tag, hf-hub:org/repo[@rev] or local-dir:PATH")
    p.add_argument("--pretrained", action="store_true", help="also load the weights and print the load report")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("convert-official", _cmd_convert_official,
            "convert an official BrainMVP checkpoint (.pt) into a brainmm folder (safetensors + config + card)")
    p.add_argument("checkpoint", help="official checkpoint, e.g. model_final.pt (with or without 'module.')")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--arch", choices=["mmvp_uniformer", "mmvp_unet"], default=None,
                   help="architecture (detected from the keys when omitted)")
    p.add_argument("--allow-unmapped", action="store_true", help="convert even if some keys map to nothing")

    p = add("convert-monai-swin", _cmd_convert_monai_swin,
            "convert MONAI SwinUNETR weights: self-supervised (model_swinvit.pt) into an mmvp_swin encoder folder, "
            "or a fine-tuned SwinUNETR (--segmentation) into the mmvp_swin segmentation adapter")
    p.add_argument("checkpoint", help="model_swinvit.pt (with or without module./swin_vit. prefixes), or with "
                   "--segmentation a fine-tuned SwinUNETR state dict")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--segmentation", action="store_true",
                   help="the checkpoint is a fine-tuned SwinUNETR: convert it into the mmvp_swin segmentation adapter")
    p.add_argument("--modalities", nargs="+", default=None, help="--segmentation: input channels in order")
    p.add_argument("--labels", default=None, help="--segmentation: label scheme (brats2023, brats2021, classes:K)")
    p.add_argument("--allow-unmapped", action="store_true", help="convert even if some keys map to nothing")

    p = add("register-local", _cmd_register_local,
            "register a brainmm folder (e.g. a converted official checkpoint) as a pretrained tag on this machine")
    p.add_argument("directory", help="folder with model.safetensors + config.json")
    p.add_argument("--name", required=True, help="arch.tag, e.g. mmvp_uniformer.brainmvp")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tag of the same name")

    p = add("download", _cmd_download, "download a weight into the Hugging Face cache (for later offline use)")
    p.add_argument("name", help="arch.tag or hf-hub:org/repo[@rev]")
    p.add_argument("--revision", default=None)
    p.add_argument("--cache-dir", default=None)

    p = add("features", _cmd_features, "extract pooled and per-stage features of a study or NIfTI file")
    p.add_argument("--model", required=True, help="arch[.tag], hf-hub:... or local-dir:...")
    p.add_argument("--input", required=True, help="a NIfTI file or a study folder (BraTS/BIDS naming)")
    p.add_argument("--output", required=True, help="output .npz")
    p.add_argument("--modalities", nargs="+", default=None,
                   help="modality of each input (a NIfTI file needs one; a folder's are detected)")
    p.add_argument("--random-init", action="store_true", help="do not load pretrained weights (for testing)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--save-maps", action="store_true", help="also store the stage maps (float16; large)")

    p = add("synth", _cmd_synth, "write a synthetic multi-parametric brain-phantom dataset (NIfTI, BraTS-2023 names)")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--studies", type=int, default=24, help="number of studies (default 24)")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48), metavar=("H", "W", "D"),
                   help="grid size in voxels (1 mm); 240 240 155 for the SRI24 grid (default 64 64 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--missing-prob", type=float, default=0.2, help="probability that a modality is missing")
    p.add_argument("--overwrite", action="store_true", help="rewrite an existing dataset")

    p = add("check-data", _cmd_check_data,
            "validate every study of a dataset before a long run (readable, 3-D, same grid, finite, not empty)")
    p.add_argument("data", help="a BraTS/BIDS folder, a BrainMVP json list, or a CSV/JSON manifest")
    p.add_argument("--crop", type=int, nargs=3, default=(96, 96, 96), metavar=("H", "W", "D"))
    p.add_argument("--atlas", type=int, nargs=3, default=(240, 240, 155), metavar=("H", "W", "D"))
    p.add_argument("--headers-only", action="store_true", help="check headers only (fast; skips value checks)")
    p.add_argument("--workers", type=int, default=2, help="reader threads")

    p = add("pretrain", _cmd_pretrain, "pre-train an encoder with the three BrainMVP proxy tasks "
            "(torchrun --nproc_per_node N -m brainmm pretrain ... for several GPUs)")
    p.add_argument("--data", default=None, help="dataset path, or 'demo' to synthesise phantoms (default: demo)")
    p.add_argument("--arch", default=None, help="encoder architecture (default mmvp_uniformer; demo: *_tiny)")
    p.add_argument("--config", default=None, help="YAML file of settings (see brainmm.pretrain.PretrainConfig)")
    p.add_argument("--out", default=None, help="run folder (checkpoints, TensorBoard, previews, export)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--accumulation", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--crop", type=int, nargs=3, default=None, metavar=("H", "W", "D"))
    p.add_argument("--mask-ratio", type=float, default=None, help="0.8 (official code) or 0.875 (paper)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing (less memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE",
                   help="any other setting, e.g. objective.contrastive_start_epoch=500 warmup_steps=100")

    p = add("bench", _cmd_bench, "measure speed: pretrain-step, inference, ops, loader, masking, or the GPU suite "
            "(table + JSON)")
    p.add_argument("what", choices=["pretrain-step", "inference", "ops", "loader", "masking", "suite"])
    p.add_argument("--arch", default="mmvp_uniformer", help="encoder (pretrain-step, inference)")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--crop", type=int, default=96, help="cubic crop size")
    p.add_argument("--atlas", type=int, nargs=3, default=None, metavar=("H", "W", "D"),
                   help="atlas grid (default 240 240 155 for SRI24 data)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="pretrain-step: MODE-PRECISION[+triton][+cl], e.g. eager-fp32 eager-bf16 compile-bf16+triton "
                        "(default eager-fp32); inference: [compile-]fp32|bf16[+triton]; ops: fp32 bf16")
    p.add_argument("--channels-last", action="store_true", help="pretrain-step: channels_last_3d for every variant")
    p.add_argument("--baseline", action="store_true",
                   help="pretrain-step: add MONAI SwinUNETR's train step (batch 2) for each mode-precision")
    p.add_argument("--baseline-batch", type=int, default=2, help="pretrain-step: SwinUNETR baseline batch (2)")
    p.add_argument("--profile", action="store_true", help="pretrain-step: top operators / GPU kernels per variant")
    p.add_argument("--parts", nargs="+", default=None,
                   help="suite: which parts, in order (default all: pretrain-uniformer ops inference "
                        "compile-uniformer pretrain-swin)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data", default="demo", help="loader/inference: dataset path or 'demo'")
    p.add_argument("--studies", type=int, default=8, help="loader: number of studies")
    p.add_argument("--workers", type=int, default=2, help="loader: DataLoader workers")
    p.add_argument("--out", default="runs/bench",
                   help="loader: scratch folder (cache, demo data); suite: report folder")
    p.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155), metavar=("H", "W", "D"),
                   help="inference: volume size")
    p.add_argument("--no-baseline", action="store_true", help="inference: skip MONAI SwinUNETR")
    p.add_argument("--tiny", action="store_true", help="suite: the *_tiny encoders (a smoke run)")
    p.add_argument("--json", default=None, help="also write the result as JSON")

    # Subcommands of other areas register themselves through the same `add` (their modules import lazily).
    from brainmm.adapters import commands as adapter_commands

    adapter_commands.register(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("brainmm: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as err:
        if args.debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"brainmm {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
