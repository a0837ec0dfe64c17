"""Day-one failures of generate: sizes that cannot fit, non-finite values in sidecars, long prompts."""

import json
import math

import pytest
import torch

from omniportrait.cli import main
from omniportrait.errors import ConfigError
from omniportrait.files import write_json_atomic
from omniportrait.memory import GIB, check_fits

FAST = ["--preset", "tiny-sd15", "--steps", "2", "--dift-ensemble", "2"]


def test_a_size_that_cannot_fit_names_the_largest_that_does():
    with pytest.raises(ConfigError, match=r"largest that fits is about (\d+)x\1") as caught:
        check_fits("tiny", 8192, 8192, 1, torch.device("cpu"), torch.float32, None, available=4 * GIB)
    fit = int(str(caught.value).split("about ")[1].split("x")[0])
    check_fits("tiny", fit, fit, 1, torch.device("cpu"), torch.float32, None, available=4 * GIB)
    check_fits("tiny", 64, 64, 1, torch.device("cpu"), torch.float32, None, available=4 * GIB)


def test_generate_refuses_the_size_before_loading(monkeypatch, tmp_path, astronaut_path, capsys):
    monkeypatch.setattr("omniportrait.memory.available_bytes", lambda device: 2.0 * GIB)
    code = main(["generate", *FAST, "--reference", astronaut_path, "--prompt", "a woman", "--width", "8192",
                 "--height", "8192", "--out", str(tmp_path / "out" / "o.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "largest that fits" in err and "GiB" in err
    assert not (tmp_path / "out").exists()


def test_sidecars_are_strict_json(tmp_path):
    path = write_json_atomic(tmp_path / "s.json", {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    value = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert value == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_a_long_prompt_gets_one_warning_naming_what_is_cut(tmp_path, astronaut_path, capsys):
    prompt = "a woman " + "standing on a sunny beach " * 20 + "holding a lantern"
    out = tmp_path / "o.png"
    assert main(["generate", *FAST, "--reference", astronaut_path, "--prompt", prompt, "--out", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "cut and not used" in line]
    assert len(warnings) == 1 and "holding a lantern" in warnings[0]
    assert json.loads(out.with_suffix(".json").read_text())["identities"][0]["sim"] is not None or \
        "sim_missing" in json.loads(out.with_suffix(".json").read_text())["identities"][0]
