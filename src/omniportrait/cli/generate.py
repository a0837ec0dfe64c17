"""``omniportrait generate``: one reference photo (or several) + a prompt -> portrait PNG(s) + JSON sidecar."""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from pathlib import Path

from omniportrait.errors import ClassWordError, ConfigError, OutOfMemoryError
from omniportrait.files import write_json_atomic
from omniportrait.guidance.config import FEATURE_PASSES, RECOMPUTES, RBGuidanceConfig
from omniportrait.identity import Identity
from omniportrait.pipelines.loading import PRESETS
from omniportrait.text import find_person_nouns

# Flags that change what a generation costs, not the image it draws (up to rounding); evaluate takes them too.
COST_FLAGS = {
    "--banded-decode": dict(action=argparse.BooleanOptionalAction, default=None,
                            help="decode in bands of rows: the same image up to rounding, with a lower memory peak "
                                 "(default: on where the VAE decodes in fp32 on CUDA, as SDXL's does; "
                                 "--no-banded-decode: diffusers' decode)"),
    "--rb-recompute": dict(choices=RECOMPUTES, default=RBGuidanceConfig().recompute,
                           help="what the guided step's feed-forwards recompute in the backward: projection "
                                "(default: keeps less than gelu, the same FLOPs with the cfg pass) or gelu; "
                                "same images"),
    "--rb-cuda-graph": dict(action=argparse.BooleanOptionalAction, default=None,
                            help="capture the sampling steps as CUDA graphs once and replay them: the same images, "
                                 "less host time (default: on where they can run: CUDA, a scheduler without input "
                                 "scaling such as ddim, no CPU offloading; --no-rb-cuda-graph: eager steps)"),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="draw a person from a reference photo in the scene a prompt describes",
        description="Draw the person of a reference photo in the scene a prompt describes.",
    )
    p.add_argument("--prompt", required=True, help='e.g. "a woman riding a bicycle, with sweat on face"')
    p.add_argument("--reference", action="append", default=[], metavar="PHOTO",
                   help="reference photo; binds to the prompt's person words in order (repeatable)")
    p.add_argument("--identity", action="append", default=[], metavar="PHOTO:WORD[:N]",
                   help="reference photo bound to a class word (its N-th occurrence, 1-based); repeatable")
    p.add_argument("--class-word", default=None, help="class word for a single --reference (default: detected)")
    p.add_argument("--face-index", type=int, default=None,
                   help="which face of the reference to use when it has several (0 = largest)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--out", required=True, help="output PNG path; with --num-images N, files are NAME-0.png ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="sampling steps (paper: 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance w (paper: 7.5)")
    p.add_argument("--width", type=int, default=None, help="default: the preset's size")
    p.add_argument("--height", type=int, default=None, help="default: the preset's size")
    p.add_argument("--preset", default="sd15", help=f"one of {', '.join(PRESETS)} (default: sd15)")
    p.add_argument("--base", default=None, help="hub id, diffusers folder or .safetensors file (overrides preset)")
    p.add_argument("--arch", choices=("sd15", "sdxl"), default=None, help="architecture of --base if not detected")
    p.add_argument("--pivot-encoder", default=None, help="folder of a trained PivotIDEncoder (save_pretrained)")
    p.add_argument("--scheduler", default="ddim", help="ddim (paper), dpmpp-2m, euler, euler-a, pndm, unipc")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), fp32, fp16, bf16")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--banded-decode", **COST_FLAGS["--banded-decode"])
    add_guidance_arguments(p)
    p.set_defaults(run=run)


def add_guidance_arguments(p) -> None:
    """Reference-Based Guidance flags (docs/guidance.md); defaults are the paper's."""
    d = RBGuidanceConfig()
    g = p.add_argument_group("Reference-Based Guidance (paper §3.3)")
    g.add_argument("--no-rb", action="store_true", help="turn RB-Guidance off (Pivot ID Encoder only)")
    g.add_argument("--rb-strength", type=float, default=d.strength, help="p of E = p/(1+S), eq. 10")
    g.add_argument("--rb-start", type=float, default=d.start, help="u: guide steps with t <= u*T, eq. 11")
    g.add_argument("--ref-timestep", type=int, default=d.ref_timestep, help="t0 of the reference features")
    g.add_argument("--dift-ensemble", type=int, default=d.dift_ensemble, help="K noises for reference features")
    g.add_argument("--dift-block", type=int, default=None, help="UNet up_blocks index (default SD1.5 1, SDXL 0)")
    g.add_argument("--rb-reduction", choices=("sum", "mean"), default=d.reduction, help="S as sum (eq. 8) or mean")
    g.add_argument("--mask-iterations", type=int, default=d.mask_iterations, help="gamma of eq. 6")
    g.add_argument("--mask-power", type=float, default=d.mask_power, help="alpha of eq. 6")
    g.add_argument("--mask-threshold", type=float, default=d.mask_threshold, help="beta of eq. 6")
    g.add_argument("--no-background-mask", action="store_true", help="do not mask the gradient by M_gen (eq. 9)")
    g.add_argument("--rb-feature-pass", choices=FEATURE_PASSES, default=d.feature_pass,
                   help="cfg: features from the batched CFG pass with grad; split: CFG as an unconditional pass "
                        "and a conditional one with grad (half the backward memory); separate: CFG pass without "
                        "grad plus a partial conditional pass")
    g.add_argument("--rb-recompute", **COST_FLAGS["--rb-recompute"])
    g.add_argument("--rb-interval", type=int, default=d.gradient_interval, metavar="N",
                   help="recompute the guidance gradient every N-th guided step, reuse it in between (paper: 1)")
    g.add_argument("--rb-cuda-graph", **COST_FLAGS["--rb-cuda-graph"])
    g.add_argument("--save-masks", default=None, metavar="DIR", help="write M_gen, M_ref and matches as PNGs")


def guidance_config(args) -> RBGuidanceConfig:
    return RBGuidanceConfig(
        enabled=not args.no_rb, strength=args.rb_strength, start=args.rb_start, ref_timestep=args.ref_timestep,
        dift_ensemble=args.dift_ensemble, dift_block=args.dift_block, reduction=args.rb_reduction,
        mask_iterations=args.mask_iterations, mask_power=args.mask_power, mask_threshold=args.mask_threshold,
        background_masking=not args.no_background_mask, feature_pass=args.rb_feature_pass,
        recompute=args.rb_recompute, gradient_interval=args.rb_interval, cuda_graph=args.rb_cuda_graph,
    )


def parse_identity_flag(value: str) -> tuple[str, str, int | None]:
    """``PHOTO:WORD[:N]`` -> (photo, word, N). Split from the right so paths may contain ':'."""
    parts = value.rsplit(":", 2)
    occurrence = None
    if len(parts) == 3 and parts[2].isdigit():
        occurrence = int(parts[2])
        parts = parts[:2]
    elif len(parts) == 3:
        parts = [parts[0] + ":" + parts[1], parts[2]]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"--identity {value!r} must look like PHOTO:WORD or PHOTO:WORD:N, e.g. alice.jpg:woman")
    return parts[0], parts[1], occurrence


def identities_from_args(args) -> list[Identity]:
    """The identities asked for, class words resolved, before any model is loaded."""
    identities = [Identity(photo, word, occurrence, args.face_index) for photo, word, occurrence in
                  map(parse_identity_flag, args.identity)]
    if args.reference:
        if args.class_word is not None:
            if len(args.reference) > 1:
                raise ConfigError("--class-word applies to a single --reference; use --identity PHOTO:WORD for several")
            words = [(args.class_word, None)]
        else:
            nouns = find_person_nouns(args.prompt)
            if len(nouns) < len(args.reference):
                raise ClassWordError(
                    f"the prompt names {len(nouns)} person word(s) for {len(args.reference)} --reference photo(s); "
                    "write one per person (e.g. 'a woman ...') or use --identity PHOTO:WORD"
                )
            counts: dict[str, int] = {}
            words = []
            for noun in nouns[: len(args.reference)]:
                counts[noun.word.lower()] = counts.get(noun.word.lower(), 0) + 1
                words.append((noun.word, counts[noun.word.lower()] if len(args.reference) > 1 else None))
        identities += [Identity(photo, word, occ, args.face_index) for photo, (word, occ) in zip(args.reference, words)]
    return identities


