"""The side-by-side bench (``benchmarks/bench.py``): its schedule, its rows and reports, on the tiny SD1.5 preset."""

import json
import time

import pytest
import torch

from benchmarks import bench
from benchmarks.bench import (
    PLAIN,
    PLAIN_AFTER,
    BenchConfig,
    CallMemory,
    PeakBeforeDecode,
    VariantTimes,
    format_row,
    leftover_lines,
    main,
    markdown_table,
    placement,
    run_benchmark,
    target_lines,
    timed_once,
)


@pytest.mark.parametrize("kwargs", [dict(model="sd15"), dict(model="tiny-sd15", variants=("rb-fast",)),
                                    dict(model="tiny-sd15", steps=0)])
def test_bad_settings_are_errors(kwargs):
    with pytest.raises(ValueError):
        BenchConfig(**kwargs)


def test_sizes_and_devices_default_per_model():
    assert [BenchConfig(m).resolution for m in ("tiny-sdxl", "random-sd15", "random-sdxl")] == [64, 512, 1024]
    assert BenchConfig("random-sdxl", size=768).resolution == 768
    assert BenchConfig("tiny-sd15").guided_steps == 30
    cuda = torch.device("cuda")
    assert placement("tiny-sdxl", cuda, torch.float16) == (torch.device("cpu"), torch.float32)
    assert placement("random-sdxl", cuda, torch.float16) == (cuda, torch.float16)


def test_plain_runs_first_and_graph_variants_on_cuda_only():
    config = BenchConfig("random-sdxl", variants=("rb-cfg", PLAIN, "rb-cfg-graph", "rb-split-graph-banded"))
    assert config.variants_on(torch.device("cpu")) == (PLAIN, "rb-cfg")
    assert config.variants_on(torch.device("cuda")) == (PLAIN, "rb-cfg", "rb-cfg-graph", "rb-split-graph-banded")


def test_plain_is_timed_before_ours_run_and_again_after():
    config = BenchConfig("tiny-sd15", repeats=2, variants=("rb-off", "rb-cfg"))
    assert config.schedule(torch.device("cpu")) == [
        (PLAIN, False), (PLAIN, True), (PLAIN, True),  # warmed up and timed before any of ours has run
        ("rb-off", False), ("rb-cfg", False), ("rb-off", True), ("rb-cfg", True), ("rb-off", True), ("rb-cfg", True),
        (PLAIN_AFTER, True), (PLAIN_AFTER, True)]
    assert BenchConfig("tiny-sd15", repeats=2, variants=(PLAIN,)).schedule(torch.device("cpu")) == [
        (PLAIN, False), (PLAIN, True), (PLAIN, True)]  # nothing of ours ran: no second plain


def test_timed_once_measures_the_call_and_on_cuda_its_start_and_peak(monkeypatch):
    seconds, memory = timed_once(lambda: time.sleep(0.02), torch.device("cpu"))
    assert 0.02 <= seconds < 1 and memory == CallMemory(None, None)
    gib = 2**30
    allocated = {"now": 3 * gib, "peak": 9 * gib}

    def call():  # peaks at 5 GiB and leaves 1 GiB more allocated than it found
        allocated.update(now=4 * gib, peak=max(allocated["peak"], 5 * gib))

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    assert timed_once(call, torch.device("cuda"))[1] == CallMemory(start=3.0, peak=5.0)
    assert timed_once(call, torch.device("cuda"))[1] == CallMemory(start=4.0, peak=5.0)


def test_a_row_is_a_ratio_to_plain_unless_either_failed():
    plain, ours, failed = VariantTimes(), VariantTimes(), VariantTimes(error="RuntimeError: boom")
    plain.add(2.0, CallMemory(), None)
    ours.add(3.0, CallMemory(1.0, 4.0), 2.5)
    ours.add(5.0, CallMemory(1.5, 3.0), 2.0)  # a slower call: the best time stays, the highest memory is kept
    assert ours.row("rb-cfg", plain) == bench.BenchRow("rb-cfg", 3.0, 1.5, 4.0, 2.5, start_gib=1.5)
    assert ours.row("rb-cfg", failed).ratio is None and ours.row("rb-cfg", failed).seconds == 3.0
    assert failed.row(PLAIN, plain) == bench.BenchRow(PLAIN, None, None, None, None, "RuntimeError: boom")
    assert format_row(failed.row(PLAIN, plain)) == f"{PLAIN:26s} failed: RuntimeError: boom"


