"""Argument types shared by every subcommand: numbers in their range, paths of the right kind.

Each factory returns an argparse ``type`` callable, so a bad value is refused while the command line is
parsed, before any photo is read or model loaded, with one line naming the flag, the allowed values and
what was given. :class:`OneLineParser` keeps argparse's own refusals to that one line too.
"""

from __future__ import annotations

import argparse
import re
from typing import Callable

from omniportrait.errors import ConfigError
from omniportrait.values import Range


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str):
        line = re.sub(r"^argument ([^:]+): ", r"\1 ", " ".join(str(message).split()))
        self.exit(2, f"{self.prog}: error: {line} (see {self.prog} --help)\n")


def number(value_range: Range) -> Callable[[str], int | float]:
    """argparse type: a number within ``value_range`` (finite; whole where it asks for integers)."""

    def parse(text: str):
        try:
            return value_range.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = "integer" if value_range.integer else "number"
    parse.range = value_range  # what the flag accepts, for its help and the flag tests
    return parse


def finite_float(low: float | None = None, high: float | None = None, **options) -> Callable[[str], float]:
    """argparse type: a finite float in ``[low, high]`` (``low_open``/``high_open``/``note`` as in :class:`Range`)."""
    return number(Range(low, high, **options))


def int_in(low: int | None = None, high: int | None = None, **options) -> Callable[[str], int]:
    """argparse type: an integer in ``[low, high]``."""
    return number(Range(low, high, integer=True, **options))


def text(what: str = "value") -> Callable[[str], str]:
    """argparse type: a string that is not empty or only blanks."""

    def parse(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"the {what} is empty")
        return value

    parse.__name__ = what
    parse.kind = "text"
    return parse


def choice_of(names, what: str) -> Callable[[str], str]:
    """argparse type: one of ``names``, refused as ``unknown WHAT 'x'; choose one of: ...``."""

    def parse(value: str) -> str:
        if value not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; choose one of: {', '.join(names)}")
        return value

    parse.__name__ = what
    parse.choices = tuple(names)
    return parse


def checked(check: Callable[[str], object], name: str) -> Callable[[str], str]:
    """argparse type from a checker (e.g. of :mod:`omniportrait.files`) that raises ``ConfigError``; ``name``
    says what kind of path or value it takes (``file``, ``folder``, ``output file``, ...)."""

    def parse(value: str) -> str:
        try:
            check(value)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    parse.__name__ = name
    parse.kind = name
    return parse


def existing_file() -> Callable[[str], str]:
    """argparse type: the path of an existing file (not a folder)."""
    from omniportrait.files import check_input_file

    return checked(check_input_file, "file")


def existing_folder() -> Callable[[str], str]:
    """argparse type: the path of an existing folder."""
    from omniportrait.files import check_input_folder

    return checked(check_input_folder, "folder")


def pivot_encoder_path() -> Callable[[str], str]:
    """argparse type: a pivot encoder folder or a PhotoMaker v1 checkpoint file, existing."""
    from omniportrait.models.photomaker import check_pivot_path

    return checked(check_pivot_path, "pivot encoder")


def output_file(suffix: str | None = None) -> Callable[[str], str]:
    """argparse type: a file we can create: ``suffix`` (e.g. ``.png``), not a folder or device, and the
    nearest existing folder above it writable (so missing folders can be made)."""
    from omniportrait.files import check_output_file

    parse = checked(lambda value: check_output_file(value, suffix), "output file")
    parse.suffix = suffix
    return parse


def output_folder() -> Callable[[str], str]:
    """argparse type: a folder we can create or write into (not a file or device)."""
    from omniportrait.files import check_output_folder

    return checked(check_output_folder, "output folder")


def device_name(value: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` present on this machine."""
    from omniportrait.pipelines.loading import resolve_device

    try:
        resolve_device(value)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


device_name.kind = "device"


def dtype_name(value: str) -> str:
    """argparse type: ``auto`` or a dtype :func:`~omniportrait.pipelines.loading.resolve_dtype` knows."""
    from omniportrait.pipelines.loading import DTYPES

    return choice_of(("auto", *DTYPES), "dtype")(value)


dtype_name.choices = ("auto", "fp32", "fp16", "bf16")
