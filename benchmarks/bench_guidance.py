"""Wall time and peak memory of OmniPortrait against diffusers' plain pipeline, measured side by side.

Rows: diffusers plain, ours with RB-Guidance off (target <= 1.03x), ours with the full method (RB on,
`cfg` and `separate` feature passes). Tiny presets on CPU always; with `--real` on a CUDA machine, the
real SD1.5 (512²) and SDXL (1024²) architectures with random weights in fp16 (benchmarks/architectures.py),
all components on the GPU. Peak memory is reported on CUDA only.

    python benchmarks/bench_guidance.py [--steps 50] [--repeats 3] [--real]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from omniportrait.guidance import RBGuidanceConfig  # noqa: E402
from omniportrait.models.tiny import tiny_components  # noqa: E402
from omniportrait.pipelines import Identity  # noqa: E402
from omniportrait.pipelines.loading import PIPELINE_CLASSES  # noqa: E402

PROMPT = "a photo of a woman riding a bicycle"


def astronaut_reference():
    from skimage import data

    from omniportrait.faces import prepare_reference

    return prepare_reference(Image.fromarray(data.astronaut()))


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """Best wall time over ``repeats`` and peak CUDA memory in GiB (0 on CPU)."""
    fn()  # warm-up
    best = float("inf")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return best, peak


def bench_arch(arch: str, steps: int, repeats: int, reference, device, parts: dict, pivot_encoder, size: int):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    plain = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[arch](**parts).to(device)
    ours = PIPELINE_CLASSES[arch](**parts, pivot_encoder=pivot_encoder).to(device)
    for pipe in (plain, ours):
        pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="latent")
    identity = [Identity(reference, "woman")]
    rows = {
        "diffusers plain": lambda: plain(PROMPT, **common, generator=torch.Generator().manual_seed(0)),
        "ours, RB off": lambda: ours(PROMPT, identity, **common, generator=torch.Generator().manual_seed(0),
                                     rb_guidance=RBGuidanceConfig(enabled=False)),
        "ours, RB on (cfg pass)": lambda: ours(PROMPT, identity, **common, generator=torch.Generator().manual_seed(0)),
        "ours, RB on (separate pass)": lambda: ours(
            PROMPT, identity, **common, generator=torch.Generator().manual_seed(0),
            rb_guidance=RBGuidanceConfig(feature_pass="separate")),
    }
    results = {name: timed(fn, repeats, device) for name, fn in rows.items()}
    base = results["diffusers plain"][0]
    print(f"\n{arch} {size}x{size}, {steps} steps ({int(steps * 0.6)} guided), {device} {ours.unet.dtype}")
    print(f"{'variant':32s} {'seconds':>9s} {'x plain':>8s} {'peak GiB':>9s}")
    for name, (seconds, peak) in results.items():
        print(f"{name:32s} {seconds:9.3f} {seconds / base:8.2f} {peak:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="also the real SD1.5/SDXL architectures on CUDA, fp16")
    args = parser.parse_args()
    reference = astronaut_reference()
    torch.set_grad_enabled(False)
    for arch in ("sd15", "sdxl"):
        tiny = tiny_components(arch)
        bench_arch(arch, args.steps, args.repeats, reference, torch.device("cpu"), tiny.components,
                   tiny.pivot_encoder, 64)
    if args.real:
        from benchmarks.architectures import real_components

        if not torch.cuda.is_available():
            raise SystemExit("--real needs a CUDA GPU")
        for arch, size in (("sd15", 512), ("sdxl", 1024)):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            parts, pie = real_components(arch)
            print(f"{arch}: {torch.cuda.memory_allocated() / 2**30:.2f} GiB of weights on the GPU")
            bench_arch(arch, args.steps, args.repeats, reference, torch.device("cuda"), parts, pie, size)
            del parts, pie


if __name__ == "__main__":
    main()
