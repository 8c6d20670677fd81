"""Modality vocabulary: canonical names, aliases and helpers.

Modalities are always names, never bare channel indices. The canonical order is the order of the official
BrainMVP template tensor ``[8, 240, 240, 155]``: flair, t1, t1c, t2, mra, pd, dwi, adc.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1c", "t2", "mra", "pd", "dwi", "adc")

# Alias (lower case) -> canonical name. Covers BraTS 2021 (t1ce), BraTS 2023 (t1n/t1c/t2w/t2f), BIDS suffixes
# (T1w, T2w, FLAIR, PDw, angio, dwi) and the BrainMVP names (FLAIR/T1/T1c/T2/MRA/PD/DWI/ADC).
_ALIASES: dict[str, str] = {
    # FLAIR
    "flair": "flair", "t2f": "flair", "t2flair": "flair", "t2-flair": "flair", "t2_flair": "flair",
    # T1
    "t1": "t1", "t1n": "t1", "t1w": "t1", "t1native": "t1", "t1-native": "t1",
    # T1 post-contrast
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1-gd": "t1c", "t1post": "t1c", "ce-t1w": "t1c", "t1wce": "t1c",
    # T2
    "t2": "t2", "t2w": "t2",
    # MR angiography
    "mra": "mra", "angio": "mra", "tof": "mra",
    # proton density
    "pd": "pd", "pdw": "pd",
    # diffusion
    "dwi": "dwi", "trace": "dwi",
    "adc": "adc",
}


def canonical_modality(name: str, *, argument: str = "modality") -> str:
    """Return the canonical name of ``name`` (case-insensitive alias lookup).

    Raises ``ValueError`` naming the argument, the bad value and the known names.
    """
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a modality name (str), got {type(name).__name__}: {name!r}")
    key = name.strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"Unknown {argument} {name!r}. Known modalities: {', '.join(MODALITIES)} "
            f"(aliases: {', '.join(sorted(a for a in _ALIASES if a not in MODALITIES))})."
        )
    return _ALIASES[key]


def canonical_modalities(names: Iterable[str] | str, *, argument: str = "modalities") -> tuple[str, ...]:
    """Canonicalise a list of modality names; rejects duplicates after aliasing (e.g. ``t1ce`` and ``t1c``)."""
    if isinstance(names, str):
        names = [names]
    out = tuple(canonical_modality(n, argument=argument) for n in names)
    if not out:
        raise ValueError(f"{argument} must name at least one modality; known: {', '.join(MODALITIES)}.")
    dup = sorted({m for m in out if out.count(m) > 1})
    if dup:
        raise ValueError(f"{argument} names {', '.join(dup)} more than once (after resolving aliases): {list(names)}.")
    return out


def modality_index(name: str) -> int:
    """Index of a modality in the canonical order (the template tensor's first axis)."""
    return MODALITIES.index(canonical_modality(name))


def sort_modalities(names: Sequence[str]) -> tuple[str, ...]:
    """Canonicalise and sort into the canonical order."""
    return tuple(sorted(canonical_modalities(names), key=MODALITIES.index))


def aliases() -> dict[str, str]:
    """A copy of the alias table (lower-case alias -> canonical name)."""
    return dict(_ALIASES)
