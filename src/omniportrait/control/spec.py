"""What a ``--control KIND:IMAGE[:SCALE]`` flag asks for: a typed :class:`ControlSpec` and its parser.

The kinds (see ``docs/control.md``):

- ``pose``: a photo of one or more people becomes an OpenPose body skeleton on black;
- ``canny``: a photo becomes its Canny edge map, white on black;
- ``image``: a control image the user already has (depth, segmentation, lineart, a pose skeleton), used as is.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from omniportrait.errors import ConfigError

__all__ = ["CONTROL_KINDS", "ControlSpec", "parse_control"]

CONTROL_KINDS = ("pose", "canny", "image")
"""Kinds of control image :func:`~omniportrait.control.make_control_image` makes."""

_LOOKS_NUMERIC = re.compile(r"^[-+]?(\d|\.\d)")
"""A last field that starts like a number is meant as a scale, even when it does not parse as one."""

_FLAG_FORM = "KIND:IMAGE[:SCALE], e.g. pose:photo.jpg:0.8"


@dataclass(frozen=True)
class ControlSpec:
    """One control image for a ControlNet: its kind, the photo or image it comes from, and its weight.

    Attributes:
        kind: one of :data:`CONTROL_KINDS`.
        image: the photo (``pose``, ``canny``) or the ready control image (``image``).
        scale: the ControlNet's conditioning scale, finite and at least 0 (diffusers'
            ``controlnet_conditioning_scale``; 1.0 is its default).
    """

    kind: str
    image: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_kind(self.kind)
        check_scale(self.scale, f"control {self.kind}:{self.image}")
        object.__setattr__(self, "image", Path(self.image))


def parse_control(value: str) -> ControlSpec:
    """``KIND:IMAGE[:SCALE]`` -> :class:`ControlSpec`; bad input raises :class:`ConfigError`.

    The kind is the text before the first colon (kinds have none); the scale is the last field when it
    starts like a number. Everything in between is the image path, so paths may contain colons
    (``image:C:/maps/depth.png``, ``pose:shots/12:30.jpg:0.5``). A path that itself ends in ``:NUMBER``
    must be given with an explicit scale after it.
    """
    kind, separator, rest = value.partition(":")
    if not separator or not rest:
        raise ConfigError(f"--control {value!r} must look like {_FLAG_FORM}")
    check_kind(kind, value)
    path, scale = _split_scale(rest, value)
    if not path:
        raise ConfigError(f"--control {value!r} names no image; write {_FLAG_FORM}")
    return ControlSpec(kind, Path(os.path.expanduser(path)), scale)


def check_kind(kind: str, flag: str | None = None) -> None:
    """Raise :class:`ConfigError` unless ``kind`` is one of :data:`CONTROL_KINDS`."""
    if kind not in CONTROL_KINDS:
        where = f"--control {flag!r}: " if flag is not None else ""
        raise ConfigError(f"{where}unknown control kind {kind!r}; use one of {', '.join(CONTROL_KINDS)}")


def check_scale(scale: float, flag: str) -> None:
    """Raise :class:`ConfigError` unless ``scale`` is a finite number at least 0."""
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ConfigError(f"{flag}: the scale must be a finite number at least 0 (e.g. 0.8), got {scale!r}")


def _split_scale(rest: str, flag: str) -> tuple[str, float]:
    """``IMAGE[:SCALE]`` -> (image, scale); the default scale 1.0 when the last field is not numeric."""
    path, separator, last = rest.rpartition(":")
    if not separator or not _is_meant_as_scale(last):
        return rest, 1.0
    try:
        scale = float(last)
    except ValueError:
        raise ConfigError(f"--control {flag!r}: the scale {last!r} is not a number; write e.g. 0.8") from None
    check_scale(scale, f"--control {flag!r}")
    return path, scale


def _is_meant_as_scale(field: str) -> bool:
    """Whether the last ``:`` field is a scale: it starts like a number, or spells nan/inf."""
    return bool(_LOOKS_NUMERIC.match(field)) or field.strip().lower().lstrip("+-") in {"nan", "inf", "infinity"}
