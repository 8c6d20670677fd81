"""Model cards rendered from the templates in ``model_cards/`` with ``huggingface_hub.ModelCard``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

TEMPLATES = {"encoder": "encoder.md", "segmentation": "segmentation.md", "classification": "classification.md"}
# Hugging Face pipeline tag per model type.
PIPELINE_TAGS = {"encoder": "image-feature-extraction", "segmentation": "image-segmentation",
                 "classification": "image-classification"}


def template_path(model_type: str) -> Path:
    """Path of the card template for a model type (``encoder``, ...)."""
    if model_type not in TEMPLATES:
        raise ValueError(f"No model card template for model_type {model_type!r}; known: {', '.join(TEMPLATES)}.")
    # In a checkout / editable install the templates live in the top-level model_cards/ folder; in a wheel they
    # ship as the package brainmm.model_cards (see pyproject.toml).
    local = Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATES[model_type]
    if local.is_file():
        return local
    return Path(str(resources.files("brainmm.model_cards").joinpath(TEMPLATES[model_type])))


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "No downstream metrics recorded for this weight yet."
    rows = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(rows)


def render_card(config: dict[str, Any], *, repo_id: str | None = None, recipe: str = "", num_params: int | None = None,
                tags: list[str] | None = None, datasets: list[str] | None = None, base_model: str | None = None,
                **extra: Any) -> str:
    """Render the card for a saved folder's ``config.json`` dict; returns Markdown with YAML front matter."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = config["pretrained_cfg"]
    arch = config["architecture"]
    model_type = config.get("model_type", "encoder")
    mods = list(cfg.get("modalities") or [])
    contents = config.get("contents", {})
    parts = ["`model.safetensors`: the network weights"]
    if contents.get("templates"):
        parts.append(f"learned modality templates (min-max normalised): {', '.join(contents['templates'])}")
    if contents.get("decoder"):
        parts.append("the pre-training reconstruction decoder (`decoder.*`)")
    card_data = ModelCardData(
        library_name="brainmm",
        license=cfg.get("license") or "apache-2.0",
        tags=["brainmm", "medical-imaging", "mri", "3d", "self-supervised" if model_type == "encoder" else "fine-tuned",
              model_type, *(tags or [])],
        datasets=datasets,
        # A fine-tuned model's base is the published encoder it started from (the Hub only accepts repo ids here).
        base_model=base_model or (cfg.get("hf_hub_id") if model_type != "encoder" else None),
        pipeline_tag=PIPELINE_TAGS.get(model_type),
        model_name=repo_id or cfg.get("name") or arch,
    )
    feature_info = extra.pop("feature_info", None)
    kwargs = dict(
        model_name=repo_id or (f"{arch}.{cfg['tag']}" if cfg.get("tag") else arch),
        description=cfg.get("description") or f"A brainmm `{arch}` {model_type}.",
        load_name=_load_name(repo_id, cfg, arch, extra.pop("directory", None)),
        modalities=mods,
        modalities_text=", ".join(mods) if mods else "1 (modality-agnostic: one modality at a time)",
        architecture=arch,
        num_params=f"{num_params / 1e6:.2f} M" if num_params else "see config.json",
        in_chans=config["model_args"].get("in_chans", 1),
        size_divisor=extra.pop("size_divisor", "the model's total stride"),
        feature_text=", ".join(f"{f['num_chs']}@/{f['reduction']}" for f in feature_info) if feature_info else "-",
        num_features=extra.pop("num_features", "-"),
        orientation=cfg.get("orientation", "RAS"),
        spacing=tuple(cfg.get("spacing", (1, 1, 1))),
        foreground_text="centred foreground crop, " if cfg.get("foreground_crop") else "",
        intensity_text=_intensity_text(cfg.get("intensity", {})),
        atlas_size=tuple(cfg.get("atlas_size", ())),
        input_size=tuple(cfg.get("input_size", ())),
        contents_text="\n".join(f"- {p}" for p in parts),
        data=cfg.get("data") or "Not recorded.",
        recipe=recipe,
        metrics_text=_fmt_metrics(cfg.get("metrics") or {}),
        brainmm_version=config.get("provenance", {}).get("brainmm_version", "?"),
        git_commit=config.get("provenance", {}).get("git_commit"),
        sha256=config.get("provenance", {}).get("sha256", "recorded in config.json"),
        citation=cfg.get("citation", ""),
        modality_use=(f"Input channels, in order: {', '.join(mods)}." if mods else
                      "Modality-agnostic: it encodes one MRI modality per channel-1 input (any of flair, t1, t1c, "
                      "t2, mra, pd, dwi, adc); for several modalities build a multi-channel stem with modalities=."),
        templates_image="templates.png" if contents.get("templates") else None,
        config_hash=config.get("provenance", {}).get("config_hash"),
    )
    kwargs.update(extra)
    card = ModelCard.from_template(card_data, template_path=str(template_path(model_type)), **kwargs)
    return str(card)


def _load_name(repo_id: str | None, cfg: dict[str, Any], arch: str, directory: Any) -> str:
    """What a user types to load this weight: the Hub repo, the registered tag, or the folder itself."""
    if repo_id:
        return f"hf-hub:{repo_id}"
    if cfg.get("hf_hub_id") and cfg.get("tag"):
        return f"{arch}.{cfg['tag']}"
    if directory is not None:
        return f"local-dir:{directory}"
    return arch


def _intensity_text(intensity: dict[str, Any]) -> str:
    if intensity.get("method") == "percentile":
        return (f"per-channel percentiles p{intensity.get('lower', 5):g}..p{intensity.get('upper', 95):g} scaled to "
                f"{intensity.get('b_min', 0):g}..{intensity.get('b_max', 1):g}"
                f"{', clipped' if intensity.get('clip', True) else ''}")
    return str(intensity) if intensity else "none"
