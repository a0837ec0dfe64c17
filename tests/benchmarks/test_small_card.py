"""benchmarks/small_card.py: each limit's generation is reported, with what it went on with or why it failed."""

import torch

from benchmarks.small_card import CardRow, format_card_row, generation_under, main
from omniportrait.benchmark import CallMemory


def test_prints_a_row_per_limit(capsys):
    main(["--model", "tiny-sd15", "--limit-gib", "12", "11", "--steps", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny-sd15 64², 2 steps, every option at its default, cpu (no limit applies)")
    assert [line.split(" | ")[0] for line in lines[3:]] == ["| none", "| 12", "| 11"]
    assert all(line.endswith("| n/a | n/a | nothing: ran as asked | none |") for line in lines[3:])


def test_what_a_generation_went_on_with_and_a_failure_are_its_row(monkeypatch, tiny_pipe, astronaut_reference):
    from omniportrait.guidance import rb
    from omniportrait.pipelines import Identity
    from tests.conftest import out_of_memory_on_calls

    identities, cpu = [Identity(astronaut_reference, "woman")], torch.device("cpu")
    monkeypatch.setattr(rb.torch.autograd, "grad", out_of_memory_on_calls(torch.autograd.grad, last=1))
    row = generation_under(tiny_pipe, identities, 64, 3, cpu, 12)
    assert row.error is None and row.went_on_with == ("the split feature pass",) and row.seconds > 0
    assert len(row.warned) == 1 and "ran out of GPU memory" in row.warned[0]  # said once, though two steps ran
    monkeypatch.setattr(rb.torch.autograd, "grad", out_of_memory_on_calls(torch.autograd.grad))  # split too
    failed = generation_under(tiny_pipe, identities, 64, 3, cpu, 8)
    assert failed.error.startswith("OutOfMemoryError: CUDA out of memory (simulated)") and failed.seconds is None
    assert format_card_row(failed) == f"| 8 | failed: {failed.error} | | | | |"  # the header's six columns
    row = CardRow(12, 4.5, CallMemory(7.5, 11.61), ("a banded decode",), ("the decode ran out", "graph not captured"))
    assert format_card_row(row) == (
        "| 12 | 4.50 | 7.50 | 11.61 | a banded decode | the decode ran out; graph not captured |")


def test_a_generation_that_fails_otherwise_is_a_row_too(monkeypatch, tiny_pipe, astronaut_reference):
    from omniportrait.pipelines import Identity

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tiny_pipe, "decode_images", broken)
    row = generation_under(tiny_pipe, [Identity(astronaut_reference, "woman")], 64, 2, torch.device("cpu"), 12)
    assert row.error == "RuntimeError: CUDA error: an illegal memory access was encountered"
