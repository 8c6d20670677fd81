"""Encoders and the model factory. Importing this package registers every architecture family."""

from . import swin, unet, uniformer  # noqa: F401  (registers the families)
from ._base import Encoder, FeatureListNet, LinearReconstructionDecoder
from ._builder import LoadReport, adapt_stem_weight, create_model, load_decoder, load_encoder_weights, load_templates
from ._pretrained import PretrainedCfg
from ._registry import (
    get_pretrained_cfg,
    is_model,
    list_models,
    list_pretrained,
    list_tags,
    load_local_registry,
    model_entrypoint,
    register_local,
    register_model,
    register_pretrained_cfg,
    split_model_name_tag,
)

load_local_registry()

__all__ = [
    "Encoder", "FeatureListNet", "LinearReconstructionDecoder", "LoadReport", "PretrainedCfg", "adapt_stem_weight",
    "create_model", "get_pretrained_cfg", "is_model", "list_models", "list_pretrained", "list_tags", "load_decoder",
    "load_encoder_weights", "load_templates", "register_local", "model_entrypoint", "register_model",
    "register_pretrained_cfg",
    "split_model_name_tag",
]
