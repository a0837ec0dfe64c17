"""Shared control-image fixtures: the pose detector (MediaPipe, created once) and photos."""

from pathlib import Path

import pytest
from PIL import Image

from omniportrait.control import PoseDetector, default_pose_detector

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def pose_detector() -> PoseDetector:
    """The cached default detector, shared with ``make_control_image``."""
    return default_pose_detector()


@pytest.fixture(scope="session")
def astronaut_photo() -> Path:
    """``examples/astronaut.jpg``: scikit-image's astronaut, one person seen from the waist up."""
    return EXAMPLES / "astronaut.jpg"


@pytest.fixture(scope="session")
def coffee_path(tmp_path_factory) -> Path:
    """``skimage.data.coffee()``: a cup on a table, no person."""
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "coffee.png"
    Image.fromarray(data.coffee()).save(path)
    return path
