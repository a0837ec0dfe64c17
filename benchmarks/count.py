"""Memory and FLOPs of the real SD1.5 / SDXL pipelines counted on the ``meta`` device: what a GPU would need,
said by any CPU in seconds (no compute runs, no memory is allocated).

    python -m benchmarks.count decode [--bands 64 32 16] [--check-size 256]
    python -m benchmarks.count guidance [--steps 50] [--start 0.6] [--weights-require-grad]
    python -m benchmarks.count step-peak [--models random-sdxl random-sd15]

``decode``: the activation peak of the VAE decode, diffusers' against ours in bands, then (real compute on the CPU,
``--check-size`` pixels) how far the banded decode lands from diffusers' and how long each takes.
``guidance``: FLOPs and the bytes autograd keeps for the backward of one guided step, per feature pass and per
feed-forward recompute (``-gelu``: ``--rb-recompute gelu``; without: the default ``projection``), and what they add
to a generation. ``step-peak``: the peak of each kind of sampling step (``benchmarks/profile_step.py``'s) and of
making the reference features, every component in fp16.

Memory is counted by :class:`LiveTensorPeak`: the bytes of tensor storage alive at once, without the weights, the
allocator's rounding or a library's scratch space; attention runs as CUDA's kernels do, which keep no (hw)²
matrix. FLOPs come from ``torch.utils.flop_counter`` (matmul, conv, attention; elementwise ops are not counted).
"""

from __future__ import annotations

import argparse
import time
import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


# ----- live tensors ---------------------------------------------------------------------------------------------------
class LiveTensorPeak(TorchDispatchMode):
    """The most bytes of tensor storage alive at once among the tensors created inside the mode.

    A storage counts from the first operation that returns it until the last tensor object on it is collected;
    tensors made before the mode (weights, inputs) are not counted, nor, given in ``exclude``, views of those
    modules' weights made inside it (a linear layer's transposed weight shares the weight's storage).
    """

    def __init__(self, exclude: Iterable[torch.nn.Module] = ()):
        super().__init__()
        self.excluded = storage_keys(exclude)
        self.storage_bytes: dict[int, int] = {}
        self.storage_refs: dict[int, int] = {}
        self.tracked: set[int] = set()
        self.alive = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self.tracked:
                self.track(tensor)
        self.peak = max(self.peak, self.alive)
        return out

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.excluded:
            return
        if key not in self.storage_bytes:
            self.storage_bytes[key], self.storage_refs[key] = storage.nbytes(), 0
            self.alive += storage.nbytes()
        self.storage_refs[key] += 1
        self.tracked.add(id(tensor))
        weakref.finalize(tensor, self.release, key, id(tensor))

    def release(self, key: int, tensor_id: int) -> None:
        self.tracked.discard(tensor_id)
        self.storage_refs[key] -= 1
        if not self.storage_refs[key]:
            self.alive -= self.storage_bytes.pop(key)
            del self.storage_refs[key]

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30


def storage_keys(modules: Iterable[torch.nn.Module]) -> set[int]:
    """The storages of the modules' weights and buffers."""
    return {tensor.untyped_storage()._cdata for module in modules
            for tensor in [*module.parameters(), *module.buffers()]}


SDPA = F.scaled_dot_product_attention


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """SDPA as CUDA runs it in fp16 (flash kernel): it keeps q, k, v, the output and the log-sum-exp, never the
    (hw)² matrix; a call with a mask goes to SDPA as given."""
    if attn_mask is not None or kwargs:
        return SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    **kwargs)
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                              scale=scale)[0]


def efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """SDPA as CUDA runs it in fp32 (memory-efficient kernel; the VAE's attention), no (hw)² matrix either."""
    if attn_mask is not None or dropout_p or is_causal or kwargs:
        raise ValueError("the VAE's attention has no mask, dropout or causality")
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, False, scale=scale)[0]


@contextmanager
def attention_as_on_cuda(kernel: Callable = efficient_attention):
    """``F.scaled_dot_product_attention`` is ``kernel`` for the ``with`` block."""
    F.scaled_dot_product_attention = kernel
    try:
        yield
    finally:
        F.scaled_dot_product_attention = SDPA


@contextmanager
def quiet_diffusers():
    """The fp16 cast notice concerns loading weights; there are none."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


# ----- decode ---------------------------------------------------------------------------------------------------------
DECODES = {"SDXL 1024² fp32": (1024, torch.float32, 0.13025), "SD1.5 512² fp16": (512, torch.float16, 0.18215),
           "SD1.5 1024² fp16": (1024, torch.float16, 0.18215)}  # what the pipelines decode in (SDXL upcasts)


def decode_peak_gib(model, latents: torch.Tensor, band_mib: float | None) -> float:
    """Activation peak of one decode: diffusers' (``band_mib=None``) or in bands."""
    from omniportrait.models.banded_decode import decode_in_bands

    with torch.no_grad(), attention_as_on_cuda(), LiveTensorPeak(exclude=[model]) as live:
        if band_mib is None:
            model.decode(latents, return_dict=False)
        else:
            decode_in_bands(model, latents, band_mib)
    return live.peak_gib


