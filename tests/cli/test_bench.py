"""``omniportrait bench`` on a tiny model, with good and bad input."""

import json

import pytest

from omniportrait.cli import main


def test_prints_a_table_and_writes_json(tmp_path, astronaut_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--reference", astronaut_path, "--models", "tiny-sdxl", "--steps", "2", "--repeats", "1",
                 "--variants", "rb-cfg", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny-sdxl 64x64, 2 steps" in printed and "diffusers-plain" in printed and "rb-cfg" in printed
    (report,) = json.loads(out.read_text())
    assert report["model"] == "tiny-sdxl" and report["device"] == "cpu" and report["dtype"] == "float32"
    assert [row["variant"] for row in report["rows"]] == ["diffusers-plain", "rb-cfg"]
    assert report["rows"][0]["ratio"] == 1.0


def test_cuda_graph_variants_are_named_not_run_on_the_cpu(tmp_path, astronaut_path, capsys):
    assert main(["bench", "--reference", astronaut_path, "--models", "tiny-sd15", "--steps", "2", "--repeats", "1",
                 "--variants", "rb-off", "rb-cfg-graph"]) == 0
    printed = capsys.readouterr().out
    assert "not run on cpu (CUDA only): rb-cfg-graph" in printed
    assert "rb-off" in printed.split("not run")[0] and "rb-cfg-graph" not in printed.split("not run")[0]


def test_bad_input_exits_2_with_one_line(tmp_path, astronaut_path, capsys):
    assert main(["bench", "--reference", astronaut_path, "--models", "tiny-sd15", "--steps", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["bench", "--reference", str(tmp_path / "missing.png"), "--models", "tiny-sd15"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--reference", astronaut_path, "--models", "sd15"])
    assert exit_info.value.code == 2


def test_a_narrow_twin_runs_on_the_cpu_without_a_slowness_warning(astronaut_path, capsys, recwarn):
    assert main(["bench", "--reference", astronaut_path, "--models", "twin-sd15", "--steps", "2", "--repeats", "1",
                 "--variants", "rb-off"]) == 0
    assert "twin-sd15 16x16, 2 steps" in capsys.readouterr().out
    assert not [w for w in recwarn if "slow on the CPU" in str(w.message)]
