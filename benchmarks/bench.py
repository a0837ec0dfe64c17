"""Wall time and peak memory of our pipelines against diffusers' plain pipeline, measured side by side.

Every variant runs a whole generation (text encoding, sampling, VAE decoding to an image) on the same components,
prompt, size, seed and number of steps, in one process, one after the other; ratios are against diffusers' plain
pipeline of the same run. Models: the tiny presets (always on the CPU) and the real SD1.5 / SDXL architectures with
random weights (``random-*``, :mod:`benchmarks.architectures`; speed and memory do not depend on weight values).
Peak memory is CUDA's allocator peak, reported on CUDA only. A variant or model that fails (CUDA out of memory,
say) is reported in its place, the others still run, and the exit status is then 1.

    python -m benchmarks.bench --models tiny-sd15 tiny-sdxl --variants rb-default rb-off rb-cfg --steps 20
    python -m benchmarks.bench --models random-sdxl --json results/DAY-CARD.json --markdown results/DAY-CARD.md
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from omniportrait.errors import OmniPortraitError
from omniportrait.files import write_json_atomic, write_text_atomic
from omniportrait.guidance import RBGuidanceConfig

PROMPT = "a photo of a woman riding a bicycle"
SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "astronaut.jpg"
PLAIN = "diffusers-plain"
PLAIN_AFTER = f"{PLAIN}-after"  # the same pipeline timed again once ours have run (a row of the report, no variant)


@dataclass(frozen=True)
class Variant:
    """One way of generating that the bench times: diffusers' own pipeline (``guidance=None``), or ours with this
    guidance and decode (``banded_decode=None``: the pipeline's default, ``decodes_in_bands``); with ``controlnet``,
    each with one ControlNet (diffusers' ControlNet pipeline, ours)."""

    guidance: RBGuidanceConfig | None
    banded_decode: bool | None = False
    controlnet: bool = False

    @property
    def needs_cuda(self) -> bool:
        return self.guidance is not None and self.guidance.cuda_graph is True


# the variants fix the attention mask (eq. 6) so that they compare passes, not mask sources; rb-default is the default
EAGER = RBGuidanceConfig(cuda_graph=False, mask="attention")
GRAPHED = replace(EAGER, cuda_graph=True)  # "-graph" names these
SPLIT_GRAPHED = replace(GRAPHED, feature_pass="split")
VARIANTS: dict[str, Variant] = {  # the defaults' candidates: feature pass, gradient interval, CUDA graphs, bands
    PLAIN: Variant(None),
    "rb-default": Variant(RBGuidanceConfig(), banded_decode=None),  # what a call gets by default on the device
    "rb-off": Variant(RBGuidanceConfig(enabled=False)),
    "rb-cfg": Variant(EAGER),
    "rb-split": Variant(replace(EAGER, feature_pass="split")),
    "rb-separate": Variant(replace(EAGER, feature_pass="separate")),
    "rb-cfg-interval-2": Variant(replace(EAGER, gradient_interval=2)),
    "rb-cfg-graph": Variant(GRAPHED),
    "rb-split-graph": Variant(SPLIT_GRAPHED),
    "rb-cfg-graph-banded": Variant(GRAPHED, banded_decode=True),
    "rb-split-graph-banded": Variant(SPLIT_GRAPHED, banded_decode=True),
    "diffusers-controlnet": Variant(None, controlnet=True),  # ours against it: the cost of guidance under control
    "rb-controlnet": Variant(RBGuidanceConfig(), banded_decode=None, controlnet=True),
}
MODELS = {"tiny-sd15": ("sd15", 64), "tiny-sdxl": ("sdxl", 64), "random-sd15": ("sd15", 512),
          "random-sdxl": ("sdxl", 1024)}  # name: (architecture, default image side)
CPU_MODELS = ("tiny-",)  # run on the CPU in fp32 whatever the device

OFF_RATIO = 1.03  # targets: guidance off, × diffusers' plain pipeline
FULL_RATIO, FULL_PEAK_GIB = 1.6, 12.0  # the full method on SDXL at 1024², every component loaded
LEFTOVER_GIB = 0.01  # more allocated than plain's at a call's start that counts as left by earlier calls


@dataclass(frozen=True)
class BenchConfig:
    """One model's benchmark: which model, how many steps, how often each variant is timed."""

    model: str
    steps: int = 50
    repeats: int = 3
    size: int | None = None  # None: the model's default side (MODELS)
    variants: tuple[str, ...] = tuple(VARIANTS)
    guidance_scale: float = 7.5

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown benchmark model {self.model!r}; use one of {', '.join(MODELS)}")
        unknown = [name for name in self.variants if name not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown benchmark variant {unknown[0]!r}; use any of {', '.join(VARIANTS)}")
        if self.steps < 1 or self.repeats < 1:
            raise ValueError("benchmark steps and repeats must be at least 1")

    @property
    def arch(self) -> str:
        return MODELS[self.model][0]

    @property
    def resolution(self) -> int:
        return self.size or MODELS[self.model][1]

    @property
    def all_variants(self) -> tuple[str, ...]:
        """The variants that run: diffusers' plain pipeline first, then the requested ones."""
        return (PLAIN, *[name for name in self.variants if name != PLAIN])

    def variants_on(self, device: torch.device) -> tuple[str, ...]:
        """:attr:`all_variants` that run on ``device``: CUDA-graph variants need CUDA."""
        return tuple(name for name in self.all_variants if device.type == "cuda" or not VARIANTS[name].needs_cuda)

    def schedule(self, device: torch.device) -> list[tuple[str, bool]]:
        """The run's calls in order, each with whether it is timed. Diffusers' plain pipeline is warmed up and timed
        first, before any of ours has run in the process; ours are warmed up once each, then timed in rounds (a, b,
        …, a, b, …) so that a machine's slow drift falls on each alike; last, plain is timed again as
        :data:`PLAIN_AFTER`, whose ratio to plain shows drift and anything our calls left that slows diffusers."""
        ours = self.variants_on(device)[1:]
        schedule = [(PLAIN, timed) for timed in [False] + [True] * self.repeats]
        for timed_round in range(self.repeats + 1):
            schedule += [(name, timed_round > 0) for name in ours]
        return schedule + [(PLAIN_AFTER, True)] * (self.repeats if ours else 0)

    @property
    def guided_steps(self) -> int:
        """Steps with ``t <= u·T`` under the default schedule, for the report."""
        return round(self.steps * RBGuidanceConfig().start)


@dataclass(frozen=True)
class BenchRow:
    variant: str
    seconds: float | None  # None: the variant failed
    ratio: float | None  # None: it or diffusers' plain pipeline failed
    peak_gib: float | None
    sampling_peak_gib: float | None = None  # the peak before the VAE decode: text encoding and sampling
    error: str | None = None  # why the variant failed: its exception's type and first line
    start_gib: float | None = None  # allocated when its calls began, the most of them: the weights, and what earlier
    # calls left allocated, which its peak counts too


@dataclass(frozen=True)
class CallMemory:
    """One call's CUDA memory in GiB (None off CUDA): allocated when it began, and its peak."""

    start: float | None = None
    peak: float | None = None


# ----- models ---------------------------------------------------------------------------------------------------------
def placement(model: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """Tiny models always run on the CPU in fp32; the random-weight real architectures where asked."""
    if model.startswith(CPU_MODELS):
        return torch.device("cpu"), torch.float32
    return device, dtype


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_components(model: str, device: torch.device, dtype: torch.dtype) -> tuple[dict, object]:
    """Pipeline components and a Pivot ID Encoder for ``model``, on ``device`` in ``dtype``."""
    arch = MODELS[model][0]
    if not model.startswith("tiny-"):
        from benchmarks.architectures import real_components

        return real_components(arch, dtype=dtype, device=str(device))
    from omniportrait.models.tiny import tiny_components

    tiny = tiny_components(arch)
    parts, pivot_encoder = dict(tiny.components), tiny.pivot_encoder
    for module in [*parts.values(), pivot_encoder]:
        if isinstance(module, torch.nn.Module):
            module.to(device, dtype)
    return parts, pivot_encoder


def model_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    """Our pipeline of ``model`` on ``device`` in ``dtype``, without a progress bar, and its modules (to count
    their weights)."""
    from omniportrait.pipelines.loading import PIPELINE_CLASSES

    parts, pivot_encoder = model_components(model, device, dtype)
    pipe = PIPELINE_CLASSES[MODELS[model][0]](**parts, pivot_encoder=pivot_encoder).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, [module for module in [*parts.values(), pivot_encoder] if isinstance(module, torch.nn.Module)]


# ----- measuring --------------------------------------------------------------------------------------------------
def release_memory(device: torch.device) -> None:
    """Free what an earlier model or call left (a failed call's tensors, garbage still in reference cycles), so that
    it does not count in the next peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocator_peak_gib(device: torch.device) -> float | None:
    """CUDA's allocator peak since the last reset, in GiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_once(call: Callable[[], object], device: torch.device) -> tuple[float, CallMemory]:
    """Wall time of one call, and its CUDA memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, CallMemory(start_gib, allocator_peak_gib(device))


class PeakBeforeDecode:
    """Reads ``measure()`` (the allocator peak) when the VAE starts decoding: the peak of text encoding and
    sampling without the decode. Both pipelines share the VAE, so one hook serves every variant; it sits on the
    decoder's first layer, which diffusers' decode and the banded one both run."""

    def __init__(self, vae, measure: Callable[[], float | None]):
        self.measure, self.gib = measure, None
        vae.decoder.conv_in.register_forward_pre_hook(self.read)

    def read(self, module, args) -> None:
        self.gib = self.measure()


def variant_calls(config: BenchConfig, parts: dict, pivot_encoder, reference, device) -> dict[str, Callable]:
    """One zero-argument call per requested variant; all share components, prompt, size, seed and steps."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from omniportrait.pipelines import Identity
    from omniportrait.pipelines.loading import PIPELINE_CLASSES

    plain_class = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[config.arch]
    plain = plain_class(**parts).to(device)
    ours = PIPELINE_CLASSES[config.arch](**parts, pivot_encoder=pivot_encoder).to(device)
    pipes = {False: (plain, ours)}
    if any(VARIANTS[name].controlnet for name in config.variants_on(device)):
        pipes[True] = controlnet_pipelines(config, plain, ours, device)
    for pipe in [pipe for pair in pipes.values() for pipe in pair]:
        pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                  height=config.resolution, width=config.resolution, output_type="pil")
    identities = [Identity(reference, "woman")]
    control = {False: {}, True: dict(image=control_image(config.resolution))}

    def call(variant: Variant) -> Callable:
        generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        theirs, our_pipe = pipes[variant.controlnet]
        extra = control[variant.controlnet]
        if variant.guidance is None:
            return lambda: theirs(PROMPT, **common, **extra, generator=generator())

        def generate():
            our_pipe.banded_decode = variant.banded_decode
            output = our_pipe(PROMPT, identities=identities, **common, **extra, generator=generator(),
                              rb_guidance=variant.guidance)
            fell_back = " and ".join(output.memory_fallbacks())
            if fell_back:  # reported as this variant's failure
                raise torch.OutOfMemoryError(f"ran out of GPU memory and went on with {fell_back}, so the time is "
                                             "not this variant's")
            return output

        return generate

    return {name: call(VARIANTS[name]) for name in config.variants_on(device)}


def controlnet_pipelines(config: BenchConfig, plain, ours, device) -> tuple:
    """diffusers' ControlNet pipeline and ours, on the components of ``plain``/``ours`` and one random-weight
    ControlNet of the UNet's architecture (speed and memory do not depend on its weights)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    from omniportrait.models.tiny import tiny_controlnet
    from omniportrait.pipelines import OmniPortraitSDControlNetPipeline, OmniPortraitSDXLControlNetPipeline

    unet = ours.unet
    if config.model.startswith("tiny-"):
        controlnet = tiny_controlnet(unet)
    else:
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_unet(unet)
    controlnet = controlnet.to(device, unet.dtype)
    theirs_class = {"sd15": StableDiffusionControlNetPipeline, "sdxl": StableDiffusionXLControlNetPipeline}
    ours_class = {"sd15": OmniPortraitSDControlNetPipeline, "sdxl": OmniPortraitSDXLControlNetPipeline}
    return (theirs_class[config.arch].from_pipe(plain, controlnet=controlnet),
            ours_class[config.arch].from_pipe(ours, controlnet=controlnet))


def control_image(side: int):
    """A fixed control image of the generation size (its content does not change the cost)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


@dataclass
class VariantTimes:
    """What one variant's calls measured so far: best time, highest peaks and start, or why it failed."""

    best: float = float("inf")
    peak_gib: float | None = None
    sampling_peak_gib: float | None = None
    start_gib: float | None = None
    error: str | None = None

    def add(self, seconds: float, memory: CallMemory, sampling_peak_gib: float | None) -> None:
        self.best = min(self.best, seconds)
        self.peak_gib = highest(self.peak_gib, memory.peak)
        self.sampling_peak_gib = highest(self.sampling_peak_gib, sampling_peak_gib)
        self.start_gib = highest(self.start_gib, memory.start)

    def row(self, variant: str, plain: VariantTimes) -> BenchRow:
        if self.error is not None:
            return BenchRow(variant, None, None, None, None, self.error)
        ratio = None if plain.error is not None else self.best / plain.best
        return BenchRow(variant, self.best, ratio, self.peak_gib, self.sampling_peak_gib, start_gib=self.start_gib)


def highest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def failure(error: BaseException) -> str:
    """An exception as one line for a report: its type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def run_benchmark(config: BenchConfig, reference, device: torch.device, dtype: torch.dtype,
                  on_call: Callable[[str], None] | None = None) -> list[BenchRow]:
    """One row per variant that runs on ``device``, in the order of :meth:`BenchConfig.schedule`: its best time,
    ratio to plain, and highest peak.

    Memory is released before every call, so that no call's peak counts what the one before left for the garbage
    collector. ``on_call`` is told each call's row, for progress. A variant whose call raises is reported with the
    error, with a warning, and not called again; the others go on.
    """
    release_memory(device)  # an earlier model's
    parts, pivot_encoder = model_components(config.model, device, dtype)
    calls = variant_calls(config, parts, pivot_encoder, reference, device)
    before_decode = PeakBeforeDecode(parts["vae"], lambda: allocator_peak_gib(device))
    schedule = config.schedule(device)
    times = {name: VariantTimes() for name, _ in schedule}
    with torch.no_grad():
        for name, timed in schedule:
            called = PLAIN if name == PLAIN_AFTER else name
            if times[called].error is not None:  # failed before: not called again
                times[name].error = times[called].error
                continue
            before_decode.gib = None
            release_memory(device)
            try:
                seconds, memory = timed_once(calls[called], device)
            except Exception as error:  # reported in the variant's row
                times[name].error = failure(error)
                warnings.warn(f"{name} failed: {times[name].error}; the other variants go on", stacklevel=2)
            else:
                if timed:
                    times[name].add(seconds, memory, before_decode.gib)
            if on_call is not None:
                on_call(name)
    return [times[name].row(name, times[PLAIN]) for name in times]


# ----- reporting --------------------------------------------------------------------------------------------------
def number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table_header(config: BenchConfig, device: torch.device, dtype: torch.dtype) -> str:
    return (f"{config.model} {config.resolution}x{config.resolution}, {config.steps} steps "
            f"({config.guided_steps} guided), {device_name(device)}, {dtype_name(dtype)}\n"
            f"{'variant':26s} {'seconds':>9s} {'x plain':>8s} {'peak GiB':>9s} {'sampling GiB':>13s} "
            f"{'start GiB':>10s}")


def format_row(row: BenchRow) -> str:
    if row.error is not None:
        return f"{row.variant:26s} failed: {row.error}"
    ratio, peak, sampling, start = (number(value, 2)
                                    for value in (row.ratio, row.peak_gib, row.sampling_peak_gib, row.start_gib))
    return f"{row.variant:26s} {row.seconds:9.3f} {ratio:>8s} {peak:>9s} {sampling:>13s} {start:>10s}"


def report_entry(config: BenchConfig, device: torch.device, dtype: torch.dtype, rows: list[BenchRow]) -> dict:
    """One model's rows and the conditions they were measured under, for ``--json`` (a model that could not run at
    all is ``{"model", "error", "rows": []}``)."""
    return {"model": config.model, "size": config.resolution, "steps": config.steps,
            "guided_steps": config.guided_steps, "repeats": config.repeats, "device": device_name(device),
            "dtype": dtype_name(dtype), "rows": [dataclasses.asdict(row) for row in rows]}


def model_name(entry: dict) -> str:
    return f"{entry['model']} {entry['size']}²"


def row_cells(row: dict | None) -> list[str]:
    """A variant's four markdown cells for one model: not run, failed, or measured."""
    if row is None:
        return ["—"] * 4
    if row.get("error"):
        return ["failed"] + ["—"] * 3
    return [f"{row['seconds']:.3f}", number(row["ratio"], 2), number(row["peak_gib"], 2),
            number(row.get("sampling_peak_gib"), 2)]


def markdown_table(report: list[dict]) -> str:
    """One row per variant (in the report's order), four columns per model: seconds, × plain, peak and the peak
    before the decode (GiB). A variant a model did not run shows ``—``, one that failed ``failed``; the failures'
    errors follow the table, and so does each model that could not run at all."""
    measured = [entry for entry in report if entry["rows"]]
    header = ["variant"]
    for entry in measured:
        header += [f"{model_name(entry)} s", "× plain", "peak GiB", "sampling GiB"]
    variants = list(dict.fromkeys(row["variant"] for entry in measured for row in entry["rows"]))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        cells = [f"`{variant}`"]
        for entry in measured:
            cells += row_cells(next((row for row in entry["rows"] if row["variant"] == variant), None))
        lines.append("| " + " | ".join(cells) + " |")
    failures = [f"- `{row['variant']}` failed on {model_name(entry)}: {row['error']}"
                for entry in measured for row in entry["rows"] if row.get("error")]
    failures += [f"- {entry['model']} failed: {entry['error']}" for entry in report if not entry["rows"]]
    lines += ["", *failures] if failures else []
    conditions = {(entry["device"], entry["dtype"], entry["steps"], entry["guided_steps"]) for entry in measured}
    for device, dtype, steps, guided in sorted(conditions):
        lines.append(f"\n{device}, {dtype}, {steps} steps of which {guided} guided")
    return "\n".join(lines)


def target_lines(report: list[dict]) -> list[str]:
    """Per measured model, the guidance-off variants within ``OFF_RATIO`` and the full-method variants within both
    ``FULL_RATIO`` and ``FULL_PEAK_GIB`` (a variant without a measured ratio or peak cannot meet them)."""
    lines = [f"\nTargets: guidance off ≤ {OFF_RATIO}×; full method ≤ {FULL_RATIO}× and ≤ {FULL_PEAK_GIB:g} GiB peak "
             "(set for SDXL at 1024², every component loaded)."]
    for entry in [entry for entry in report if entry["rows"]]:
        rows = [row for row in entry["rows"] if row["variant"].startswith("rb-") and row["ratio"] is not None]
        off = [row for row in rows if row["variant"].startswith("rb-off")]
        full = [row for row in rows if not row["variant"].startswith("rb-off")]
        met_off = [f"`{row['variant']}` {row['ratio']:.2f}×" for row in off if row["ratio"] <= OFF_RATIO]
        met_full = [f"`{row['variant']}` {row['ratio']:.2f}×, {row['peak_gib']:.2f} GiB" for row in full
                    if row["ratio"] <= FULL_RATIO and row["peak_gib"] is not None
                    and row["peak_gib"] <= FULL_PEAK_GIB]
        lines.append(f"- {model_name(entry)}: guidance off within: {', '.join(met_off) or 'none'}; "
                     f"full method within both: {', '.join(met_full) or 'none'}")
    return lines


def leftover_lines(report: list[dict]) -> list[str]:
    """Per model measured on CUDA, whether any variant's calls began with more allocated than diffusers' plain
    pipeline's (the weights): cuBLAS's workspaces of the streams and threads ours use, or what earlier calls left,
    which that variant's peak counts too."""
    lines = []
    for entry in [entry for entry in report if entry["rows"]]:
        starts = {row["variant"]: row.get("start_gib") for row in entry["rows"] if row.get("start_gib") is not None}
        base = starts.pop(PLAIN, None)  # diffusers' plain pipeline's, before any of ours ran
        if base is None:  # off CUDA, or plain failed
            continue
        more = {variant: start - base for variant, start in starts.items() if start - base > LEFTOVER_GIB}
        if more:
            named = ", ".join(f"`{variant}` +{gib:.2f}" for variant, gib in more.items())
            lines.append(f"- {model_name(entry)}: calls began with more allocated than plain's ({base:.2f} GiB), "
                         f"counted in their peaks: {named} GiB (cuBLAS keeps a workspace for each stream and thread "
                         "that ran a matrix product, which a first call allocates too; beyond those, earlier calls "
                         "left it)")
        else:
            lines.append(f"- {model_name(entry)}: every call began with what plain's did ({base:.2f} GiB, within "
                         f"{LEFTOVER_GIB} GiB): no peak counts what an earlier call left")
    return lines


def markdown_report(report: list[dict]) -> str:
    """The table, then the variants within the targets and whether any call began with memory left before it."""
    return "\n".join([markdown_table(report), *target_lines(report), *leftover_lines(report)]) + "\n"


def print_table(config: BenchConfig, device: torch.device, dtype: torch.dtype, rows: list[BenchRow]) -> None:
    print(table_header(config, device, dtype))
    print("\n".join(format_row(row) for row in rows))
    skipped = [name for name in config.all_variants if name not in config.variants_on(device)]
    if skipped:
        print(f"not run on {device.type} (CUDA only): {', '.join(skipped)}")
    print(flush=True)


# ----- command line -----------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", default=str(SAMPLE), help="face photo for the identity (default: the sample)")
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS), metavar="MODEL",
                   help=f"any of {', '.join(MODELS)} (default: the tiny models, and the random-weight real "
                        "architectures when CUDA is available)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"any of {', '.join(VARIANTS)} (default: all; {PLAIN} always runs first)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50, the paper's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls of each variant after one warm-up call (each keeps its best)")
    p.add_argument("--size", type=int, default=None, help="image side (default: 64 tiny, 512 SD1.5, 1024 SDXL)")
    p.add_argument("--device", default="auto", help="device of the random-* models: auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="dtype of the random-* models (auto: fp16 on CUDA, else fp32)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every row as JSON (after each model)")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="also write the models side by side as a markdown table, with the variants within the "
                        "targets (after each model)")
    return p


def run_model(config: BenchConfig, reference, device: torch.device, dtype: torch.dtype) -> dict:
    """One model's table printed, and its report entry; a model that cannot run at all is an entry with its error."""
    from tqdm.auto import tqdm

    if device.type == "cpu" and not config.model.startswith(CPU_MODELS):
        warnings.warn(f"{config.model} is slow on the CPU (seconds to minutes per step); use few --steps or a GPU",
                      stacklevel=1)
    try:
        with tqdm(total=len(config.schedule(device)), desc=config.model, unit="call", file=sys.stderr,
                  leave=False) as bar:
            rows = run_benchmark(config, reference, device, dtype, on_call=lambda _: bar.update())
    except Exception as error:  # e.g. its weights do not fit: the next model still runs
        print(f"{config.model} failed: {failure(error)}\n", flush=True)
        return {"model": config.model, "error": failure(error), "rows": []}
    print_table(config, device, dtype, rows)
    return report_entry(config, device, dtype, rows)


def failures(entry: dict) -> list[str]:
    if not entry["rows"]:
        return [f"{entry['model']} failed ({entry['error']})"]
    return [f"{entry['model']}: {row['variant']} failed ({row['error']})" for row in entry["rows"] if row["error"]]


def main(argv: list[str] | None = None) -> int:
    from diffusers.utils import logging as diffusers_logging

    from omniportrait.faces import prepare_reference
    from omniportrait.images import load_image
    from omniportrait.pipelines.loading import resolve_device, resolve_dtype

    args = parser().parse_args(argv)
    diffusers_logging.set_verbosity_error()  # the fp16 cast notice concerns loading weights; there are none
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        configs = [BenchConfig(model, args.steps, args.repeats, args.size, tuple(args.variants))
                   for model in args.models or [m for m in MODELS if m.startswith("tiny-") or device.type == "cuda"]]
        reference = prepare_reference(load_image(args.reference))
    except (OmniPortraitError, ValueError) as error:
        parser().error(str(error))
    report = []
    for config in configs:
        report.append(run_model(config, reference, *placement(config.model, device, dtype)))
        if args.json:  # after each model, so that a run cut short keeps what it measured
            write_json_atomic(args.json, report)
        if args.markdown:
            write_text_atomic(args.markdown, markdown_report(report))
    failed = [line for entry in report for line in failures(entry)]
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
