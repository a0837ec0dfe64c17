"""Side-by-side benchmark of our pipelines against diffusers' plain pipeline, on the tiny SD1.5 preset."""

import time

import pytest
import torch

from omniportrait.benchmark import (
    PLAIN,
    PLAIN_AFTER,
    BenchConfig,
    CallMemory,
    PeakBeforeDecode,
    format_row,
    placement,
    run_benchmark,
    timed_once,
)
from omniportrait.errors import ConfigError
from omniportrait.models.banded_decode import DEFAULT_BAND_MIB


@pytest.mark.parametrize("kwargs", [dict(model="sd15"), dict(model="tiny-sd15", variants=("rb-fast",)),
                                    dict(model="tiny-sd15", steps=0)])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        BenchConfig(**kwargs)


def test_sizes_default_per_model():
    models = ("tiny-sdxl", "random-sd15", "random-sdxl")
    assert [BenchConfig(m).resolution for m in models] == [64, 512, 1024]
    assert BenchConfig("random-sdxl", size=768).resolution == 768
    assert BenchConfig("tiny-sd15").guided_steps == 30


def test_tiny_and_twin_models_stay_on_the_cpu_in_fp32_and_real_ones_go_where_asked():
    cuda = torch.device("cuda")
    assert placement("tiny-sdxl", cuda, torch.float16) == (torch.device("cpu"), torch.float32)
    assert placement("random-sdxl", cuda, torch.float16) == (cuda, torch.float16)


def test_timed_once_measures_the_call():
    seconds, memory = timed_once(lambda: time.sleep(0.02), torch.device("cpu"))
    assert 0.02 <= seconds < 1 and memory == CallMemory(None, None)


def test_on_cuda_a_call_reports_what_was_allocated_when_it_began_and_its_peak(monkeypatch):
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


def test_plain_runs_first_and_once():
    config = BenchConfig("tiny-sd15", variants=("rb-cfg", PLAIN, "rb-off"))
    assert config.all_variants == (PLAIN, "rb-cfg", "rb-off")


def test_cuda_graph_variants_run_on_cuda_only():
    config = BenchConfig("random-sdxl", variants=("rb-cfg", "rb-cfg-graph", "rb-split-graph", "rb-off-banded",
                                                  "rb-split-graph-banded"))
    assert config.variants_on(torch.device("cpu")) == (PLAIN, "rb-cfg", "rb-off-banded")
    assert config.variants_on(torch.device("cuda")) == config.all_variants


def test_plain_is_timed_before_ours_run_and_again_after():
    config = BenchConfig("tiny-sd15", repeats=2, variants=("rb-off", "rb-cfg"))
    assert config.schedule(torch.device("cpu")) == [
        (PLAIN, False), (PLAIN, True), (PLAIN, True),  # warmed up and timed before any of ours has run
        ("rb-off", False), ("rb-cfg", False), ("rb-off", True), ("rb-cfg", True), ("rb-off", True), ("rb-cfg", True),
        (PLAIN_AFTER, True), (PLAIN_AFTER, True)]
    assert BenchConfig("tiny-sd15", repeats=2, variants=(PLAIN,)).schedule(torch.device("cpu")) == [
        (PLAIN, False), (PLAIN, True), (PLAIN, True)]  # nothing of ours ran: no second plain


def test_rows_start_with_plain_and_are_ratios_to_it(astronaut_reference):
    config = BenchConfig("tiny-sd15", steps=3, repeats=1, variants=("rb-off", "rb-cfg-interval-2"))
    seen = []
    rows = run_benchmark(config, astronaut_reference, torch.device("cpu"), torch.float32, on_call=seen.append)
    assert [row.variant for row in rows] == [PLAIN, "rb-off", "rb-cfg-interval-2", PLAIN_AFTER]
    assert seen == [PLAIN] * 2 + ["rb-off", "rb-cfg-interval-2"] * 2 + [PLAIN_AFTER]
    assert rows[0].ratio == 1.0
    for row in rows:
        assert row.seconds > 0 and row.peak_gib is None and row.sampling_peak_gib is None and row.start_gib is None
        assert row.ratio == pytest.approx(row.seconds / rows[0].seconds)
    assert format_row(rows[1]).split()[0] == "rb-off" and format_row(rows[1]).split()[-3:] == ["n/a"] * 3


def test_the_sampling_peak_is_read_when_decoding_starts():
    from omniportrait.models.banded_decode import decode_in_bands
    from omniportrait.models.tiny import tiny_vae

    vae, readings = tiny_vae(), iter([1.5, 2.5])
    before_decode = PeakBeforeDecode(vae, lambda: next(readings))
    assert before_decode.gib is None
    vae.encode(torch.zeros(1, 3, 32, 32))
    assert before_decode.gib is None  # encoding the reference is not decoding
    vae.decode(torch.zeros(1, 4, 4, 4))
    assert before_decode.gib == 1.5
    with torch.no_grad():
        decode_in_bands(vae, torch.zeros(1, 4, 4, 4))
    assert before_decode.gib == 2.5


def test_banded_variants_decode_in_bands_and_the_others_do_not(monkeypatch, astronaut_reference):
    from omniportrait.pipelines import base

    banded_calls = []
    decode = base.decode_in_bands
    monkeypatch.setattr(base, "decode_in_bands", lambda *args: banded_calls.append(args[2]) or decode(*args))
    config = BenchConfig("tiny-sd15", steps=1, repeats=1, variants=("rb-off-banded", "rb-off", "rb-default"))
    seen = []
    run_benchmark(config, astronaut_reference, torch.device("cpu"), torch.float32, on_call=seen.append)
    assert seen == [PLAIN] * 2 + ["rb-off-banded", "rb-off", "rb-default"] * 2 + [PLAIN_AFTER]
    assert banded_calls == [DEFAULT_BAND_MIB] * 2  # the banded variant's warm-up and timed calls, no other (the
    # default decodes whole on the CPU)


