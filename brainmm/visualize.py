"""Pictures people would rather look at than read: mid-slices of volumes and of the learned templates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(a: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    return (np.clip((a - lo) / (hi - lo + 1e-9), 0, 1) * 255).astype(np.uint8)


def mid_slices(vol: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of an (H, W, D) RAS volume, oriented for display."""
    h, w, d = vol.shape
    return [np.rot90(vol[:, :, d // 2]), np.rot90(vol[:, w // 2, :]), np.rot90(vol[h // 2, :, :])]


def label_image(img: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + 12), "black")
    out.paste(img, (0, 12))
    ImageDraw.Draw(out).text((2, 0), text, fill="white")
    return out


def templates_grid(templates: dict[str, torch.Tensor], scale: int = 2) -> Image.Image:
    """The learned templates (normalised), axial mid-slice each, labelled by modality."""
    tiles = []
    for name, t in templates.items():
        vol = t.float().cpu().numpy()
        sl = np.rot90(vol[:, :, vol.shape[2] // 2])
        img = Image.fromarray(to_uint8(sl, 0.0, 1.0)).resize((sl.shape[1] * scale, sl.shape[0] * scale),
                                                              Image.BILINEAR)
        tiles.append(label_image(img.convert("RGB"), name))
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * (tw + 2), rows * (th + 2)), "black")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * (tw + 2), (i // cols) * (th + 2)))
    return grid


def save_templates_png(templates: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write the templates' axial mid-slices as one labelled PNG."""
    path = Path(path)
    templates_grid(templates).save(path)
    return path
