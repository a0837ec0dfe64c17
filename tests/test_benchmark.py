"""Side-by-side benchmark of our pipelines against diffusers' plain pipeline, on the tiny SD1.5 preset."""

import pytest
import torch

from omniportrait.benchmark import PLAIN, BenchConfig, format_row, run_benchmark, timed
from omniportrait.errors import ConfigError


@pytest.mark.parametrize("kwargs", [dict(model="sd15"), dict(model="tiny-sd15", variants=("rb-fast",)),
                                    dict(model="tiny-sd15", steps=0)])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        BenchConfig(**kwargs)


def test_sizes_default_per_model():
    assert [BenchConfig(m).resolution for m in ("tiny-sdxl", "random-sd15", "random-sdxl")] == [64, 512, 1024]
    assert BenchConfig("random-sdxl", size=768).resolution == 768
    assert BenchConfig("tiny-sd15").guided_steps == 30


def test_timed_warms_up_once_and_keeps_the_best_of_the_repeats():
    calls = []
    seconds, peak = timed(lambda: calls.append(1), 3, torch.device("cpu"))
    assert len(calls) == 4 and seconds >= 0 and peak is None


def test_rows_start_with_plain_and_are_ratios_to_it(astronaut_reference):
    config = BenchConfig("tiny-sd15", steps=3, repeats=1, variants=("rb-off", "rb-cfg-interval-2"))
    seen = []
    rows = run_benchmark(config, astronaut_reference, torch.device("cpu"), torch.float32, on_row=seen.append)
    assert [row.variant for row in rows] == [PLAIN, "rb-off", "rb-cfg-interval-2"] and seen == rows
    assert rows[0].ratio == 1.0
    for row in rows:
        assert row.seconds > 0 and row.peak_gib is None
        assert row.ratio == pytest.approx(row.seconds / rows[0].seconds)
    assert format_row(rows[1]).split()[0] == "rb-off" and format_row(rows[1]).endswith("n/a")
