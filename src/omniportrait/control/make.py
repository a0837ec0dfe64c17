"""The single entry point for control images: a kind and a photo (or a :class:`ControlSpec`) -> RGB image.

Sizing: with ``size = (width, height)``, the result has exactly that size. The source is scaled to cover
it and centred, and what sticks out is cut off (the default "crop and resize" of the ControlNet WebUI
extension), so people and edges keep their proportions. A pose skeleton is drawn at the target size
rather than resized, so its lines stay sharp and their width fits that size; canny edges are found on
the resized photo for the same reason.
"""

from __future__ import annotations

import numbers
import os

from PIL import Image

from omniportrait.control.canny import HIGH_THRESHOLD, LOW_THRESHOLD, canny_edges, check_thresholds
from omniportrait.control.openpose import draw_bodies
from omniportrait.control.pose import NoPersonError, PoseDetector, default_pose_detector
from omniportrait.control.spec import ControlSpec, check_kind
from omniportrait.errors import ConfigError
from omniportrait.images import MAX_PIXELS, ImageSource, load_image

__all__ = ["make_control_image", "cover_transform", "fit_image", "check_size"]


def make_control_image(
    spec_or_kind: ControlSpec | str,
    image: ImageSource | None = None,
    size: tuple[int, int] | None = None,
    *,
    low_threshold: float = LOW_THRESHOLD,
    high_threshold: float = HIGH_THRESHOLD,
    detector: PoseDetector | None = None,
) -> Image.Image:
    """The control image of ``kind`` made from ``image`` (a path, PIL image or array), as RGB.

    Args:
        spec_or_kind: a :class:`ControlSpec` (its ``image`` is used unless ``image`` is given) or a kind:
            ``"pose"``, ``"canny"`` or ``"image"``.
        image: the photo (``pose``, ``canny``) or the ready control image (``image``); read with
            :func:`~omniportrait.images.load_image`, so EXIF rotation, grayscale, 16-bit and alpha are handled.
        size: ``(width, height)`` of the generation; ``None`` keeps the source's size.
        low_threshold, high_threshold: Canny hysteresis thresholds (``canny`` only).
        detector: the pose detector (default: the shared :func:`default_pose_detector`).

    Raises:
        InvalidImageError: the image cannot be read.
        NoPersonError: (a :class:`ConfigError`) ``pose`` found no person; the message names the photo.
        ConfigError: unknown kind, bad size or thresholds.
    """
    kind = spec_or_kind.kind if isinstance(spec_or_kind, ControlSpec) else spec_or_kind
    check_kind(kind)
    if image is None:
        if not isinstance(spec_or_kind, ControlSpec):
            raise ConfigError(f"a {kind} control image needs a photo; pass image=PATH")
        image = spec_or_kind.image
    if size is not None:
        check_size(size)
        size = (int(size[0]), int(size[1]))
    if kind == "canny":
        check_thresholds(low_threshold, high_threshold)
    source = load_image(image)
    if kind == "pose":
        return pose_image(source, _describe(image), size, detector or default_pose_detector())
    fitted = fit_image(source, size)
    return canny_edges(fitted, low_threshold, high_threshold) if kind == "canny" else fitted


def pose_image(photo: Image.Image, name: str, size: tuple[int, int] | None, detector: PoseDetector) -> Image.Image:
    """The OpenPose skeletons of the people in ``photo``, drawn at ``size``; :class:`NoPersonError` when none."""
    bodies = detector.detect(photo)
    if not bodies:
        raise NoPersonError(
            f"no person found in {name} for a pose control image; pass a photo with a visible person, "
            "or --control image:YOUR_POSE.png"
        )
    size = photo.size if size is None else size
    scale, left, top = cover_transform(photo.size, size)
    return draw_bodies([body.transformed(scale, left, top) for body in bodies], size)


def cover_transform(source: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float]:
    """``(scale, left, top)``: scale ``source`` by ``scale`` to cover ``target``, then crop it at ``(left, top)``.

    A source point ``(x, y)`` lands at ``(x·scale − left, y·scale − top)``; the crop is centred.
    """
    scale = max(target[0] / source[0], target[1] / source[1])
    return scale, (source[0] * scale - target[0]) / 2, (source[1] * scale - target[1]) / 2


def fit_image(image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """``image`` scaled to cover ``size`` and centre-cropped to it (Lanczos); a copy when ``size`` is ``None``."""
    if size is None or tuple(size) == image.size:
        return image.copy()
    scale, left, top = cover_transform(image.size, size)
    box = (left / scale, top / scale, (left + size[0]) / scale, (top + size[1]) / scale)
    return image.resize(tuple(size), Image.LANCZOS, box=box, reducing_gap=3.0)


def check_size(size: tuple[int, int]) -> None:
    """Raise :class:`ConfigError` unless ``size`` is two positive integers within the image pixel limit."""
    width, height = size
    if not all(_is_whole(v) and v > 0 for v in (width, height)) or width * height > MAX_PIXELS:
        raise ConfigError(
            f"a control image size must be two positive whole numbers of at most {MAX_PIXELS // 1_000_000} "
            f"megapixels together, got {width!r}×{height!r}"
        )


def _is_whole(value) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _describe(source: ImageSource) -> str:
    """Name a photo in messages: its path when it has one."""
    if isinstance(source, (str, os.PathLike)):
        return f"'{source}'"
    filename = getattr(source, "filename", "")
    return f"'{filename}'" if filename else "the image"