def test_the_sampling_peak_is_read_when_decoding_starts():
    from omniportrait.models.banded_decode import decode_in_bands
    from omniportrait.models.tiny import tiny_vae

    vae, readings = tiny_vae(), iter([1.5, 2.5])
    before_decode = PeakBeforeDecode(vae, lambda: next(readings))
    vae.encode(torch.zeros(1, 3, 32, 32))
    assert before_decode.gib is None  # encoding the reference is not decoding
    vae.decode(torch.zeros(1, 4, 4, 4))
    assert before_decode.gib == 1.5
    with torch.no_grad():
        decode_in_bands(vae, torch.zeros(1, 4, 4, 4))
    assert before_decode.gib == 2.5


def test_memory_is_released_before_every_call_and_rows_are_ratios_to_plain(monkeypatch, astronaut_reference):
    events = []
    monkeypatch.setattr(bench, "release_memory", lambda device: events.append("release"))
    config = BenchConfig("tiny-sd15", steps=1, repeats=1, variants=("rb-off",))
    rows = run_benchmark(config, astronaut_reference, torch.device("cpu"), torch.float32, on_call=events.append)
    assert events == ["release"] + [event for name in [PLAIN] * 2 + ["rb-off"] * 2 + [PLAIN_AFTER]
                                    for event in ("release", name)]  # the model's, then before each call
    assert [row.variant for row in rows] == [PLAIN, "rb-off", PLAIN_AFTER] and rows[0].ratio == 1.0
    for row in rows:
        assert row.seconds > 0 and row.peak_gib is None and row.ratio == pytest.approx(row.seconds / rows[0].seconds)


def test_the_controlnet_variants_run_diffusers_and_ours_with_the_same_controlnet(monkeypatch, astronaut_reference):
    used = []
    real = bench.controlnet_pipelines

    def recorded(*args):
        pair = real(*args)
        used.append(pair)
        return pair

    monkeypatch.setattr(bench, "controlnet_pipelines", recorded)
    config = BenchConfig("tiny-sd15", steps=1, repeats=1, variants=("diffusers-controlnet", "rb-controlnet"))
    rows = run_benchmark(config, astronaut_reference, torch.device("cpu"), torch.float32)
    assert [row.variant for row in rows] == [PLAIN, "diffusers-controlnet", "rb-controlnet", PLAIN_AFTER]
    assert all(row.seconds > 0 and row.error is None for row in rows)
    (theirs, ours), = used
    assert theirs.controlnet is ours.controlnet and type(theirs).__name__ == "StableDiffusionControlNetPipeline"


def failing(names: tuple[str, ...], message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
    """``variant_calls`` whose ``names`` raise instead of generating."""
    real = bench.variant_calls

    def calls(*args):
        def fail():
            raise torch.OutOfMemoryError(f"{message}\nmore detail")

        return {name: fail if name in names else call for name, call in real(*args).items()}

    return calls


def test_a_failing_variant_is_reported_everywhere_and_the_run_exits_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "variant_calls", failing(("rb-cfg",), "boom"))
    out = tmp_path / "bench.json"
    with pytest.warns(UserWarning, match="rb-cfg failed: OutOfMemoryError: boom; the other variants go on"):
        status = main(["--models", "tiny-sd15", "--steps", "1", "--repeats", "1", "--variants", "rb-cfg", "rb-off",
                       "rb-cfg-graph", "--json", str(out), "--markdown", str(tmp_path / "bench.md")])
    assert status == 1
    printed = capsys.readouterr()
    assert "tiny-sd15 64x64, 1 steps (1 guided), cpu, float32" in printed.out
    assert "rb-cfg                     failed: OutOfMemoryError: boom" in printed.out
    assert "not run on cpu (CUDA only): rb-cfg-graph" in printed.out
    assert printed.err.splitlines()[-1] == "tiny-sd15: rb-cfg failed (OutOfMemoryError: boom)"
    (report,) = json.loads(out.read_text())
    assert (report["model"], report["device"], report["dtype"]) == ("tiny-sd15", "cpu", "float32")
    assert [(row["variant"], row["error"]) for row in report["rows"]] == [
        (PLAIN, None), ("rb-cfg", "OutOfMemoryError: boom"), ("rb-off", None), (PLAIN_AFTER, None)]
    table = (tmp_path / "bench.md").read_text().splitlines()
    assert table[3] == "| `rb-cfg` | failed | — | — | — |"
    assert table[4].startswith("| `rb-off` | ") and table[4].endswith(" | n/a | n/a |")  # no CUDA peaks on the CPU


