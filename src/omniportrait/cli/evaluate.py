"""``omniportrait evaluate``: Table 1 metrics on the Table 3 prompts for a folder of references (paper §4.2).

Data-parallel under ``accelerate launch`` (each process takes a disjoint slice of the jobs, the main
process writes the merged report); resumable (finished images are not regenerated). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omniportrait.errors import ConfigError

from omniportrait.cli.args import (
    choice_of,
    device_name,
    dtype_name,
    existing_file,
    existing_folder,
    int_in,
    number,
    output_folder,
    pivot_encoder_path,
    text,
)
from omniportrait.cli.generate import COST_FLAGS
from omniportrait.evaluation.metrics import METRIC_NAMES, MetricConfig, parse_metric_names
from omniportrait.evaluation.metrics.blip import DEFAULT_BLIP_MODEL
from omniportrait.evaluation.metrics.clip import DEFAULT_CLIP_MODEL
from omniportrait.evaluation.prompts import CATEGORIES, DEFAULT_CLASS_WORD
from omniportrait.evaluation.sim import SIM_BACKENDS
from omniportrait.pipelines.loading import PRESETS
from omniportrait.pipelines.schedulers import SCHEDULERS
from omniportrait.values import FACE_INDEX, GUIDANCE_SCALE, IMAGE_SIDE, SEED, SEED_MAX, STEPS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a model with the paper's Table 1 metrics on the Table 3 prompts",
        description="Generate the Table 3 prompts for every reference photo of a folder and score them with "
                    "CLIP-T, CLIP-I, SIM, BLIP, CLIP-IQA and FID (paper §4.2). Resumable; data-parallel under "
                    "accelerate launch.",
    )
    p.add_argument("--references", required=True, type=existing_folder(), help="folder of reference face photos")
    p.add_argument("--output", required=True, type=output_folder(), help="folder for images, sidecars and reports (reused to resume)")
    p.add_argument("--preset", default="sd15", type=choice_of(PRESETS, "preset"), help=f"one of {', '.join(PRESETS)} (default: sd15)")
    p.add_argument("--base", default=None, type=text("base model"), help="hub id, diffusers folder or .safetensors file (overrides preset)")
    p.add_argument("--arch", choices=("sd15", "sdxl"), default=None, help="architecture of --base if not detected")
    p.add_argument("--pivot-encoder", default=None, type=pivot_encoder_path(),
                   help="folder of a trained PivotIDEncoder (save_pretrained; also one converted by "
                        "'omniportrait convert photomaker'), or a PhotoMaker v1 checkpoint (SDXL), converted on load")
    p.add_argument("--scheduler", default="ddim", type=choice_of(SCHEDULERS, "scheduler"), help="sampler (paper: ddim)")
    p.add_argument("--steps", type=number(STEPS), default=50, help="sampling steps (paper: 50)")
    p.add_argument("--guidance-scale", type=number(GUIDANCE_SCALE), default=7.5, help="classifier-free guidance w (paper: 7.5)")
    p.add_argument("--width", type=number(IMAGE_SIDE), default=None, help="default: the preset's size")
    p.add_argument("--height", type=number(IMAGE_SIDE), default=None, help="default: the preset's size")
    p.add_argument("--negative-prompt", default=None)
    for flag, spec in COST_FLAGS.items():  # the images do not change, so finished ones are reused either way
        p.add_argument(flag, **spec)
    p.add_argument("--seeds", type=int_in(1, 1000), default=1, help="seeds per (reference, prompt) (default: 1)")
    p.add_argument("--first-seed", type=number(SEED), default=0, help="seeds are FIRST … FIRST+N-1 (default: 0)")
    p.add_argument("--class-words", type=text("class words"), default=None, metavar="NAME=WORD,...|FILE",
                   help="class word per reference, e.g. alice.jpg=woman,bob.jpg=man, or a file of NAME=WORD lines")
    p.add_argument("--class-word", default=DEFAULT_CLASS_WORD, type=text("class word"),
                   help=f"class word of references not named in --class-words (default: {DEFAULT_CLASS_WORD})")
    p.add_argument("--face-index", type=number(FACE_INDEX), default=None, help="face to use in each reference (0 = largest)")
    p.add_argument("--categories", type=text("categories"), default=None,
                   help=f"comma-separated subset of {', '.join(CATEGORIES)} (default: all)")
    p.add_argument("--prompts-per-category", type=int_in(1, 10**6), default=None, help="first N prompts of each category")
    p.add_argument("--max-prompts", type=int_in(1, 10**6), default=None, help="N prompts taken round-robin over the categories")
    p.add_argument("--sweep", type=text("sweep"), default=None, metavar="NAME=V1,V2,...",
                   help="vary one pipeline parameter for the Fig. 5 plot, "
                        "e.g. guidance-scale=3,7.5 or rb-strength=0,4,8.5,16")
    p.add_argument("--metrics", type=text("metrics"), default=None,
                   help=f"comma-separated subset of {', '.join(METRIC_NAMES)} (default: all)")
    p.add_argument("--clip-model", type=text("CLIP model"), default=DEFAULT_CLIP_MODEL,
                   help="CLIP for CLIP-T, CLIP-I, FID-CLIP: hub id, folder, or tiny-random "
                        f"(default {DEFAULT_CLIP_MODEL})")
    p.add_argument("--iqa-model", type=text("CLIP-IQA model"), default=None, help="CLIP for CLIP-IQA (default: --clip-model)")
    p.add_argument("--blip-model", type=text("BLIP model"), default=DEFAULT_BLIP_MODEL,
                   help=f"BLIP image-text matching model (default {DEFAULT_BLIP_MODEL})")
    p.add_argument("--sim-backend", choices=SIM_BACKENDS, default="auto",
                   help="auto: FaceNet when --facenet-weights is given, else dlib")
    p.add_argument("--facenet-weights", default=None, type=existing_file(), help="VGGFace2 InceptionResnetV1 state dict (the paper's SIM)")
    p.add_argument("--fid-inception-weights", default=None, type=existing_file(),
                   help="torch-fidelity Inception weights for the standard FID "
                        "(pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--batch-size", type=int_in(1, 4096), default=8, help="images per metric batch (default: 8)")
    p.add_argument("--device", default="auto", type=device_name, help="auto (CUDA if present), cpu, cuda, cuda:N; "
                                                    "under accelerate launch each process uses its own GPU")
    p.add_argument("--dtype", default="auto", type=dtype_name, help="diffusion model dtype: auto, fp32, fp16, bf16")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    """An :class:`~omniportrait.evaluation.runner.EvalConfig` from the flags; bad flags fail here."""
    from omniportrait.evaluation.prompts import check_class_word, parse_class_words, select_prompts
    from omniportrait.evaluation.runner import EvalConfig, GenerationConfig
    from omniportrait.evaluation.sweep import parse_sweep
    from omniportrait.pipelines.loading import get_preset

    from omniportrait.pipelines.loading import check_base, check_pivot_encoder

    get_preset(args.preset)
    if args.first_seed + args.seeds - 1 > SEED_MAX:
        raise ConfigError(f"--first-seed {args.first_seed} with --seeds {args.seeds} runs past the largest seed "
                          f"{SEED_MAX}")
    if args.base is not None:
        check_base(args.base)
    if args.pivot_encoder is not None:
        check_pivot_encoder(args.pivot_encoder)
    categories = [c.strip().lower() for c in args.categories.split(",") if c.strip()] if args.categories else None
    generation = GenerationConfig(
        preset=args.preset, base=args.base, arch=args.arch, pivot_encoder=args.pivot_encoder,
        scheduler=args.scheduler, device=args.device, dtype=args.dtype, steps=args.steps,
        guidance_scale=args.guidance_scale, height=args.height, width=args.width,
        negative_prompt=args.negative_prompt, cuda_graph=args.rb_cuda_graph, recompute=args.rb_recompute,
        banded_decode=args.banded_decode,
    )
    metrics = MetricConfig(
        clip_model=args.clip_model, iqa_model=args.iqa_model, blip_model=args.blip_model,
        sim_backend=args.sim_backend, facenet_weights=args.facenet_weights,
        fid_inception_weights=args.fid_inception_weights,
    )
    return EvalConfig(
        references=Path(args.references).expanduser(), output=Path(args.output).expanduser(),
        prompts=tuple(select_prompts(categories, args.prompts_per_category, args.max_prompts)),
        generation=generation, metrics=metrics, metric_names=tuple(parse_metric_names(args.metrics)),
        seeds=args.seeds, first_seed=args.first_seed, class_words=parse_class_words(args.class_words),
        default_class_word=check_class_word(args.class_word), face_index=args.face_index,
        sweep=parse_sweep(args.sweep), batch_size=args.batch_size, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from omniportrait.evaluation.report import table1_markdown
    from omniportrait.evaluation.runner import run_evaluation

    result = run_evaluation(config_from_args(args))
    if result is None:  # a non-main process of a data-parallel run: the main process reports
        return 0
    print(table1_markdown(result.report))
    for metric in result.report["metrics"]:
        if not metric["available"]:
            print(f"{metric['name']} unavailable: {metric['reason']}", file=sys.stderr)
    skipped = result.report["references"]["skipped"]
    if skipped:
        print(f"skipped {len(skipped)} reference(s) without a usable face (listed in report.md)", file=sys.stderr)
    print(f"generated {result.generated} image(s); report: "
          + ", ".join(str(path) for path in result.files.values()), file=sys.stderr)
    return 0
