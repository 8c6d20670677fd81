"""Feature extraction from NIfTI studies: the model's own preprocessing, then pooled and per-stage features."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def study_from_path(path: str | Path, modalities: list[str] | None = None) -> Any:
    """A ``Study`` from one NIfTI file (its modality from ``modalities`` or the file name) or from a study folder
    (each NIfTI's modality from its file name; ``*seg*`` label files are skipped)."""
    from .data.datasets import Study, modality_from_filename, nifti_stem
    from .data.modalities import canonical_modalities

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist.")
    if path.is_file():
        if nifti_stem(path.name) is None:
            raise ValueError(f"--input {str(path)!r} is not a NIfTI file (.nii or .nii.gz) or a study folder.")
        if modalities:
            if len(modalities) != 1:
                raise ValueError(f"A single NIfTI file has one modality; got --modalities {modalities}.")
            mod = canonical_modalities(modalities)[0]
        else:
            mod = modality_from_filename(path)
            if mod is None:
                raise ValueError(f"Cannot tell the modality of {path.name!r} from its name; pass --modalities NAME.")
        return Study(study_id=nifti_stem(path.name) or path.name, images={mod: path})
    images: dict[str, Path] = {}
    for f in sorted(path.iterdir()):
        stem = nifti_stem(f.name)
        if stem is None or "seg" in stem.lower().split("-")[-1].split("_")[-1]:
            continue
        mod = modality_from_filename(f)
        if mod is None:
            logger.warning("Skipping %s: no modality in its name.", f)
            continue
        if mod in images:
            raise ValueError(f"Study folder {str(path)!r} has two {mod} files: {images[mod].name} and {f.name}.")
        images[mod] = f
    if modalities:
        wanted = canonical_modalities(modalities)
        missing = [m for m in wanted if m not in images]
        if missing:
            raise ValueError(f"Study folder {str(path)!r} has no {missing} (found {sorted(images)}).")
        images = {m: images[m] for m in wanted}
    if not images:
        raise ValueError(f"No NIfTI image with a recognisable modality in {str(path)!r}.")
    return Study(study_id=path.name, images=images)


@torch.no_grad()
def extract_features(model_name: str, input_path: str | Path, *, modalities: list[str] | None = None,
                     pretrained: bool = True, device: str = "auto", save_maps: bool = False) -> dict[str, np.ndarray]:
    """Pooled and per-stage features of a study.

    A modality-agnostic (1-channel) encoder encodes each modality separately: keys ``pooled.<modality>`` and
    ``stage<i>.<modality>`` (channel means of stage i), and ``pooled`` is their mean. A multi-channel encoder
    encodes the stacked modalities once: keys ``pooled`` and ``stage<i>``. ``save_maps`` also stores the stage maps
    themselves (float16, ``map<i>[.<modality>]``).
    """
    from monai.transforms import DivisiblePad

    from .data.transforms import build_preprocessing
    from .models import create_model

    study = study_from_path(input_path, modalities)
    model = create_model(model_name, pretrained=pretrained)
    want_mods = tuple(model.pretrained_cfg.modalities)
    if model.in_chans > 1:
        if want_mods:
            missing = [m for m in want_mods if m not in study.images]
            if missing:
                raise ValueError(f"{model_name!r} expects modalities {list(want_mods)}; the input lacks {missing}.")
        elif len(study.images) != model.in_chans:
            raise ValueError(f"{model_name!r} takes {model.in_chans} channels; the input has {len(study.images)}.")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = model.to(dev).eval()
    order = want_mods if (model.in_chans > 1 and want_mods) else tuple(study.images)
    data = build_preprocessing(model.pretrained_cfg, order, place_in_atlas=False)(study)
    image = DivisiblePad(k=model.size_divisor)(data["image"])
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None].to(dev)
    out: dict[str, np.ndarray] = {"modalities": np.array(data["modalities"]), "input_shape": np.array(x.shape[2:])}
    if model.in_chans == 1:
        pooled = []
        for c, mod in enumerate(data["modalities"]):
            maps = model.forward_intermediates(x[:, c:c + 1])
            _store(out, maps, f".{mod}", save_maps)
            pooled.append(out[f"pooled.{mod}"])
        out["pooled"] = np.mean(pooled, axis=0)
    else:
        maps = model.forward_intermediates(x)
        _store(out, maps, "", save_maps)
    return out


def _store(out: dict[str, np.ndarray], maps: list[torch.Tensor], suffix: str, save_maps: bool) -> None:
    for i, fmap in enumerate(maps, start=1):
        out[f"stage{i}{suffix}"] = fmap.mean(dim=(2, 3, 4))[0].float().cpu().numpy()
        if save_maps:
            out[f"map{i}{suffix}"] = fmap[0].to(torch.float16).cpu().numpy()
    out[f"pooled{suffix}"] = out[f"stage{len(maps)}{suffix}"]


def extract_features_to_file(model_name: str, input_path: str | Path, output: str | Path, **kwargs: Any) -> Path:
    """``extract_features`` written to a compressed ``.npz``."""
    output = Path(output)
    if output.suffix != ".npz":
        raise ValueError(f"--output must end in .npz, got {str(output)!r}.")
    feats = extract_features(model_name, input_path, **kwargs)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.npz")
    np.savez_compressed(tmp, **feats)
    tmp.replace(output)
    return output
