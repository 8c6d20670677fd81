"""Prediction: sliding-window inference and writing results in the input's original grid.

``predict(model_dir, input, output)`` runs, for each study:

1. the model's own preprocessing (``build_preprocessing(model.pretrained_cfg, place_in_atlas=False)``: RAS,
   1 mm, intensity scaling, foreground box), exactly what training saw through the preprocessed cache;
2. the box's place in the atlas grid (``atlas_placement``), so absent modalities get the exact template window;
3. segmentation: sliding-window inference (MONAI, gaussian blending, ``overlap`` 0.5, bf16 autocast on GPU, CPU
   stitching as fallback when the GPU runs out of memory) -> label map in the scheme's values -> MONAI ``Invertd``
   through the recorded spatial transforms -> a NIfTI mask with the input's shape and affine (header copied from
   the input file); classification: the box resized to the training input -> softmax;
4. one CSV row per study (``predictions.csv``): class probabilities (classification), or the volume in ml and the
   highest probability of each region (segmentation; ``p_max`` is the model's belief that the region is present).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._runtime import pick_device
from ..data.datasets import Study
from ..data.transforms import atlas_placement, build_preprocessing
from .base import AdapterModel
from .datasets import resize_volume

logger = logging.getLogger(__name__)

__all__ = ["PredictionResult", "Predictor", "load_adapter", "pick_device", "predict", "sliding_window_logits"]


def amp_dtype_for(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype: ``auto`` is bf16 on GPU and fp32 (None) on CPU."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}.")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def load_adapter(model: str | Path | AdapterModel, **kwargs: Any) -> AdapterModel:
    """A saved segmentation/classification model from a folder, ``local-dir:`` or ``hf-hub:`` name (or the model)."""
    from .. import hub
    from .classification import create_classification_model
    from .segmentation import create_segmentation_model

    if isinstance(model, AdapterModel):
        return model
    name = str(model)
    if hub.parse_location(name) is None:
        if not Path(name).is_dir():
            raise FileNotFoundError(f"Model {name!r} is neither a folder nor a 'local-dir:'/'hf-hub:' name.")
        name = f"local-dir:{name}"
    model_type = hub.read_config(hub.parse_location(name)).get("model_type", "encoder")  # type: ignore[arg-type]
    if model_type == "segmentation":
        return create_segmentation_model(name, **kwargs)
    if model_type == "classification":
        return create_classification_model(name, **kwargs)
    raise ValueError(f"{name!r} holds a {model_type} model; predict needs a fine-tuned segmentation or "
                     "classification model (brainmm finetune writes one to OUT/best).")


def sliding_window_logits(model: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int], *,
                          overlap: float = 0.5, sw_batch_size: int = 2, device: torch.device | None = None,
                          amp_dtype: torch.dtype | None = None, progress: bool = False) -> torch.Tensor:
    """Logits ``(B, K, *S)`` float32 for ``image (B, C, *S)`` by MONAI sliding-window inference with gaussian
    blending. Windows run on ``device``; the stitched output lives there too, and moves to the CPU (retrying) when
    the GPU runs out of memory."""
    from monai.inferers import sliding_window_inference

    device = device or next(model.parameters()).device
    divisor = int(getattr(model, "size_divisor", 1))
    roi = tuple(int(r) for r in roi_size)
    if any(r % divisor for r in roi):
        raise ValueError(f"roi_size {roi} must be a multiple of the model's size divisor {divisor}.")

    def run(out_device: torch.device) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                             enabled=amp_dtype is not None):
            out = sliding_window_inference(image, roi, sw_batch_size, lambda x: model(x).float(), overlap=overlap,
                                           mode="gaussian", sw_device=device, device=out_device, progress=progress)
        return torch.as_tensor(out).float()

    try:
        return run(device)
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
        logger.warning("GPU out of memory while stitching a %s volume; retrying with the output on the CPU.",
                       tuple(image.shape[2:]))
        torch.cuda.empty_cache()
        return run(torch.device("cpu"))


@dataclass
class PredictionResult:
    """What :meth:`Predictor.predict_study` returns."""

    study_id: str
    modalities_used: tuple[str, ...]
    templates_used: tuple[str, ...]
    mask: Any = None  # segmentation: MetaTensor (1, *original) uint8 in the original grid
    reference: Path | None = None  # the input file whose grid the mask is in
    probabilities: dict[str, float] = field(default_factory=dict)
    volumes_ml: dict[str, float] = field(default_factory=dict)
    predicted: str | None = None


class Predictor:
    """Runs a fine-tuned adapter on raw studies. ``Predictor(model_dir).predict_study(study)``."""

    def __init__(self, model: str | Path | AdapterModel, *, device: str | torch.device = "auto",
                 precision: str = "auto", overlap: float = 0.5, sw_batch_size: int = 2,
                 roi_size: Sequence[int] | None = None, threshold: float = 0.5) -> None:
        self.model = load_adapter(model)
        self.device = pick_device(device)
        self.amp_dtype = amp_dtype_for(self.device, precision)
        self.model.to(self.device).eval()
        cfg = self.model.pretrained_cfg
        self.roi_size = tuple(int(r) for r in (roi_size or cfg.input_size))
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.threshold = float(threshold)
        self.atlas_size = tuple(int(s) for s in cfg.atlas_size)
        self.pipeline = build_preprocessing(cfg, self.model.modalities, place_in_atlas=False)

    @property
    def task(self) -> str:
        return self.model.model_type

    def _inputs(self, study: Study) -> tuple[dict[str, Any], torch.Tensor, tuple[int, ...], tuple[int, ...],
                                             tuple[int, ...], np.ndarray]:
        """Preprocess: (transform output, model input (1, C, *region), src, dst, size, present)."""
        out = self.pipeline(study)
        box = out["image"]
        src, dst, size = atlas_placement(box.shape[1:], self.atlas_size)
        region = tuple(slice(s, s + n) for s, n in zip(src, size))
        mods = self.model.modalities
        present = np.array([m in out["modalities"] for m in mods])
        image = np.zeros((len(mods), *size), np.float32)
        for c, m in enumerate(mods):
            if present[c]:
                image[c] = box[(out["modalities"].index(m), *region)].numpy()
        image = self.model.templates.fill(image, present, dst)
        return out, torch.from_numpy(image)[None], src, dst, size, present

    def predict_study(self, study: Study) -> PredictionResult:
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        out, x, src, _dst, size, present = self._inputs(study)
        mods = self.model.modalities
        used = tuple(m for m, p in zip(mods, present) if p)
        filled = tuple(m for m, p in zip(mods, present) if not p)
        result = PredictionResult(study.study_id, used, filled)
        if self.task == "classification":
            xr = resize_volume(x[0], self.model.pretrained_cfg.input_size)[None].to(self.device)
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                                 enabled=self.amp_dtype is not None):
                probs = torch.softmax(self.model(xr).float(), dim=1)[0].cpu()
            result.probabilities = {n: float(p) for n, p in zip(self.model.class_names, probs)}
            result.predicted = self.model.class_names[int(probs.argmax())]
            return result
        scheme = self.model.label_scheme
        logits = sliding_window_logits(self.model, x.to(self.device), self.roi_size, overlap=self.overlap,
                                       sw_batch_size=self.sw_batch_size, device=self.device, amp_dtype=self.amp_dtype)
        probs = scheme.probabilities(logits)
        masks = scheme.logits_to_masks(logits, self.threshold)
        labels = scheme.masks_to_labels(masks)[0].cpu()  # (1, *region) uint8
        box = out["image"]
        full = torch.zeros((1, *box.shape[1:]), dtype=torch.uint8)
        full[(slice(None), *(slice(s, s + n) for s, n in zip(src, size)))] = labels
        # The label map takes the box's metadata and transform history, so Invertd can walk it back.
        out["pred"] = MetaTensor(full, meta=dict(box.meta), applied_operations=list(box.applied_operations))
        inverted = Invertd(keys="pred", transform=self.pipeline, orig_keys="image", nearest_interp=True)(out)["pred"]
        result.mask = inverted
        result.reference = _reference_file(study, mods)
        voxel_ml = float(np.prod(self.model.pretrained_cfg.spacing)) / 1000.0
        names = scheme.foreground_names
        offset = 0 if scheme.kind == "regions" else 1
        for k, name in enumerate(names):
            result.volumes_ml[name] = float(masks[0, k + offset].sum()) * voxel_ml
            result.probabilities[name] = float(probs[0, k + offset].max())
        return result


def _reference_file(study: Study, modalities: Sequence[str]) -> Path:
    for m in modalities:
        if m in study.images:
            return study.images[m]
    return next(iter(study.images.values()))


def save_mask(result: PredictionResult, reference: Path | None, path: Path) -> Path:
    """Write the mask with the reference file's header (shape, affine, qform/sform codes) unchanged."""
    import nibabel as nib

    if reference is None or result.mask is None:
        raise ValueError(f"No mask / reference file for study {result.study_id!r} (classification result?).")
    ref = nib.load(str(reference))
    data = np.asarray(result.mask)[0].astype(np.uint8)
    if data.shape != tuple(ref.shape[:3]):
        raise RuntimeError(f"Inverted prediction of {result.study_id} has shape {data.shape}, the input "
                           f"{reference} {tuple(ref.shape[:3])}: the inverse transforms did not restore the grid.")
    inv_affine = np.asarray(result.mask.affine, float)
    if not np.allclose(inv_affine, ref.affine, atol=1e-3):
        logger.warning("Inverted affine of %s differs from the input's by %.2g; writing the input's header.",
                       result.study_id, float(np.abs(inv_affine - ref.affine).max()))
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(data, ref.affine, header=header)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def predict(model: str | Path | AdapterModel, inputs: str | Path | Sequence[Study], output: str | Path, *,
            device: str = "auto", precision: str = "auto", overlap: float = 0.5, sw_batch_size: int = 2,
            roi_size: Sequence[int] | None = None, threshold: float = 0.5,
            progress: Callable[[str], None] | None = None) -> Path:
    """Predict every study of ``inputs`` (a study folder, a dataset folder or a manifest; or Study objects) and
    write ``output/<study_id>.nii.gz`` masks (segmentation) and ``output/predictions.csv``. Returns ``output``."""
    from ..data.datasets import discover_studies
    from .metrics import write_csv

    studies = list(inputs) if not isinstance(inputs, (str, Path)) else discover_studies(inputs)
    if not studies:
        raise ValueError(f"No studies found in {inputs!r}.")
    predictor = Predictor(model, device=device, precision=precision, overlap=overlap, sw_batch_size=sw_batch_size,
                          roi_size=roi_size, threshold=threshold)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for study in studies:
        res = predictor.predict_study(study)
        row: dict[str, Any] = {"study_id": res.study_id}
        if predictor.task == "segmentation":
            path = save_mask(res, res.reference, out / f"{res.study_id}.nii.gz")
            row["mask"] = path.name
            for name in res.volumes_ml:
                row[f"{name}_ml"] = res.volumes_ml[name]
                row[f"{name}_p_max"] = res.probabilities[name]
        else:
            row["predicted"] = res.predicted
            row.update({f"p_{n}": p for n, p in res.probabilities.items()})
        row["modalities_used"] = " ".join(res.modalities_used)
        row["template_filled"] = " ".join(res.templates_used) or "-"
        rows.append(row)
        if progress is not None:
            progress(f"{res.study_id}: " + (row.get("mask") or str(res.predicted)))
    write_csv(out / "predictions.csv", rows)
    return out
