"""``--control KIND:IMAGE[:SCALE]``: parsing from the right, validation of kind and scale."""

import math
from pathlib import Path

import pytest

from omniportrait.control import CONTROL_KINDS, ControlSpec, parse_control
from omniportrait.errors import ConfigError


@pytest.mark.parametrize(
    "value, kind, image, scale",
    [
        ("pose:photo.jpg", "pose", "photo.jpg", 1.0),
        ("pose:photo.jpg:0.8", "pose", "photo.jpg", 0.8),
        ("canny:edges/in.png:0", "canny", "edges/in.png", 0.0),
        ("image:depth.png:1.5", "image", "depth.png", 1.5),
        ("image:C:/maps/depth.png", "image", "C:/maps/depth.png", 1.0),
        ("pose:shots/12:30.jpg:.5", "pose", "shots/12:30.jpg", 0.5),
        ("pose:a:b:c.jpg", "pose", "a:b:c.jpg", 1.0),
        ("canny:x.png:2e-1", "canny", "x.png", 0.2),
    ],
)
def test_parses_kind_path_and_scale_from_the_right(value, kind, image, scale):
    spec = parse_control(value)

    assert spec == ControlSpec(kind, Path(image), scale)
    assert isinstance(spec.image, Path)


def test_home_in_the_path_is_expanded():
    assert parse_control("pose:~/me.jpg").image == Path.home() / "me.jpg"


@pytest.mark.parametrize(
    "value, named",
    [
        ("depth:d.png", "unknown control kind 'depth'"),
        ("Pose:p.jpg", "unknown control kind 'Pose'"),
        ("pose", "must look like KIND:IMAGE[:SCALE]"),
        ("pose:", "must look like KIND:IMAGE[:SCALE]"),
        ("pose::0.5", "names no image"),
        ("pose:p.jpg:-0.5", "finite number at least 0"),
        ("pose:p.jpg:nan", "finite number at least 0"),
        ("pose:p.jpg:inf", "finite number at least 0"),
        ("pose:p.jpg:-inf", "finite number at least 0"),
        ("pose:p.jpg:0.8.1", "the scale '0.8.1' is not a number"),
        ("pose:p.jpg:1x", "the scale '1x' is not a number"),
    ],
)
def test_bad_values_are_one_line_config_errors(value, named):
    with pytest.raises(ConfigError, match="^[^\n]+$") as caught:
        parse_control(value)

    assert named in str(caught.value)
    assert value in str(caught.value)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ConfigError) as caught:
        parse_control("seg:s.png")

    assert all(kind in str(caught.value) for kind in CONTROL_KINDS)


@pytest.mark.parametrize("kind, scale", [("lineart", 1.0), ("pose", math.nan), ("pose", -1.0), ("pose", "1")])
def test_spec_built_directly_is_checked_too(kind, scale):
    with pytest.raises(ConfigError):
        ControlSpec(kind, Path("p.jpg"), scale)


def test_spec_turns_a_string_path_into_a_path():
    assert ControlSpec("canny", "a/b.png").image == Path("a/b.png")
