"""Sample images during training: the fixed prompts, one fixed reference and seed, every N steps.

The samples run the generate pipeline itself (the one the trainer's parts come from) with the PIE being
trained and Reference-Based Guidance off, so they show what the PIE alone contributes at that step
(``omniportrait generate --pivot-encoder ... --no-rb``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from omniportrait.errors import ClassWordError, ConfigError
from omniportrait.faces.base import AlignedFace
from omniportrait.guidance.config import RBGuidanceConfig
from omniportrait.images import save_image_atomic
from omniportrait.identity import Identity, locate_class_word

GUIDANCE_SCALE = 7.5  # the paper's CFG weight w


@dataclass(frozen=True)
class CropReference:
    """A reference that is already an aligned face crop (a training record's), for the pipeline's binding."""

    face: Image.Image
    mask: np.ndarray | None = None

    def aligned(self, size: int, margin: float | None = None) -> AlignedFace:
        image = self.face.convert("RGB").resize((size, size), Image.BICUBIC)
        mask = np.ones((size, size), bool) if self.mask is None else np.asarray(
            Image.fromarray(np.asarray(self.mask, np.uint8) * 255).resize((size, size), Image.BILINEAR)) >= 128
        scale = np.array([[size / self.face.width, 0, 0], [0, size / self.face.height, 0]], np.float64)
        return AlignedFace(image=image, mask=mask, matrix=scale)


def sample_reference(path: str | None, first_record):
    """The user's reference photo (face found by the face analyzer), or the first record's face crop."""
    if path is not None:
        from omniportrait.faces import prepare_reference

        return prepare_reference(path)
    return CropReference(first_record.face_crop, first_record.face_crop_mask)


def sample_prompts(templates: tuple[str, ...], word: str, tokenizer) -> list[str]:
    """The prompts with ``{word}`` filled in; each must contain the class word."""
    prompts = [template.replace("{word}", word) for template in templates]
    for prompt in prompts:
        try:
            locate_class_word(tokenizer, prompt, word)
        except ClassWordError as err:
            raise ConfigError(f"sample prompt {prompt!r} cannot bind the class word: {err}") from err
    return prompts


@dataclass
class SampleWriter:
    """Draws and saves ``OUTPUT/samples/step-N/K.png`` for each fixed prompt."""

    pipe: object
    reference: object
    word: str
    prompts: list[str]
    folder: Path
    resolution: int
    steps: int
    seed: int

    def __call__(self, step: int) -> list[Image.Image]:
        pie = self.pipe.pivot_encoder
        was_training = pie.training
        pie.eval()
        images = []
        try:
            for index, prompt in enumerate(self.prompts):
                generator = torch.Generator("cpu").manual_seed(self.seed)
                output = self.pipe(prompt, identities=[Identity(self.reference, self.word)], height=self.resolution,
                                   width=self.resolution, num_inference_steps=self.steps,
                                   guidance_scale=GUIDANCE_SCALE, generator=generator,
                                   rb_guidance=RBGuidanceConfig(enabled=False))
                image = output.images[0]
                save_image_atomic(image, self.folder / f"step-{step}" / f"{index}.png")
                images.append(image)
        finally:
            pie.train(was_training)
        return images
