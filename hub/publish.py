#!/usr/bin/env python
"""Build, verify and (with --push) publish one brainmm weight to the Hugging Face Hub.

    python hub/publish.py hub/weights/mmvp_uniformer.brainmvp.yaml            # dry run: build + verify + plan
    python hub/publish.py hub/weights/mmvp_uniformer.brainmvp.yaml --push     # upload in one commit

The folder it builds holds ``model.safetensors``, ``config.json`` (with the Hub fields, licence, data, metrics and
provenance), the model card ``README.md``, ``templates.png`` when the weight carries templates, and
``golden.safetensors``: a fixed input and the features the weight must produce. Verification reloads the folder
through ``brainmm.create_model("local-dir:...")`` and compares with the golden tensors, checks the recorded sha256,
and refuses any pickle file. Not part of the installed package: this is the maintainers' tool (see hub/README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

import brainmm
from brainmm import hub
from brainmm.cards import render_card

SOURCE_KINDS = ("official", "folder", "monai-swin")
GOLDEN_NAME = "golden.safetensors"


@dataclass
class WeightConfig:
    """One published weight (one YAML file in hub/weights/)."""

    name: str  # registry name arch.tag
    repo_id: str
    source: dict[str, Any]  # {kind: official|folder|monai-swin, path: ..., [arch: ...]}
    license: str = "apache-2.0"
    revision: str | None = None
    description: str = ""
    data: str = ""
    datasets: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    golden_size: int = 64

    @classmethod
    def from_yaml(cls, path: str | Path) -> WeightConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Publish config {str(path)!r} does not exist.")
        raw = yaml.safe_load(path.read_text()) or {}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path.name}: unknown key(s) {unknown}; allowed: {', '.join(sorted(known))}.")
        for key in ("name", "repo_id", "source"):
            if key not in raw:
                raise ValueError(f"{path.name}: missing required key {key!r}.")
        cfg = cls(**raw)
        kind = cfg.source.get("kind")
        if kind not in SOURCE_KINDS:
            raise ValueError(f"{path.name}: source.kind must be one of {SOURCE_KINDS}, got {kind!r}.")
        src = Path(str(cfg.source.get("path", "")))
        cfg.source["path"] = str(src if src.is_absolute() else (path.parent / src).resolve())
        arch, _, tag = cfg.name.partition(".")
        if not tag:
            raise ValueError(f"{path.name}: name must be 'arch.tag', got {cfg.name!r}.")
        if arch not in brainmm.list_models():
            raise ValueError(f"{path.name}: unknown architecture {arch!r}; known: {', '.join(brainmm.list_models())}.")
        return cfg


def build_folder(cfg: WeightConfig, out_dir: str | Path) -> Path:
    """Materialise the weight's folder from its source, then stamp the Hub fields into config.json and the card."""
    from brainmm.convert import convert_monai_swin, convert_official

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    kind, src = cfg.source["kind"], Path(cfg.source["path"])
    arch, _, tag = cfg.name.partition(".")
    if kind == "official":
        convert_official(src, out, arch=cfg.source.get("arch", arch), tag=tag)
    elif kind == "monai-swin":
        convert_monai_swin(src, out, arch=arch)
    else:
        if not (src / hub.WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"source folder {str(src)!r} has no {hub.WEIGHTS_NAME}.")
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.pt", "*.pth", "*.bin", "*.ckpt"))
    config = json.loads((out / hub.CONFIG_NAME).read_text())
    if config["architecture"] != arch:
        raise ValueError(f"source holds a {config['architecture']!r} model, but the config names {arch!r}.")
    pc = config["pretrained_cfg"]
    pc.update(architecture=arch, tag=tag, hf_hub_id=cfg.repo_id, hf_hub_revision=cfg.revision, status="published",
              license=cfg.license, local_dir=None, sha256=config["provenance"]["sha256"])
    if cfg.description:
        pc["description"] = cfg.description
    if cfg.data:
        pc["data"] = cfg.data
    if cfg.metrics:
        pc["metrics"] = cfg.metrics
    hub.write_json(out / hub.CONFIG_NAME, config)
    model = brainmm.create_model(f"local-dir:{out}")
    card = render_card(config, repo_id=cfg.repo_id, datasets=cfg.datasets or None,
                       num_params=sum(p.numel() for p in model.parameters()), feature_info=model.feature_info,
                       size_divisor=model.size_divisor, num_features=model.num_features,
                       recipe=_recipe_from_card(out / hub.CARD_NAME))
    (out / hub.CARD_NAME).write_text(card)
    write_golden(out, cfg.golden_size)
    return out


def _recipe_from_card(card_path: Path) -> str:
    """Keep the recipe paragraph the export wrote (it describes the run that made the weight)."""
    if not card_path.is_file():
        return ""
    text = card_path.read_text()
    if "## Training data and recipe" not in text:
        return ""
    body = text.split("## Training data and recipe", 1)[1].split("\n## ", 1)[0].strip().split("\n\n")
    return body[-1] if len(body) > 1 else ""


