"""``omniportrait generate``: one reference photo (or several) + a prompt -> portrait PNG(s) + JSON sidecar."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omniportrait.cli.plugins import (
    add_plugin_arguments,
    attach_plugins,
    call_arguments,
    make_control_images,
    plugin_flags,
    plugin_request,
    plugins_record,
    save_control_images,
)
from omniportrait.cli.args import (
    choice_of,
    device_name,
    dtype_name,
    existing_file,
    number,
    output_file,
    output_folder,
    pivot_encoder_path,
    text,
)
from omniportrait.errors import ClassWordError, ConfigError, OutOfMemoryError
from omniportrait.files import write_json_atomic
from omniportrait.guidance.calibration import calibration_line
from omniportrait.guidance.config import FEATURE_PASSES, MASK_SOURCES, RECOMPUTES, RBGuidanceConfig
from omniportrait.identity import Identity
from omniportrait.pipelines.loading import PRESETS
from omniportrait.pipelines.plugins import file_sha256
from omniportrait.pipelines.schedulers import SCHEDULERS
from omniportrait.text import find_person_nouns
from omniportrait.values import FACE_INDEX, GUIDANCE_SCALE, IMAGE_SIDE, SEED, SEED_MAX, STEPS, Range

NUM_IMAGES = Range(1, 64, integer=True)
# Reference-Based Guidance (docs/guidance.md): the values the equations are defined for
RB_STRENGTH = Range(0, 1000, note="0 turns the guidance's pull off")
RB_START = Range(0, 1)
REF_TIMESTEP = Range(0, 999, integer=True)
DIFT_ENSEMBLE = Range(1, 64, integer=True)
DIFT_BLOCK = Range(0, 3, integer=True)
MASK_ITERATIONS = Range(0, 100, integer=True)
MASK_POWER = Range(0, 100, low_open=True)
MASK_THRESHOLD = Range(0, 1)
RB_INTERVAL = Range(1, 1000, integer=True)
RB_REDETECT = Range(0, 1000, integer=True, note="0 never detects again")

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
    p.add_argument("--prompt", required=True, type=text("prompt"),
                   help='e.g. "a woman riding a bicycle, with sweat on face"')
    p.add_argument("--reference", action="append", default=[], metavar="PHOTO", type=existing_file(),
                   help="reference photo; binds to the prompt's person words in order (repeatable)")
    p.add_argument("--identity", action="append", default=[], metavar="PHOTO:WORD[:N]", type=identity_flag,
                   help="reference photo bound to a class word (its N-th occurrence, 1-based); repeatable")
    p.add_argument("--class-word", default=None, type=text("class word"),
                   help="class word for a single --reference (default: detected)")
    p.add_argument("--face-index", type=number(FACE_INDEX), default=None,
                   help="which face of the reference to use when it has several (0 = largest)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--out", required=True, type=output_file(".png"),
                   help="output PNG path; with --num-images N, files are NAME-0.png ...")
    p.add_argument("--seed", type=number(SEED), default=0, help=f"0 … 2^64 − 1 (default: 0)")
    p.add_argument("--steps", type=number(STEPS), default=50, help="sampling steps (paper: 50)")
    p.add_argument("--guidance-scale", type=number(GUIDANCE_SCALE), default=7.5,
                   help="classifier-free guidance w (paper: 7.5); <= 1 turns it off, as in diffusers")
    p.add_argument("--width", type=number(IMAGE_SIDE), default=None, help="default: the preset's size")
    p.add_argument("--height", type=number(IMAGE_SIDE), default=None, help="default: the preset's size")
    add_model_arguments(p, preset_note="")
    p.add_argument("--scheduler", default="ddim", type=choice_of(SCHEDULERS, "scheduler"),
                   help="ddim (paper), dpmpp-2m, euler, euler-a, pndm, unipc")
    p.add_argument("--num-images", type=number(NUM_IMAGES), default=1)
    p.add_argument("--banded-decode", **COST_FLAGS["--banded-decode"])
    add_guidance_arguments(p)
    add_plugin_arguments(p)
    p.set_defaults(run=run)


def add_model_arguments(p, preset_note: str) -> None:
    """The model flags (preset, base, arch, pivot encoder, device, dtype), shared by ``generate`` and ``web``."""
    p.add_argument("--preset", default="sd15", type=choice_of(PRESETS, "preset"),
                   help=f"one of {', '.join(PRESETS)} (default: sd15{preset_note})")
    p.add_argument("--base", default=None, type=text("base model"),
                   help="hub id, diffusers folder or .safetensors file (overrides preset)")
    p.add_argument("--arch", choices=("sd15", "sdxl"), default=None, help="architecture of --base if not detected")
    p.add_argument("--pivot-encoder", default=None, type=pivot_encoder_path(),
                   help="folder of a trained PivotIDEncoder (save_pretrained; also one converted by "
                        "'omniportrait convert photomaker'), or a PhotoMaker v1 checkpoint (SDXL), converted on load")
    p.add_argument("--device", default="auto", type=device_name, help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", type=dtype_name, help="auto (fp16 on CUDA, else fp32), fp32, fp16, bf16")


def add_guidance_arguments(p) -> None:
    """Reference-Based Guidance flags (docs/guidance.md); defaults are the paper's."""
    d = RBGuidanceConfig()
    g = p.add_argument_group("Reference-Based Guidance (paper §3.3)")
    g.add_argument("--no-rb", action="store_true", help="turn RB-Guidance off (Pivot ID Encoder only)")
    g.add_argument("--rb-strength", type=number(RB_STRENGTH), default=d.strength, help="p of E = p/(1+S), eq. 10")
    g.add_argument("--rb-strength-per-point", action="store_true",
                   help="E = p*|M_ref|/(1+S) instead of eq. 10: the same p pulls alike at every feature-map size "
                        "(a deviation from the paper; docs/guidance.md)")
    g.add_argument("--rb-start", type=number(RB_START), default=d.start, help="u: guide steps with t <= u*T, eq. 11")
    g.add_argument("--ref-timestep", type=number(REF_TIMESTEP), default=d.ref_timestep, help="t0 of the reference features")
    g.add_argument("--dift-ensemble", type=number(DIFT_ENSEMBLE), default=d.dift_ensemble, help="K noises for reference features")
    g.add_argument("--dift-block", type=number(DIFT_BLOCK), default=None, help="UNet up_blocks index (default SD1.5 1, SDXL 0)")
    g.add_argument("--rb-reduction", choices=("sum", "mean"), default=d.reduction, help="S as sum (eq. 8) or mean")
    g.add_argument("--mask-iterations", type=number(MASK_ITERATIONS), default=d.mask_iterations, help="gamma of eq. 6")
    g.add_argument("--mask-power", type=number(MASK_POWER), default=d.mask_power, help="alpha of eq. 6")
    g.add_argument("--mask-threshold", type=number(MASK_THRESHOLD), default=d.mask_threshold, help="beta of eq. 6")
    g.add_argument("--rb-mask", default=d.mask, type=choice_of(MASK_SOURCES, "mask source"),
                   help="where M_gen comes from: attention (eq. 6), detect (face ovals found in the decoded x0 "
                        "of the first guided step, assigned by attention mass; the attention mask where none is "
                        "found) or auto (default: attention with a pivot encoder trained with the localization "
                        "loss, detect otherwise)")
    g.add_argument("--rb-redetect-every", type=number(RB_REDETECT), default=d.redetect_every, metavar="N",
                   help="with detected masks, detect again every N-th guided step (default 0: never)")
    g.add_argument("--no-background-mask", action="store_true", help="do not mask the gradient by M_gen (eq. 9)")
    g.add_argument("--rb-feature-pass", choices=FEATURE_PASSES, default=d.feature_pass,
                   help="cfg: features from the batched CFG pass with grad; split: CFG as an unconditional pass "
                        "and a conditional one with grad (half the backward memory); separate: CFG pass without "
                        "grad plus a partial conditional pass")
    g.add_argument("--rb-recompute", **COST_FLAGS["--rb-recompute"])
    g.add_argument("--rb-interval", type=number(RB_INTERVAL), default=d.gradient_interval, metavar="N",
                   help="recompute the guidance gradient every N-th guided step, reuse it in between (paper: 1)")
    g.add_argument("--rb-cuda-graph", **COST_FLAGS["--rb-cuda-graph"])
    g.add_argument("--save-masks", default=None, type=output_folder(), metavar="DIR", help="write M_gen, M_ref and matches as PNGs")


