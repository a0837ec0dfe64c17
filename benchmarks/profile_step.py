"""Where one sampling step's time and memory go, per RB-Guidance feature pass, on the real architectures.

Random weights in fp16 on CUDA (speed does not depend on weight values). For one model it first runs a short
generation with CUDA-graph steps and an eager one (how far their latents land apart, and what memory the graphed
one leaves allocated); then it times, with CUDA synchronised around each call: a plain CFG step, the same step with
the attention recording the mask needs (eager and replayed as a CUDA graph), a guided step (forward with grad,
mask, energy, backward) in each feature pass, eager and (``cfg``, ``split``) replayed as a CUDA graph, the VAE
decode (diffusers' and in bands) and the once-per-call identity binding (Pivot ID Encoder), with the allocator
peak of each; the CUDA kernels of one guided step by device time
(``torch.profiler``) and the sum of all kernel time, which, against the step's wall time, says whether the step
waits on the GPU or on Python; last, the source lines where a step makes the CPU wait for the GPU.

    python -m benchmarks.profile_step --model random-sdxl [--feature-pass cfg] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench import EAGER, MODELS, PROMPT, SAMPLE, device_name, failure, model_pipeline, placement
from omniportrait.guidance.config import FEATURE_PASSES

GRAPHED_PASSES = ("cfg", "split")  # the feature passes also timed as CUDA graphs and with only the gate recomputed
GUIDED_INDEX = 30  # of a 50-step schedule: a guided timestep


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(call, repeats: int) -> float:
    call()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def peak_gib(call) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    call()
    synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def measured(measure, call, digits: int) -> str:
    """``measure(call)`` to ``digits`` decimals, or why it failed: one kind of step running out of memory, say, does
    not stop the others."""
    try:
        return f"{measure(call):.{digits}f}"
    except Exception as error:  # printed in its place
        return f"failed ({failure(error)})"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sync_points(call) -> Counter:
    """Where ``call`` makes the CPU wait for the GPU (``torch.cuda.set_sync_debug_mode``), by source line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


def graph_agreement(pipe, reference, size: int, steps: int = 10) -> str:
    """Final latents of a short generation with the guided steps as CUDA graphs against eager ones, per graphed
    feature pass (the same kernels run, so the difference should be at rounding level), and the memory a graphed
    generation leaves allocated once its output is gone, before and after a garbage collection.
    Run before :func:`step_calls`, whose guidance states hold attention maps and captured steps."""
    from omniportrait.guidance import RBGuidanceConfig
    from omniportrait.pipelines import Identity

    def latents(**config) -> torch.Tensor:
        return pipe(PROMPT, identities=[Identity(reference, "woman")], height=size, width=size, num_inference_steps=steps,
                    output_type="latent", generator=torch.Generator().manual_seed(0),
                    rb_guidance=RBGuidanceConfig(**config)).images.float()

    lines = []
    for name in GRAPHED_PASSES:
        eager = latents(feature_pass=name, cuda_graph=False)
        before = torch.cuda.memory_allocated()
        graphed = latents(feature_pass=name, cuda_graph=True)
        left = (torch.cuda.memory_allocated() - before) / 2**20
        gc.collect()
        collected = (torch.cuda.memory_allocated() - before) / 2**20
        lines.append(f"{name} max|Δ| {(graphed - eager).abs().max():.2e} (max |z| {eager.abs().max():.2f}), "
                     f"left allocated {left:.0f} MiB, {collected:.0f} MiB after gc")
    return f"graph vs eager latents after {steps} steps: " + "; ".join(lines)


def kernel_table(call) -> str:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        call()
        synchronize()
        wall = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    kernel_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
    table = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
    return f"one guided step under the profiler: wall {wall:.1f} ms, kernels {kernel_ms:.1f} ms\n{table}"


def decoded(pipe, latents: torch.Tensor, in_bands: bool) -> torch.Tensor:
    """The pipeline's decode, in bands or whole (whatever its default), for this call only."""
    before, pipe.banded_decode = pipe.banded_decode, in_bands
    try:
        return pipe.decode(latents, "pt")
    finally:
        pipe.banded_decode = before


def step_configs(graphs: bool) -> dict:
    """The guidance of each kind of guided step: every feature pass eager; ``cfg`` and ``split`` also with only the
    feed-forward's gate recomputed (``-gelu``) and, with ``graphs``, as CUDA graphs (``-graph``)."""
    configs = {name: replace(EAGER, feature_pass=name) for name in FEATURE_PASSES}
    configs.update({f"{name}-gelu": replace(configs[name], recompute="gelu") for name in GRAPHED_PASSES})
    if graphs:  # captured on the first call, replayed on the later ones
        configs.update({f"{name}-graph": replace(configs[name], cuda_graph=True) for name in GRAPHED_PASSES})
        configs["record-graph"] = configs["cfg-graph"]  # its own state, which never captures a guided step
    return configs