def decode_check_on_cpu(size: int, band_mib: float) -> str:
    """Max |Δ| between the banded and diffusers' decode of the real SDXL VAE, and their CPU times (best of two,
    alternating)."""
    from benchmarks.architectures import vae
    from omniportrait.models.banded_decode import decode_in_bands

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


def print_decode(args) -> None:
    from benchmarks.architectures import vae

    print("| decode | diffusers GiB | " + " | ".join(f"bands of {mib:g} MiB" for mib in args.bands) + " |")
    print("|---|---|" + "---|" * len(args.bands))
    for name, (size, dtype, scaling) in DECODES.items():
        with torch.device("meta"):
            model = torch.nn.Module.to(vae(scaling), dtype)
        latents = torch.zeros(1, 4, size // 8, size // 8, device="meta", dtype=dtype)
        plain = decode_peak_gib(model, latents, None)
        banded = [decode_peak_gib(model, latents, mib) for mib in args.bands]
        print(f"| {name} | {plain:.2f} | " + " | ".join(f"{gib:.2f} ({gib / plain:.2f}×)" for gib in banded) + " |")
    if args.check_size:
        print(decode_check_on_cpu(args.check_size, 1.0))  # 1 MiB: several bands per layer even at a small size


# ----- guidance -------------------------------------------------------------------------------------------------------
UNETS = {"sd15": ("sd15_unet", 64, 768), "sdxl": ("sdxl_unet", 128, 2048)}  # builder, latent side, text width
GUIDED = ("cfg", "cfg-gelu", "split", "split-gelu", "separate", "separate-gelu")  # feature pass[-recompute]
CONDITIONAL_ROW = slice(1, 2)  # of the batch-2 CFG pass


class SavedBytes:
    """A pack hook summing the storages autograd saves, each once, parameters excluded."""

    def __init__(self, module: torch.nn.Module):
        self.skip = storage_keys([module])
        self.storages: dict[int, int] = {}
        self.alive: list[torch.Tensor] = []  # keeps storage ids from being reused while counting

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.skip:
            self.storages[storage._cdata] = storage.nbytes()
            self.alive.append(tensor)
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def unet_inputs(arch: str, batch: int, latent: int, width: int) -> dict:
    def randn(*shape):
        return torch.randn(*shape, device="meta", dtype=torch.float16)

    added = {"text_embeds": randn(batch, 1280), "time_ids": randn(batch, 6)} if arch == "sdxl" else None
    return dict(sample=randn(batch, 4, latent, latent), timestep=torch.tensor(500, device="meta"),
                encoder_hidden_states=randn(batch, 77, width), added_cond_kwargs=added)


def count_step(unet, arch: str, variant: str, latent: int, width: int) -> tuple[float, int]:
    """(FLOPs, saved bytes) of one sampling step: ``plain`` (a CFG pass without grad) or a guided one of
    :data:`GUIDED`, taken as ``ReferenceGuidance`` takes it: the pass's forward, grad up to the DIFT block only,
    the feed-forward gates recomputed (in a batched CFG pass for the conditional row only), and the backward."""
    from omniportrait.guidance.config import DEFAULT_DIFT_BLOCK
    from omniportrait.guidance.features import capture_features, features_only
    from omniportrait.guidance.recompute import gelu_gates, gelu_gates_recomputed

    feature_pass, _, recompute = variant.partition("-")
    block, saved = DEFAULT_DIFT_BLOCK[arch], SavedBytes(unet)
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)  # one mode per pass
    with forward:
        if feature_pass in ("plain", "separate", "split"):  # the CFG pass (split: its unconditional half)
            with torch.no_grad():
                unet(**unet_inputs(arch, 1 if feature_pass == "split" else 2, latent, width))
        if feature_pass == "plain":
            return forward.get_total_flops(), 0
        inputs = unet_inputs(arch, 2 if feature_pass == "cfg" else 1, latent, width)
        sample = inputs.pop("sample").requires_grad_(True)
        rows = CONDITIONAL_ROW if feature_pass == "cfg" else None
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor), \
                gelu_gates_recomputed(gelu_gates(unet), recompute or "projection", rows):
            if feature_pass == "separate":
                features = features_only(unet, block, sample, **inputs)
            else:
                with capture_features(unet, block, grad_after=False) as captured:
                    unet(sample, **inputs)
                features = captured[0]
    with backward, torch.enable_grad():
        torch.autograd.grad(features[-1].float().mean(), sample)
    return forward.get_total_flops() + backward.get_total_flops(), saved.total


def generation_ratio(step_flops: float, plain_flops: float, steps: int, recomputed: int) -> float:
    """FLOPs of a generation whose ``recomputed`` steps cost ``step_flops`` and the rest a plain step, over plain."""
    return ((steps - recomputed) * plain_flops + recomputed * step_flops) / (steps * plain_flops)


