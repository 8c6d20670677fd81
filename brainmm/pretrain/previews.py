"""PNG previews: mid-slices of the target, both masked views and their reconstructions; the learned templates."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

ROWS = (("target", "target"), ("view_template", "view A: template fill"), ("recon_template", "recon A"),
        ("view_cross_modal", "view B: cross-modal fill"), ("recon_cross_modal", "recon B"))


def _to_uint8(a: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    return (np.clip((a - lo) / (hi - lo + 1e-9), 0, 1) * 255).astype(np.uint8)


def _mid_slices(vol: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of an (H, W, D) RAS volume, oriented for display."""
    h, w, d = vol.shape
    return [np.rot90(vol[:, :, d // 2]), np.rot90(vol[:, w // 2, :]), np.rot90(vol[h // 2, :, :])]


def _label(img: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + 12), "black")
    out.paste(img, (0, 12))
    ImageDraw.Draw(out).text((2, 0), text, fill="white")
    return out


def preview_grid(preview: dict[str, torch.Tensor], scale: int = 3) -> Image.Image:
    """One row per view (target, view A, recon A, view B, recon B), three orthogonal mid-slices each.

    All panels share the target's intensity window, so reconstructions are comparable to the input."""
    target = preview["target"][0, 0].float().cpu().numpy()
    lo, hi = float(target.min()), float(target.max())
    rows = []
    for key, title in ROWS:
        if key not in preview:
            continue
        vol = preview[key][0, 0].float().cpu().numpy()
        panels = [Image.fromarray(_to_uint8(s, lo, hi)) for s in _mid_slices(vol)]
        width = sum(p.width for p in panels) + 2 * (len(panels) - 1)
        row = Image.new("L", (width, max(p.height for p in panels)))
        x = 0
        for p in panels:
            row.paste(p, (x, 0))
            x += p.width + 2
        row = row.resize((row.width * scale, row.height * scale), Image.NEAREST).convert("RGB")
        rows.append(_label(row, title))
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "black")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    return grid


def templates_grid(templates: dict[str, torch.Tensor], scale: int = 2) -> Image.Image:
    """The learned templates (normalised), axial mid-slice each, labelled by modality."""
    tiles = []
    for name, t in templates.items():
        vol = t.float().cpu().numpy()
        sl = np.rot90(vol[:, :, vol.shape[2] // 2])
        img = Image.fromarray(_to_uint8(sl, 0.0, 1.0)).resize((sl.shape[1] * scale, sl.shape[0] * scale),
                                                              Image.BILINEAR)
        tiles.append(_label(img.convert("RGB"), name))
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * (tw + 2), rows * (th + 2)), "black")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * (tw + 2), (i // cols) * (th + 2)))
    return grid
