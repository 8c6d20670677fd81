"""PNG overlays of segmentation predictions: reference | prediction on the axial slice with the most foreground."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

# Distinct colours per output channel (drawn in order, so nested regions show their innermost colour last).
_COLOURS = [(46, 204, 64), (255, 65, 54), (255, 220, 0), (0, 116, 217), (177, 13, 201), (255, 133, 27),
            (57, 204, 204), (240, 18, 190)]


def _draw_order(names: Sequence[str]) -> list[int]:
    # BraTS regions are nested (WT > TC > ET): paint the largest first so inner regions stay visible.
    rank = {"WT": 0, "TC": 1, "ET": 2}
    return sorted(range(len(names)), key=lambda k: rank.get(names[k], 3 + k))


def overlay(image: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, pred: torch.Tensor | np.ndarray,
            names: Sequence[str], *, title: str = "", scale: int = 3, alpha: float = 0.45) -> Image.Image:
    """``image (H, W, D)``, ``ref``/``pred`` ``(K, H, W, D)`` binary -> RGB panel "reference | prediction".

    The axial slice is the one with the largest reference foreground (else prediction, else the middle)."""
    img = np.asarray(image, np.float32)
    ref_a, pred_a = np.asarray(ref) > 0, np.asarray(pred) > 0
    area = ref_a.any(0).sum((0, 1))
    if not area.any():
        area = pred_a.any(0).sum((0, 1))
    z = int(area.argmax()) if area.any() else img.shape[2] // 2
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    grey = np.clip((img[:, :, z] - lo) / (hi - lo + 1e-9), 0, 1)
    panels = []
    for masks, label in ((ref_a, "reference"), (pred_a, "prediction")):
        rgb = np.repeat(grey[..., None], 3, axis=2) * 255.0
        for k in _draw_order(names):
            m = masks[k, :, :, z]
            colour = np.asarray(_COLOURS[k % len(_COLOURS)], np.float32)
            rgb[m] = (1 - alpha) * rgb[m] + alpha * colour
        # RAS (H = left->right, W = posterior->anterior): rotate so anterior is up, as radiological viewers show.
        panel = Image.fromarray(np.rot90(rgb).astype(np.uint8))
        panel = panel.resize((panel.width * scale, panel.height * scale), Image.NEAREST)
        canvas = Image.new("RGB", (panel.width, panel.height + 14), "black")
        canvas.paste(panel, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), label, fill="white")
        panels.append(canvas)
    width = sum(p.width for p in panels) + 4
    legend_h = 14
    out = Image.new("RGB", (width, panels[0].height + legend_h + (14 if title else 0)), "black")
    y0 = 14 if title else 0
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((2, 1), f"{title} (axial slice {z})", fill="white")
    x = 0
    for p in panels:
        out.paste(p, (x, y0))
        x += p.width + 4
    x = 2
    for k, name in enumerate(names):
        draw.rectangle([x, y0 + panels[0].height + 3, x + 8, y0 + panels[0].height + 11],
                       fill=_COLOURS[k % len(_COLOURS)])
        draw.text((x + 11, y0 + panels[0].height + 1), name, fill="white")
        x += 16 + 7 * len(name)
    return out
