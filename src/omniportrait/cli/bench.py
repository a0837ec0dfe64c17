"""``omniportrait bench``: wall time and peak memory of each guidance variant against diffusers' plain pipeline.

See benchmarks/README.md for measured tables and what each optimisation bought.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from omniportrait.benchmark import CPU_MODELS, MODELS, PLAIN, VARIANTS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time our pipelines against diffusers' plain pipeline, side by side",
        description="Wall time (best of --repeats rounds over all variants, after a warm-up round) and CUDA "
                    "peak memory of diffusers' plain pipeline, ours with RB-Guidance off, and the full method in "
                    "each variant, on the same components, prompt, seed and steps, in one run. Prints ratios "
                    "to plain.",
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
                   help="timed rounds over all variants after one warm-up round (each keeps its best)")
    p.add_argument("--size", type=int, default=None,
                   help="image side (default: 64 tiny, 16 twin, 512 SD1.5, 1024 SDXL)")
    p.add_argument("--device", default="auto", help="device of the random-* models: auto, cpu, cuda, cuda:N; "
                                                    "tiny and twin models always run on the CPU")
    p.add_argument("--dtype", default="auto", help="dtype of the random-* models (auto: fp16 on CUDA, else fp32)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every row as JSON")
    p.set_defaults(run=run)


def default_models(cuda: bool) -> list[str]:
    return [name for name in MODELS if name.startswith("tiny-") or cuda]


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from omniportrait.benchmark import (
        BenchConfig,
        format_row,
        placement,
        report_entry,
        run_benchmark,
        table_header,
    )
    from omniportrait.faces import prepare_reference
    from omniportrait.files import write_json_atomic
    from omniportrait.images import load_image
    from omniportrait.pipelines.loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    configs = [BenchConfig(model, args.steps, args.repeats, args.size, tuple(args.variants))
               for model in args.models or default_models(device.type == "cuda")]
    reference = prepare_reference(load_image(args.reference))
    report = []
    for config in configs:
        model_device, dtype = placement(config.model, device, resolve_dtype(args.dtype, device))
        if model_device.type == "cpu" and not config.model.startswith(CPU_MODELS):
            warnings.warn(f"{config.model} is slow on the CPU (seconds to minutes per step); use few --steps or a GPU",
                          stacklevel=1)
        with tqdm(total=(config.repeats + 1) * len(config.variants_on(model_device)), desc=config.model,
                  unit="call", file=sys.stderr, leave=False) as bar:
            rows = run_benchmark(config, reference, model_device, dtype, on_call=lambda name: bar.update())
        print(table_header(config, model_device, dtype))
        print("\n".join(format_row(row) for row in rows))
        skipped = [name for name in config.all_variants if name not in config.variants_on(model_device)]
        if skipped:
            print(f"not run on {model_device.type} (CUDA only): {', '.join(skipped)}")
        print(flush=True)
        report.append(report_entry(config, model_device, dtype, rows))
    if args.json:
        write_json_atomic(args.json, report)
    return 0
