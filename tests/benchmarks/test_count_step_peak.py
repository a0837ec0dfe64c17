"""The meta-device step peak counter (``benchmarks/count_step_peak.py``) on the tiny SD1.5 pipeline."""

import torch

from benchmarks.count_step_peak import META, main, reference_features_peak, step_peaks, weight_bytes
from omniportrait.benchmark import model_pipeline


def test_guided_steps_hold_more_than_plain_ones_and_the_leaner_ways_less(astronaut_reference):
    pipe, modules = model_pipeline("tiny-sd15", META, torch.float16)
    peaks = step_peaks(pipe, modules, astronaut_reference, 64)
    kept = step_peaks(pipe, modules, astronaut_reference, 64, kept=True)
    assert 0 < peaks["plain"] <= peaks["plain+record"] < peaks["guided-split"] < peaks["guided-cfg"]
    assert peaks["guided-cfg"] < peaks["guided-cfg-gelu"] < kept["guided-cfg"]  # the projection recomputed by default
    assert peaks["guided-split"] < peaks["guided-split-gelu"] < kept["guided-split"]
    assert kept["plain"] == peaks["plain"]  # the gates only matter with a backward
    assert weight_bytes(modules) > 0 and not any(name.startswith("vae") for name in peaks)
    assert 0 < reference_features_peak(pipe, modules, astronaut_reference, 64)


def test_prints_a_table_per_model(capsys):
    main(["--models", "tiny-sd15"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("tiny-sd15 64², fp16, weights")
    assert lines[2] == "| step | activations GiB | weights + activations GiB |"
    assert any(line.startswith("| guided-cfg |") for line in lines)
    assert lines[4].startswith("| reference-features |")
