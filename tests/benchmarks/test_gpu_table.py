"""The markdown table of a bench report."""

import json

from benchmarks.gpu_table import leftover_lines, main, markdown_table, target_lines
from omniportrait.cli import main as cli


def entry(model, size, rows):
    return {"model": model, "size": size, "steps": 50, "guided_steps": 30, "repeats": 1, "device": "NVIDIA H100",
            "dtype": "float16", "rows": rows}


def row(variant, seconds, ratio, peak=None, sampling=None, error=None, start=None):
    return {"variant": variant, "seconds": seconds, "ratio": ratio, "peak_gib": peak, "sampling_peak_gib": sampling,
            "error": error, "start_gib": start}


def test_models_side_by_side_and_a_missing_variant_is_a_dash():
    sdxl = [row("diffusers-plain", 3.2061, 1.0, 12.151, 7.6), row("rb-cfg", 6.717, 2.095, 15.41, 15.4)]
    sd15 = [row("diffusers-plain", 1.362, 1.0, 3.24, 2.8)]
    report = [entry("random-sdxl", 1024, sdxl), entry("random-sd15", 512, sd15)]
    lines = markdown_table(report).splitlines()
    assert lines[0] == ("| variant | random-sdxl 1024² s | × plain | peak GiB | sampling GiB | random-sd15 512² s | "
                        "× plain | peak GiB | sampling GiB |")
    assert lines[2] == "| `diffusers-plain` | 3.206 | 1.00 | 12.15 | 7.60 | 1.362 | 1.00 | 3.24 | 2.80 |"
    assert lines[3] == "| `rb-cfg` | 6.717 | 2.10 | 15.41 | 15.40 | — | — | — | — |"
    assert lines[-1] == "NVIDIA H100, float16, 50 steps of which 30 guided"


def test_the_variants_within_the_targets_are_named():
    sdxl = [row("diffusers-plain", 3.2, 1.0, 12.15), row("rb-off", 3.2, 1.02, 12.15), row("rb-off-banded", 3.4, 1.06),
            row("rb-cfg", 5.0, 1.56, 13.9), row("rb-cfg-banded", 5.1, 1.59, 11.6), row("rb-split", 6.0, 1.9, 10.0),
            row("rb-cfg-graph", 4.0, 1.25)]
    lines = target_lines([entry("random-sdxl", 1024, sdxl)])
    assert lines[-1] == ("- random-sdxl 1024²: guidance off within: `rb-off` 1.02×; full method within both: "
                         "`rb-cfg-banded` 1.59×, 11.60 GiB")
    tiny = target_lines([entry("tiny-sd15", 64, [row("rb-cfg", 1.0, 2.0)])])
    assert tiny[-1].endswith("full method within both: none")


def test_failures_are_cells_and_lines_and_never_within_the_targets():
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    sdxl = [row("diffusers-plain", 3.2, 1.0, 12.15), row("rb-cfg", None, None, error=oom)]
    sd15 = [row("diffusers-plain", None, None, error="RuntimeError: boom"), row("rb-cfg", 2.0, None, 3.4)]
    report = [entry("random-sdxl", 1024, sdxl), entry("random-sd15", 512, sd15),
              {"model": "random-flux", "error": "OutOfMemoryError: loading", "rows": []}]
    table = markdown_table(report).splitlines()
    assert table[3] == "| `rb-cfg` | failed | — | — | — | 2.000 | n/a | 3.40 | n/a |"
    assert f"- `rb-cfg` failed on random-sdxl 1024²: {oom}" in table
    assert "- random-flux failed: OutOfMemoryError: loading" in table
    lines = target_lines(report)
    assert lines[1].endswith("full method within both: none") and lines[2].endswith("within both: none")
    assert len(lines) == 3


def test_memory_an_earlier_call_left_is_named_with_how_much():
    clean = [row("diffusers-plain", 3.6, 1.0, 12.1, start=7.45), row("rb-cfg-graph", 4.4, 1.2, 12.2, start=7.455),
             row("diffusers-plain-after", 3.6, 1.0, 12.1, start=7.45)]
    leaky = [row("diffusers-plain", 3.6, 1.0, 12.1, start=7.45), row("rb-cfg-graph", 4.4, 1.2, 12.2, start=7.55),
             row("rb-cfg-graph-banded", 4.4, 1.2, 12.2, start=8.15)]
    on_cpu = [row("diffusers-plain", 1.0, 1.0), row("rb-cfg", 1.5, 1.5)]
    plain_failed = [row("diffusers-plain", None, None, error="RuntimeError: boom"),
                    row("rb-cfg", 4.4, None, 12.2, start=7.45), row("rb-split", 4.6, None, 10.2, start=7.55)]
    lines = leftover_lines([entry("random-sdxl", 1024, clean), entry("random-sd15", 512, leaky),
                            entry("tiny-sd15", 64, on_cpu), entry("random-sdxl", 768, plain_failed)])
    assert lines == ["- random-sdxl 1024²: every call began with what plain's did (7.45 GiB, within 0.01 GiB): no "
                     "peak counts what an earlier call left",
                     "- random-sd15 512²: calls began with more allocated than plain's (7.45 GiB), counted in their "
                     "peaks: `rb-cfg-graph` +0.10, `rb-cfg-graph-banded` +0.70 GiB (cuBLAS keeps a workspace for "
                     "each stream and thread that ran a matrix product, which a first call allocates too; beyond "
                     "those, earlier calls left it)"]


def test_reads_what_the_bench_writes(tmp_path, astronaut_path, capsys):
    out = tmp_path / "bench.json"
    assert cli(["bench", "--reference", astronaut_path, "--models", "tiny-sd15", "--steps", "1", "--repeats", "1",
                "--variants", "rb-off", "--json", str(out)]) == 0
    capsys.readouterr()
    main([str(out)])
    printed = capsys.readouterr().out
    assert "| `rb-off` |" in printed and "n/a | n/a |" in printed  # no CUDA peaks on the CPU
    assert json.loads(out.read_text())[0]["model"] == "tiny-sd15"
