"""What a dataset build and its report share: the build file's name, the build's result, and its arguments flattened.

Kept apart so that ``data.build`` (which runs a build) and ``data.report`` (which summarises one) need not import
each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omniportrait.data.filters import KEPT

BUILD_FILE = "build.json"


@dataclass(frozen=True)
class BuildResult:
    """What a build did. ``counts`` has one entry per reason plus ``kept``, over all shards."""

    output: Path
    inputs: int
    counts: dict[str, int]
    shards: int
    shards_built: int
    index_path: Path
    report_path: Path
    seconds: float
    failures: list[str]

    @property
    def kept(self) -> int:
        return self.counts.get(KEPT, 0)


def flat_arguments(values: dict, prefix: str = "") -> dict:
    """``{"filters": {"min_side": 512}}`` -> ``{"filters.min_side": 512}``."""
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_arguments(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat
