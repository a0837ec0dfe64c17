"""Shared inputs of the evaluation tests: small images with known relations and briefly trained tiny models.

A random tiny CLIP/BLIP has no notion of "red" or "good photo", so orderings that depend on meaning are
tested on tiny models first fitted for a few dozen steps to a handful of (image, text) pairs; orderings that
hold for any encoder (an image against itself) are tested on the untrained ones.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from omniportrait.evaluation.tiny import tiny_blip, tiny_clip

CLIP_STEPS, CLIP_LR = 30, 5e-3
BLIP_STEPS, BLIP_LR = 40, 1e-2


@pytest.fixture(scope="session")
def red() -> Image.Image:
    return Image.new("RGB", (64, 64), (220, 30, 30))


@pytest.fixture(scope="session")
def blue() -> Image.Image:
    return Image.new("RGB", (64, 64), (30, 30, 220))


@pytest.fixture(scope="session")
def noise() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def blank() -> Image.Image:
    """A face-free image."""
    return Image.new("RGB", (256, 256), (200, 200, 200))


@pytest.fixture(scope="session")
def mirrored_astronaut(astronaut_image) -> Image.Image:
    return ImageOps.mirror(astronaut_image)


@pytest.fixture(scope="session")
def cameraman() -> Image.Image:
    """Another person (scikit-image's cameraman)."""
    from skimage import data

    return Image.fromarray(data.camera()).convert("RGB")


def fit_clip(images, texts, steps=CLIP_STEPS, lr=CLIP_LR):
    """The tiny CLIP after a few contrastive steps on (images[i], texts[i]) pairs."""
    bundle = tiny_clip()
    model, processor = bundle.model.train(), bundle.processor
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                     return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), processor


@pytest.fixture(scope="session")
def trained_clip_dir(tmp_path_factory, red, blue, astronaut_image, noise) -> str:
    """A tiny CLIP that knows red/blue and prefers "Good photo." for the astronaut, "Bad photo." for noise."""
    torch.manual_seed(0)
    model, processor = fit_clip([red, blue, astronaut_image.resize((64, 64)), noise],
                                ["red", "blue", "Good photo.", "Bad photo."])
    folder = tmp_path_factory.mktemp("trained-clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def trained_blip_dir(tmp_path_factory, red, blue) -> str:
    """A tiny BLIP whose ITM head learned that red goes with "red" and blue with "blue"."""
    torch.manual_seed(0)
    bundle = tiny_blip()
    model, processor = bundle.model.train(), bundle.processor
    pixels = processor.image_processor(images=[red, blue, red, blue], return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(["red", "blue", "blue", "red"], padding=True, return_tensors="pt")
    labels = torch.tensor([1, 1, 0, 0])
    optimizer = torch.optim.Adam(model.parameters(), lr=BLIP_LR)
    for _ in range(BLIP_STEPS):
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                       use_itm_head=True).itm_score
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("trained-blip")
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def references_dir(tmp_path_factory, astronaut_image, mirrored_astronaut, blank):
    """Two usable references (the astronaut and its mirror) and one face-free photo that must be skipped."""
    folder = tmp_path_factory.mktemp("references")
    astronaut_image.save(folder / "astronaut.png")
    mirrored_astronaut.save(folder / "mirror.png")
    blank.save(folder / "blank.png")
    return folder
