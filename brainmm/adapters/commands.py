"""CLI subcommands of the downstream adapters (finetune, predict, evaluate, demo).

``register(add)`` is called by ``brainmm.cli.build_parser``; ``add(name, fn, help) -> argparse.ArgumentParser``.
Handlers import their heavy modules lazily so that ``brainmm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODALITIES = ("flair", "t1", "t1c", "t2")


def _is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    from .._config import parse_override

    return dict(parse_override(item) for item in items or [])


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .._config import given_settings
    from .finetune import FinetuneConfig, finetune

    explicit = given_settings(args, ("encoder", "data", "labels", "out", "epochs", "max_steps", "batch_size", "lr",
                                     "label_fraction", "val_fraction", "val_every", "decoder", "mode", "pool", "head",
                                     "layer_decay", "modality_dropout", "precision", "device", "num_workers", "seed",
                                     "optimizer", "sw_overlap"))
    if args.crop is not None:
        explicit["crop_size"] = tuple(args.crop)
    if args.modalities is not None:
        explicit["modalities"] = tuple(args.modalities)
    if args.classes is not None:
        explicit["classes"] = tuple(args.classes)
    if args.no_deep_supervision:
        explicit["deep_supervision"] = False
    if args.no_augment:
        explicit["augment"] = False
    if args.random_init:
        explicit["pretrained"] = False
    explicit.update(_parse_sets(args.set))
    if (args.data or "demo") == "demo":
        cfg = FinetuneConfig.demo(args.task, **{"out": f"runs/finetune-{args.task}-demo", **explicit})
    else:
        cfg = FinetuneConfig.from_dict({"task": args.task, "out": f"runs/finetune-{args.task}", **explicit})
    result = finetune(cfg, resume=args.resume, show_progress=not args.no_progress)
    if _is_main():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != "n") or "no validation set"
        loader = "create_segmentation_model" if cfg.task == "segmentation" else "create_classification_model"
        print(f"Best epoch {result.best_epoch}: {shown}.\nSaved the best model to {result.best} (and the last to "
              f"{result.last}). Load it with brainmm.{loader}('local-dir:{result.best.resolve()}') or run "
              f"`brainmm predict --model {result.best} --input STUDY --output OUT`.")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference import predict

    out = predict(args.model, args.input, args.output, device=args.device, precision=args.precision,
                  overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                  roi_size=tuple(args.roi) if args.roi else None, threshold=args.threshold,
                  progress=None if args.quiet else print)
    print(f"Wrote predictions to {out} (predictions.csv + one <study_id>.nii.gz mask per study for segmentation).")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..data.datasets import discover_studies

    if (args.pred is None) == (args.model is None):
        raise ValueError("evaluate needs exactly one of --pred DIR (score written masks against the labels) or "
                         "--model DIR (run the model in the preprocessed space).")
    if args.pred is not None:
        from .labels import get_label_scheme
        from .metrics import evaluate_predictions, format_metric_table

        scheme = get_label_scheme(args.labels or "brats2023")
        studies = discover_studies(args.data)
        rows, summary = evaluate_predictions(args.pred, studies, scheme, hd95_empty=args.hd95_empty,
                                             output_csv=args.output)
        print(format_metric_table(summary, title=f"{len(rows)} studies, labels {scheme.name}, HD95 of a one-sided "
                                                 f"empty mask: {args.hd95_empty}"))
        if args.output:
            print(f"Per-study metrics: {args.output}")
        return 0

    from .evaluation import evaluate_modality_subsets, format_subset_table, prepare_data
    from .inference import amp_dtype_for, load_adapter, pick_device
    from .metrics import write_csv

    model = load_adapter(args.model)
    device = pick_device(args.device)
    model.to(device).eval()
    seg = model.model_type == "segmentation"
    with tempfile.TemporaryDirectory(prefix="brainmm-eval-") as tmp:
        # The preprocessed cache goes to --cache-dir (kept, reused by later calls) or a temporary folder.
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        studies, cache = prepare_data(args.data, model, with_label=seg, with_class=not seg, out_dir=work,
                                      cache_dir=args.cache_dir)
        subsets = None if args.missing_subsets else [model.modalities]
        rows = evaluate_modality_subsets(model, cache, studies, device=device,
                                         amp_dtype=amp_dtype_for(device, args.precision), overlap=args.overlap,
                                         sw_batch_size=args.sw_batch_size, subsets=subsets)
    print(f"{len(studies)} studies; model inputs {', '.join(model.modalities)}"
          f"{' (every non-empty subset; the rest filled with the learned templates)' if args.missing_subsets else ''}")
    print(format_subset_table(rows))
    if args.output:
        write_csv(args.output, rows)
        print(f"Table written to {args.output}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_demo_table, run_demo

    kwargs: dict[str, Any] = {"out": args.out, "ablation": args.ablation, "classification": not args.no_cls}
    for key in ("arch", "pretrain_steps", "finetune_steps", "cls_steps", "label_fraction", "pretrain_studies",
                "seg_studies", "cls_studies", "max_val_studies", "seed", "device", "shape"):
        value = getattr(args, key)
        if value is not None:
            kwargs[key] = value
    results = run_demo(DemoConfig(**kwargs), show_progress=not args.no_progress,
                       echo=None if args.quiet else print)
    print(format_demo_table(results))
    print(f"Results: {Path(args.out) / 'results.json'} and {Path(args.out) / 'results.md'}")
    return 0


def register(add: Callable[..., Any]) -> None:
    """Add the adapter subcommands to the ``brainmm`` parser."""
    p = add("finetune", _cmd_finetune, "fine-tune a segmentation or classification model on an encoder (the paper's "
            "recipe by default; torchrun --nproc_per_node N -m brainmm finetune ... for several GPUs)")
    p.add_argument("--task", required=True, choices=["seg", "cls"], help="segmentation or classification")
    p.add_argument("--encoder", default=None, help="encoder: arch[.tag], hf-hub:org/repo, local-dir:PATH (a "
                   "pre-training export) (default mmvp_uniformer; demo: mmvp_uniformer_tiny)")
    p.add_argument("--random-init", action="store_true", help="do not load the encoder's registry weights (scratch)")
    p.add_argument("--data", default=None, help="dataset folder or manifest, or 'demo' for synthetic phantoms")
    p.add_argument("--labels", default=None, help="label scheme for --task seg: brats2023 (ET=3; default), brats2021 "
                   "(ET=4), brats-ped/-met/-men/-ssa, binary, classes:K")
    p.add_argument("--classes", nargs="+", default=None, help="class names for --task cls (default: those in the "
                   "data's labels.csv, sorted)")
    p.add_argument("--modalities", nargs="+", default=None,
                   help=f"input channels by name (default {' '.join(DEFAULT_MODALITIES)})")
    p.add_argument("--out", default=None, help="run folder (checkpoints, TensorBoard, overlays, best/ and last/)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the cosine schedule (paper: 300)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="per process (paper: 2)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (paper: 3e-4)")
    p.add_argument("--optimizer", choices=["adam", "adamw"], default=None)
    p.add_argument("--crop", type=int, nargs=3, default=None, metavar=("H", "W", "D"),
                   help="training crop and sliding-window ROI (seg; paper 96^3) or input size (cls)")
    p.add_argument("--label-fraction", type=float, default=None,
                   help="use a seeded, nested subset of this fraction of the training studies (data efficiency)")
    p.add_argument("--val-fraction", type=float, default=None, help="validation share of the studies (default 0.2)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N epochs")
    p.add_argument("--decoder", choices=["auto", "unetr", "swinunetr"], default=None)
    p.add_argument("--no-deep-supervision", action="store_true", help="train without the 1/2 and 1/4 heads")
    p.add_argument("--mode", choices=["full", "freeze", "linear_probe"], default=None, help="cls fine-tuning mode")
    p.add_argument("--pool", choices=["avg", "max", "avgmax"], default=None, help="cls pooling")
    p.add_argument("--head", choices=["mlp", "linear"], default=None, help="cls head")
    p.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay over encoder stages (1 = off)")
    p.add_argument("--modality-dropout", type=float, default=None,
                   help="drop each present modality with this probability (template fill) as augmentation")
    p.add_argument("--no-augment", action="store_true", help="no flips / intensity augmentation")
    p.add_argument("--sw-overlap", type=float, default=None, help="sliding-window overlap for validation (0.5)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="any other FinetuneConfig field, e.g. "
                   "samples_per_study=2 max_val_studies=10")

    p = add("predict", _cmd_predict, "predict masks (in each input's original grid) or class probabilities with a "
            "fine-tuned model")
    p.add_argument("--model", required=True, help="a fine-tuned model folder (OUT/best), local-dir:... or hf-hub:...")
    p.add_argument("--input", required=True, help="a study folder, a dataset folder or a manifest (CSV/JSON)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass")
    p.add_argument("--roi", type=int, nargs=3, default=None, metavar=("H", "W", "D"),
                   help="sliding-window ROI (default: the model's training crop)")
    p.add_argument("--threshold", type=float, default=0.5, help="sigmoid threshold of region outputs")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto (GPU if available, else CPU), cpu or cuda")
    p.add_argument("--quiet", action="store_true")

    p = add("evaluate", _cmd_evaluate, "score predicted masks (Dice, HD95 per region) or a model, optionally with "
            "every subset of its modalities (missing-modality table)")
    p.add_argument("--data", required=True, help="dataset folder or manifest with the reference labels")
    p.add_argument("--pred", default=None, help="folder of predicted masks (<study_id>.nii.gz, from brainmm predict)")
    p.add_argument("--model", default=None, help="a fine-tuned model folder: evaluate it in the preprocessed space")
    p.add_argument("--labels", default=None, help="label scheme of --pred masks (default brats2023)")
    p.add_argument("--hd95-empty", choices=["nan", "max"], default="nan",
                   help="HD95 when exactly one mask is empty: nan (left out of means) or max (volume diagonal)")
    p.add_argument("--missing-subsets", action="store_true",
                   help="with --model: score every non-empty subset of the model's modalities in one call")
    p.add_argument("--output", default=None, help="CSV of per-study metrics (--pred) or of the table (--model)")
    p.add_argument("--cache-dir", default=None, help="preprocessed cache for --model (default: a work folder)")
    p.add_argument("--work-dir", default=None, help="scratch folder for --model (default: a temporary folder)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch-size", type=int, default=2)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--device", default="auto")

    p = add("demo", _cmd_demo, "end-to-end demo on synthetic phantoms: pre-train a tiny encoder, fine-tune from it "
            "and from scratch, print the table (add --ablation for the proxy-task ablation)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--ablation", action="store_true", help="also pre-train CMR only and CMR + MD, and fine-tune each")
    p.add_argument("--arch", default=None, help="encoder architecture (default mmvp_uniformer_tiny)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pre-training optimizer steps (default 480)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="segmentation fine-tuning steps per arm (default 600)")
    p.add_argument("--cls-steps", type=int, default=None, help="classification fine-tuning steps per arm (default 300)")
    p.add_argument("--label-fraction", type=float, default=None,
                   help="labelled share of the segmentation training studies (default 0.25)")
    p.add_argument("--pretrain-studies", type=int, default=None)
    p.add_argument("--seg-studies", type=int, default=None)
    p.add_argument("--cls-studies", type=int, default=None)
    p.add_argument("--max-val-studies", type=int, default=None, help="cap the validation studies (faster)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("H", "W", "D"),
                   help="phantom grid (default 64 64 48)")
    p.add_argument("--no-cls", action="store_true", help="skip the classification runs")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no stage messages (the table is still printed)")
