"""``--resume`` with damaged checkpoints, and a failed run's log (issue: reliability)."""

import shutil
import warnings

import pytest

from omniportrait.errors import ConfigError
from omniportrait.training.checkpoints import inspect_checkpoint, resumable_checkpoint
from omniportrait.training.runlog import LOG_FILE
from omniportrait.training.trainer import PivotTrainer

from .conftest import tiny_config


@pytest.fixture(scope="module")
def two_checkpoints(records_dir, tmp_path_factory):
    """A run folder with intact checkpoints step-1 and step-2 (copied per test, so each may damage it)."""
    output = tmp_path_factory.mktemp("two")
    PivotTrainer(tiny_config(records_dir, output, max_steps=2, checkpoint_every=1)).train()
    return output


@pytest.fixture
def run_dir(two_checkpoints, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(two_checkpoints, copy)
    return copy


def truncate(path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_intact_checkpoints_are_used_without_warning(run_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resumable_checkpoint(run_dir).name == "step-2"


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "scheduler.bin",
                                  "pivot_encoder/diffusion_pytorch_model.safetensors"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(name, run_dir):
    truncate(run_dir / "checkpoints" / "step-2" / name)
    with pytest.warns(UserWarning) as caught:
        assert resumable_checkpoint(run_dir).name == "step-1"
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "step-2" in message and "step-1" in message and "damaged" in message


def test_resume_runs_on_from_the_intact_checkpoint(run_dir, records_dir):
    truncate(run_dir / "checkpoints" / "step-2" / "model.safetensors")
    with pytest.warns(UserWarning, match="resuming from .*step-1"):
        result = PivotTrainer(tiny_config(records_dir, run_dir, max_steps=3, resume=True)).train()
    assert result.resumed_from == 1 and result.step == 3


def test_no_intact_checkpoint_is_one_line(run_dir):
    for step in ("step-1", "step-2"):
        truncate(run_dir / "checkpoints" / step / "optimizer.bin")
    with pytest.raises(ConfigError, match="no intact checkpoint") as caught:
        resumable_checkpoint(run_dir)
    assert "\n" not in str(caught.value) and "step-2" in str(caught.value)


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_damaged_random_states_are_a_warning_not_silence(damage, run_dir):
    path = run_dir / "checkpoints" / "step-2" / "random_states_0.pkl"
    if damage == "truncated":
        truncate(path, 50)
    else:
        import torch

        torch.save({"something": torch.zeros(2)}, path)
    assert inspect_checkpoint(path.parent).rng_damage
    with pytest.warns(UserWarning, match="random states .* damaged"):
        assert resumable_checkpoint(run_dir).name == "step-2"


def test_a_pickle_of_objects_in_a_checkpoint_is_refused_unloaded(run_dir):
    import pickle

    (run_dir / "checkpoints" / "step-2" / "optimizer.bin").write_bytes(pickle.dumps(ValueError("boom")))
    assert "optimizer.bin" in inspect_checkpoint(run_dir / "checkpoints" / "step-2").damage


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_log(records_dir, tmp_path, monkeypatch):
    def fail(self, batch, generator):
        raise RuntimeError("boom")

    monkeypatch.setattr(PivotTrainer, "micro_step", fail)
    with pytest.raises(RuntimeError):
        PivotTrainer(tiny_config(records_dir, tmp_path / "run", max_steps=2)).train()
    assert not (tmp_path / "run" / "logs" / LOG_FILE).exists()
