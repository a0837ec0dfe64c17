"""Allowed ranges of numeric settings, in one place for the CLI's argparse types and the configs' checks.

A :class:`Range` says which numbers a setting accepts (finite, integer or not, bounds open or closed) and
words its refusal the same way wherever the number comes from: a flag, a config file or the Python API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SEED_MAX = 2**64 - 1
"""The largest seed ``torch.Generator.manual_seed`` takes."""


@dataclass(frozen=True)
class Range:
    """Numbers in ``[low, high]`` (either end open when ``*_open``); ``integer`` demands whole numbers.

    ``multiple_of`` additionally demands a multiple of that number (image sides). ``note`` is appended to the
    refusal, to say what a boundary means (e.g. that a guidance scale ≤ 1 turns classifier-free guidance off).
    """

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None
    note: str = ""

    def describe(self) -> str:
        """``an integer in [1, 1000]``, ``a finite number > 0``, ..."""
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}" \
                   f"{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            text = kind
        if self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        return text

    def problem(self, value) -> str | None:
        """Why ``value`` is refused, or ``None`` when it is allowed."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.describe()}, got {value!r}"
        if not math.isfinite(value) or (self.integer and not float(value).is_integer()):
            return f"must be {self.describe()}, got {value!r}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above or (self.multiple_of and value % self.multiple_of):
            return f"must be {self.describe()}{'; ' + self.note if self.note else ''}, got {_number(value)}"
        return None

    def parse(self, text: str) -> int | float:
        """The number ``text`` spells, checked; ``ValueError`` with the refusal otherwise."""
        value = parse_number(text, self.integer)
        if value is None:
            raise ValueError(f"must be {self.describe()}, got {text!r}")
        problem = self.problem(value)
        if problem:
            raise ValueError(problem)
        return value


def parse_number(text: str, integer: bool) -> int | float | None:
    """``int(text)`` (``integer``) or ``float(text)``; ``None`` for text that is not such a number."""
    text = str(text).strip()
    try:
        return int(text) if integer else float(text)
    except (ValueError, OverflowError):
        return None


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


# ranges shared by several subcommands
SEED = Range(0, SEED_MAX, integer=True)
STEPS = Range(1, 1000, integer=True)
GUIDANCE_SCALE = Range(0, 100, note="a scale <= 1 turns classifier-free guidance off")
IMAGE_SIDE = Range(8, 16384, integer=True, multiple_of=8)
FACE_INDEX = Range(0, 255, integer=True)
