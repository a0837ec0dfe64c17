"""The default generation on a smaller card: CUDA's allocator capped at a few sizes, one generation under each.

First one generation without a limit (its peak, and the warm-up of the libraries), then for each ``--limit-gib``
the process may hold at most that much GPU memory (``torch.cuda.set_per_process_memory_fraction``; a real card of
that size also holds the CUDA context beside it), and one generation runs as a user's call does, with every option
at its default (CUDA-graph steps, the ``cfg`` pass, on SDXL the decode in bands). A step or decode that runs out of
memory goes on with what needs less, with a warning (the ``split`` pass, eager steps, a decode in bands), so each
row says whether the generation finished, what it went on with, the warnings it gave, its time, and what the
allocator held when it began and at its peak. Random weights, fp16, every component on the GPU. Off CUDA no limit
applies (the rows only check the script).

    python -m benchmarks.small_card --model random-sdxl --limit-gib 12 11 10
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass

import torch
from PIL import Image

from benchmarks.gpu_table import number
from omniportrait.benchmark import (
    MODELS,
    PROMPT,
    CallMemory,
    failure,
    model_pipeline,
    placement,
    release_memory,
    timed_once,
)

EXAMPLE = "examples/astronaut.jpg"
WARNING_WIDTH = 120  # characters of a warning a row shows


@dataclass(frozen=True)
class CardRow:
    """One generation under one memory limit."""

    limit_gib: float | None  # None: no limit
    seconds: float | None = None
    memory: CallMemory = CallMemory()
    went_on_with: tuple[str, ...] = ()  # what ran after running out of memory (OmniPortraitOutput.memory_fallbacks)
    warned: tuple[str, ...] = ()  # each warning the generation gave, once (a CUDA graph not captured, say)
    error: str | None = None  # why the generation failed


def limited(device: torch.device, limit_gib: float | None) -> None:
    """Cap what CUDA's allocator may hold on ``device`` at ``limit_gib`` (None: the whole card; nothing off CUDA)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = 1.0 if limit_gib is None else min(1.0, limit_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)


def generation_under(pipe, identities, size: int, steps: int, device: torch.device,
                     limit_gib: float | None) -> CardRow:
    """One default generation with the allocator capped at ``limit_gib``."""
    release_memory(device)
    limited(device, limit_gib)
    outputs = []

    def generate():
        outputs.append(pipe(PROMPT, identities, height=size, width=size, num_inference_steps=steps,
                            generator=torch.Generator().manual_seed(0)))

    try:
        seconds, memory, warned = timed_with_warnings(generate, device)
    except Exception as error:  # out of memory, or anything else: the next limit still runs
        return CardRow(limit_gib, error=failure(error))
    finally:
        limited(device, None)
    return CardRow(limit_gib, seconds, memory, tuple(outputs[0].memory_fallbacks()), warned)


def timed_with_warnings(call, device: torch.device) -> tuple[float, CallMemory, tuple[str, ...]]:
    """:func:`timed_once`, and each warning the call gave (:func:`warning_lines`), for a row to print."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seconds, memory = timed_once(call, device)
    return seconds, memory, warning_lines(caught)


def warning_lines(caught: list[warnings.WarningMessage], width: int = WARNING_WIDTH) -> tuple[str, ...]:
    """Each distinct warning's first line, cut to ``width`` characters."""
    return tuple(dict.fromkeys(str(warning.message).partition("\n")[0][:width] for warning in caught))


def format_card_row(row: CardRow) -> str:
    limit = "none" if row.limit_gib is None else f"{row.limit_gib:g}"
    if row.error is not None:
        return f"| {limit} | failed: {row.error} | | | | |"
    start, peak = (number(value, 2) for value in (row.memory.start, row.memory.peak))
    return (f"| {limit} | {row.seconds:.2f} | {start} | {peak} | "
            f"{', '.join(row.went_on_with) or 'nothing: ran as asked'} | {'; '.join(row.warned) or 'none'} |")


def main(argv: list[str] | None = None) -> None:
    from diffusers.utils import logging as diffusers_logging

    from omniportrait.faces import prepare_reference
    from omniportrait.pipelines import Identity

    diffusers_logging.set_verbosity_error()  # the fp16 cast notice concerns loading weights; there are none
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-sdxl", choices=list(MODELS))
    parser.add_argument("--limit-gib", nargs="+", type=float, default=[12.0, 11.0, 10.0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = placement(args.model, torch.device("cuda" if cuda else "cpu"),
                              torch.float16 if cuda else torch.float32)
    pipe, _ = model_pipeline(args.model, device, dtype)
    identities = [Identity(prepare_reference(Image.open(EXAMPLE)), "woman")]
    size = MODELS[args.model][1]
    print(f"{args.model} {size}², {args.steps} steps, every option at its default, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (no limit applies)'}, "
          f"{str(dtype).removeprefix('torch.')}")
    print("| limit GiB | seconds | start GiB | peak GiB | went on with | warnings |\n|---|---|---|---|---|---|")
    for limit in [None, *args.limit_gib]:
        print(format_card_row(generation_under(pipe, identities, size, args.steps, device, limit)), flush=True)


if __name__ == "__main__":
    main()
