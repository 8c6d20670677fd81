"""Convert official BrainMVP checkpoints into brainmm folders (safetensors + config.json + card).

The official checkpoint is ``torch.save({"state_dict": sd, "current_epoch": ..., ...})``; keys may carry the
``module.`` prefix of DistributedDataParallel. It is read with ``torch.load(weights_only=True)`` (no arbitrary
pickle code), every key is mapped or explicitly dropped, and anything else is reported.

Key mapping:
- UniFormer: ``encoder.uniformer.<k>`` -> ``<k>``; 5-D kernels are permuted ``(O, I, d, h, w) -> (O, I, h, w, d)``
  because the official encoder permutes its input to (D, H, W) while brainmm runs in the input's (H, W, D) order.
  ``decoder.decoder{5,4,3,2}.transp_conv.conv.weight`` -> ``decoder.ups.{0,1,2,3}.weight`` (these run on maps
  already back in input order, so they are not permuted; checked against the reference reconstruction) and
  ``decoder.out_1.conv.conv.*`` -> ``decoder.head.*``. The official decoder also registers ``conv_block`` and
  ``proj1`` modules its forward never uses: dropped.
- UNet: encoder keys unchanged, ``up*`` -> ``decoder.up*``.
- ``rep_template`` ``[8, 240, 240, 155]`` -> ``templates.<modality>`` in the order flair, t1, t1c, t2, mra, pd, dwi,
  adc (min-max normalised on export, as BrainMVP uses them).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data.modalities import MODALITIES

logger = logging.getLogger(__name__)

OFFICIAL_ARCHS = ("mmvp_uniformer", "mmvp_unet")
_UNIFORMER_UNUSED = re.compile(r"^decoder\.(decoder\d+\.conv_block\.|proj1\.)")
_UNIFORMER_UPS = {f"decoder.decoder{n}.transp_conv.conv.weight": f"ups.{i}.weight" for i, n in enumerate((5, 4, 3, 2))}


@dataclass
class ConversionResult:
    architecture: str
    encoder: dict[str, torch.Tensor]
    decoder: dict[str, torch.Tensor]
    templates: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.architecture}: {len(self.encoder)} encoder tensors, {len(self.decoder)} decoder tensors, "
                f"{len(self.templates)} templates; dropped {len(self.dropped)} unused official tensors"
                + (f"; UNMAPPED {self.unmapped}" if self.unmapped else ""))


def load_official_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an official checkpoint safely: returns (state dict without ``module.``, scalar metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Official checkpoint {str(path)!r} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises many types for bad files)
        raise ValueError(f"Could not read {str(path)!r} as a PyTorch checkpoint with weights_only=True: "
                         f"{type(err).__name__}: {str(err).splitlines()[0]}") from err
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and any(k in obj for k in ("state_dict", "model", "net")):
        for k, v in obj.items():
            if isinstance(v, (int, float, str, bool)):
                meta[k] = v
        sd = next(obj[k] for k in ("state_dict", "model", "net") if k in obj)
    else:
        sd = obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{str(path)!r} holds no state dict of tensors (expected a dict, optionally under "
                         "'state_dict').")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return sd, meta


def detect_architecture(sd: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("encoder.uniformer.") for k in sd):
        return "mmvp_uniformer"
    if "conv1a.weight" in sd and "ds1.weight" in sd:
        return "mmvp_unet"
    raise ValueError(f"Not an official BrainMVP UniFormer or UNet state dict (first keys: {list(sd)[:5]}).")


def _split_templates(t: torch.Tensor) -> dict[str, torch.Tensor]:
    if t.ndim != 4 or t.shape[0] != len(MODALITIES):
        raise ValueError(f"rep_template has shape {tuple(t.shape)}; expected [{len(MODALITIES)}, H, W, D].")
    return {m: t[i].clone() for i, m in enumerate(MODALITIES)}


def convert_state_dict(sd: dict[str, torch.Tensor], arch: str | None = None) -> ConversionResult:
    """Map an official state dict (no ``module.`` prefix) to brainmm encoder/decoder/template tensors."""
    arch = arch or detect_architecture(sd)
    if arch not in OFFICIAL_ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(OFFICIAL_ARCHS)}, got {arch!r}.")
    res = ConversionResult(architecture=arch, encoder={}, decoder={}, templates={})
    for k, v in sd.items():
        if k == "rep_template":
            res.templates = _split_templates(v)
        elif arch == "mmvp_uniformer":
            if k.startswith("encoder.uniformer."):
                res.encoder[k[len("encoder.uniformer."):]] = v.permute(0, 1, 3, 4, 2).contiguous() if v.ndim == 5 else v
            elif k in _UNIFORMER_UPS:
                res.decoder[_UNIFORMER_UPS[k]] = v
            elif k.startswith("decoder.out_1.conv.conv."):
                res.decoder["head." + k.rsplit(".", 1)[-1]] = v
            elif _UNIFORMER_UNUSED.match(k):
                res.dropped.append(k)
            else:
                res.unmapped.append(k)
        else:
            if k.startswith("up"):
                res.decoder[k] = v
            elif re.match(r"^(conv\d[a-d]|ds\d)\.", k):
                res.encoder[k] = v
            else:
                res.unmapped.append(k)
    return res


def convert_official(checkpoint: str | Path, out_dir: str | Path, *, arch: str | None = None,
                     strict: bool = True, tag: str = "brainmvp") -> Path:
    """Convert an official checkpoint into a brainmm folder loadable with ``create_model("local-dir:OUT_DIR")``."""
    from . import hub
    from .models import create_model, load_encoder_weights

    sd, meta = load_official_checkpoint(checkpoint)
    res = convert_state_dict(sd, arch)
    if res.unmapped and strict:
        raise ValueError(f"{len(res.unmapped)} key(s) of {str(checkpoint)!r} map to nothing in {res.architecture}: "
                         f"{res.unmapped[:8]}. Is --arch right? (strict=False converts the rest.)")
    for k in res.unmapped:
        logger.warning("Unmapped official key %s (skipped)", k)
    model = create_model(res.architecture)
    # A converted folder lives on this machine until someone publishes it (hub/ sets the Hub fields then).
    model.pretrained_cfg = model.pretrained_cfg.replace(tag=tag or "", status="local", hf_hub_id=None)
    report = load_encoder_weights(model, res.encoder, source=str(checkpoint), strict=True)
    decoder = None
    if res.decoder:
        decoder = model.build_reconstruction_decoder()
        decoder.load_state_dict(res.decoder, strict=True)
    provenance = {"converted_from": Path(checkpoint).name, "source_sha256": hub.sha256_file(checkpoint),
                  "official_metadata": meta, "dropped_official_keys": res.dropped}
    recipe = ("Converted from the official BrainMVP checkpoint"
              + (f" (epoch {meta['current_epoch']})" if "current_epoch" in meta else "")
              + " with `brainmm convert-official`.")
    out = hub.save_pretrained(model, out_dir, templates=res.templates, decoder=decoder, provenance=provenance,
                              card={"recipe": recipe})
    logger.info("%s; %s", res.summary(), report.summary().splitlines()[0])
    return out


# ---------------------------------------------------------------------------------------------- MONAI SwinUNETR
_SWIN_PREFIXES = ("module.", "swin_vit.", "swinViT.", "model.")
_SWIN_SSL_HEADS = re.compile(r"^(rotation_pre|rotation_head|contrastive_pre|contrastive_head|conv|norm)\b")


def convert_monai_swin_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Map MONAI Swin weights (the self-supervised ``model_swinvit.pt`` layout or a bare ``swinViT`` state dict,
    with or without ``module.`` / ``swin_vit.`` / ``swinViT.`` prefixes, old ``mlp.fc1/fc2`` or new
    ``mlp.linear1/linear2`` names) to ``mmvp_swin`` keys. Returns (encoder tensors, dropped SSL-head keys, unmapped)."""
    encoder, dropped, unmapped = {}, [], []
    for key, value in sd.items():
        k = key
        changed = True
        while changed:  # prefixes can stack, e.g. "module.swinViT."
            changed = False
            for p in _SWIN_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        k = k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        if k.startswith(("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")):
            encoder[k] = value
        elif _SWIN_SSL_HEADS.match(k):
            dropped.append(key)
        else:
            unmapped.append(key)
    return encoder, dropped, unmapped


