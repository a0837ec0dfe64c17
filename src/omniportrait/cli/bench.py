"""``omniportrait bench``: wall time and peak memory of each guidance variant against diffusers' plain pipeline.

See benchmarks/README.md for measured tables and what each optimisation bought.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from omniportrait import benchmark
from omniportrait.benchmark import (
    CPU_MODELS,
    MODELS,
    PLAIN,
    VARIANTS,
    BenchConfig,
    BenchRow,
    failure,
    format_row,
    placement,
    report_entry,
    table_header,
)
from omniportrait.files import write_json_atomic


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time our pipelines against diffusers' plain pipeline, side by side",
        description="Wall time (best of --repeats timed calls, after a warm-up call) and CUDA peak memory of "
                    "diffusers' plain pipeline, ours with RB-Guidance off, and the full method in each variant, on "
                    "the same components, prompt, seed and steps, in one run. Plain is timed before any of ours "
                    "runs, ours in rounds over the variants, then plain again (diffusers-plain-after: drift, or "
                    "something our calls left). Prints ratios to plain. A variant or model that fails (CUDA out of "
                    "memory, say) is reported in its place, the others still run, and the exit status is then 1.",
    )
    p.add_argument("--reference", required=True, help="face photo for the identity, e.g. examples/astronaut.jpg")
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS), metavar="MODEL",
                   help=f"any of {', '.join(MODELS)} (default: the tiny models, and the random-weight real "
                        "architectures when CUDA is available). twin-*: the real UNet's layers at a twentieth of its "
                        "channels, on the CPU, where a step costs about what issuing the real one costs a GPU's host")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"any of {', '.join(VARIANTS)} (default: all; {PLAIN} always runs first)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50, the paper's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls of each variant after one warm-up call (each keeps its best)")
    p.add_argument("--size", type=int, default=None,
                   help="image side (default: 64 tiny, 16 twin, 512 SD1.5, 1024 SDXL)")
    p.add_argument("--device", default="auto", help="device of the random-* models: auto, cpu, cuda, cuda:N; "
                                                    "tiny and twin models always run on the CPU")
    p.add_argument("--dtype", default="auto", help="dtype of the random-* models (auto: fp16 on CUDA, else fp32)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every row as JSON (after each model)")
    p.set_defaults(run=run)


def default_models(cuda: bool) -> list[str]:
    return [name for name in MODELS if name.startswith("tiny-") or cuda]


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from omniportrait.faces import prepare_reference
    from omniportrait.images import load_image
    from omniportrait.pipelines.loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    configs = [BenchConfig(model, args.steps, args.repeats, args.size, tuple(args.variants))
               for model in args.models or default_models(device.type == "cuda")]
    reference = prepare_reference(load_image(args.reference))
    report, failed = [], []
    for config in configs:
        model_device, dtype = placement(config.model, device, resolve_dtype(args.dtype, device))
        if model_device.type == "cpu" and not config.model.startswith(CPU_MODELS):
            warnings.warn(f"{config.model} is slow on the CPU (seconds to minutes per step); use few --steps or a GPU",
                          stacklevel=1)
        try:
            with tqdm(total=len(config.schedule(model_device)), desc=config.model,
                      unit="call", file=sys.stderr, leave=False) as bar:
                rows = benchmark.run_benchmark(config, reference, model_device, dtype, on_call=lambda _: bar.update())
        except Exception as error:  # e.g. its weights do not fit: the next model still runs
            message = failure(error)
            print(f"{config.model} failed: {message}\n", flush=True)
            failed.append(f"{config.model} failed ({message})")
            report.append({"model": config.model, "error": message, "rows": []})
        else:
            print_table(config, model_device, dtype, rows)
            failed += [f"{config.model}: {row.variant} failed ({row.error})" for row in rows if row.error]
            report.append(report_entry(config, model_device, dtype, rows))
        if args.json:  # after each model, so that a run cut short keeps what it measured
            write_json_atomic(args.json, report)
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


def print_table(config: BenchConfig, device: torch.device, dtype: torch.dtype, rows: list[BenchRow]) -> None:
    print(table_header(config, device, dtype))
    print("\n".join(format_row(row) for row in rows))
    skipped = [name for name in config.all_variants if name not in config.variants_on(device)]
    if skipped:
        print(f"not run on {device.type} (CUDA only): {', '.join(skipped)}")
    print(flush=True)