def guidance_config(args) -> RBGuidanceConfig:
    return RBGuidanceConfig(
        enabled=not args.no_rb, strength=args.rb_strength, strength_per_point=args.rb_strength_per_point,
        start=args.rb_start, ref_timestep=args.ref_timestep,
        dift_ensemble=args.dift_ensemble, dift_block=args.dift_block, reduction=args.rb_reduction,
        mask_iterations=args.mask_iterations, mask_power=args.mask_power, mask_threshold=args.mask_threshold,
        background_masking=not args.no_background_mask, feature_pass=args.rb_feature_pass,
        recompute=args.rb_recompute, gradient_interval=args.rb_interval, cuda_graph=args.rb_cuda_graph,
        mask=args.rb_mask, redetect_every=args.rb_redetect_every,
    )


def parse_identity_flag(value: str) -> tuple[str, str, int | None]:
    """``PHOTO:WORD[:N]`` -> (photo, word, N), read from the right so a path may contain ':'.

    The last part is N when it is a number; otherwise it is the word, unless the part before it is a person
    noun and the last is not: then the last was meant as N and is refused (``alice.jpg:woman:x``).
    """
    from omniportrait.text import lemma_of

    example = "e.g. alice.jpg:woman or alice.jpg:woman:2"
    head, _, last = value.rpartition(":")
    occurrence = None
    if last.strip().lstrip("+-").isdigit():
        occurrence = int(last)
        if occurrence < 1:
            raise ConfigError(f"--identity {value!r}: N counts occurrences from 1, got {occurrence}")
        head, _, last = head.rpartition(":")
    elif lemma_of(last) is None and ":" in head and lemma_of(head.rpartition(":")[2]) is not None:
        raise ConfigError(f"--identity {value!r}: N must be a whole number >= 1, got {last!r} ({example})")
    photo, word = head, last
    if not photo or not word.strip():
        raise ConfigError(f"--identity {value!r} must look like PHOTO:WORD or PHOTO:WORD:N ({example})")
    return photo, word, occurrence