def convert_monai_swin(checkpoint: str | Path, out_dir: str | Path, *, arch: str = "mmvp_swin",
                       strict: bool = True) -> Path:
    """Convert MONAI SwinUNETR self-supervised weights (``model_swinvit.pt``) into an ``mmvp_swin`` folder."""
    from . import hub
    from .models import create_model, load_encoder_weights

    sd, meta = load_official_checkpoint(checkpoint)
    encoder_sd, dropped, unmapped = convert_monai_swin_state_dict(sd)
    if unmapped and strict:
        raise ValueError(f"{len(unmapped)} key(s) of {str(checkpoint)!r} are not MONAI Swin weights: {unmapped[:8]}.")
    in_chans = encoder_sd["patch_embed.proj.weight"].shape[1] if "patch_embed.proj.weight" in encoder_sd else 1
    feature = encoder_sd["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in encoder_sd else 48
    model = create_model(arch, in_chans=in_chans, feature_size=feature)
    model.pretrained_cfg = model.pretrained_cfg.replace(tag="", status="local", hf_hub_id=None, description=(
        "MONAI SwinUNETR self-supervised Swin 3D weights converted with `brainmm convert-monai-swin`."), data="")
    load_encoder_weights(model, encoder_sd, source=str(checkpoint), strict=True)
    provenance = {"converted_from": Path(checkpoint).name, "source_sha256": hub.sha256_file(checkpoint),
                  "dropped_ssl_head_keys": dropped, "source_metadata": meta}
    return hub.save_pretrained(model, out_dir, provenance=provenance,
                               card={"recipe": "Converted from MONAI's SwinUNETR self-supervised weights."})


def convert_monai_swinunetr(checkpoint: str | Path, out_dir: str | Path, *, modalities: list[str],
                            labels: str | None = None, strict: bool = True) -> Path:
    """Convert a fine-tuned MONAI ``SwinUNETR`` checkpoint (state dict, optionally under ``state_dict``/``model``,
    optionally ``module.``-prefixed) into the ``mmvp_swin`` segmentation adapter, whose layout is SwinUNETR's.

    ``modalities`` names the checkpoint's input channels in order (required: the channel order of BraTS models
    differs between projects); ``labels`` the output scheme (default ``classes:K``).
    The deep-supervision heads, which SwinUNETR lacks, are newly initialised and reported.
    """
    from .adapters.segmentation import create_segmentation_model
    from .data.modalities import canonical_modalities

    sd, meta = load_official_checkpoint(checkpoint)
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    if "swinViT.patch_embed.proj.weight" not in sd or "out.conv.conv.weight" not in sd:
        raise ValueError(f"{str(checkpoint)!r} is not a MONAI SwinUNETR state dict (needs swinViT.* and out.* keys; "
                         "for the self-supervised model_swinvit.pt use `brainmm convert-monai-swin`).")
    mods = canonical_modalities(modalities, argument="--modalities")
    stem = sd["swinViT.patch_embed.proj.weight"]
    if stem.shape[1] != len(mods):
        raise ValueError(f"The checkpoint takes {stem.shape[1]} input channels but --modalities names {len(mods)}: "
                         f"{list(mods)}.")
    feature = int(stem.shape[0])
    num_classes = int(sd["out.conv.conv.weight"].shape[0])
    arch = "mmvp_swin" if feature == 48 else "mmvp_swin_tiny" if feature == 12 else None
    if arch is None:
        raise ValueError(f"SwinUNETR feature_size {feature} has no brainmm architecture (48: mmvp_swin).")
    model = create_segmentation_model(arch, modalities=list(mods), labels=labels or f"classes:{num_classes}",
                                      decoder="swinunetr")
    if model.num_classes != num_classes:
        raise ValueError(f"--labels {labels!r} gives {model.num_classes} output channels; the checkpoint has "
                         f"{num_classes}.")
    own = model.state_dict()
    unexpected = sorted(k for k in sd if k not in own)
    if unexpected and strict:
        raise ValueError(f"{len(unexpected)} key(s) of {str(checkpoint)!r} are not SwinUNETR keys: {unexpected[:8]}.")
    result = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    new = sorted(result.missing_keys)
    if any(not k.startswith("ds_heads.") for k in new):
        raise ValueError(f"{str(checkpoint)!r} lacks SwinUNETR tensors: {[k for k in new if 'ds_heads' not in k][:8]}.")
    model.load_report.copied = sorted(k for k in sd if k in own)
    model.load_report.initialised = new
    model.load_report.adapted = {}
    model.load_report.ignored = unexpected
    model.load_report.source = str(checkpoint)
    logger.info("%s", model.load_report.summary())
    return model.save_pretrained(out_dir, card={"recipe": "Converted from a fine-tuned MONAI SwinUNETR checkpoint "
                                                          "with `brainmm convert-monai-swin --segmentation`."},
                                 provenance={"converted_from": Path(checkpoint).name, "source_metadata": meta,
                                             "newly_initialised": new})
