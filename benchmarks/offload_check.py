"""A default generation with the pipeline's components offloaded to the CPU, against the same generation in place.

diffusers' two offloads: ``enable_model_cpu_offload()`` (a component moves to the GPU when called) and
``enable_sequential_cpu_offload()`` (every layer's weights wait on ``meta`` until that layer runs). Our pipeline
reads some weights other than through a module call (the pivot encoder's ``encode_image``, the banded decode) and
puts tensors on the execution device itself; this runs each offload once, as a user's call, and prints per mode
whether it finished, its time and allocator peak, and the largest pixel difference to the generation in place.
Random weights, every option at its default. On CUDA in fp16 with diffusers' own offload calls; off CUDA, which
diffusers' calls refuse, accelerate's hooks as they set them, with the CPU as the execution device (the rows then
check the script and the hooks, not the transfers).

    python -m benchmarks.offload_check --model random-sd15 --steps 10
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from benchmarks.gpu_table import number
from benchmarks.small_card import EXAMPLE, timed_with_warnings
from omniportrait.benchmark import (
    MODELS,
    PROMPT,
    device_name,
    failure,
    model_pipeline,
    placement,
    release_memory,
)

MODES = ("in place", "model", "sequential")


def offloaded(pipe, mode: str, device: torch.device) -> None:
    """``pipe`` with its components offloaded as ``mode`` says (``in place``: moved to ``device``)."""
    if mode == "in place":
        pipe.to(device)
    elif device.type == "cuda":
        getattr(pipe, f"enable_{mode}_cpu_offload")(device=device)
    else:  # diffusers asks for an accelerator; its hooks, with the CPU as the execution device
        from accelerate import cpu_offload, cpu_offload_with_hook

        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                if mode == "model":
                    cpu_offload_with_hook(component, device)
                else:
                    cpu_offload(component, device, offload_buffers=len(component._parameters) > 0)


def generation(model: str, mode: str, identities, steps: int, device: torch.device, dtype: torch.dtype):
    """One default generation with ``mode``'s offload: (seconds, peak GiB, images, warnings); an error is raised."""
    pipe, _ = model_pipeline(model, torch.device("cpu"), dtype)
    offloaded(pipe, mode, device)
    size = MODELS[model][1]
    images = []

    def generate():
        images.append(pipe(PROMPT, identities, height=size, width=size, num_inference_steps=steps, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images)

    release_memory(device)
    seconds, memory, warned = timed_with_warnings(generate, device)
    return seconds, memory.peak, images[0], warned


def main(argv: list[str] | None = None) -> None:
    from diffusers.utils import logging as diffusers_logging

    from omniportrait.faces import prepare_reference
    from omniportrait.pipelines import Identity

    diffusers_logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-sd15", choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = placement(args.model, torch.device("cuda" if cuda else "cpu"),
                              torch.float16 if cuda else torch.float32)
    identities = [Identity(prepare_reference(Image.open(EXAMPLE)), "woman")]
    print(f"{args.model} {MODELS[args.model][1]}², {args.steps} steps, every option at its default, "
          f"{device_name(device)}, {str(dtype).removeprefix('torch.')}")
    print("| offload | seconds | peak GiB | max \\|Δ\\| to in place | warnings |\n|---|---|---|---|---|")
    in_place = None
    for mode in MODES:
        try:
            seconds, peak, images, warned = generation(args.model, mode, identities, args.steps, device, dtype)
        except Exception as error:  # reported in the mode's row; the next mode still runs
            print(f"| {mode} | failed: {failure(error)} | | | |", flush=True)
            continue
        if mode == "in place":
            in_place, difference = images, "—"
        else:
            difference = "n/a" if in_place is None else f"{np.abs(images - in_place).max():.2e}"
        print(f"| {mode} | {seconds:.2f} | {number(peak, 2)} | {difference} | {'; '.join(warned) or 'none'} |",
              flush=True)


if __name__ == "__main__":
    main()