@torch.no_grad()
def golden_outputs(model: torch.nn.Module, size: int) -> dict[str, torch.Tensor]:
    s = max(size, model.size_divisor) // model.size_divisor * model.size_divisor
    x = torch.rand(1, model.in_chans, s, s, s, generator=torch.Generator().manual_seed(20250611))
    maps = model.eval().forward_intermediates(x)
    out = {"input": x, "pooled": model.forward_head(maps[-1])}
    out.update({f"stage{i}.channel_mean": m.mean(dim=(2, 3, 4)) for i, m in enumerate(maps, start=1)})
    return out


def write_golden(folder: Path, size: int) -> None:
    model = brainmm.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in golden_outputs(model, size).items()}, str(folder / GOLDEN_NAME))


def verify_folder(folder: str | Path, rtol: float = 1e-4) -> list[str]:
    """Re-load the folder as a user would and check it: returns a list of problems (empty = good)."""
    folder = Path(folder)
    problems = []
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in {".pt", ".pth", ".bin", ".ckpt", ".pkl"})
    if pickles:
        problems.append(f"pickle files present: {pickles}")
    config = json.loads((folder / hub.CONFIG_NAME).read_text())
    recorded = config["provenance"].get("sha256")
    actual = hub.sha256_file(folder / hub.WEIGHTS_NAME)
    if recorded != actual:
        problems.append(f"sha256 of model.safetensors is {actual}, config.json records {recorded}")
    model = brainmm.create_model(f"local-dir:{folder}")
    if model.load_report.initialised or model.load_report.ignored:
        problems.append(f"load report not clean: {model.load_report.summary()}")
    golden = load_file(str(folder / GOLDEN_NAME))
    with torch.no_grad():
        maps = model.eval().forward_intermediates(golden["input"])
        got = {"pooled": model.forward_head(maps[-1])}
        got.update({f"stage{i}.channel_mean": m.mean(dim=(2, 3, 4)) for i, m in enumerate(maps, start=1)})
    for key, want in golden.items():
        if key == "input":
            continue
        if key not in got or got[key].shape != want.shape:
            problems.append(f"golden {key}: missing or shape {tuple(want.shape)} differs")
            continue
        err = float((got[key] - want).abs().max() / want.abs().max().clamp_min(1e-6))
        if err > rtol:
            problems.append(f"golden {key}: relative error {err:.2e} > {rtol:g}")
    card = (folder / hub.CARD_NAME).read_text()
    front = yaml.safe_load(card.split("---")[1]) if card.startswith("---") else None
    if not front or front.get("library_name") != "brainmm":
        problems.append("model card has no YAML front matter with library_name: brainmm")
    return problems


def upload_plan(folder: Path, cfg: WeightConfig) -> str:
    config = json.loads((folder / hub.CONFIG_NAME).read_text())
    lines = [f"Would upload to {cfg.repo_id}" + (f"@{cfg.revision}" if cfg.revision else "") + " in one commit:"]
    for p in sorted(folder.iterdir()):
        lines.append(f"  {p.name:<22} {p.stat().st_size / 1e6:9.2f} MB")
    arch, _, tag = cfg.name.partition(".")
    lines.append("Registry line for brainmm/models/<family>.py default_cfgs:")
    lines.append(f'  "{cfg.name}": _cfg(hf_hub_id="{cfg.repo_id}", '
                 + (f'hf_hub_revision="{cfg.revision}", ' if cfg.revision else "")
                 + f'sha256="{config["provenance"]["sha256"]}", license="{cfg.license}", ...),')
    return "\n".join(lines)


def publish(config_path: str | Path, *, out_dir: str | Path | None = None, push: bool = False,
            token: str | None = None) -> tuple[Path, str]:
    """Build + verify; with ``push`` upload. Returns (folder, plan or commit URL)."""
    cfg = WeightConfig.from_yaml(config_path)
    folder = build_folder(cfg, out_dir or Path("hub/build") / cfg.name)
    problems = verify_folder(folder)
    if problems:
        raise ValueError(f"{cfg.name}: verification failed: " + "; ".join(problems))
    if not push:
        return folder, upload_plan(folder, cfg)
    url = hub.upload_folder(folder, cfg.repo_id, revision=cfg.revision, token=token,
                            commit_message=f"Publish {cfg.name} (brainmm {brainmm.__version__})")
    return folder, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build, verify and publish a brainmm weight (dry run by default).")
    parser.add_argument("config", help="hub/weights/<arch.tag>.yaml")
    parser.add_argument("--out", default=None, help="build folder (default hub/build/<arch.tag>)")
    parser.add_argument("--push", action="store_true", help="upload to the Hub (default: dry run)")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: the logged-in one)")
    args = parser.parse_args(argv)
    try:
        folder, result = publish(args.config, out_dir=args.out, push=args.push, token=args.token)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"publish: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"Built and verified {folder}")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
