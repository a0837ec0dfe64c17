"""Memory peak of each kind of sampling step of the real SD1.5 / SDXL pipelines, counted on the meta device.

Every component (UNet, text encoders, VAE, Pivot ID Encoder) is built on ``meta`` in fp16, as the GPU bench loads
them, and each step of ``profile_step.py`` runs once under :class:`~benchmarks.live_tensors.LiveTensorPeak`, with
attention as CUDA's flash kernel runs it. Weights plus the step's activations at their peak is what CUDA's
allocator would report, less its rounding and the libraries' scratch space (cuBLAS and cuDNN workspaces). No
compute runs: about a minute on any CPU. Before the steps, the once-per-call pass that makes the reference features
(``ReferenceGuidance``: the aligned face encoded, ``K`` noisy copies through the UNet to the DIFT block) is counted the
same way. The VAE decode is counted by ``count_decode.py``.

``--gates-kept`` counts the guided steps without the recomputed feed-forward gates, as the code the H100 tables
of ``benchmarks/README.md`` measured (commit 8a43b86), to compare the count with those measurements.

    python -m benchmarks.count_step_peak [--models random-sdxl random-sd15] [--gates-kept]
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from unittest import mock

import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from benchmarks.live_tensors import LiveTensorPeak, attention_as_on_cuda, flash_attention
from omniportrait.benchmark import MODELS, PROMPT, model_pipeline, step_calls
from omniportrait.faces import prepare_reference
from omniportrait.guidance import RBGuidanceConfig

EXAMPLE = "examples/astronaut.jpg"
META = torch.device("meta")


def weight_bytes(modules: list[torch.nn.Module]) -> int:
    return sum(tensor.numel() * tensor.element_size() for module in modules
               for tensor in [*module.parameters(), *module.buffers()])


@contextmanager
def gates_kept(kept: bool):
    """With ``kept``, guided steps keep the feed-forward gates for the backward (no GEGLU is recomputed)."""
    if not kept:
        yield
        return
    with mock.patch("omniportrait.guidance.rb.gelu_gates", lambda unet: []):
        yield


def reference_features_peak(pipe, modules: list[torch.nn.Module], reference, size: int) -> int:
    """Activation bytes at the peak of making one identity's reference features (once per generation)."""
    from omniportrait.guidance.rb import ReferenceGuidance
    from omniportrait.pipelines import Identity

    with torch.no_grad():
        bound = pipe.bind_identities(PROMPT, [Identity(reference, "woman")])
    with attention_as_on_cuda(flash_attention), LiveTensorPeak(exclude=modules) as live:
        ReferenceGuidance(pipe, RBGuidanceConfig(), bound, size, size, 1)
    return live.peak


def step_peaks(pipe, modules: list[torch.nn.Module], reference, size: int, kept: bool = False) -> dict[str, int]:
    """Activation bytes at the peak of each step of :func:`~omniportrait.benchmark.step_calls` but the decodes."""
    peaks = {}
    with attention_as_on_cuda(flash_attention), gates_kept(kept):
        calls = step_calls(pipe, reference, size, META, graphs=False)
        for name, call in calls.items():
            if name.startswith("vae-"):
                continue
            with LiveTensorPeak(exclude=modules) as live:
                call()
            peaks[name] = live.peak
    return peaks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["random-sdxl", "random-sd15"], choices=list(MODELS))
    parser.add_argument("--gates-kept", action="store_true", help="count as commit 8a43b86 did (no gate recomputed)")
    args = parser.parse_args(argv)
    diffusers_logging.set_verbosity_error()  # the fp16 cast notice concerns loading weights; there are none
    reference = prepare_reference(Image.open(EXAMPLE))
    for model in args.models:
        size = MODELS[model][1]
        pipe, modules = model_pipeline(model, META, torch.float16)
        weights = weight_bytes(modules)
        print(f"\n{model} {size}², fp16, weights {weights / 2**30:.2f} GiB"
              + (", feed-forward gates kept" if args.gates_kept else ""))
        print("| step | activations GiB | weights + activations GiB |\n|---|---|---|")
        peaks = {"reference-features": reference_features_peak(pipe, modules, reference, size),
                 **step_peaks(pipe, modules, reference, size, args.gates_kept)}
        for name, peak in peaks.items():
            print(f"| {name} | {peak / 2**30:.2f} | {(weights + peak) / 2**30:.2f} |")


if __name__ == "__main__":
    main()