def prepare_identities(identities: list[Identity]) -> list[Identity]:
    """Read each photo and find its face now, so bad input fails before minutes of model loading."""
    from omniportrait.faces import prepare_reference

    return [Identity(prepare_reference(i.reference, face_index=i.face_index), i.class_word, i.occurrence,
                     i.face_index) for i in identities]


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--out {out!r} must end in .png")
    if path.is_dir():
        raise ConfigError(f"--out {out!r} is a folder; give a file name ending in .png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index}{path.suffix}") for index in range(count)]


def file_sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def package_versions() -> dict:
    import diffusers
    import torch
    import transformers

    from omniportrait import __version__

    return {"omniportrait": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def similarities(identities: list[Identity], image) -> list[float | None]:
    """SIM (cosine of face embeddings, ``omniportrait[eval]``) of ``image`` to each reference, or ``None``s."""
    try:
        from omniportrait.evaluation.sim import identity_similarity
    except ImportError:
        return [None for _ in identities]
    return [identity_similarity(item.reference, image) for item in identities]


def sidecar(args, pipe, identities: list[Identity], sources: list[Identity], seed: int, index: int,
            elapsed: float, sims: list[float | None]) -> dict:
    from dataclasses import asdict

    return {
        "rb_guidance": asdict(guidance_config(args)),
        "parameters": {
            "prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": seed, "steps": args.steps,
            "guidance_scale": args.guidance_scale, "width": args.width, "height": args.height,
            "preset": args.preset, "base": args.base, "arch": args.arch, "pivot_encoder": args.pivot_encoder,
            "scheduler": type(pipe.scheduler).__name__, "scheduler_flag": args.scheduler, "device": str(pipe.device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""), "image_index": index, "num_images": args.num_images,
            "banded_decode": args.banded_decode_ran, "cuda_graph": args.cuda_graph_ran,
        },
        "identities": [
            {"reference": str(source.reference), "sha256": file_sha256(str(source.reference)),
             "class_word": item.class_word, "occurrence": item.occurrence,
             "face_index": item.reference.face_index, "face_box": [round(v, 2) for v in item.reference.face.box],
             "face_score": round(float(item.reference.face.score), 4),
             "sim": None if sim is None else round(sim, 4)}
            for item, source, sim in zip(identities, sources, sims)
        ],
        "reproduce": reproduce_command(args, seed),
        "versions": package_versions(),
        "elapsed_s": round(elapsed, 3),
    }


def reproduce_command(args, seed: int) -> list[str]:
    command = ["omniportrait", "generate", "--prompt", args.prompt, "--seed", str(seed), "--steps", str(args.steps),
               "--guidance-scale", str(args.guidance_scale), "--width", str(args.width), "--height",
               str(args.height), "--preset", args.preset, "--scheduler", args.scheduler, "--dtype", args.dtype]
    for flag, value in asdict_flags(args).items():
        command += [flag] if value is True else [flag, str(value)] if value is not False else []
    for flag in ("negative_prompt", "base", "arch", "pivot_encoder", "class_word", "face_index"):
        if getattr(args, flag) is not None:
            command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.banded_decode is not None:  # asked for (or fallen back to); left to us, the reproducing machine decides
        command.append("--banded-decode" if args.banded_decode else "--no-banded-decode")
    for photo in args.reference:
        command += ["--reference", photo]
    for value in args.identity:
        command += ["--identity", value]
    return command + ["--out", args.out]


def asdict_flags(args) -> dict:
    """The guidance flags of this run that differ from the defaults, as command-line flags."""
    defaults = RBGuidanceConfig()
    chosen = guidance_config(args)
    names = {"strength": "--rb-strength", "start": "--rb-start", "ref_timestep": "--ref-timestep",
             "dift_ensemble": "--dift-ensemble", "dift_block": "--dift-block", "reduction": "--rb-reduction",
             "mask_iterations": "--mask-iterations", "mask_power": "--mask-power",
             "mask_threshold": "--mask-threshold", "feature_pass": "--rb-feature-pass",
             "recompute": "--rb-recompute", "gradient_interval": "--rb-interval"}
    flags = {flag: getattr(chosen, name) for name, flag in names.items()
             if getattr(chosen, name) != getattr(defaults, name)}
    if not chosen.enabled:
        flags["--no-rb"] = True
    if not chosen.background_masking:
        flags["--no-background-mask"] = True
    if chosen.cuda_graph is not None:  # asked for; left to us, the machine that reproduces decides
        flags["--rb-cuda-graph" if chosen.cuda_graph else "--no-rb-cuda-graph"] = True
    return flags


def out_of_memory_message(args, config: RBGuidanceConfig) -> str:
    """What to say when the GPU runs out of memory: the options of this run that would lower the peak. Neither the
    split feature pass nor the banded decode: a guided ``cfg`` step or a whole decode that runs out of memory is
    taken again that way without being asked."""
    advice = []
    if config.enabled and config.recompute == "gelu":
        advice.append("--rb-recompute projection (the same gradient at a lower peak, docs/guidance.md)")
    if args.num_images > 1:
        advice.append("fewer images at once (--num-images)")
    advice.append("a smaller --width/--height")
    return "the GPU ran out of memory; try " + "; or ".join(advice)


def record_what_ran(args, output) -> None:
    """The options that ran, for the sidecar and its reproduce line: a run that ran out of GPU memory went on with
    the split feature pass, eager steps, or decoded in bands (each with a warning); whether the steps ran as CUDA
    graphs and the decode in bands (the sidecar's ``cuda_graph`` and ``banded_decode``)."""
    args.banded_decode_ran = output.decoded_in_bands
    if output.decode_ran_out_of_memory:
        args.banded_decode = True
    args.cuda_graph_ran = output.guidance is not None and output.guidance.config.cuda_graph
    if output.guidance is not None:
        args.rb_feature_pass = output.guidance.config.feature_pass


def run(args: argparse.Namespace) -> int:
    import torch

    from omniportrait.images import save_image_atomic
    from omniportrait.pipelines.loading import get_preset, load_pipeline

    preset = get_preset(args.preset)
    if args.num_images < 1 or args.steps < 1:
        raise ConfigError("--num-images and --steps must be at least 1")
    paths = output_paths(args.out, args.num_images)
    sources = identities_from_args(args)
    identities = prepare_identities(sources)
    rb_config = guidance_config(args)
    pipe = load_pipeline(args.preset, args.base, args.arch, args.pivot_encoder, args.device, args.dtype,
                         args.scheduler)
    pipe.banded_decode = args.banded_decode  # None: the pipeline's default
    args.width = args.width or preset.size
    args.height = args.height or preset.size
    seeds = [args.seed + index for index in range(args.num_images)]
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    started = time.perf_counter()
    try:
        output = pipe(args.prompt, identities, negative_prompt=args.negative_prompt, height=args.height,
                      width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                      num_images_per_prompt=args.num_images, generator=generators, rb_guidance=rb_config)
    except torch.cuda.OutOfMemoryError as error:
        raise OutOfMemoryError(out_of_memory_message(args, rb_config)) from error
    elapsed = time.perf_counter() - started
    record_what_ran(args, output)
    for index, (image, path, seed) in enumerate(zip(output.images, paths, seeds)):
        path.parent.mkdir(parents=True, exist_ok=True)
        sims = similarities(identities, image)
        save_image_atomic(image, path)
        write_json_atomic(path.with_suffix(".json"),
                          sidecar(args, pipe, identities, sources, seed, index, elapsed, sims))
        print(f"wrote {path} ({image.width}x{image.height}) and {path.with_suffix('.json').name}", file=sys.stderr)
        for item, sim in zip(identities, sims):
            missing = "n/a (no face in the output, or no SIM backend: omniportrait[eval])"
            shown = missing if sim is None else f"{sim:.3f}"
            print(f"  SIM to {item.class_word!r} reference: {shown}", file=sys.stderr)
    if args.save_masks and output.guidance is not None:
        from omniportrait.guidance.visualize import save_guidance_pictures

        written = save_guidance_pictures(output.guidance, output.images, args.save_masks)
        print(f"wrote {len(written)} guidance pictures to {args.save_masks}", file=sys.stderr)
    return 0
