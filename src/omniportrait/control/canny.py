"""Canny edge control images: OpenCV's Canny detector, white edges on black, three channels."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from omniportrait.errors import ConfigError

__all__ = ["LOW_THRESHOLD", "HIGH_THRESHOLD", "canny_edges", "check_thresholds"]

LOW_THRESHOLD = 100.0
"""Gradient magnitude below which a pixel is never an edge (the ControlNet canny annotator's default)."""

HIGH_THRESHOLD = 200.0
"""Gradient magnitude above which a pixel is always an edge (the ControlNet canny annotator's default)."""


def canny_edges(image: Image.Image, low: float = LOW_THRESHOLD, high: float = HIGH_THRESHOLD) -> Image.Image:
    """The Canny edge map of an RGB image as an RGB image of the same size, each pixel 0 or 255 on all channels.

    ``cv2.Canny`` runs on the three colour channels (on each pixel it takes the channel with the strongest
    gradient), as ControlNet's canny annotator does; hysteresis keeps weak edges (between ``low`` and
    ``high``) only where they connect to strong ones.
    """
    import cv2

    check_thresholds(low, high)
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    edges = cv2.Canny(pixels, low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2), "RGB")


def check_thresholds(low: float, high: float) -> None:
    """Raise :class:`ConfigError` unless ``0 <= low <= high``, both finite."""
    if not all(math.isfinite(value) and value >= 0 for value in (low, high)) or low > high:
        raise ConfigError(
            f"canny thresholds must be finite with 0 <= low <= high, got low={low!r} high={high!r}; "
            f"the defaults are {LOW_THRESHOLD:g} and {HIGH_THRESHOLD:g}"
        )
