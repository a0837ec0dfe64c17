"""Every flag of every subcommand with boundary and junk values: exit 2, one line, no traceback, nothing written.

The table is built by walking the parsers: each flag's argparse type says what it accepts (a ``Range``, a
kind of path, a list of choices), and the values just outside that are derived from it, so a new flag is
covered as soon as it is declared with one of the shared types. ``bench`` is left out (it is being moved).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from omniportrait.cli import build_parser, main
from omniportrait.values import SEED_MAX

SUBCOMMANDS = ("generate", "train", "build-dataset", "evaluate", "web", "control", "convert")
JUNK = ("", "abc")


def numbers_outside(value_range) -> list[str]:
    """Values a ``Range`` refuses: non-numbers, non-finite numbers, just past each bound, fractions for
    integers, non-multiples, and huge ones."""
    values = [*JUNK, "nan", "inf", "-inf", "1e400"]
    low, high = value_range.low, value_range.high
    if low is not None:
        below = low if value_range.low_open else low - 1
        values.append(str(int(below)) if value_range.integer or float(below).is_integer() else repr(below))
        if low >= 0:
            values.append("-1")
    if high is not None:
        above = high if value_range.high_open else high + 1
        values += [str(int(above)) if value_range.integer else repr(float(above)), str(10**30)]
    if value_range.integer:
        values.append("1.5")
    if value_range.multiple_of:
        values.append(str(int(low or 0) + value_range.multiple_of + 1))
    return sorted(set(values))


def bad_values(parse, place: Path) -> list[str]:
    """Refused values for a flag whose argparse type is ``parse`` (``place``: a folder holding a file ``f.png``
    and a folder ``d``)."""
    a_file, a_folder, missing = str(place / "f.png"), str(place / "d"), str(place / "missing" / "x")
    if hasattr(parse, "range"):
        return numbers_outside(parse.range)
    kind = getattr(parse, "kind", None)
    if hasattr(parse, "choices"):
        return ["", "nope"]
    by_kind = {
        "text": ["", "   "],
        "file": ["", missing, a_folder],
        "folder": ["", missing, a_file],
        "pivot encoder": ["", missing, a_file],
        "init": ["", "photomaker", f"photomaker:{missing}.bin", f"nope:{a_file}", f"photomaker:{a_file}",
                 f"photomaker:{a_folder}"],
        "output folder": ["", a_file, "/dev/null/sub", "/dev/null"],
        "output file": ["", a_folder, "/dev/null/x.png", "/dev/null", str(place / "new" / "x.jpg")],
        "identity": ["", "just-a-path", f"{a_file}:woman:x", f"{a_file}:woman:0", f"{a_folder}:woman",
                     f"{missing}:woman"],
        "device": ["", "nope", "cuda:99"],
        "data": ["", missing],
        "control": ["", "pose", "nope:" + a_file, f"pose:{missing}", f"pose:{a_folder}", f"pose:{a_file}:-1",
                    f"pose:{a_file}:nan", f"canny:{a_file}:1x"],
        "controlnet": ["", "pose", "nope=tiny", "pose=", f"pose={missing}", f"pose={a_file}", f"image={a_folder}"],
        "ip-adapter": ["", missing, a_file, a_folder, "just-a-name"],
        "lora": ["", missing, a_file, f"{a_file}:0.5", f"{missing}.safetensors:x", f"{missing}.safetensors:-1"],
    }
    return by_kind.get(kind, [])


def base_arguments(command: str, place: Path) -> list[str]:
    """A command line that parses: the required flags with usable values."""
    return {
        "generate": ["generate", "--preset", "tiny-sd15", "--prompt", "a woman", "--reference",
                     str(place / "f.png"), "--out", str(place / "out" / "o.png")],
        "train": ["train", "--data", str(place / "d"), "--output", str(place / "out")],
        "build-dataset": ["build-dataset", "--input", str(place / "d"), "--output", str(place / "out")],
        "evaluate": ["evaluate", "--references", str(place / "d"), "--output", str(place / "out")],
        "web": ["web", "--preset", "tiny-sd15"],
        "control": ["control", "canny", str(place / "f.png"), "--out", str(place / "out" / "c.png")],
        "convert": ["convert", "photomaker", str(place / "f.png"), "--out", str(place / "out")],
    }[command]


def subparser(command: str) -> argparse.ArgumentParser:
    actions = build_parser()._subparsers._group_actions[0]
    return actions.choices[command]


def flag_cases(place: Path) -> list[tuple[str, str, str]]:
    """``(command, flag, value)`` for every typed flag of every subcommand and each value it must refuse."""
    cases = []
    for command in SUBCOMMANDS:
        for action in subparser(command)._actions:
            if not action.option_strings or action.nargs == 0 or action.dest == "help":
                continue
            flag = action.option_strings[0]
            values = bad_values(action.type, place) if action.type else []
            if action.choices is not None:
                values = ["", "nope"]
            cases += [(command, flag, value) for value in values]
    return cases


PLACE = Path("/nonexistent-flag-test-place")  # replaced by the tmp folder in each test (see place fixture)
CASES = flag_cases(PLACE)


FREE_TEXT = {"--negative-prompt"}
"""Flags that accept any string, the empty one included."""


def test_every_flag_of_every_subcommand_is_in_the_table():
    """No flag that takes a value escapes the table (each needs a shared type or argparse choices)."""
    covered = {(command, flag) for command, flag, _ in CASES}
    for command in SUBCOMMANDS:
        for action in subparser(command)._actions:
            if action.option_strings and action.nargs != 0 and action.dest != "help" \
                    and action.option_strings[0] not in FREE_TEXT:
                assert (command, action.option_strings[0]) in covered, (command, action.option_strings[0])
    assert len(CASES) >= 500


@pytest.fixture
def place(tmp_path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "f.png")
    (tmp_path / "d").mkdir()
    return tmp_path


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


def assert_refused(argv: list[str], place: Path, capsys) -> str:
    before = files_under(place)
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (argv, captured)
    assert err.count("\n") == 0 and err, err
    assert "Traceback" not in err and "Traceback" not in captured.out
    assert files_under(place) == before, argv
    return err


@pytest.mark.parametrize(("command", "flag", "value"), CASES,
                         ids=[f"{c}{f}={v.replace(str(PLACE), '~')!r}" for c, f, v in CASES])
def test_refused_while_parsing(command, flag, value, place, capsys):
    value = value.replace(str(PLACE), str(place))
    err = assert_refused(base_arguments(command, place) + [flag, value], place, capsys)
    assert err.startswith(f"omniportrait {command}: error:") and flag in err


def test_numeric_refusals_name_the_allowed_range(place, capsys):
    err = assert_refused(base_arguments("generate", place) + ["--seed", str(2**64)], place, capsys)
    assert f"--seed must be an integer in [0, {SEED_MAX}]" in err
    err = assert_refused(base_arguments("generate", place) + ["--guidance-scale", "nan"], place, capsys)
    assert "--guidance-scale must be a finite number in [0, 100]" in err


@pytest.mark.parametrize(("command", "extra", "message"), [
    ("generate", ["--seed", str(SEED_MAX), "--num-images", "2"], "runs past the largest seed"),
    ("evaluate", ["--first-seed", str(SEED_MAX), "--seeds", "2"], "runs past the largest seed"),
])
def test_seed_ranges_that_overflow_are_refused_before_loading(command, extra, message, place, capsys):
    assert message in assert_refused(base_arguments(command, place) + extra, place, capsys)


@pytest.mark.parametrize("value", ["0", "0.5", "1", "-0"])
def test_a_guidance_scale_up_to_one_is_accepted_as_no_cfg(value, place):
    args = build_parser().parse_args(base_arguments("generate", place) + ["--guidance-scale", value])
    assert args.guidance_scale == float(value) and math.isfinite(args.guidance_scale)


def test_a_path_with_colons_is_read_from_the_right(tmp_path):
    from omniportrait.cli.generate import parse_identity_flag

    assert parse_identity_flag("C:/x:y.png:woman:2") == ("C:/x:y.png", "woman", 2)
    assert parse_identity_flag("a:b.png:woman") == ("a:b.png", "woman", None)
    with pytest.raises(Exception, match="N must be a whole number"):
        parse_identity_flag("A.png:woman:x")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_base_command_line_parses(command, place):
    """The refusals above are the flag's: without it, the command line parses."""
    assert build_parser().parse_args(base_arguments(command, place)).command == command
