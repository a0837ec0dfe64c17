"""On a GPU, the real architectures (random weights, fp16) generating as a user's call does, every option at its
default: SDXL on a smaller card (CUDA's allocator capped), SD1.5 with diffusers' CPU offloads.

Marked ``gpu`` and skipped without CUDA; ``python -m pytest -q -s -m gpu tests`` runs them (``benchmarks/gpu_check.sh``
does), each printing a markdown row of what it measured.
"""

import pytest
import torch

from benchmarks.bench import PROMPT, CallMemory, failure, model_pipeline, release_memory, timed_once

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")
TARGET_GIB = 12.0  # the card a default SDXL generation at 1024² must fit


@pytest.fixture(scope="module")
def identities(astronaut_reference):
    from omniportrait.pipelines import Identity

    return [Identity(astronaut_reference, "woman")]


def generation(pipe, identities, size: int, steps: int) -> tuple[object, float, CallMemory]:
    """One default generation of ``pipe``: its output, seconds and CUDA memory."""
    outputs = []

    def generate():
        outputs.append(pipe(PROMPT, identities=identities, height=size, width=size, num_inference_steps=steps,
                            output_type="np", generator=torch.Generator().manual_seed(0)))

    release_memory(CUDA)
    seconds, memory = timed_once(generate, CUDA)
    return outputs[0], seconds, memory


def capped(limit_gib: float | None) -> None:
    """Let CUDA's allocator hold at most ``limit_gib`` (None: the whole card)."""
    total = torch.cuda.get_device_properties(CUDA).total_memory
    fraction = 1.0 if limit_gib is None else min(1.0, limit_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, CUDA)


@pytest.fixture(scope="module")
def sdxl():
    pipe, _ = model_pipeline("random-sdxl", CUDA, torch.float16)
    yield pipe
    capped(None)


@pytest.mark.parametrize("limit_gib", [None, TARGET_GIB, 11.0, 10.0])
def test_the_default_sdxl_generation_on_a_smaller_card(sdxl, identities, limit_gib):
    """Within the target the generation finishes (going on with what needs less memory where it runs out, said in
    its output); below it, it finishes too or fails with CUDA's out-of-memory error, nothing else."""
    capped(limit_gib)
    try:
        output, seconds, memory = generation(sdxl, identities, 1024, 50)
    except torch.OutOfMemoryError as error:
        print(f"\n| {limit_gib} GiB | failed: {failure(error)} |")
        assert limit_gib is not None and limit_gib < TARGET_GIB
        return
    finally:
        capped(None)
    print(f"\n| {limit_gib} GiB | {seconds:.2f} s | start {memory.start:.2f} GiB | peak {memory.peak:.2f} GiB | went "
          f"on with: {', '.join(output.memory_fallbacks()) or 'nothing'} |")
    assert output.images.shape == (1, 1024, 1024, 3)
    assert memory.peak <= (limit_gib or float("inf"))


@pytest.fixture(scope="module")
def sd15_in_place(identities):
    pipe, _ = model_pipeline("random-sd15", CUDA, torch.float16)
    output, seconds, memory = generation(pipe, identities, 512, 10)
    print(f"\n| in place | {seconds:.2f} s | peak {memory.peak:.2f} GiB |")
    return output.images, memory.peak


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_the_default_sd15_generation_with_cpu_offload_gives_the_images_made_in_place(sd15_in_place, identities,
                                                                                    mode):
    """diffusers' ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``: our pipeline also reads weights
    other than through a module call (the pivot encoder, the banded decode), which the offload hooks must cover."""
    images, in_place_peak = sd15_in_place
    pipe, _ = model_pipeline("random-sd15", torch.device("cpu"), torch.float16)
    getattr(pipe, f"enable_{mode}_cpu_offload")(device=CUDA)
    output, seconds, memory = generation(pipe, identities, 512, 10)
    difference = abs(output.images - images).max()
    print(f"\n| {mode} offload | {seconds:.2f} s | peak {memory.peak:.2f} GiB | max |Δ| {difference:.2e} |")
    assert difference < 2 / 255
    assert memory.peak < in_place_peak