def print_guidance(args) -> None:
    """One table per architecture; ``--weights-require-grad`` counts with the weights requiring grad, as
    diffusers' ``from_pretrained`` leaves them (the pipeline freezes them for sampling)."""
    import benchmarks.architectures as architectures

    guided = round(args.steps * args.start)
    with attention_as_on_cuda(flash_attention):
        for arch, (builder, latent, width) in UNETS.items():
            with torch.device("meta"):
                unet = getattr(architectures, builder)().to(torch.float16).eval()
            unet.requires_grad_(args.weights_require_grad)
            print(f"\n{arch} latent {latent}x{latent}, fp16; ratios over {args.steps} steps with {guided} guided "
                  "(every step / every 2nd recomputed)")
            print(f"{'variant':16s} {'TFLOP/step':>10s} {'x plain':>8s} {'saved GiB':>10s} {'every':>10s} "
                  f"{'interval 2':>10s}")
            plain = count_step(unet, arch, "plain", latent, width)[0]
            for variant in ("plain", *GUIDED):
                flops, saved = count_step(unet, arch, variant, latent, width)
                every = generation_ratio(flops, plain, args.steps, guided)
                half = generation_ratio(flops, plain, args.steps, (guided + 1) // 2)
                print(f"{variant:16s} {flops / 1e12:10.3f} {flops / plain:8.2f} {saved / 2**30:10.2f} "
                      f"{every:10.2f} {half:10.2f}")


# ----- step peaks -----------------------------------------------------------------------------------------------------
META = torch.device("meta")


def weight_bytes(modules: list[torch.nn.Module]) -> int:
    return sum(tensor.numel() * tensor.element_size() for module in modules
               for tensor in [*module.parameters(), *module.buffers()])


def reference_features_peak(pipe, modules: list[torch.nn.Module], reference, size: int) -> int:
    """Activation bytes at the peak of making one identity's reference features (once per generation: the aligned
    face encoded, ``K`` noisy copies through the UNet to the DIFT block)."""
    from benchmarks.bench import PROMPT
    from omniportrait.guidance import RBGuidanceConfig
    from omniportrait.guidance.rb import ReferenceGuidance
    from omniportrait.pipelines import Identity

    with torch.no_grad():
        bound = pipe.bind_identities(PROMPT, [Identity(reference, "woman")])
    with attention_as_on_cuda(flash_attention), LiveTensorPeak(exclude=modules) as live:
        ReferenceGuidance(pipe, RBGuidanceConfig(cuda_graph=False), bound, size, size, 1)
    return live.peak


def step_peaks(pipe, modules: list[torch.nn.Module], reference, size: int) -> dict[str, int]:
    """Activation bytes at the peak of each step of :func:`benchmarks.profile_step.step_calls` but the decodes
    (``decode`` counts those)."""
    from benchmarks.profile_step import step_calls

    peaks = {}
    with attention_as_on_cuda(flash_attention):
        calls = step_calls(pipe, reference, size, META, graphs=False)
        for name, call in calls.items():
            if name.startswith("vae-"):
                continue
            with LiveTensorPeak(exclude=modules) as live:
                call()
            peaks[name] = live.peak
    return peaks


def print_step_peaks(args) -> None:
    from benchmarks.bench import MODELS, SAMPLE, model_pipeline
    from omniportrait.faces import prepare_reference
    from omniportrait.images import load_image

    reference = prepare_reference(load_image(SAMPLE))
    for model in args.models:
        size = MODELS[model][1]
        pipe, modules = model_pipeline(model, META, torch.float16)
        weights = weight_bytes(modules)
        print(f"\n{model} {size}², fp16, weights {weights / 2**30:.2f} GiB")
        print("| step | activations GiB | weights + activations GiB |\n|---|---|---|")
        peaks = {"reference-features": reference_features_peak(pipe, modules, reference, size),
                 **step_peaks(pipe, modules, reference, size)}
        for name, peak in peaks.items():
            print(f"| {name} | {peak / 2**30:.2f} | {(weights + peak) / 2**30:.2f} |")


# ----- command line ---------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    from benchmarks.bench import MODELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)
    decode = commands.add_parser("decode", help="the VAE decode's peak, diffusers' against ours in bands")
    decode.add_argument("--bands", type=float, nargs="+", default=[64, 32, 16], metavar="MIB")
    decode.add_argument("--check-size", type=int, default=256, help="pixels of the CPU check (0: skip it)")
    decode.set_defaults(run=print_decode)
    guidance = commands.add_parser("guidance", help="FLOPs and saved bytes of one guided step per feature pass")
    guidance.add_argument("--steps", type=int, default=50)
    guidance.add_argument("--start", type=float, default=0.6, help="u: share of the steps that are guided")
    guidance.add_argument("--weights-require-grad", action="store_true",
                          help="count with the weights requiring grad (diffusers' from_pretrained leaves them so)")
    guidance.set_defaults(run=print_guidance)
    peaks = commands.add_parser("step-peak", help="the peak of each kind of sampling step")
    peaks.add_argument("--models", nargs="+", default=["random-sdxl", "random-sd15"], choices=list(MODELS))
    peaks.set_defaults(run=print_step_peaks)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with quiet_diffusers():
        args.run(args)


if __name__ == "__main__":
    main()
