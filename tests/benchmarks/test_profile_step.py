"""``benchmarks/profile_step.py``: its step calls compute what a generation's steps do; a failing one is named."""

import torch

from benchmarks.profile_step import measured, step_calls
from tests.conftest import build


def test_a_measurement_is_formatted_and_a_failure_named_in_its_place():
    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    assert measured(lambda call: call(), lambda: 1.23456, 2) == "1.23"
    assert measured(lambda call: call(), out_of_memory, 1) == (
        "failed (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB)")


def test_the_step_calls_agree_where_they_should(monkeypatch, astronaut_reference):
    from omniportrait.guidance.steps import StepRunner
    from tests.guidance.test_graph import EmulatedGraphs

    monkeypatch.setattr(StepRunner, "graph_backend", EmulatedGraphs)
    pipe = build("sd15")
    calls = step_calls(pipe, astronaut_reference, 64, torch.device("cpu"), graphs=True)
    assert torch.equal(calls["plain+record"](), calls["plain"]())  # recording changes nothing computed
    for name in ("guided-cfg", "guided-split"):
        noise, gradient = calls[name]()
        assert torch.equal(calls[f"{name}-gelu"]()[1], gradient)  # the gate or the projection recomputed
        calls[f"{name}-graph"]()  # warm-up and capture
        replayed = calls[f"{name}-graph"]()
        assert torch.allclose(replayed[0], noise, atol=1e-6) and torch.allclose(replayed[1], gradient, atol=1e-6)
    assert torch.allclose(calls["vae-decode-banded"](), calls["vae-decode"](), atol=1e-5)
    assert pipe.banded_decode is None  # left as it was
