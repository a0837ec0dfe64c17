"""Shared face-analysis fixtures: one analyzer for the whole run (creating one takes about a second)."""

import numpy as np
import pytest
from PIL import Image

from omniportrait.faces import Face, FaceAnalyzer, default_analyzer


@pytest.fixture(scope="session")
def face_analyzer() -> FaceAnalyzer:
    """The cached default MediaPipe analyzer, shared with ``prepare_reference``."""
    return default_analyzer()


@pytest.fixture(scope="session")
def astronaut_face(face_analyzer, astronaut_image) -> Face:
    """The one face of ``skimage.data.astronaut()``."""
    faces = face_analyzer.analyze(astronaut_image)
    assert len(faces) == 1
    return faces[0]


@pytest.fixture(scope="session")
def two_astronauts(astronaut_image) -> Image.Image:
    """The astronaut at full size on the left and at 360 px on the right of a white canvas."""
    canvas = Image.new("RGB", (1100, 640), "white")
    canvas.paste(astronaut_image, (0, 60))
    canvas.paste(astronaut_image.resize((360, 360)), (680, 100))
    return canvas


@pytest.fixture(scope="session")
def noise_image() -> Image.Image:
    """Uniform RGB noise, seeded."""
    pixels = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    return Image.fromarray(pixels)

