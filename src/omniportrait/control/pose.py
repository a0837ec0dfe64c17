"""People in a photo as OpenPose bodies: MediaPipe Pose's 33 landmarks mapped to the 18 OpenPose keypoints.

How :meth:`PoseDetector.detect` finds people (MediaPipe 0.10.14's legacy Pose finds one person per call):

1. The photo is analysed on a copy whose longer side is at most :data:`ANALYSIS_MAX_SIDE` pixels.
2. Pose runs on the whole copy; the person it finds (the most prominent one) is the first body.
3. Faces are found with :class:`~omniportrait.faces.MediaPipeFaceDetector` (whole image and tiles). Each
   face that no body found so far explains (no body has its head inside the face box grown by
   :data:`HEAD_BOX_GROWTH`) gets a crop around where its person stands: :data:`CROP_SIDES` face sizes to
   each side, :data:`CROP_ABOVE` above the face's top and :data:`CROP_BELOW` below it. Pose runs on the
   crop, and its body is kept when its head lies in that face's grown box (so a neighbour who fills
   more of the crop is not taken twice).
4. Bodies come back in that order: the whole-image person, then the others by face size, largest first.

So several people are found when their faces are visible; a second person seen from behind (no face) is
not. Joints whose MediaPipe visibility is below the threshold, or that lie outside the photo (MediaPipe
also guesses off-frame joints), are left out. The landmark names of MediaPipe and OpenPose both mean the
person's own left and right.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
from PIL import Image

from omniportrait.control.openpose import KEYPOINT_NAMES, Body, Point
from omniportrait.errors import ConfigError
from omniportrait.faces.base import Box
from omniportrait.faces.mediapipe_backend import _downscaled

__all__ = [
    "ANALYSIS_MAX_SIDE",
    "VISIBILITY_THRESHOLD",
    "MEDIAPIPE_LANDMARKS",
    "OPENPOSE_FROM_MEDIAPIPE",
    "NoPersonError",
    "PoseDetector",
    "body_from_landmarks",
    "default_pose_detector",
]

ANALYSIS_MAX_SIDE = 1024
"""Pose and face detection run on a copy whose longer side is at most this many pixels."""

VISIBILITY_THRESHOLD = 0.5
"""MediaPipe landmark visibility below which a joint is left out of the skeleton."""

MIN_DETECTION_CONFIDENCE = 0.5
"""MediaPipe Pose's person-detector confidence threshold."""

HEAD_BOX_GROWTH = 0.5
"""A body's head explains a face when it lies in the face box grown by this fraction of its size on each side."""

CROP_SIDES = 3.0
"""Face sizes (the box's longer side) the person crop reaches to each side of the face's centre."""

CROP_ABOVE = 1.0
"""Face sizes the person crop reaches above the face box's top."""

CROP_BELOW = 8.0
"""Face sizes the person crop reaches below the face box's top (a standing body is about 7–8 heads tall)."""

MEDIAPIPE_LANDMARKS = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye", "right_eye_outer",
    "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_pinky", "right_pinky", "left_index", "right_index",
    "left_thumb", "right_thumb", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    "left_heel", "right_heel", "left_foot_index", "right_foot_index",
)  # fmt: skip
"""MediaPipe Pose's 33 landmarks in its order (``mp.solutions.pose.PoseLandmark``, BlazePose topology)."""

OPENPOSE_FROM_MEDIAPIPE = {
    name: MEDIAPIPE_LANDMARKS.index(name) for name in KEYPOINT_NAMES if name in MEDIAPIPE_LANDMARKS
}
"""OpenPose keypoint name -> MediaPipe landmark index, for the 17 keypoints both models have (all but the neck)."""

NECK_FROM = (MEDIAPIPE_LANDMARKS.index("left_shoulder"), MEDIAPIPE_LANDMARKS.index("right_shoulder"))
"""OpenPose's neck has no MediaPipe landmark: it is the midpoint of the two shoulders, as visible as the lesser."""

_HEAD = ("nose", "right_eye", "left_eye", "right_ear", "left_ear")


class NoPersonError(ConfigError):
    """A photo given for a pose control image shows no person the detector can find."""


