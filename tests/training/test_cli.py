import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniportrait.cli import build_parser, main
from omniportrait.models.pivot_encoder import PivotIDEncoder
from omniportrait.training.checkpoints import complete_checkpoints
from omniportrait.training.config import TrainConfig
from omniportrait.training.runlog import read_log
from omniportrait.training.trainer import PivotTrainer

from .conftest import tiny_config

FAST = ["--preset", "tiny-sd15", "--batch-size", "2", "--num-workers", "0", "--sample-every", "0", "--log-every", "1",
        "--no-progress"]


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def train_command(data, output, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "omniportrait.cli", "train", "--data", str(data), "--output", str(output),
            "--max-steps", str(steps), *FAST, *extra]


def test_every_config_field_is_a_flag_with_its_default(tmp_path):
    parser = build_parser()
    data, output = str(tmp_path), str(tmp_path / "o")
    args = parser.parse_args(["train", "--data", data, "--output", output])
    for item in fields(TrainConfig):
        assert hasattr(args, item.name), item.name
    defaults = TrainConfig(data=data, output=output)
    assert (args.learning_rate, args.eta, args.cond_dropout) == (2e-5, 2e-3, 0.1)
    for item in fields(TrainConfig):
        if item.name != "sample_prompts":
            assert getattr(args, item.name) == getattr(defaults, item.name), item.name
    assert tuple(args.sample_prompts) == defaults.sample_prompts


@pytest.mark.parametrize("case", ["missing", "empty", "preset", "precision"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, records_dir, capsys):
    data = {"missing": tmp_path / "nowhere", "empty": tmp_path / "empty"}.get(case, records_dir)
    (tmp_path / "empty").mkdir()
    preset = "tiny-sd99" if case == "preset" else "tiny-sd15"
    extra = ["--mixed-precision", "fp8"] if case == "precision" else []
    output = tmp_path / "out"
    code = main(["train", "--data", str(data), "--output", str(output), "--preset", preset, "--max-steps", "2", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("omniportrait train: error: ")
    assert not output.exists()


def test_a_killed_run_resumes_without_losing_finished_steps(records_dir, tmp_path):
    output = tmp_path / "killed"
    steps, every = 24, 4
    command = train_command(records_dir, output, steps, "--checkpoint-every", str(every))
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while not (output / "checkpoints" / "step-8").is_dir():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = complete_checkpoints(output)[-1][0]
    logged_before = max(line["step"] for line in read_log(output / "logs") if "loss" in line)
    assert 8 <= killed_at < steps and logged_before < steps

    resumed = subprocess.run(command + ["--resume"], env=subprocess_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = read_log(output / "logs")
    resume_events = [line for line in log if line.get("event") == "resume"]
    assert [event["step"] for event in resume_events] == [killed_at]
    after = [line["step"] for line in log[log.index(resume_events[0]):] if "loss" in line]
    assert after == list(range(killed_at + 1, steps + 1))  # nothing after the checkpoint is skipped
    state = json.loads((output / "checkpoints" / f"step-{steps}" / "trainer_state.json").read_text())
    assert state["step"] == steps and state["position"] == steps

    straight = PivotTrainer(tiny_config(records_dir, tmp_path / "straight", max_steps=steps)).train()
    one = PivotIDEncoder.from_pretrained(str(straight.pivot_encoder)).state_dict()
    two = PivotIDEncoder.from_pretrained(str(output / "pivot_encoder")).state_dict()
    for name, value in one.items():  # the killed-and-resumed run ends where an uninterrupted one does
        torch.testing.assert_close(two[name], value, rtol=0, atol=1e-6)


def test_accelerate_launch_smoke(records_dir, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    output = tmp_path / "launched"
    command = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--cpu", "-m", "omniportrait.cli", "train", "--data", str(records_dir),
               "--output", str(output), "--max-steps", "2", *FAST]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((output / "checkpoints" / "step-2" / "trainer_state.json").read_text())["step"] == 2
    assert PivotIDEncoder.from_pretrained(str(output / "pivot_encoder")).config.text_width == 32


def test_two_processes_train_one_pie_with_ddp(records_dir, tmp_path):
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "omniportrait.cli", "train", "--data", str(records_dir), "--output", str(output),
               "--max-steps", "2", "--cond-dropout", "0", *FAST]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    log = read_log(output / "logs")
    assert log[0]["event"] == "start" and log[0]["processes"] == 2
    assert [line["kept"] for line in log if "loss" in line] == [4, 4]  # 2 records on each of 2 processes
    checkpoint = output / "checkpoints" / "step-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()


def test_the_trained_pie_loads_into_generate_and_changes_its_output(records_dir, tmp_path, astronaut_path):
    trained = PivotTrainer(tiny_config(records_dir, tmp_path / "run", max_steps=3, learning_rate=1e-2)).train()
    images = []
    for extra in ([], ["--pivot-encoder", str(trained.pivot_encoder)]):
        out = tmp_path / f"out-{len(images)}.png"
        code = main(["generate", "--preset", "tiny-sd15", "--reference", astronaut_path, "--class-word", "woman",
                     "--prompt", "a photo of a woman", "--steps", "2", "--no-rb", "--out", str(out), *extra])
        assert code == 0
        images.append(np.asarray(Image.open(out), np.int16))
    # without --pivot-encoder the preset uses the tiny PIE the training started from
    assert np.abs(images[0] - images[1]).mean() > 0.5
