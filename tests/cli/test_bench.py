"""``omniportrait bench`` on a tiny model, with good and bad input."""

import json

import pytest
import torch

from omniportrait.cli import main


def test_prints_a_table_and_writes_json(tmp_path, astronaut_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--reference", astronaut_path, "--models", "tiny-sdxl", "--steps", "2", "--repeats", "1",
                 "--variants", "rb-cfg", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny-sdxl 64x64, 2 steps" in printed and "diffusers-plain" in printed and "rb-cfg" in printed
    (report,) = json.loads(out.read_text())
    assert report["model"] == "tiny-sdxl" and report["device"] == "cpu" and report["dtype"] == "float32"
    assert [row["variant"] for row in report["rows"]] == ["diffusers-plain", "rb-cfg", "diffusers-plain-after"]
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


def test_a_failing_variant_exits_1_after_the_whole_report(monkeypatch, tmp_path, astronaut_path, capsys):
    from omniportrait import benchmark
    from tests.test_benchmark import failing

    monkeypatch.setattr(benchmark, "variant_calls", failing(("rb-cfg",), "boom"))
    out = tmp_path / "bench.json"
    assert main(["bench", "--reference", astronaut_path, "--models", "tiny-sd15", "--steps", "1", "--repeats", "1",
                 "--variants", "rb-cfg", "rb-off", "--json", str(out)]) == 1
    printed = capsys.readouterr()
    assert "rb-cfg                     failed: OutOfMemoryError: boom" in printed.out
    assert "warning: rb-cfg failed: OutOfMemoryError: boom; the other variants go on" in printed.err
    assert printed.err.splitlines()[-1] == "tiny-sd15: rb-cfg failed (OutOfMemoryError: boom)"
    (report,) = json.loads(out.read_text())
    assert [(row["variant"], row["error"]) for row in report["rows"]] == [
        ("diffusers-plain", None), ("rb-cfg", "OutOfMemoryError: boom"), ("rb-off", None),
        ("diffusers-plain-after", None)]


def test_each_model_is_written_as_it_finishes_and_a_model_that_fails_does_not_stop_the_next(
        monkeypatch, tmp_path, astronaut_path, capsys):
    from omniportrait import benchmark
    from omniportrait.cli import bench

    real, written = benchmark.run_benchmark, []

    def run(config, *args, **kwargs):
        if config.model == "tiny-sd15":
            raise torch.OutOfMemoryError("CUDA out of memory while loading")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(benchmark, "run_benchmark", run)
    write = bench.write_json_atomic
    monkeypatch.setattr(bench, "write_json_atomic", lambda path, report: written.append(len(report)) or
                        write(path, report))
    out = tmp_path / "bench.json"
    assert main(["bench", "--reference", astronaut_path, "--models", "tiny-sd15", "tiny-sdxl", "--steps", "1",
                 "--repeats", "1", "--variants", "rb-off", "--json", str(out)]) == 1
    assert written == [1, 2]
    failed, done = json.loads(out.read_text())
    assert failed == {"model": "tiny-sd15", "error": "OutOfMemoryError: CUDA out of memory while loading",
                      "rows": []}
    assert done["model"] == "tiny-sdxl" and len(done["rows"]) == 3  # plain, rb-off, plain after
    printed = capsys.readouterr()
    assert "tiny-sd15 failed: OutOfMemoryError: CUDA out of memory while loading" in printed.out
    assert "tiny-sdxl 64x64, 1 steps" in printed.out
