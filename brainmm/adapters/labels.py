"""Label schemes: how label-map values become training targets, and how predictions become label maps again.

Two kinds of scheme:

- ``regions`` (sigmoid outputs, one channel per possibly overlapping region; loss 0.7 Dice + 0.3 BCE): BraTS.
  BraTS 2021 labels are 1 NCR/NETC, 2 ED/SNFH, **4** ET; BraTS 2023 (GLI, MEN, MET, PED, SSA) labels are 1 NETC,
  2 SNFH, **3** ET. Regions: TC = NETC | ET, WT = NETC | SNFH | ET, ET. The official BrainMVP code applied the 2021
  mapping to 2023 data, so its ET channel was always empty; here each year has its own scheme and a label file with
  a value the scheme does not know is an error that names the likely right scheme.
- ``classes`` (softmax outputs, mutually exclusive classes including background; loss Dice + CE): any integer label
  map ``0..K-1`` (``classes:K``), e.g. ISLES22 (``binary`` is ``classes:2``), MRBrainS13, VSseg.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LabelScheme", "check_label_values", "get_label_scheme", "list_label_schemes"]


@dataclass(frozen=True)
class LabelScheme:
    """How a label map is turned into targets.

    ``names``: one per output channel (region names, or class names with the background first). ``regions``: for
    ``kind == "regions"``, the label values belonging to each region. ``paint``: for ``regions``, ``(region index,
    label value)`` pairs painted in order to turn region masks back into one label map (outer regions first).
    ``label_values``: the values allowed in label files (0 included).
    """

    name: str
    kind: str  # "regions" | "classes"
    names: tuple[str, ...]
    label_values: tuple[int, ...]
    regions: tuple[tuple[int, ...], ...] = ()
    paint: tuple[tuple[int, int], ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("regions", "classes"):
            raise ValueError(f"LabelScheme.kind must be 'regions' or 'classes', got {self.kind!r}.")
        if self.kind == "regions" and len(self.regions) != len(self.names):
            raise ValueError(f"Label scheme {self.name!r}: {len(self.names)} region names but {len(self.regions)} "
                             "region definitions.")

    @property
    def num_channels(self) -> int:
        """Output channels of a model trained with this scheme."""
        return len(self.names)

    @property
    def sigmoid(self) -> bool:
        return self.kind == "regions"

    @property
    def foreground_names(self) -> tuple[str, ...]:
        """Names of the channels scored by Dice/HD95 (regions; classes without the background)."""
        return self.names if self.kind == "regions" else self.names[1:]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "names": list(self.names),
                "label_values": list(self.label_values), "regions": [list(r) for r in self.regions],
                "paint": [list(p) for p in self.paint], "description": self.description}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> LabelScheme:
        return cls(name=str(d["name"]), kind=str(d["kind"]), names=tuple(d["names"]),  # type: ignore[arg-type]
                   label_values=tuple(int(v) for v in d["label_values"]),  # type: ignore[union-attr]
                   regions=tuple(tuple(int(v) for v in r) for r in d.get("regions", ())),  # type: ignore[union-attr]
                   paint=tuple((int(a), int(b)) for a, b in d.get("paint", ())),  # type: ignore[union-attr]
                   description=str(d.get("description", "")))

    # ------------------------------------------------------------------------------------------------ targets
    def to_target(self, label: torch.Tensor) -> torch.Tensor:
        """Integer label map ``(B, 1, *S)`` -> target.

        ``regions``: float ``(B, R, *S)`` binary masks. ``classes``: the label itself as float ``(B, 1, *S)`` (MONAI
        losses one-hot it with ``to_onehot_y=True``; DiceMetric wants one-hot, see :meth:`to_onehot`).
        """
        if label.ndim < 3 or label.shape[1] != 1:
            raise ValueError(f"label must have shape (B, 1, *spatial), got {tuple(label.shape)}.")
        if self.kind == "classes":
            return label.float()
        masks = [_isin(label, values) for values in self.regions]
        return torch.cat(masks, dim=1).float()

    def to_onehot(self, label: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *S)`` label -> ``(B, K, *S)`` float masks, one per output channel (regions or classes)."""
        if self.kind == "regions":
            return self.to_target(label)
        k = self.num_channels
        lab = label.long().clamp(0, k - 1)
        return torch.cat([(lab == c) for c in range(k)], dim=1).float()

    def logits_to_masks(self, logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """``(B, K, *S)`` logits -> ``(B, K, *S)`` binary masks (sigmoid > threshold, or one-hot of the argmax)."""
        if self.kind == "regions":
            return (torch.sigmoid(logits.float()) > threshold).float()
        idx = logits.argmax(dim=1, keepdim=True)
        return torch.cat([(idx == c) for c in range(logits.shape[1])], dim=1).float()

    def masks_to_labels(self, masks: torch.Tensor) -> torch.Tensor:
        """``(B, K, *S)`` binary masks -> ``(B, 1, *S)`` uint8 label map in this scheme's label values.

        For BraTS: WT -> SNFH (2), then TC -> NETC (1), then ET -> 3 (2023) or 4 (2021), so every voxel keeps the
        innermost region it belongs to.
        """
        if self.kind == "classes":
            return masks.argmax(dim=1, keepdim=True).to(torch.uint8)
        out = torch.zeros((masks.shape[0], 1, *masks.shape[2:]), dtype=torch.uint8, device=masks.device)
        for region, value in self.paint:
            out[masks[:, region:region + 1] > 0] = value
        return out

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-channel probabilities: sigmoid (regions) or softmax (classes)."""
        return torch.sigmoid(logits.float()) if self.kind == "regions" else torch.softmax(logits.float(), dim=1)


def _isin(label: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    out = torch.zeros_like(label, dtype=torch.bool)
    for v in values:
        out |= label == v
    return out


def _brats(year: str, et: int, description: str, name: str | None = None) -> LabelScheme:
    return LabelScheme(
        name=name or f"brats{year}", kind="regions", names=("TC", "WT", "ET"), label_values=(0, 1, 2, et),
        regions=((1, et), (1, 2, et), (et,)), paint=((1, 2), (0, 1), (2, et)), description=description,
    )


_BRATS2021 = "BraTS 2021: 1 NCR/NETC, 2 ED/SNFH, 4 ET; regions TC = 1|4, WT = 1|2|4, ET = 4."
_BRATS2023 = "BraTS 2023: 1 NETC, 2 SNFH, 3 ET; regions TC = 1|3, WT = 1|2|3, ET = 3."
_SCHEMES: dict[str, LabelScheme] = {
    "brats2021": _brats("2021", 4, _BRATS2021),
    "brats2023": _brats("2023", 3, _BRATS2023),
}
# The BraTS 2023 challenges (and later ones) share the 2023 values.
_ALIASES = {"brats2023-gli": "brats2023", "brats-gli": "brats2023", "brats-men": "brats2023",
            "brats-met": "brats2023", "brats-ped": "brats2023", "brats-ssa": "brats2023", "brats2024": "brats2023",
            "brats2018": "brats2021", "brats2019": "brats2021", "brats2020": "brats2021", "binary": "classes:2"}
_CLASSES = re.compile(r"^classes:(\d+)$")


def list_label_schemes() -> list[str]:
    """Names accepted by :func:`get_label_scheme` (``classes:K`` stands for any K >= 2)."""
    return sorted([*_SCHEMES, *_ALIASES, "classes:K"])


def get_label_scheme(name: str | LabelScheme) -> LabelScheme:
    """A scheme by name: ``brats2021``, ``brats2023`` (aliases ``brats-ped``, ``brats-met``, ``brats-men``,
    ``brats-ssa``, ``brats-gli``), ``binary`` or ``classes:K`` (integer classes 0..K-1, softmax)."""
    if isinstance(name, LabelScheme):
        return name
    if not isinstance(name, str):
        raise TypeError(f"labels must be a scheme name (str), got {type(name).__name__}.")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _SCHEMES:
        return _SCHEMES[key]
    m = _CLASSES.match(key)
    if m:
        k = int(m.group(1))
        if k < 2:
            raise ValueError(f"labels {name!r}: classes:K needs K >= 2 (background + at least one class).")
        names = ("background", *(f"class{c}" for c in range(1, k)))
        return LabelScheme(name=f"classes:{k}", kind="classes", names=names, label_values=tuple(range(k)),
                           description=f"{k} integer classes 0..{k - 1} (0 = background), softmax + Dice-CE.")
    raise ValueError(f"Unknown label scheme {name!r}. Known: {', '.join(list_label_schemes())} (classes:K for K "
                     "integer classes, e.g. classes:4).")


def check_label_values(values: Iterable[int], scheme: LabelScheme, *, source: str) -> None:
    """Raise ``ValueError`` when a label map holds values the scheme does not define.

    Catches the official BrainMVP mistake: BraTS 2023 data (ET = 3) read with the 2021 mapping (ET = 4) leaves the
    ET channel empty, and the reverse. The message names the file and the scheme that fits.
    """
    found = sorted({int(v) for v in np.asarray(list(values)).ravel()})
    bad = [v for v in found if v not in scheme.label_values]
    if not bad:
        return
    hint = ""
    if scheme.name == "brats2021" and 3 in bad:
        hint = " BraTS 2023 data marks ET with 3: use --labels brats2023."
    elif scheme.name == "brats2023" and 4 in bad:
        hint = " BraTS 2018-2021 data marks ET with 4: use --labels brats2021."
    elif scheme.kind == "classes":
        hint = f" Use --labels classes:{max(found) + 1} if these are integer classes."
    raise ValueError(f"Label map {source} has value(s) {bad}, which label scheme {scheme.name!r} does not define "
                     f"(allowed: {list(scheme.label_values)}).{hint}")