@pytest.mark.filterwarnings("ignore:a guided step with the batched cfg feature pass ran out")  # the pipeline's
def test_a_variant_that_fell_back_after_running_out_of_memory_is_not_timed_as_itself(monkeypatch,
                                                                                     astronaut_reference):
    from omniportrait.guidance import rb
    from tests.conftest import out_of_memory_on_calls

    monkeypatch.setattr(rb.torch.autograd, "grad", out_of_memory_on_calls(torch.autograd.grad, last=1))
    config = BenchConfig("tiny-sd15", steps=1, repeats=1, variants=("rb-cfg",))
    with pytest.warns(UserWarning, match="rb-cfg failed"):
        plain, cfg, _ = run_benchmark(config, astronaut_reference, torch.device("cpu"), torch.float32)
    assert cfg.error == ("OutOfMemoryError: ran out of GPU memory and went on with the split feature pass, so the time "
                         "is not this variant's")
    assert plain.error is None


def test_bad_input_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["--models", "tiny-sd15", "--steps", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--models", "tiny-sd15", "--reference", "missing.png"])
    assert exit_info.value.code == 2


def entry(model, size, rows):
    return {"model": model, "size": size, "steps": 50, "guided_steps": 30, "repeats": 1, "device": "NVIDIA H100",
            "dtype": "float16", "rows": rows}


def row(variant, seconds, ratio, peak=None, sampling=None, error=None, start=None):
    return {"variant": variant, "seconds": seconds, "ratio": ratio, "peak_gib": peak, "sampling_peak_gib": sampling,
            "error": error, "start_gib": start}


def test_the_markdown_table_puts_models_side_by_side():
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    sdxl = [row(PLAIN, 3.2061, 1.0, 12.151, 7.6), row("rb-cfg", 6.717, 2.095, 15.41, 15.4),
            row("rb-split", None, None, error=oom)]
    sd15 = [row(PLAIN, 1.362, 1.0, 3.24, 2.8)]
    report = [entry("random-sdxl", 1024, sdxl), entry("random-sd15", 512, sd15),
              {"model": "random-flux", "error": "OutOfMemoryError: loading", "rows": []}]
    lines = markdown_table(report).splitlines()
    assert lines[0] == ("| variant | random-sdxl 1024² s | × plain | peak GiB | sampling GiB | random-sd15 512² s | "
                        "× plain | peak GiB | sampling GiB |")
    assert lines[2] == f"| `{PLAIN}` | 3.206 | 1.00 | 12.15 | 7.60 | 1.362 | 1.00 | 3.24 | 2.80 |"
    assert lines[3] == "| `rb-cfg` | 6.717 | 2.10 | 15.41 | 15.40 | — | — | — | — |"
    assert lines[4] == "| `rb-split` | failed | — | — | — | — | — | — | — |"
    assert f"- `rb-split` failed on random-sdxl 1024²: {oom}" in lines
    assert "- random-flux failed: OutOfMemoryError: loading" in lines
    assert lines[-1] == "NVIDIA H100, float16, 50 steps of which 30 guided"


def test_the_variants_within_the_targets_are_named():
    sdxl = [row(PLAIN, 3.2, 1.0, 12.15), row("rb-off", 3.2, 1.02, 12.15), row("rb-cfg", 5.0, 1.56, 13.9),
            row("rb-cfg-graph-banded", 5.1, 1.59, 11.6), row("rb-split", 6.0, 1.9, 10.0),
            row("rb-cfg-graph", 4.0, 1.25), row("rb-separate", None, None, error="RuntimeError: boom")]
    lines = target_lines([entry("random-sdxl", 1024, sdxl)])
    assert lines[-1] == ("- random-sdxl 1024²: guidance off within: `rb-off` 1.02×; full method within both: "
                         "`rb-cfg-graph-banded` 1.59×, 11.60 GiB")
    assert target_lines([entry("tiny-sd15", 64, [row("rb-cfg", 1.0, 2.0)])])[-1].endswith("within both: none")


def test_memory_an_earlier_call_left_is_named_with_how_much():
    clean = [row(PLAIN, 3.6, 1.0, 12.1, start=7.45), row("rb-cfg-graph", 4.4, 1.2, 12.2, start=7.455)]
    leaky = [row(PLAIN, 3.6, 1.0, 12.1, start=7.45), row("rb-cfg-graph", 4.4, 1.2, 12.2, start=7.55)]
    on_cpu = [row(PLAIN, 1.0, 1.0), row("rb-cfg", 1.5, 1.5)]
    lines = leftover_lines([entry("random-sdxl", 1024, clean), entry("random-sd15", 512, leaky),
                            entry("tiny-sd15", 64, on_cpu)])
    assert len(lines) == 2 and lines[0].startswith("- random-sdxl 1024²: every call began with what plain's did")
    assert lines[1].startswith("- random-sd15 512²: calls began with more allocated than plain's (7.45 GiB), counted "
                               "in their peaks: `rb-cfg-graph` +0.10 GiB")