def test_the_banded_decode_call_matches_the_decode_and_leaves_the_pipeline_as_it_was(astronaut_reference):
    from omniportrait.benchmark import step_calls
    from tests.conftest import build

    pipe = build("sdxl")
    calls = step_calls(pipe, astronaut_reference, 64, torch.device("cpu"))
    assert torch.allclose(calls["vae-decode-banded"](), calls["vae-decode"](), atol=1e-5)
    assert pipe.banded_decode is None


def test_the_gate_recomputed_steps_give_the_same_guided_noise(astronaut_reference):
    from omniportrait.benchmark import step_calls
    from tests.conftest import build

    calls = step_calls(build("sdxl"), astronaut_reference, 64, torch.device("cpu"))
    for name in ("guided-cfg", "guided-split"):
        assert torch.equal(calls[f"{name}-gelu"](), calls[name]())


def test_graph_step_calls_replay_what_the_eager_ones_compute(monkeypatch, astronaut_reference):
    from omniportrait.benchmark import step_calls
    from omniportrait.guidance.rb import ReferenceGuidance
    from tests.conftest import build
    from tests.guidance.test_graph import EmulatedGraphs

    monkeypatch.setattr(ReferenceGuidance, "graph_backend", EmulatedGraphs)
    calls = step_calls(build("sd15"), astronaut_reference, 64, torch.device("cpu"), graphs=True)
    for eager, graphed in [("plain+record", "plain+record-graph"), ("guided-cfg", "guided-cfg-graph"),
                           ("guided-split", "guided-split-graph")]:
        expected = calls[eager]()
        calls[graphed]()  # warm-up and capture
        assert torch.allclose(calls[graphed](), expected, atol=1e-6)  # a replay


def failing(names: tuple[str, ...], message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
    """``variant_calls`` whose ``names`` raise instead of generating."""
    from omniportrait import benchmark

    real = benchmark.variant_calls

    def calls(*args):
        made = real(*args)

        def fail():
            raise torch.OutOfMemoryError(f"{message}\nmore detail")

        return {name: fail if name in names else call for name, call in made.items()}

    return calls


def test_a_failing_variant_is_reported_and_the_others_still_run(monkeypatch, astronaut_reference):
    from omniportrait import benchmark

    monkeypatch.setattr(benchmark, "variant_calls", failing(("rb-cfg",)))
    config = BenchConfig("tiny-sd15", steps=2, repeats=2, variants=("rb-cfg", "rb-off"))
    seen = []
    with pytest.warns(UserWarning, match="rb-cfg failed: OutOfMemoryError: CUDA out of memory"):
        rows = run_benchmark(config, astronaut_reference, torch.device("cpu"), torch.float32, on_call=seen.append)
    assert seen == [PLAIN] * 3 + ["rb-cfg", "rb-off", "rb-off", "rb-off"] + [PLAIN_AFTER] * 2  # not tried again
    failed, off = rows[1], rows[2]
    assert failed.error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"  # its first line
    assert failed.seconds is None and failed.ratio is None
    assert off.error is None and off.ratio == pytest.approx(off.seconds / rows[0].seconds)
    assert format_row(failed) == f"{'rb-cfg':26s} failed: {failed.error}"


def test_without_plain_there_are_times_but_no_ratios(monkeypatch, astronaut_reference):
    from omniportrait import benchmark

    monkeypatch.setattr(benchmark, "variant_calls", failing((PLAIN,)))
    config = BenchConfig("tiny-sd15", steps=1, repeats=1, variants=("rb-off",))
    with pytest.warns(UserWarning, match=f"{PLAIN} failed"):
        plain, off, after = run_benchmark(config, astronaut_reference, torch.device("cpu"), torch.float32)
    assert plain.error is not None and off.seconds > 0 and off.ratio is None
    assert after.error == plain.error  # not called again
    assert format_row(off).split()[:3] == ["rb-off", f"{off.seconds:.3f}", "n/a"]


def test_a_variant_that_fell_back_after_running_out_of_memory_is_not_timed_as_itself(monkeypatch,
                                                                                     astronaut_reference):
    from omniportrait.guidance import rb
    from tests.conftest import out_of_memory_on_calls

    monkeypatch.setattr(rb.torch.autograd, "grad", out_of_memory_on_calls(torch.autograd.grad, last=1))
    config = BenchConfig("tiny-sd15", steps=2, repeats=1, variants=("rb-cfg", "rb-split"))
    with pytest.warns(UserWarning) as caught:
        plain, cfg, split, _ = run_benchmark(config, astronaut_reference, torch.device("cpu"), torch.float32)
    messages = [str(warning.message) for warning in caught]
    assert any("use the split pass" in message for message in messages)  # the pipeline's
    assert any(message.startswith("rb-cfg failed") for message in messages)  # the bench's
    assert cfg.error == ("OutOfMemoryError: ran out of GPU memory and went on with the split feature pass, so the time "
                         "is not this variant's")
    assert split.error is None and split.ratio > 0


def test_memory_is_released_before_every_call(monkeypatch, astronaut_reference):
    from omniportrait import benchmark

    events = []
    monkeypatch.setattr(benchmark, "release_memory", lambda device: events.append("release"))
    config = BenchConfig("tiny-sd15", steps=1, repeats=1, variants=("rb-off",))
    run_benchmark(config, astronaut_reference, torch.device("cpu"), torch.float32, on_call=events.append)
    assert events == ["release"] + [event for name in [PLAIN] * 2 + ["rb-off"] * 2 + [PLAIN_AFTER]
                                    for event in ("release", name)]  # the model's, then before each call
