"""Plugins for the dataset tests, named as ``tests.data.stubs:NAME`` in ``BuildConfig``.

They wrap the real MediaPipe analyzer and change one thing, to reach filter branches that a real photo
reaches only with other detectors (a person box that misses the face), or to slow a build down so that
it can be killed half-way.
"""

from __future__ import annotations

import dataclasses
import time

from omniportrait.faces import FaceAnalyzer, default_analyzer


class NoPersonAnalyzer(FaceAnalyzer):
    """The real faces, with no person box (as when no person is detected around the face)."""

    def analyze(self, image):
        return [dataclasses.replace(face, person_box=None) for face in default_analyzer().analyze(image)]


class PersonElsewhereAnalyzer(FaceAnalyzer):
    """The real faces, with a person box in the image's bottom-right quarter, away from the face."""

    def analyze(self, image):
        width, height = image.size
        box = (0.75 * width, 0.75 * height, float(width), float(height))
        return [dataclasses.replace(face, person_box=box) for face in default_analyzer().analyze(image)]


class SlowAnalyzer(FaceAnalyzer):
    """The real analyzer, 0.3 s slower per image."""

    def analyze(self, image):
        time.sleep(0.3)
        return default_analyzer().analyze(image)


class FixedCaptioner:
    """Captions every image 'a photo of a person'."""

    def caption(self, image):
        return "a photo of a person"

