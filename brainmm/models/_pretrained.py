"""PretrainedCfg: everything needed to use a weight correctly (where it lives, what input it expects)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..data.modalities import MODALITIES

BRAINMVP_CITATION = (
    "@inproceedings{rui2025brainmvp,\n"
    "  title={Multi-modal Vision Pre-training for Medical Image Analysis},\n"
    "  author={Rui, Shaohao and Chen, Lingzhi and Tang, Zhenyu and Wang, Lilong and Liu, Mianxin and Zhang, "
    "Shaoting and Wang, Xiaosong},\n"
    "  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},\n"
    "  year={2025}\n}"
)


@dataclass
class PretrainedCfg:
    """Where a weight lives and the preprocessing contract its inputs must follow.

    ``modalities`` are the input channels in order (canonical names); an empty tuple means a modality-agnostic
    single-channel encoder (BrainMVP pre-training encodes one modality at a time). ``template_modalities`` are the
    modalities whose learned templates the weight carries. Spatial tuples are in the MONAI axis order (H, W, D) of a
    RAS volume.
    """

    architecture: str = ""
    tag: str = ""
    hf_hub_id: str | None = None
    hf_hub_revision: str | None = None
    local_dir: str | None = None  # a folder registered on this machine (e.g. a converted official checkpoint)
    # "published" (on the Hub), "planned" (repo reserved, not uploaded yet) or "local" (registered on this machine).
    status: str = "published"
    file: str = "model.safetensors"
    sha256: str | None = None
    modalities: tuple[str, ...] = ()
    template_modalities: tuple[str, ...] = MODALITIES
    input_size: tuple[int, int, int] = (96, 96, 96)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    atlas_size: tuple[int, int, int] = (240, 240, 155)
    foreground_crop: bool = True
    intensity: dict[str, Any] = field(
        default_factory=lambda: {"method": "percentile", "lower": 5.0, "upper": 95.0, "b_min": 0.0, "b_max": 1.0,
                                 "clip": True, "channel_wise": True}
    )
    stem: str = ""
    license: str = "apache-2.0"
    citation: str = BRAINMVP_CITATION
    description: str = ""
    data: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.architecture}.{self.tag}" if self.tag else self.architecture

    @property
    def in_chans(self) -> int:
        return max(1, len(self.modalities))

    @property
    def has_weights(self) -> bool:
        return bool(self.hf_hub_id or self.local_dir)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainedCfg:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in d.items():
            if k not in known:
                continue  # forward compatibility: configs written by newer versions may carry more keys
            kwargs[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)

    def replace(self, **changes: Any) -> PretrainedCfg:
        return dataclasses.replace(self, **changes)
