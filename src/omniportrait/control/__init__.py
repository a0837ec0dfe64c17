"""ControlNet control images made offline from a photo by our own code (see ``docs/control.md``).

- ``pose``: MediaPipe Pose -> the 18-keypoint OpenPose body skeleton on black (:mod:`.pose`, :mod:`.openpose`);
- ``canny``: OpenCV's Canny edges (:mod:`.canny`);
- ``image``: a control image the user already has, read and sized.

:func:`make_control_image` is the one entry point; :func:`parse_control` reads ``--control KIND:IMAGE[:SCALE]``.
Importing this package is cheap; MediaPipe and OpenCV are imported when first needed.
"""

from omniportrait.control.canny import HIGH_THRESHOLD, LOW_THRESHOLD, canny_edges
from omniportrait.control.make import cover_transform, fit_image, make_control_image
from omniportrait.control.openpose import COLOURS, KEYPOINT_NAMES, LIMBS, Body, draw_bodies
from omniportrait.control.pose import NoPersonError, PoseDetector, body_from_landmarks, default_pose_detector
from omniportrait.control.spec import CONTROL_KINDS, ControlSpec, parse_control

__all__ = [
    "COLOURS",
    "CONTROL_KINDS",
    "HIGH_THRESHOLD",
    "KEYPOINT_NAMES",
    "LIMBS",
    "LOW_THRESHOLD",
    "Body",
    "ControlSpec",
    "NoPersonError",
    "PoseDetector",
    "body_from_landmarks",
    "canny_edges",
    "cover_transform",
    "default_pose_detector",
    "draw_bodies",
    "fit_image",
    "make_control_image",
    "parse_control",
]