def step_calls(pipe, reference, size: int, device: torch.device, graphs: bool | None = None) -> dict:
    """Zero-argument calls of one sampling step at a guided timestep, per kind of step, as a generation runs them,
    and of the VAE decode and the identity binding.

    ``plain`` is the pipeline's unguided CFG step; ``plain+record`` the same step recording the attention the mask
    needs (an unguided step of the full method); ``guided-<pass>`` a guided step (:func:`step_configs`), which
    returns the noise and the gradient. With ``graphs`` (default: on CUDA), ``plain+record-graph`` and
    ``guided-<pass>-graph`` are those steps as CUDA graphs. Each call starts with no attention recorded by any
    state, so that no step's peak counts another's.
    """
    from omniportrait.guidance.rb import ReferenceGuidance
    from omniportrait.pipelines import Identity

    with torch.no_grad():  # as in a generation
        bound = pipe.bind_identities(PROMPT, [Identity(reference, "woman")])
        cond = pipe.encode_text(PROMPT, None, 1, True, size, size, bound)
    pipe.scheduler.set_timesteps(50, device=device)  # on the GPU, as the pipeline has them
    t = pipe.scheduler.timesteps[GUIDED_INDEX]
    side = size // pipe.vae_scale_factor
    latents = torch.randn(1, 4, side, side, device=device, dtype=pipe.unet.dtype)
    configs = step_configs(device.type == "cuda" if graphs is None else graphs)
    guidance = {name: ReferenceGuidance(pipe, config, bound, size, size, 1) for name, config in configs.items()}

    def fresh(name: str) -> ReferenceGuidance:
        for state in guidance.values():
            state.store.clear()
        return guidance[name]

    calls = {"plain": lambda: pipe.predict_noise(latents, t, GUIDED_INDEX, cond, 7.5),
             "plain+record": lambda: fresh("cfg").steps.plain(latents, t, cond, 7.5)}
    if "record-graph" in guidance:
        calls["plain+record-graph"] = lambda: fresh("record-graph").steps.plain(latents, t, cond, 7.5)
    for name in [name for name in guidance if name != "record-graph"]:
        calls[f"guided-{name}"] = lambda name=name: fresh(name).noise_and_gradient(latents, t, cond, 7.5)
    calls["vae-decode"] = lambda: fresh("cfg") and decoded(pipe, latents, in_bands=False)
    calls["vae-decode-banded"] = lambda: fresh("cfg") and decoded(pipe, latents, in_bands=True)
    calls["bind-identities"] = lambda: pipe.bind_identities(PROMPT, [Identity(reference, "woman")])
    return calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-sdxl", choices=list(MODELS),
                        help="tiny-* checks the script on a CPU")
    parser.add_argument("--reference", default=str(SAMPLE))
    parser.add_argument("--feature-pass", default="cfg", choices=FEATURE_PASSES, help="the pass profiled")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from omniportrait.faces import prepare_reference
    from omniportrait.images import load_image

    size = MODELS[args.model][1]
    device, dtype = placement(args.model, torch.device("cuda"), torch.float16)
    pipe, _ = model_pipeline(args.model, device, dtype)
    reference = prepare_reference(load_image(args.reference))
    if device.type == "cuda":
        print(graph_agreement(pipe, reference, size), flush=True)
    calls = step_calls(pipe, reference, size, device)
    weights = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"{args.model} {size}x{size}, {device_name(device)}, {dtype}; weights {weights:.2f} GiB")
    # peaks first: a CUDA-graph step allocates its memory when it is captured, on its first call; its replays
    # allocate nothing, so a peak taken on a replay would leave out the graph's memory
    print("peak GiB: " + ", ".join(f"{name} {measured(peak_gib, call, 2)}" for name, call in calls.items()),
          flush=True)
    print("ms: " + ", ".join(f"{name} {measured(lambda c: timed_ms(c, args.repeats), call, 1)}"
                             for name, call in calls.items()), flush=True)
    print(kernel_table(calls[f"guided-{args.feature_pass}"]))
    print(kernel_table(calls["plain"]).replace("one guided step", "one plain step", 1))
    if device.type == "cuda":
        for name in ("plain", "plain+record", f"guided-{args.feature_pass}"):
            points = sync_points(calls[name])
            print(f"syncs {name}: {sum(points.values())} " + ", ".join(f"{k}×{v}" for k, v in points.most_common(8)))


if __name__ == "__main__":
    main()
