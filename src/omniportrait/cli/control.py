"""``omniportrait control pose|canny|image PHOTO --out OUT.png``: write a ControlNet control image alone."""

from __future__ import annotations

import argparse
import sys

from omniportrait.cli.args import existing_file, number, output_file
from omniportrait.control.canny import HIGH_THRESHOLD, LOW_THRESHOLD
from omniportrait.control.spec import CONTROL_KINDS
from omniportrait.errors import ConfigError
from omniportrait.values import IMAGE_SIDE, Range

CANNY_THRESHOLD = Range(0, 1000, note="OpenCV's Canny gradient thresholds")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "control", help="make a ControlNet control image (pose skeleton, canny edges) from a photo",
        description="Make a ControlNet control image from a photo, offline: pose (an OpenPose body skeleton of "
                    "each person found), canny (edges) or image (a control image you already have, read and "
                    "sized). See docs/control.md.",
    )
    p.add_argument("kind", choices=CONTROL_KINDS, help="pose, canny or image")
    p.add_argument("photo", metavar="PHOTO", type=existing_file(),
                   help="the photo (pose, canny) or the ready control image (image)")
    p.add_argument("--out", required=True, type=output_file(".png"), help="output PNG path")
    p.add_argument("--width", type=number(IMAGE_SIDE), default=None,
                   help="generation width; with --height, the photo is scaled to cover W×H and centre-cropped "
                        "(default: the photo's size)")
    p.add_argument("--height", type=number(IMAGE_SIDE), default=None, help="generation height (with --width)")
    p.add_argument("--low-threshold", type=number(CANNY_THRESHOLD), default=None,
                   help=f"canny: gradient below which there is no edge (default {LOW_THRESHOLD:g})")
    p.add_argument("--high-threshold", type=number(CANNY_THRESHOLD), default=None,
                   help=f"canny: gradient above which there is always an edge (default {HIGH_THRESHOLD:g})")
    p.set_defaults(run=run)


def size_from_args(args: argparse.Namespace) -> tuple[int, int] | None:
    """``(width, height)`` from ``--width`` and ``--height``, which come together or not at all."""
    if (args.width is None) != (args.height is None):
        raise ConfigError("--width and --height go together; give both, or neither to keep the photo's size")
    return None if args.width is None else (args.width, args.height)


def thresholds_from_args(args: argparse.Namespace) -> dict[str, float]:
    """Canny's thresholds; refused for the other kinds, where they would do nothing."""
    given = {"low_threshold": args.low_threshold, "high_threshold": args.high_threshold}
    if args.kind != "canny":
        if any(value is not None for value in given.values()):
            raise ConfigError(f"--low-threshold and --high-threshold apply to canny, not {args.kind}; drop them")
        return {}
    defaults = {"low_threshold": LOW_THRESHOLD, "high_threshold": HIGH_THRESHOLD}
    return {name: defaults[name] if value is None else value for name, value in given.items()}


def run(args: argparse.Namespace) -> int:
    from omniportrait.cli.generate import output_paths
    from omniportrait.control.make import make_control_image
    from omniportrait.images import save_image_atomic

    path = output_paths(args.out, 1)[0]
    image = make_control_image(args.kind, args.photo, size_from_args(args), **thresholds_from_args(args))
    save_image_atomic(image, path)
    print(f"wrote {path} ({image.width}x{image.height}, {args.kind})", file=sys.stderr)
    return 0
