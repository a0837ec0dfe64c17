"""FLOPs and activation bytes of one guided step on the real SD1.5 / SDXL UNets, counted on the meta device.

No compute runs: the UNets are built on ``meta`` in fp16, so this takes seconds on any CPU and says what each
way of taking the RB-Guidance gradient costs before a GPU is at hand. The variants use the pipeline's own
feature capture (:mod:`omniportrait.guidance.features`):

    plain          CFG batch-2 forward without grad (one plain sampling step)
    cfg-full-graph CFG forward with grad through the whole UNet, backward from the DIFT features
    cfg-gate-kept  CFG forward with grad up to the DIFT block only (no graph after it), backward
    cfg-every-row  cfg-gate-kept with the feed-forward gates recomputed in the backward (``--rb-recompute gelu``),
                   every row kept, as before the gates took the conditional rows only
    cfg            as cfg-every-row, the gates keeping and differentiating the conditional row only
    split          batch-1 unconditional forward without grad + batch-1 conditional forward as in cfg, backward
    separate       plain + a batch-1 conditional forward with grad stopped after the DIFT block, backward
    *-projection   the feed-forward's whole projection recomputed (``--rb-recompute projection``, the default):
                   ``cfg-projection`` is what a generation runs by default

All but the first three recompute the feed-forward gates as the pipeline does (``omniportrait.guidance.recompute``).

FLOPs come from ``torch.utils.flop_counter`` (matmul, conv, attention; elementwise ops are not counted).
"Saved" is the bytes autograd keeps for the backward, parameters excluded, deduplicated by storage; it is not
the peak (weights, live activations and backward scratch come on top). Attention is routed through the flash
kernel that CUDA picks in fp16, which keeps q, k, v, the output and the log-sum-exp, not the (hw)² matrix.

With ``--weights-require-grad`` the weights require grad, as diffusers' ``from_pretrained`` leaves them: what a
guided step kept before the pipeline froze them for sampling (``ReferenceGuidance.sampling``).

    python -m benchmarks.count_guidance [--steps 50] [--start 0.6] [--weights-require-grad] [--by-node]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.live_tensors import attention_as_on_cuda, flash_attention
from omniportrait.guidance.config import DEFAULT_DIFT_BLOCK
from omniportrait.guidance.features import capture_features, features_only
from omniportrait.guidance.recompute import gelu_gates, gelu_gates_recomputed
from benchmarks.architectures import sd15_unet, sdxl_unet

ARCHS = {"sd15": (sd15_unet, 64, 768), "sdxl": (sdxl_unet, 128, 2048)}  # builder, latent side, text width
VARIANTS = ("plain", "cfg-full-graph", "cfg-gate-kept", "cfg-every-row", "cfg", "cfg-every-row-projection",
            "cfg-projection", "split", "split-projection", "separate")
PROJECTION = "-projection"
GATES_KEPT = ("cfg-full-graph", "cfg-gate-kept")
EVERY_ROW = "-every-row"
CONDITIONAL_ROW = slice(1, 2)  # of the batch-2 CFG pass


class SavedBytes:
    """A pack hook summing the storages autograd saves, each once, parameters excluded."""

    def __init__(self, module: torch.nn.Module):
        self.skip = {tensor.untyped_storage()._cdata for tensor in [*module.parameters(), *module.buffers()]}
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


def saved_tensors_of(node) -> list[torch.Tensor]:
    """The tensors an autograd node keeps: ``_saved_*`` attributes (built-in nodes), ``saved_tensors`` (custom)."""
    values = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
    if type(node).__name__.endswith("Backward"):  # a custom autograd.Function's node
        values.append(node.saved_tensors)
    flat = [item for value in values for item in (value if isinstance(value, (tuple, list)) else [value])]
    return [item for item in flat if isinstance(item, torch.Tensor)]


def saved_by_node(output: torch.Tensor, skip: set[int]) -> Counter:
    """Bytes kept for the backward of ``output`` per kind of autograd node, each storage once, ``skip`` (the
    parameters' storages) left out."""
    by_node, seen, visited, stack = Counter(), set(skip), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for tensor in saved_tensors_of(node):
            storage = tensor.untyped_storage()
            if storage._cdata not in seen:
                seen.add(storage._cdata)
                by_node[node.name()] += storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return by_node


def count_step(unet, arch: str, variant: str, latent: int, width: int, by_node: Counter | None = None
               ) -> tuple[float, int]:
    """(FLOPs, saved bytes) of one sampling step in ``variant``; ``by_node`` gets the saved bytes per autograd
    node kind."""
    recompute = "projection" if variant.endswith(PROJECTION) else "gelu"
    variant = variant.removesuffix(PROJECTION)
    rows = CONDITIONAL_ROW if variant == "cfg" else None  # as ReferenceGuidance.gate_rows
    variant = variant.removesuffix(EVERY_ROW)
    block, saved = DEFAULT_DIFT_BLOCK[arch], SavedBytes(unet)
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)  # one mode per pass
    with forward:
        if variant in ("plain", "separate", "split"):
            with torch.no_grad():
                unet(**unet_inputs(arch, 1 if variant == "split" else 2, latent, width))
        if variant == "plain":
            return forward.get_total_flops(), 0
        inputs = unet_inputs(arch, 1 if variant in ("separate", "split") else 2, latent, width)
        sample = inputs.pop("sample").requires_grad_(True)
        gates = [] if variant in GATES_KEPT else gelu_gates(unet)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor), \
                gelu_gates_recomputed(gates, recompute, rows):
            if variant == "separate":
                features = features_only(unet, block, sample, **inputs)
            else:
                with capture_features(unet, block, grad_after=variant == "cfg-full-graph") as captured:
                    unet(sample, **inputs)
                features = captured[0]
    if by_node is not None:
        by_node.update(saved_by_node(features, saved.skip))
    with backward, torch.enable_grad():
        torch.autograd.grad(features[-1].float().mean(), sample)
    return forward.get_total_flops() + backward.get_total_flops(), saved.total


