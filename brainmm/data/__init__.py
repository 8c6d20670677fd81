"""Data: modality vocabulary, manifests, preprocessing, synthetic phantoms and the preprocessed cache."""

from .modalities import MODALITIES, canonical_modalities, canonical_modality, modality_index, sort_modalities

__all__ = ["MODALITIES", "canonical_modalities", "canonical_modality", "modality_index", "sort_modalities"]
