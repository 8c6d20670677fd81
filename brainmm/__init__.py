"""brainmm: BrainMVP multi-modal vision pre-training for 3D brain MRI.

Public API: ``create_model``, ``list_models``, ``list_pretrained``, ``register_model``, ``get_pretrained_cfg``,
``save_pretrained``, ``push_to_hub``, ``load_templates``, ``create_segmentation_model``,
``create_classification_model``. ``import brainmm`` never imports the trainers (``brainmm.pretrain``,
``brainmm.adapters.finetune``), so it stays light.
"""

__version__ = "0.1.0"

from .adapters import create_classification_model, create_segmentation_model
from .data.modalities import MODALITIES, canonical_modalities, canonical_modality
from .hub import push_to_hub, save_pretrained
from .models import (
    LoadReport,
    PretrainedCfg,
    create_model,
    get_pretrained_cfg,
    list_models,
    list_pretrained,
    load_decoder,
    load_templates,
    register_model,
)

__all__ = [
    "MODALITIES", "LoadReport", "PretrainedCfg", "__version__", "canonical_modalities", "canonical_modality",
    "create_classification_model", "create_model", "create_segmentation_model", "get_pretrained_cfg", "list_models",
    "list_pretrained", "load_decoder", "load_templates", "push_to_hub", "register_model", "save_pretrained",
]
