"""A build worker publishes only into a folder its own run owns; rejection details hold no object addresses."""

import dataclasses
import json

import pytest

from omniportrait.data.build import (
    RUN_FILE,
    Rejection,
    _claim_output,
    _shard_path,
    _stats_path,
    process_shard,
    shard_tasks,
)
from omniportrait.data.sources import plan_folder
from omniportrait.errors import DatasetBuildError
from tests.data.helpers import small_config


def test_a_worker_of_a_superseded_run_publishes_nothing(mixed_inputs, tmp_path):
    config = small_config(mixed_inputs, tmp_path / "out")
    task = shard_tasks(plan_folder(str(mixed_inputs)), config)[0]
    (tmp_path / "out").mkdir()
    mine = _claim_output(tmp_path / "out")
    _claim_output(tmp_path / "out")  # a rerun took the folder over
    with pytest.raises(DatasetBuildError, match="another run"):
        process_shard(dataclasses.replace(task, run_id=mine))
    assert not _shard_path(tmp_path / "out", task.index, "webdataset").exists()
    assert not _stats_path(tmp_path / "out", task.index).exists()


def test_the_owning_run_publishes(mixed_inputs, tmp_path):
    config = small_config(mixed_inputs, tmp_path / "out")
    task = shard_tasks(plan_folder(str(mixed_inputs)), config)[0]
    (tmp_path / "out").mkdir()
    stats = process_shard(dataclasses.replace(task, run_id=_claim_output(tmp_path / "out")))
    assert _stats_path(tmp_path / "out", task.index).is_file() and stats["inputs"] == len(task.refs)
    assert json.loads((tmp_path / "out" / RUN_FILE).read_text())["run"]


def test_rejection_details_hold_no_object_addresses():
    detail = Rejection("corrupt", "cannot identify image file <_io.BytesIO object at 0x7f3a2b1c0d90>").detail
    assert "0x" not in detail and detail == "cannot identify image file the input's bytes"
    assert Rejection("failed", "bad <foo.Bar object at 0xdeadbeef>").detail == "bad a Bar"
