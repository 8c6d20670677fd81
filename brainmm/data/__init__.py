"""Data: modality vocabulary, manifests, preprocessing, synthetic phantoms and the preprocessed cache.

Only the modality vocabulary is imported eagerly (it is tiny); the readers, transforms and cache pull in MONAI and
nibabel and are imported from their modules: ``brainmm.data.datasets``, ``brainmm.data.transforms``,
``brainmm.data.cache``, ``brainmm.data.check``, ``brainmm.data.synthetic``.
"""

from .modalities import MODALITIES, canonical_modalities, canonical_modality, modality_index, sort_modalities

__all__ = ["MODALITIES", "canonical_modalities", "canonical_modality", "modality_index", "sort_modalities"]
