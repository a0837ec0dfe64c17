"""Operations one sampling step dispatches, per kind of step, on the real architectures (random weights, CPU).

Where the host CPU bounds a step (it issues kernels more slowly than the GPU runs them), wall time follows the
number of operations the step dispatches, whatever their size: on the H100 host of benchmarks/README.md a step
took 11.2-12.5 µs per operation counted here, for every kind of step. So this count, which needs no GPU,
measures the cost of CPU-side changes. Each ``scaled_dot_product_attention`` call counts as one operation, as
CUDA runs it (one fused kernel), though the CPU may decompose it. Steps are those of ``profile_step.py``; the
count does not depend on the image size, so a small one keeps the run short.

    python benchmarks/count_ops.py [--models random-sdxl random-sd15] [--size 128]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from omniportrait.benchmark import MODELS, model_pipeline, step_calls

STEPS = ("plain", "plain-ours", "plain+record", "guided-cfg", "guided-cfg-gelu", "guided-split", "guided-split-gelu",
         "guided-separate")


class OperationCount(TorchDispatchMode):
    """Counts dispatched aten operations; SDPA (see :class:`OneFusedAttention`) counts once."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class OneFusedAttention(TorchFunctionMode):
    """Counts each SDPA call as one operation and pauses the dispatch count while the CPU runs it."""

    def __init__(self, count: OperationCount):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.count.counts["scaled_dot_product_attention"] += 1
        self.count.paused = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.count.paused = False


def operations(call) -> Counter:
    """Operations dispatched by one call (after a warm-up call, so that one-time setup does not count)."""
    call()
    count = OperationCount()
    with count, OneFusedAttention(count):
        call()
    return count.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["random-sdxl", "random-sd15"], choices=list(MODELS))
    parser.add_argument("--size", type=int, default=128, help="image side (the count does not depend on it)")
    parser.add_argument("--reference", default="examples/astronaut.jpg")
    args = parser.parse_args()
    from omniportrait.faces import prepare_reference
    from omniportrait.images import load_image

    reference = prepare_reference(load_image(args.reference))
    for model in args.models:
        pipe, _ = model_pipeline(model, torch.device("cpu"), torch.float32)
        calls = step_calls(pipe, reference, args.size, torch.device("cpu"))
        print(f"{model}: operations per step (× plain step)", flush=True)
        plain = None
        for name in STEPS:
            total = sum(operations(calls[name]).values())
            plain = plain or total
            print(f"  {name:24s} {total:6d}  {total / plain:5.2f}", flush=True)


if __name__ == "__main__":
    main()
