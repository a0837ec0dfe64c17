"""Sampling steps replayed as CUDA graphs against eager ones, on the real architectures, without a GPU.

The CUDA capture is replaced by the emulation of ``tests/guidance/test_graph.py`` (a replay runs only the aten
operations the capture recorded, on the same tensors). For each feature pass, two ``ReferenceGuidance`` states
take the same steps (two unguided, then three guided), at changing latents and timesteps, with the attention
processors and frozen weights of a generation, one eagerly and one captured on the first step of each kind and
replayed after; the script prints the largest difference of the noise
and of the gradient. Random weights, fp32, CPU, a small image (the replay logic does not depend on the size);
a few minutes on 2 cores.

    python -m benchmarks.check_graph_replay [--models random-sd15 random-sdxl] [--size 128]
"""

from __future__ import annotations

import argparse

import torch

from omniportrait.attention import ContextProjections, sampling_attention
from omniportrait.benchmark import MODELS, PROMPT, model_pipeline
from omniportrait.guidance import RBGuidanceConfig
from omniportrait.guidance.rb import ReferenceGuidance
from omniportrait.pipelines import Identity
from tests.guidance.test_graph import EmulatedGraphs

STEP_INDICES = (5, 10, 20, 25, 30)  # of a 50-step schedule: two unguided steps (t > 600), then three guided
STEP_KINDS = ("unguided, eager then captured", "unguided, replayed", "guided, eager then captured",
              "guided, replayed", "guided, replayed")


def replay_differences(pipe, reference, feature_pass: str, size: int) -> list[tuple[float, float, float]]:
    """Per step: (max |Δ noise|, max |Δ gradient|, max |gradient|) between the eager and the replayed state; the
    gradient columns are 0 on unguided steps."""
    with torch.no_grad():  # as in a generation
        bound = pipe.bind_identities(PROMPT, [Identity(reference, "woman")])
        cond = pipe.encode_text(PROMPT, None, 1, True, size, size, bound)
    pipe.scheduler.set_timesteps(50)
    eager, graphed = (ReferenceGuidance(pipe, RBGuidanceConfig(feature_pass=feature_pass, strength=5000.0,
                                                               cuda_graph=graph), bound, size, size, 1)
                      for graph in (False, True))
    side = size // pipe.vae_scale_factor
    latents = torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    projections = {eager: ContextProjections(), graphed: ContextProjections()}  # each state's own, as a generation's

    def step(state: ReferenceGuidance, z, t, index: int) -> torch.Tensor:
        """One sampling step as a generation takes it: our attention processors, the weights frozen."""
        with sampling_attention(pipe.unet, projections[state]), state.sampling():
            return state.noise(z, t, index, cond, 7.5)

    differences = []
    for step_number, index in enumerate(STEP_INDICES):
        t, z = pipe.scheduler.timesteps[index], latents * (1 - 0.1 * step_number)
        noise = step(eager, z, t, index)
        replayed = step(graphed, z, t, index)
        gradients = (eager.last_gradient, graphed.last_gradient)
        if gradients[0] is None:
            gradients = (torch.zeros(()), torch.zeros(()))
        differences.append((float((noise - replayed).abs().max()), float((gradients[0] - gradients[1]).abs().max()),
                            float(gradients[0].abs().max())))
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["random-sd15", "random-sdxl"], choices=list(MODELS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--reference", default="examples/astronaut.jpg")
    args = parser.parse_args()
    from omniportrait.faces import prepare_reference
    from omniportrait.images import load_image

    ReferenceGuidance.graph_backend = EmulatedGraphs
    reference = prepare_reference(load_image(args.reference))
    for model in args.models:
        pipe, _ = model_pipeline(model, torch.device("cpu"), torch.float32)
        for feature_pass in ("cfg", "split"):
            differences = replay_differences(pipe, reference, feature_pass, args.size)
            for index, kind, (noise, gradient, scale) in zip(STEP_INDICES, STEP_KINDS, differences):
                print(f"{model} {feature_pass} step {index} {kind}: max|Δ noise| {noise:.2e}, "
                      f"max|Δ gradient| {gradient:.2e} (max |gradient| {scale:.2e})", flush=True)


if __name__ == "__main__":
    main()