def identity_flag(value: str) -> str:
    """argparse type of ``--identity``: well formed and naming an existing photo; kept as given."""
    from omniportrait.files import check_input_file

    try:
        check_input_file(parse_identity_flag(value)[0])
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


identity_flag.kind = "identity"


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
    """The PNG files a run writes (``NAME-i.png`` for several images), each checked to be creatable."""
    from omniportrait.files import check_output_file

    path = check_output_file(out, ".png")
    paths = [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
    for each in paths:
        check_output_file(each, ".png")
    return paths


def package_versions() -> dict:
    import diffusers
    import torch
    import transformers

    from omniportrait import __version__

    return {"omniportrait": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


NO_SIM_BACKEND = "no SIM backend installed (pip install 'omniportrait[eval]')"
NO_FACE_IN_OUTPUT = "the SIM backend finds no face in the output"
NO_FACE_IN_REFERENCE = "the SIM backend finds no face in the reference"


def similarities(identities: list[Identity], image) -> list[tuple[float | None, str]]:
    """SIM (cosine of face embeddings, ``omniportrait[eval]``) of ``image`` to each reference, each with why it
    is missing when it is: no backend, or no face the backend finds in the output or in the reference."""
    try:
        from omniportrait.evaluation.sim import default_face_embedder, identity_similarity
    except ImportError:
        return [(None, NO_SIM_BACKEND) for _ in identities]
    embedder = default_face_embedder()
    if embedder is None:
        return [(None, NO_SIM_BACKEND) for _ in identities]
    if embedder.embed(image) is None:
        return [(None, NO_FACE_IN_OUTPUT) for _ in identities]
    sims = [identity_similarity(item.reference, image, embedder) for item in identities]
    return [(sim, "" if sim is not None else NO_FACE_IN_REFERENCE) for sim in sims]


def sidecar(args, pipe, identities: list[Identity], sources: list[Identity], seed: int, index: int,
            elapsed: float, sims: list[float | None], plugins: dict, calibration: list[dict]) -> dict:
    from dataclasses import asdict

    return {
        "rb_guidance": {**asdict(guidance_config(args)), **args.rb_mask_ran},
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
             "sim": None if sim is None else round(sim, 4), **({"sim_missing": why} if sim is None else {})}
            for item, source, (sim, why) in zip(identities, sources, sims)
        ],
        "plugins": plugins,
        "calibration": calibration,
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
    return command + plugin_flags(args) + ["--out", args.out]


def asdict_flags(args) -> dict:
    """The guidance flags of this run that differ from the defaults, as command-line flags."""
    defaults = RBGuidanceConfig()
    chosen = guidance_config(args)
    names = {"strength": "--rb-strength", "start": "--rb-start", "ref_timestep": "--ref-timestep",
             "dift_ensemble": "--dift-ensemble", "dift_block": "--dift-block", "reduction": "--rb-reduction",
             "mask_iterations": "--mask-iterations", "mask_power": "--mask-power",
             "mask_threshold": "--mask-threshold", "feature_pass": "--rb-feature-pass",
             "recompute": "--rb-recompute", "gradient_interval": "--rb-interval", "mask": "--rb-mask",
             "redetect_every": "--rb-redetect-every"}
    flags = {flag: getattr(chosen, name) for name, flag in names.items()
             if getattr(chosen, name) != getattr(defaults, name)}
    if not chosen.enabled:
        flags["--no-rb"] = True
    if not chosen.background_masking:
        flags["--no-background-mask"] = True
    if chosen.strength_per_point:
        flags["--rb-strength-per-point"] = True
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


NO_MASK_RAN = {"mask_source": None, "mask_reason": "RB-Guidance did not run", "mask_detections": 0}


def record_what_ran(args, output) -> None:
    """The options that ran, for the sidecar and its reproduce line: a run that ran out of GPU memory went on with
    the split feature pass, eager steps, or decoded in bands (each with a warning); whether the steps ran as CUDA
    graphs and the decode in bands (the sidecar's ``cuda_graph`` and ``banded_decode``); which mask source ran and
    why (the sidecar's ``rb_guidance.mask_source`` and ``mask_reason``, DESIGN §2)."""
    args.banded_decode_ran = output.decoded_in_bands
    if output.decode_ran_out_of_memory:
        args.banded_decode = True
    args.cuda_graph_ran = output.guidance is not None and output.guidance.config.cuda_graph
    args.rb_mask_ran = NO_MASK_RAN
    if output.guidance is not None:
        args.rb_feature_pass = output.guidance.config.feature_pass
        args.rb_mask_ran = output.guidance.mask_source.record()


def check_before_loading(args) -> list[Path]:
    """Everything that can be refused without a model: seeds, output files, model files, plug-ins and how they go
    together, memory for the size. Returns the output paths."""
    from omniportrait.memory import check_fits
    from omniportrait.pipelines.loading import check_base, check_pivot_arch, check_pivot_encoder, get_preset, \
        resolve_device, resolve_dtype

    preset = get_preset(args.preset)
    if args.seed + args.num_images - 1 > SEED_MAX:
        raise ConfigError(f"--seed {args.seed} with --num-images {args.num_images} runs past the largest seed "
                          f"{SEED_MAX}; use --seed {SEED_MAX - args.num_images + 1} or less")
    paths = output_paths(args.out, args.num_images)
    if args.base is not None:
        check_base(args.base)
    if args.pivot_encoder is not None:
        known_arch = args.arch or (preset.arch if args.base is None else None)
        check_pivot_arch(check_pivot_encoder(args.pivot_encoder), args.pivot_encoder, known_arch)
    args.plugins = plugin_request(args, args.arch or preset.arch, is_tiny(args))
    device = resolve_device(args.device)
    arch = "tiny" if is_tiny(args) else (args.arch or preset.arch)
    check_fits(arch, args.width or preset.size, args.height or preset.size, args.num_images, device,
               resolve_dtype(args.dtype, device), args.banded_decode)
    return paths


def is_tiny(args) -> bool:
    """Whether this run uses a tiny preset's random weights (and so tiny random plug-ins by default)."""
    from omniportrait.pipelines.loading import get_preset

    return get_preset(args.preset).base is None and args.base is None


def pipeline_arch(pipe) -> str:
    from omniportrait.pipelines.sdxl import OmniPortraitSDXLPipeline

    return "sdxl" if isinstance(pipe, OmniPortraitSDXLPipeline) else "sd15"


def report_faces(identities: list[Identity], sources: list[Identity]) -> None:
    """One notice per photo with several faces: which one is used and how to pick another."""
    for item, source in zip(identities, sources):
        count = len(item.reference.faces)
        if count > 1 and source.face_index is None:
            box = ", ".join(f"{v:.0f}" for v in item.reference.face.box)
            print(f"omniportrait: notice: {source.reference} shows {count} faces; using the largest (face 0, box "
                  f"{box}); pick another with --face-index 1 … {count - 1}", file=sys.stderr)


def warn_cut_prompts(args, pipe) -> None:
    """One warning per prompt that the text encoder will cut, naming the words it drops."""
    from omniportrait.text import cut_by_tokenizer

    for flag, prompt in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        dropped = cut_by_tokenizer(pipe.tokenizer, prompt) if prompt else None
        if dropped:
            print(f"omniportrait: warning: {flag} is longer than the text encoder's "
                  f"{pipe.tokenizer.model_max_length} tokens; this is cut and not used: {dropped!r}",
                  file=sys.stderr)


def sim_line(item: Identity, sim: float | None, why: str) -> str:
    shown = f"{sim:.3f}" if sim is not None else f"n/a ({why})"
    return f"  SIM to {item.class_word!r} reference: {shown}"


@dataclass
class Job:
    """One generation's inputs, checked and prepared before the model runs: the identities as asked for
    (``sources``) and with their faces found (``identities``), the guidance settings and the output paths."""

    paths: list[Path]
    sources: list[Identity]
    identities: list[Identity]
    rb_config: RBGuidanceConfig


@dataclass
class Written:
    """What one generation wrote: the images with their PNG and sidecar paths, and each image's SIM lines."""

    images: list
    paths: list[Path]
    sidecars: list[dict]
    sims: list[list[tuple[float | None, str]]]


def prepare_job(args) -> Job:
    """Every check and preparation that needs no model (flags together, files, faces, control images), so that
    bad input fails in a second; fills in the preset's size. Shared by the CLI and the web app."""
    from omniportrait.pipelines.loading import get_preset

    preset = get_preset(args.preset)
    paths = check_before_loading(args)
    args.width = args.width or preset.size
    args.height = args.height or preset.size
    sources = identities_from_args(args)
    identities = prepare_identities(sources)
    report_faces(identities, sources)
    make_control_images(args.plugins, args.width, args.height)
    return Job(paths, sources, identities, guidance_config(args))


def draw(args, pipe, job: Job):
    """Run the (loaded) pipeline for ``job``: plug-ins attached, one seeded generator per image; the output, its
    pipeline (a ControlNet one when asked for) and the seconds it took. Out of GPU memory is one line."""
    import torch

    warn_cut_prompts(args, pipe)
    pipe.banded_decode = args.banded_decode  # None: the pipeline's default
    pipe = attach_plugins(pipe, args.plugins, pipeline_arch(pipe), is_tiny(args))
    seeds = [args.seed + index for index in range(args.num_images)]
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    started = time.perf_counter()
    try:
        output = pipe(args.prompt, identities=job.identities, negative_prompt=args.negative_prompt,
                      height=args.height, width=args.width, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, num_images_per_prompt=args.num_images,
                      generator=generators, rb_guidance=job.rb_config, **call_arguments(args.plugins))
    except torch.cuda.OutOfMemoryError as error:
        raise OutOfMemoryError(out_of_memory_message(args, job.rb_config)) from error
    elapsed = time.perf_counter() - started
    record_what_ran(args, output)
    return output, pipe, elapsed


def write_results(args, pipe, job: Job, output, elapsed: float) -> Written:
    """Each image as its PNG and JSON sidecar (the reproduce line included), written atomically, with SIM."""
    from omniportrait.images import save_image_atomic

    plugins = plugins_record(args.plugins)
    calibration = output.calibration()
    written = Written(list(output.images), [], [], [])
    for index, (image, path) in enumerate(zip(output.images, job.paths)):
        path.parent.mkdir(parents=True, exist_ok=True)
        sims = similarities(job.identities, image)
        record = sidecar(args, pipe, job.identities, job.sources, args.seed + index, index, elapsed, sims, plugins,
                         calibration)
        save_image_atomic(image, path)
        write_json_atomic(path.with_suffix(".json"), record)
        written.paths.append(path)
        written.sidecars.append(record)
        written.sims.append(sims)
    return written


def run(args: argparse.Namespace) -> int:
    from omniportrait.pipelines.loading import load_pipeline

    job = prepare_job(args)
    pipe = load_pipeline(args.preset, args.base, args.arch, args.pivot_encoder, args.device, args.dtype,
                         args.scheduler)
    output, pipe, elapsed = draw(args, pipe, job)
    written = write_results(args, pipe, job, output, elapsed)
    for image, path, sims in zip(written.images, written.paths, written.sims):
        print(f"wrote {path} ({image.width}x{image.height}) and {path.with_suffix('.json').name}", file=sys.stderr)
        for item, (sim, why) in zip(job.identities, sims):
            print(sim_line(item, sim, why), file=sys.stderr)
    if output.guidance is not None:
        print(calibration_line(output.calibration(), job.rb_config.strength), file=sys.stderr)
    save_control_images(args.plugins)
    if args.save_masks and output.guidance is not None:
        from omniportrait.guidance.visualize import save_guidance_pictures

        saved = save_guidance_pictures(output.guidance, output.images, args.save_masks)
        print(f"wrote {len(saved)} guidance pictures to {args.save_masks}", file=sys.stderr)
    return 0