def generation_ratio(step_flops: float, plain_flops: float, steps: int, recomputed: int) -> float:
    """FLOPs of a generation whose ``recomputed`` steps cost ``step_flops`` and the rest a plain step, over plain."""
    return ((steps - recomputed) * plain_flops + recomputed * step_flops) / (steps * plain_flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--start", type=float, default=0.6, help="u: share of the steps that are guided")
    parser.add_argument("--by-node", action="store_true",
                        help="also print what the cfg step keeps per kind of autograd node")
    parser.add_argument("--weights-require-grad", action="store_true",
                        help="count with the weights requiring grad (diffusers' from_pretrained leaves them so)")
    args = parser.parse_args()
    guided = round(args.steps * args.start)
    diffusers_logging.set_verbosity_error()  # the fp16 cast notice concerns loading weights; there are none
    with attention_as_on_cuda(flash_attention):
        for arch, build_and_sizes in ARCHS.items():
            print_counts(arch, *build_and_sizes, args, guided)


def print_counts(arch: str, build, latent: int, width: int, args, guided: int) -> None:
    """The table of one architecture."""
    with torch.device("meta"):
        unet = build().to(torch.float16).eval().requires_grad_(args.weights_require_grad)
    print(f"\n{arch} latent {latent}x{latent}, fp16, DIFT up_blocks[{DEFAULT_DIFT_BLOCK[arch]}]; "
          f"ratios over {args.steps} steps with {guided} guided (every step / every 2nd recomputed)")
    print(f"{'variant':24s} {'TFLOP/step':>10s} {'x plain':>8s} {'saved GiB':>10s} {'every':>10s} "
          f"{'interval 2':>10s}")
    plain = None
    for variant in VARIANTS:
        flops, saved = count_step(unet, arch, variant, latent, width)
        plain = plain or flops
        every = generation_ratio(flops, plain, args.steps, guided)
        half = generation_ratio(flops, plain, args.steps, (guided + 1) // 2)
        print(f"{variant:24s} {flops / 1e12:10.3f} {flops / plain:8.2f} {saved / 2**30:10.2f} {every:10.2f} "
              f"{half:10.2f}")
    if args.by_node:
        by_node = Counter()
        count_step(unet, arch, "cfg", latent, width, by_node)
        print("kept by the cfg step, GiB: " + ", ".join(f"{name} {size / 2**30:.2f}"
                                                     for name, size in by_node.most_common() if size >= 2**20))


if __name__ == "__main__":
    main()
