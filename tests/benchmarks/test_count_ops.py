"""The operation counter that stands in for a CPU-bound GPU host: what it counts, on the tiny pipelines."""

import torch
import torch.nn.functional as F

from benchmarks.count_ops import STEPS, operations
from omniportrait.benchmark import step_calls
from tests.conftest import build


def test_an_attention_call_counts_as_one_operation():
    query, narrow_value = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 1).expand(-1, -1, -1, 8)
    counts = operations(lambda: F.scaled_dot_product_attention(query, query, narrow_value))
    assert counts == {"scaled_dot_product_attention": 1}
    assert sum(operations(lambda: (query @ query.transpose(-1, -2)).softmax(-1)).values()) > 1


def test_steps_dispatch_more_as_they_record_and_guide(arch, astronaut_reference):
    tiny_pipe = build(arch)
    calls = step_calls(tiny_pipe, astronaut_reference, 64, torch.device("cpu"))
    totals = {name: sum(operations(calls[name]).values()) for name in STEPS}
    assert totals["plain-ours"] < totals["plain+record"] < totals["guided-cfg"]
    assert totals["guided-cfg"] < totals["guided-split"]  # two UNet passes per step


def test_our_unguided_step_dispatches_less_than_diffusers_for_the_same_noise(arch, astronaut_reference):
    tiny_pipe = build(arch)
    step_calls(tiny_pipe, astronaut_reference, 64, torch.device("cpu"))
    calls = step_calls(tiny_pipe, astronaut_reference, 64, torch.device("cpu"))  # a second set switches as well
    assert torch.equal(calls["plain-ours"](), calls["plain"]())
    ours, theirs = (sum(operations(calls[name]).values()) for name in ("plain-ours", "plain"))
    cross_layers = sum(name.endswith("attn2.processor") for name in tiny_pipe.unet.attn_processors)
    assert ours <= theirs - 12 * cross_layers  # at least the context's key and value projections
