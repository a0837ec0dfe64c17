"""Fixtures of the dataset tests: the mixed inputs and their build, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniportrait.data.build import build_dataset

from tests.data.helpers import small_config, write_mixed_inputs


@pytest.fixture(scope="session")
def mixed_inputs(tmp_path_factory, astronaut_image) -> Path:
    return write_mixed_inputs(tmp_path_factory.mktemp("mixed") / "inputs", astronaut_image)


@pytest.fixture(scope="session")
def mixed_build(tmp_path_factory, mixed_inputs):
    """The mixed inputs built once, in this process; tests only read it."""
    output = tmp_path_factory.mktemp("mixed_build") / "out"
    return build_dataset(small_config(mixed_inputs, output))
