"""BrainMVP pre-training: block masking, modality templates, the three proxy tasks and the trainer.

Not imported by ``import brainmm`` (it pulls in the trainer's dependencies); import ``brainmm.pretrain`` explicitly.
"""

from .masking import fill_masked, num_kept_blocks, random_block_grid, random_block_mask
from .objectives import (
    BrainMVPObjective,
    CrossModalReconstruction,
    ModalityContrastive,
    ObjectiveConfig,
    StepOutput,
    TemplateDistillation,
    info_nce_reference,
)
from .templates import ModalityTemplates

__all__ = [
    "BrainMVPObjective", "CrossModalReconstruction", "ModalityContrastive", "ModalityTemplates", "ObjectiveConfig",
    "StepOutput", "TemplateDistillation", "fill_masked", "info_nce_reference", "num_kept_blocks", "random_block_grid",
    "random_block_mask",
]
