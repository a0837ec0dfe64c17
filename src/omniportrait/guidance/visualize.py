"""PNG overlays of what RB-Guidance did (``--save-masks``): M_gen, M_ref and the feature matches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from omniportrait.images import save_image_atomic

OVERLAY = np.array([255, 40, 40], dtype=np.float32)
MAX_LINES = 64


def overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """``image`` with ``mask`` (any size, bool) painted red."""
    mask_image = Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    selected = np.asarray(mask_image) > 127
    pixels[selected] = (1 - alpha) * pixels[selected] + alpha * OVERLAY
    return Image.fromarray(pixels.astype(np.uint8))


def point_xy(flat_index: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[float, float]:
    """Centre, in pixels of an image of ``size``, of cell ``flat_index`` of a ``grid`` (h, w)."""
    row, col = divmod(int(flat_index), grid[1])
    return (col + 0.5) * size[0] / grid[1], (row + 0.5) * size[1] / grid[0]


def matches_picture(reference, generated: Image.Image, correspondence, ref_grid, gen_grid) -> Image.Image:
    """Reference crop and generated image side by side, a line per (sampled) match."""
    height = generated.height
    ref = reference.resize((height, height))
    canvas = Image.new("RGB", (ref.width + generated.width, height), "white")
    canvas.paste(ref, (0, 0))
    canvas.paste(generated, (ref.width, 0))
    draw = ImageDraw.Draw(canvas)
    pairs = list(zip(correspondence.reference_points.tolist(), correspondence.matches.tolist()))
    for ref_index, gen_index in pairs[:: max(1, len(pairs) // MAX_LINES)]:
        x0, y0 = point_xy(ref_index, ref_grid, ref.size)
        x1, y1 = point_xy(gen_index, gen_grid, generated.size)
        draw.line([(x0, y0), (x1 + ref.width, y1)], fill=(40, 200, 40), width=1)
    return canvas


def save_guidance_pictures(guidance, images: list[Image.Image], folder: str | Path) -> list[Path]:
    """Write ``mgen-{i}.png``, ``mref-{i}.png`` and ``matches-{i}.png`` per identity (first image)."""
    folder = Path(folder)
    written = []
    record = guidance.record
    if record.gen_masks is None:
        return written
    for index, reference in enumerate(guidance.references):
        gen_mask = record.gen_masks[0, index].cpu().numpy()
        pictures = {
            f"mgen-{index}.png": overlay(images[0], gen_mask),
            f"mref-{index}.png": overlay(reference.crop, reference.crop_mask),
            f"matches-{index}.png": matches_picture(reference.crop, images[0], record.correspondences[index][0],
                                                    tuple(reference.mask.shape), record.feature_size),
        }
        for name, picture in pictures.items():
            written.append(save_image_atomic(picture, folder / name))
    return written
