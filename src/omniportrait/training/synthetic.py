"""A synthetic record folder whose face mask is known: a bright ellipse "face" on a dark, noisy background.

Used by the tests and by the convergence measurement in ``docs/training.md``; also handy to smoke-test a
training setup before pointing it at real data. Each record follows the plain folder format
(``NAME.png`` + ``NAME.json`` + ``NAME.mask.png``); the reader cuts the face crop around ``face_box``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CAPTIONS = ("a photo of a {word}", "a {word} on the beach", "a portrait of a {word} in the city")


@dataclass(frozen=True)
class SyntheticRecord:
    key: str
    box: tuple[int, int, int, int]


def ellipse_box(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    """A random ellipse box covering roughly 10-30% of the image, fully inside it."""
    width = int(rng.integers(size * 3 // 10, size // 2 + 1))
    height = int(rng.integers(size * 4 // 10, size * 6 // 10 + 1))
    left = int(rng.integers(0, size - width + 1))
    top = int(rng.integers(0, size - height + 1))
    return left, top, left + width, top + height


def draw_record(rng: np.random.Generator, size: int, box, noise: float = 20.0) -> tuple[Image.Image, Image.Image]:
    """The image (dark noisy background + bright ellipse with two dark "eyes") and its exact face mask."""
    background = rng.normal(60, noise, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    mask = Image.new("L", (size, size), 0)
    skin = tuple(int(v) for v in rng.integers(190, 256, 3))
    ImageDraw.Draw(image).ellipse(box, fill=skin)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    x0, y0, x1, y1 = box
    eye_y, radius = y0 + (y1 - y0) * 0.4, max(1, (x1 - x0) // 10)
    for eye_x in (x0 + (x1 - x0) * 0.3, x0 + (x1 - x0) * 0.7):
        eye = (eye_x - radius, eye_y - radius, eye_x + radius, eye_y + radius)
        ImageDraw.Draw(image).ellipse(eye, fill=(30, 30, 30))
    return image, mask


def write_synthetic_dataset(folder: str | Path, count: int = 16, size: int = 64, seed: int = 0,
                            class_word: str = "woman", noise: float = 20.0) -> list[SyntheticRecord]:
    """Write ``count`` records into ``folder``; returns their keys and ellipse boxes.

    ``noise``: standard deviation of the background's pixel noise (0 = flat background).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        key = f"{index:05d}"
        box = ellipse_box(rng, size)
        image, mask = draw_record(rng, size, box, noise)
        caption = CAPTIONS[index % len(CAPTIONS)].format(word=class_word)
        start = caption.index(class_word)
        meta = {"caption": caption, "class_word": class_word, "class_span": [start, start + len(class_word)],
                "face_box": list(box)}
        image.save(folder / f"{key}.png")
        mask.save(folder / f"{key}.mask.png")
        (folder / f"{key}.json").write_text(json.dumps(meta))
        records.append(SyntheticRecord(key, box))
    return records


def sharpen_tiny_vae(vae, pixels) -> float:
    """Make a random tiny VAE carry the image into the latent, and return its new scaling factor.

    A randomly initialised VAE predicts a posterior standard deviation near 1 while its mean varies by
    about 0.25 across an image, and Stable Diffusion's scaling factor (0.18215, chosen so that the real
    VAE's latents have unit variance) shrinks that further: the sampled latent is mostly posterior noise
    and holds almost nothing of the face. This sets the posterior log-variance 12 lower (std ~0.003) and
    the scaling factor to ``1 / std(mean latent)`` over ``pixels`` (how SD's own factor was chosen), so a
    tiny model's latents hold the picture as a real model's do.
    """
    import torch

    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[channels:] -= 12.0
        spread = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float().std().item()
    vae.register_to_config(scaling_factor=1.0 / spread)
    return 1.0 / spread
