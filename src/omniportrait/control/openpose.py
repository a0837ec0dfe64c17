"""The OpenPose body layout that pose ControlNets were trained on, and our own drawing of it.

Facts used here (public knowledge about the OpenPose output format, not code):

- keypoint order: OpenPose's 18-point COCO body model (``POSE_COCO_BODY_PARTS``, also called BODY_18):
  nose, neck, right shoulder, right elbow, right wrist, left shoulder, left elbow, left wrist, right hip,
  right knee, right ankle, left hip, left knee, left ankle, right eye, left eye, right ear, left ear.
  "Right" is the person's right, which is on the viewer's left in a frontal photo.
- limbs: the 17 pairs the OpenPose/ControlNet body drawing connects (the COCO model's 19 pairs without
  the two ear-to-shoulder ones), in the order that sets their colours;
- colours: the 18 colours stepping round the hue circle from red, in RGB; joint ``i`` and limb ``i``
  take colour ``i``. Limbs are drawn at 60% strength over what lies below them, joints at full strength
  on top, which is how the skeletons in the ControlNet training images look;
- size: limbs are ellipses 4 px from the bone's line, joints discs of radius 4 px, at 512 px on the
  shorter side (the annotators' detect resolution); we scale both with the image.

The drawing code is ours: we do not use controlnet_aux's or ControlNet's OpenPose code, which carry
OpenPose's non-commercial licence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "KEYPOINT_NAMES",
    "LIMBS",
    "COLOURS",
    "REFERENCE_SIDE",
    "LIMB_HALF_WIDTH",
    "JOINT_RADIUS",
    "LIMB_STRENGTH",
    "Point",
    "Body",
    "draw_bodies",
    "limb_half_width",
]

KEYPOINT_NAMES = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
"""The 18 OpenPose COCO (BODY_18) body keypoints, in OpenPose's order."""

LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7),
    (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
"""The 17 drawn limbs as pairs of :data:`KEYPOINT_NAMES` indices; limb ``i`` has colour ``COLOURS[i]``."""

COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
"""The 18 OpenPose body colours (RGB): hue steps of 20° from red; joint ``i`` and limb ``i`` use ``COLOURS[i]``."""

REFERENCE_SIDE = 512
"""Shorter image side at which limbs and joints have their reference sizes below."""

LIMB_HALF_WIDTH = 4
"""Half the width of a limb's ellipse (its semi-minor axis), in pixels at :data:`REFERENCE_SIDE`."""

JOINT_RADIUS = 4
"""Radius of a joint's disc, in pixels at :data:`REFERENCE_SIDE`."""

LIMB_STRENGTH = 0.6
"""A limb's colour is blended over the canvas with this weight (the canvas keeps the rest)."""

_ELLIPSE_VERTICES = 72

Point = tuple[float, float]
"""``(x, y)`` in continuous pixels: the image spans ``(0, 0)``–``(width, height)``."""


@dataclass(frozen=True)
class Body:
    """One person's 18 OpenPose keypoints, ``None`` where a joint was not found or not visible enough.

    Attributes:
        points: 18 entries in :data:`KEYPOINT_NAMES` order, each a :data:`Point` or ``None``.
    """

    points: tuple[Point | None, ...]

    def __post_init__(self) -> None:
        if len(self.points) != len(KEYPOINT_NAMES):
            raise ValueError(f"a Body has {len(KEYPOINT_NAMES)} keypoints, got {len(self.points)}")

    def __getitem__(self, name: str) -> Point | None:
        """The keypoint called ``name`` (one of :data:`KEYPOINT_NAMES`)."""
        return self.points[KEYPOINT_NAMES.index(name)]

    @property
    def found(self) -> int:
        """How many keypoints were found."""
        return sum(point is not None for point in self.points)

    def transformed(self, scale: float, left: float = 0.0, top: float = 0.0) -> Body:
        """The body in another frame: ``x' = x·scale − left``, ``y' = y·scale − top`` (resize, then crop)."""
        return Body(tuple(None if p is None else (p[0] * scale - left, p[1] * scale - top) for p in self.points))


def limb_half_width(size: tuple[int, int]) -> float:
    """:data:`LIMB_HALF_WIDTH` (also the joint radius) scaled to an image of ``size = (width, height)``."""
    return max(1.0, LIMB_HALF_WIDTH * min(size) / REFERENCE_SIDE)


def draw_bodies(bodies: list[Body], size: tuple[int, int]) -> Image.Image:
    """An RGB image of ``size = (width, height)``: every body's limbs, then its joints, on black.

    Limbs whose two ends were found are filled ellipses along the bone, blended over the canvas at
    :data:`LIMB_STRENGTH`; found joints are discs in full colour. Points outside the image are clipped
    by the drawing, so a skeleton cut by a crop is drawn as far as it reaches into the image.
    """
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    half_width = limb_half_width(size)
    radius = JOINT_RADIUS * half_width / LIMB_HALF_WIDTH
    for body in bodies:
        for colour, (start, end) in zip(COLOURS, LIMBS):
            if body.points[start] is not None and body.points[end] is not None:
                mask = _limb_mask(body.points[start], body.points[end], half_width, size)
                canvas[mask] = (1 - LIMB_STRENGTH) * canvas[mask] + LIMB_STRENGTH * np.array(colour)
    image = Image.fromarray(np.round(canvas).astype(np.uint8), "RGB")
    for body in bodies:
        _draw_joints(ImageDraw.Draw(image), body, radius)
    return image


def _limb_mask(start: Point, end: Point, half_width: float, size: tuple[int, int]) -> np.ndarray:
    """``H×W`` bool: the filled ellipse whose long axis joins ``start`` and ``end``."""
    mask = Image.new("1", size, 0)
    ImageDraw.Draw(mask).polygon(_ellipse_polygon(start, end, half_width), fill=1)
    return np.asarray(mask, dtype=bool)


def _ellipse_polygon(start: Point, end: Point, half_width: float) -> list[tuple[float, float]]:
    """Vertices (PIL pixel-centre coordinates) of the ellipse with semi-axes ``|end − start|/2`` and
    ``half_width``, centred between the two points and turned along the bone."""
    (x0, y0), (x1, y1) = start, end
    centre_x, centre_y = (x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5
    half_length = max(math.hypot(x1 - x0, y1 - y0) / 2, half_width)
    angle = math.atan2(y1 - y0, x1 - x0)
    t = np.linspace(0, 2 * math.pi, _ELLIPSE_VERTICES, endpoint=False)
    along, across = half_length * np.cos(t), half_width * np.sin(t)
    xs = centre_x + along * math.cos(angle) - across * math.sin(angle)
    ys = centre_y + along * math.sin(angle) + across * math.cos(angle)
    return list(zip(xs.tolist(), ys.tolist()))


def _draw_joints(draw: ImageDraw.ImageDraw, body: Body, radius: float) -> None:
    """Discs of ``radius`` in each found joint's colour."""
    for colour, point in zip(COLOURS, body.points):
        if point is not None:
            x, y = point[0] - 0.5, point[1] - 0.5
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
