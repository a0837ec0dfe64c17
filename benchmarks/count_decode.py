"""Activation memory of the VAE decode, diffusers' against ours in bands, counted on the meta device.

The real SD/SDXL KL decoder (``benchmarks.architectures.vae``) is built on ``meta``, so no compute runs and
this takes seconds on any CPU. :class:`~benchmarks.live_tensors.LiveTensorPeak` follows every tensor the decode
creates and reports the highest number of bytes alive at once: the activations' share of the allocator peak,
without the weights, the allocator's rounding, or a convolution library's scratch space. Attention is routed
through the memory-efficient kernel that CUDA runs in fp32 and fp16, which keeps no (hw)² matrix.

Then, with real compute on the CPU (random weights, fp32, ``--check-size`` pixels square), how far the banded
decode lands from diffusers' and how long each takes (best of two, alternating).

    python -m benchmarks.count_decode [--bands 64 32 16] [--check-size 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.live_tensors import LiveTensorPeak, attention_as_on_cuda
from benchmarks.architectures import vae
from omniportrait.models.banded_decode import decode_in_bands

CASES = {"SDXL 1024² fp32": (1024, torch.float32, 0.13025), "SD1.5 512² fp16": (512, torch.float16, 0.18215),
         "SD1.5 1024² fp16": (1024, torch.float16, 0.18215)}  # what the pipelines decode in (SDXL upcasts)


def decode_peak_gib(model, latents: torch.Tensor, band_mib: int | None) -> float:
    """Activation peak of one decode: diffusers' (``band_mib=None``) or in bands."""
    with torch.no_grad(), attention_as_on_cuda(), LiveTensorPeak(exclude=[model]) as live:
        if band_mib is None:
            model.decode(latents, return_dict=False)
        else:
            decode_in_bands(model, latents, band_mib)
    return live.peak_gib


def check_on_cpu(size: int, band_mib: float) -> str:
    """Max |Δ| between the banded and diffusers' decode of the real SDXL VAE, and their CPU times."""
    torch.manual_seed(0)
    model = vae(0.13025).eval()
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    decodes = {"diffusers": lambda: model.decode(latents, return_dict=False)[0],
               "bands": lambda: decode_in_bands(model, latents, band_mib)}
    seconds, images = {name: float("inf") for name in decodes}, {}
    with torch.no_grad():
        for _ in range(2):
            for name, decode in decodes.items():
                start = time.perf_counter()
                images[name] = decode()
                seconds[name] = min(seconds[name], time.perf_counter() - start)
    difference = (images["bands"] - images["diffusers"]).abs().max().item()
    return (f"SDXL VAE {size}², fp32, CPU, bands of {band_mib} MiB: max |Δ| {difference:.2e} (image range "
            f"±{images['diffusers'].abs().max().item():.2f}); diffusers {seconds['diffusers']:.2f} s, bands "
            f"{seconds['bands']:.2f} s ({seconds['bands'] / seconds['diffusers']:.2f}×)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bands", type=float, nargs="+", default=[64, 32, 16], metavar="MIB")
    parser.add_argument("--check-size", type=int, default=256, help="pixels of the CPU check (0: skip it)")
    args = parser.parse_args(argv)
    print("| decode | diffusers GiB | " + " | ".join(f"bands of {mib:g} MiB" for mib in args.bands) + " |")
    print("|---|---|" + "---|" * len(args.bands))
    for name, (size, dtype, scaling) in CASES.items():
        with torch.device("meta"):
            model = torch.nn.Module.to(vae(scaling), dtype)
        latents = torch.zeros(1, 4, size // 8, size // 8, device="meta", dtype=dtype)
        plain = decode_peak_gib(model, latents, None)
        banded = [decode_peak_gib(model, latents, mib) for mib in args.bands]
        print(f"| {name} | {plain:.2f} | " + " | ".join(f"{gib:.2f} ({gib / plain:.2f}×)" for gib in banded) + " |")
    if args.check_size:
        print(check_on_cpu(args.check_size, 1.0))  # 1 MiB: several bands per layer even at a small size


if __name__ == "__main__":
    main()
