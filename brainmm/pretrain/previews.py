"""PNG previews: mid-slices of the target, both masked views and their reconstructions; the learned templates."""

from __future__ import annotations

import torch
from PIL import Image

from ..visualize import label_image, mid_slices, templates_grid, to_uint8

__all__ = ["preview_grid", "templates_grid"]

ROWS = (("target", "target"), ("view_template", "view A: template fill"), ("recon_template", "recon A"),
        ("view_cross_modal", "view B: cross-modal fill"), ("recon_cross_modal", "recon B"))


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
        panels = [Image.fromarray(to_uint8(s, lo, hi)) for s in mid_slices(vol)]
        width = sum(p.width for p in panels) + 2 * (len(panels) - 1)
        row = Image.new("L", (width, max(p.height for p in panels)))
        x = 0
        for p in panels:
            row.paste(p, (x, 0))
            x += p.width + 2
        row = row.resize((row.width * scale, row.height * scale), Image.NEAREST).convert("RGB")
        rows.append(label_image(row, title))
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "black")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    return grid