def body_from_landmarks(
    landmarks: np.ndarray, size: tuple[int, int], threshold: float = VISIBILITY_THRESHOLD
) -> Body | None:
    """The OpenPose body of one person's MediaPipe landmarks, or ``None`` when no joint is kept.

    Args:
        landmarks: ``33×3`` array of ``(x, y, visibility)`` per MediaPipe landmark, ``x, y`` in pixels.
        size: ``(width, height)`` of the image; joints outside it are left out.
        threshold: joints less visible than this are left out.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (len(MEDIAPIPE_LANDMARKS), 3):
        raise ValueError(f"expected {len(MEDIAPIPE_LANDMARKS)}×3 landmarks (x, y, visibility), got {landmarks.shape}")
    points = tuple(_keypoint(landmarks, name, size, threshold) for name in KEYPOINT_NAMES)
    body = Body(points)
    return body if body.found else None


def _keypoint(landmarks: np.ndarray, name: str, size: tuple[int, int], threshold: float) -> Point | None:
    """One OpenPose keypoint from the landmarks: ``None`` when not visible enough or outside the image."""
    if name == "neck":
        x, y = (landmarks[NECK_FROM[0], :2] + landmarks[NECK_FROM[1], :2]) / 2
        visibility = min(landmarks[NECK_FROM[0], 2], landmarks[NECK_FROM[1], 2])
    else:
        x, y, visibility = landmarks[OPENPOSE_FROM_MEDIAPIPE[name]]
    if not visibility >= threshold or not (0 <= x <= size[0] and 0 <= y <= size[1]):
        return None
    return float(x), float(y)


class PoseDetector:
    """Finds people's OpenPose bodies in photos with MediaPipe Pose (see the module docstring for the steps).

    Args:
        threshold: MediaPipe visibility below which a joint is left out.
        max_side: longer side of the copy that the detectors see.
        several_people: look for more people around the faces the face detector finds.

    The MediaPipe models are created once and reused; calls are serialised by a lock.
    """

    def __init__(
        self,
        *,
        threshold: float = VISIBILITY_THRESHOLD,
        max_side: int = ANALYSIS_MAX_SIDE,
        several_people: bool = True,
    ) -> None:
        from omniportrait.faces._mediapipe import create_solution, import_mediapipe
        from omniportrait.faces.mediapipe_backend import MediaPipeFaceDetector

        mp = import_mediapipe()
        self.threshold = threshold
        self.max_side = max_side
        self._pose = create_solution(
            lambda: mp.solutions.pose.Pose(
                static_image_mode=True,
                model_complexity=1,  # the full model ships in the wheel; lite and heavy would be downloaded
                enable_segmentation=False,
                min_detection_confidence=MIN_DETECTION_CONFIDENCE,
            )
        )
        self._faces = MediaPipeFaceDetector() if several_people else None
        self._lock = threading.Lock()
        self._closed = False

    def detect(self, image: Image.Image) -> list[Body]:
        """Every person found in an upright RGB image, as bodies in its pixels (may be empty)."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        small, scale = _downscaled(image, self.max_side)
        with self._lock:
            if self._closed:
                raise RuntimeError("this PoseDetector is closed; create a new one")
            bodies = self._bodies_in(np.asarray(small))
        return [body.transformed(1.0 / scale) for body in bodies]

    def close(self) -> None:
        """Release the MediaPipe models (safe to call twice)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pose.close()
            if self._faces is not None:
                self._faces.close()

    def _bodies_in(self, pixels: np.ndarray) -> list[Body]:
        """The whole-image body, then one body per face that no body explains yet."""
        first = self._body_in_region(pixels, (0, 0, pixels.shape[1], pixels.shape[0]))
        bodies = [first] if first is not None else []
        if self._faces is None:
            return bodies
        face_boxes = sorted((d.box for d in self._faces.detect(pixels)), key=lambda b: -_box_side(b))
        for face_box in face_boxes:
            head_box = _grown(face_box, HEAD_BOX_GROWTH)
            if any(_head_inside(body, head_box) for body in bodies):
                continue
            body = self._body_in_region(pixels, _person_crop(face_box, pixels.shape))
            if body is not None and _head_inside(body, head_box):
                bodies.append(body)
        return bodies

    def _body_in_region(self, pixels: np.ndarray, region: tuple[int, int, int, int]) -> Body | None:
        """Pose on ``pixels[top:bottom, left:right]``; the body in whole-image pixels, or ``None``."""
        from omniportrait.faces._mediapipe import native_stderr_filtered

        left, top, right, bottom = region
        crop = np.ascontiguousarray(pixels[top:bottom, left:right])
        with native_stderr_filtered():
            result = self._pose.process(crop)
        if result.pose_landmarks is None:
            return None
        height, width = crop.shape[:2]
        landmarks = np.array(
            [(p.x * width + left, p.y * height + top, p.visibility) for p in result.pose_landmarks.landmark]
        )
        return body_from_landmarks(landmarks, (pixels.shape[1], pixels.shape[0]), self.threshold)


@functools.lru_cache(maxsize=1)
def default_pose_detector() -> PoseDetector:
    """The process-wide :class:`PoseDetector`, created on first use."""
    return PoseDetector()


def _box_side(box: Box) -> float:
    """The longer side of a box."""
    return max(box[2] - box[0], box[3] - box[1])


def _grown(box: Box, fraction: float) -> Box:
    """``box`` grown by ``fraction`` of its width and height on each side."""
    grow_x, grow_y = fraction * (box[2] - box[0]), fraction * (box[3] - box[1])
    return box[0] - grow_x, box[1] - grow_y, box[2] + grow_x, box[3] + grow_y


def _head_inside(body: Body, box: Box) -> bool:
    """Whether the mean of the body's found head keypoints (nose, eyes, ears) lies inside ``box``."""
    head = [body[name] for name in _HEAD if body[name] is not None]
    if not head:
        return False
    x, y = np.mean(head, axis=0)
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _person_crop(face_box: Box, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the region where the person of ``face_box`` stands, in the image."""
    side = _box_side(face_box)
    centre_x = (face_box[0] + face_box[2]) / 2
    height, width = shape[:2]
    left = max(0, math.floor(centre_x - CROP_SIDES * side))
    right = min(width, math.ceil(centre_x + CROP_SIDES * side))
    top = max(0, math.floor(face_box[1] - CROP_ABOVE * side))
    bottom = min(height, math.ceil(face_box[1] + CROP_BELOW * side))
    return left, top, max(right, left + 1), max(bottom, top + 1)
