"""Downstream adapters: segmentation and classification models on any brainmm encoder, fine-tuning, prediction,
metrics and missing-modality handling.

``create_segmentation_model`` / ``create_classification_model`` build a task model from an encoder name (or load a
saved one from ``local-dir:`` / ``hf-hub:``). The trainer (``brainmm.adapters.finetune``), inference
(``brainmm.adapters.inference``), metrics (``brainmm.adapters.metrics``) and the demo (``brainmm.adapters.demo``)
are imported from their modules.
"""

from .base import AdapterModel, param_groups
from .classification import ClassificationModel, create_classification_model
from .labels import LabelScheme, check_label_values, get_label_scheme, list_label_schemes
from .missing import ModalityDropout, TemplateBank, modality_subsets, resample_to_grid
from .segmentation import SegmentationModel, SwinUNETRSegmentation, UNETRSegmentation, create_segmentation_model

__all__ = [
    "AdapterModel", "ClassificationModel", "LabelScheme", "ModalityDropout", "SegmentationModel",
    "SwinUNETRSegmentation", "TemplateBank", "UNETRSegmentation", "check_label_values", "create_classification_model",
    "create_segmentation_model", "get_label_scheme", "list_label_schemes", "modality_subsets", "param_groups",
    "resample_to_grid",
]
