"""Wall time and peak memory of our pipelines against diffusers' plain pipeline, measured side by side.

Every variant runs a whole generation (text encoding, sampling, VAE decoding to an image) on the same components,
prompt, size, seed and number of steps, in one process, one after the other; ratios are against diffusers'
plain pipeline of the same run. Models: the tiny presets (CPU), the real SD1.5 / SDXL architectures with random
weights (``random-*``, :mod:`benchmarks.architectures`; speed and memory do not depend on weight values). Peak memory is CUDA's allocator peak, reported on CUDA only.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from omniportrait.attention import (
    ContextProjections,
    SamplingAttnProcessor,
    is_diffusers_default,
    project_key_value,
    sampling_forward,
)
from omniportrait.blocks import lean_forwards
from omniportrait.errors import ConfigError
from omniportrait.guidance import RBGuidanceConfig

PROMPT = "a photo of a woman riding a bicycle"
PLAIN = "diffusers-plain"
PLAIN_AFTER = f"{PLAIN}-after"  # the same pipeline timed again once ours have run (a row of the report, no variant)


@dataclass(frozen=True)
class Variant:
    """One way of generating that the bench times: diffusers' own pipeline (``guidance=None``), or ours with this
    guidance and decode (``banded_decode=None``: the pipeline's default, :meth:`decodes_in_bands`)."""

    guidance: RBGuidanceConfig | None
    banded_decode: bool | None = False

    @property
    def needs_cuda(self) -> bool:
        return self.guidance is not None and self.guidance.cuda_graph is True


EAGER, GRAPHED = RBGuidanceConfig(cuda_graph=False), RBGuidanceConfig(cuda_graph=True)  # "-graph" names the latter
VARIANTS: dict[str, Variant] = {
    PLAIN: Variant(None),
    "rb-default": Variant(RBGuidanceConfig(), banded_decode=None),  # what a call gets by default on the device
    "rb-off": Variant(RBGuidanceConfig(enabled=False)),
    "rb-cfg": Variant(EAGER),
    "rb-split": Variant(replace(EAGER, feature_pass="split")),
    "rb-separate": Variant(replace(EAGER, feature_pass="separate")),
    "rb-cfg-interval-2": Variant(replace(EAGER, gradient_interval=2)),
    "rb-split-interval-2": Variant(replace(EAGER, feature_pass="split", gradient_interval=2)),
    "rb-separate-interval-2": Variant(replace(EAGER, feature_pass="separate", gradient_interval=2)),
    "rb-cfg-graph": Variant(GRAPHED),
    "rb-split-graph": Variant(replace(GRAPHED, feature_pass="split")),
    "rb-split-interval-2-graph": Variant(replace(GRAPHED, feature_pass="split", gradient_interval=2)),
    "rb-off-banded": Variant(RBGuidanceConfig(enabled=False), banded_decode=True),
    "rb-split-graph-banded": Variant(replace(GRAPHED, feature_pass="split"), banded_decode=True),
    "rb-cfg-gelu": Variant(replace(EAGER, recompute="gelu")),
    "rb-cfg-banded": Variant(EAGER, banded_decode=True),
    "rb-cfg-graph-banded": Variant(GRAPHED, banded_decode=True),
}
# the feature passes step_calls also times as CUDA graphs, and with only the feed-forward's gate recomputed
GRAPHED_PASSES = ("cfg", "split")
MODELS = {"tiny-sd15": ("sd15", 64), "tiny-sdxl": ("sdxl", 64), "random-sd15": ("sd15", 512),
          "random-sdxl": ("sdxl", 1024)}
CPU_MODELS = ("tiny-",)  # run on the CPU in fp32 whatever the device


@dataclass(frozen=True)
class BenchConfig:
    """One model's benchmark: which model, how many steps, how often each variant is timed."""

    model: str
    steps: int = 50
    repeats: int = 3
    size: int | None = None  # None: 64 for tiny models, 16 for twins, 512 for SD1.5, 1024 for SDXL
    variants: tuple[str, ...] = tuple(VARIANTS)
    guidance_scale: float = 7.5

    def __post_init__(self):
        if self.model not in MODELS:
            raise ConfigError(f"unknown benchmark model {self.model!r}; use one of {', '.join(MODELS)}")
        unknown = [name for name in self.variants if name not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown benchmark variant {unknown[0]!r}; use any of {', '.join(VARIANTS)}")
        if self.steps < 1 or self.repeats < 1:
            raise ConfigError("benchmark steps and repeats must be at least 1")

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
        :data:`PLAIN_AFTER`, whose ratio to plain shows drift and anything our calls left that slows diffusers (on
        the H100, plain took 4.88 s after ours against 3.61 s in a process of its own)."""
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


def placement(model: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """Tiny models and narrow twins always run on the CPU in fp32; the random-weight real architectures where
    asked."""
    if model.startswith(CPU_MODELS):
        return torch.device("cpu"), torch.float32
    return device, dtype


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def release_memory(device: torch.device) -> None:
    """Free what an earlier model or call left (a failed call's tensors, garbage still in reference cycles), so that
    it does not count in the next peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_components(model: str, device: torch.device, dtype: torch.dtype) -> tuple[dict, object]:
    """Pipeline components and a Pivot ID Encoder for ``model``, on ``device`` in ``dtype``."""
    arch = MODELS[model][0]
    if model.startswith("tiny-"):
        from omniportrait.models.tiny import tiny_components

        tiny = tiny_components(arch)
        parts, pivot_encoder = dict(tiny.components), tiny.pivot_encoder
        for module in [*parts.values(), pivot_encoder]:
            if isinstance(module, torch.nn.Module):
                module.to(device, dtype)
        return parts, pivot_encoder
    from benchmarks.architectures import real_components

    return real_components(arch, dtype=dtype, device=str(device))


def model_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    """Our pipeline of ``model`` (:data:`MODELS`) on ``device`` in ``dtype``, without a progress bar, and its
    components (the modules, for counting their weights)."""
    from omniportrait.pipelines.loading import PIPELINE_CLASSES

    parts, pivot_encoder = model_components(model, device, dtype)
    pipe = PIPELINE_CLASSES[MODELS[model][0]](**parts, pivot_encoder=pivot_encoder).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, [module for module in [*parts.values(), pivot_encoder] if isinstance(module, torch.nn.Module)]


def allocator_peak_gib(device: torch.device) -> float | None:
    """CUDA's allocator peak since the last reset, in GiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    """What CUDA's allocator holds for tensors now, in GiB (None off CUDA)."""
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


@dataclass(frozen=True)
class CallMemory:
    """One call's CUDA memory in GiB (None off CUDA): allocated when it began, and its peak."""

    start: float | None = None
    peak: float | None = None


def timed_once(call: Callable[[], object], device: torch.device) -> tuple[float, CallMemory]:
    """Wall time of one call, and its CUDA memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start_gib = allocated_gib(device)
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, CallMemory(start_gib, allocator_peak_gib(device))


class PeakBeforeDecode:
    """Reads ``measure()`` (the allocator peak) when the VAE starts decoding: the peak of text encoding and
    sampling without the decode, which on SDXL (decoded in fp32, as diffusers does) is the peak of a plain
    generation. Both pipelines share the VAE, so one hook serves every variant; it sits on the decoder's first layer,
    which diffusers' decode and the banded one both run."""

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
    for pipe in (plain, ours):
        pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                  height=config.resolution, width=config.resolution, output_type="pil")
    identities = [Identity(reference, "woman")]

    def call(variant: Variant) -> Callable:
        generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        if variant.guidance is None:
            return lambda: plain(PROMPT, **common, generator=generator())

        def generate():
            ours.banded_decode = variant.banded_decode
            output = ours(PROMPT, identities, **common, generator=generator(), rb_guidance=variant.guidance)
            fell_back = " and ".join(output.memory_fallbacks())
            if fell_back:  # reported as this variant's failure
                raise torch.OutOfMemoryError(f"ran out of GPU memory and went on with {fell_back}, so the time is "
                                             "not this variant's")
            return output

        return generate

    return {name: call(VARIANTS[name]) for name in config.variants_on(device)}


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


def run_benchmark(config: BenchConfig, reference, device: torch.device, dtype: torch.dtype,
                  on_call: Callable[[str], None] | None = None) -> list[BenchRow]:
    """One row per variant that runs on ``device``, diffusers' plain pipeline first and timed again last
    (:data:`PLAIN_AFTER`): its best time, ratio to plain, and highest peak, in the order of
    :meth:`BenchConfig.schedule`.

    Memory is released before every call, so that no call's peak counts what the one before left for the garbage
    collector. ``on_call`` is told each call's row, for progress. A variant whose call raises (CUDA out of memory,
    say) is reported with the error, with a warning, and not called again; the others go on.
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


def failure(error: BaseException) -> str:
    """An exception as one line for a report: its type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def highest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def table_header(config: BenchConfig, device: torch.device, dtype: torch.dtype) -> str:
    return (f"{config.model} {config.resolution}x{config.resolution}, {config.steps} steps "
            f"({config.guided_steps} guided), {device_name(device)}, {dtype_name(dtype)}\n"
            f"{'variant':26s} {'seconds':>9s} {'x plain':>8s} {'peak GiB':>9s} {'sampling GiB':>13s} "
            f"{'start GiB':>10s}")


def format_row(row: BenchRow) -> str:
    if row.error is not None:
        return f"{row.variant:26s} failed: {row.error}"
    ratio, peak, sampling, start = (f"{value:.2f}" if value is not None else "n/a"
                                    for value in (row.ratio, row.peak_gib, row.sampling_peak_gib, row.start_gib))
    return f"{row.variant:26s} {row.seconds:9.3f} {ratio:>8s} {peak:>9s} {sampling:>13s} {start:>10s}"


def report_entry(config: BenchConfig, device: torch.device, dtype: torch.dtype, rows: list[BenchRow]) -> dict:
    """One model's rows and the conditions they were measured under, for ``--json`` (a model that could not run at
    all is ``{"model", "error", "rows": []}``)."""
    return {"model": config.model, "size": config.resolution, "steps": config.steps,
            "guided_steps": config.guided_steps, "repeats": config.repeats, "device": device_name(device),
            "dtype": dtype_name(dtype), "rows": [dataclasses.asdict(row) for row in rows]}


def decoded(pipe, latents: torch.Tensor, in_bands: bool) -> torch.Tensor:
    """The pipeline's decode, in bands or whole (whatever its default), for this call only."""
    before, pipe.banded_decode = pipe.banded_decode, in_bands
    try:
        return pipe.decode(latents, "pt")
    finally:
        pipe.banded_decode = before


class AttentionSwitch(SamplingAttnProcessor):
    """Each attention layer's processor for the per-step benchmarks: diffusers' own while ``switch["ours"]`` is false,
    else ours as a generation samples with it (one context cache for all calls, as over a generation's steps;
    recording switched on in place, as in a generation). Installed once, switched by a flag: swapping processors
    costs milliseconds per call on SDXL, which a step's time would count."""

    def __init__(self, projections: ContextProjections, theirs, switch: dict):
        super().__init__(projections)
        self.theirs, self.switch = theirs, switch

    def __call__(self, *args, **kwargs):
        if self.switch["ours"]:
            return super().__call__(*args, **kwargs)
        return self.theirs(*args, **kwargs)


AttentionSwitch.__call__.__signature__ = SamplingAttnProcessor.__call__.__signature__  # diffusers reads it per call


def switched_forward(attn, *args, **kwargs):
    """A layer's forward under :class:`AttentionSwitch`: :func:`sampling_forward` as a generation's layers run while
    ours are on, diffusers' ``Attention.forward`` otherwise."""
    forward = sampling_forward if attn.processor.switch["ours"] else type(attn).forward
    return forward(attn, *args, **kwargs)


def switched_block_forward(module, lean: Callable, switch: dict, *args, **kwargs):
    """The forward of a module :func:`~omniportrait.blocks.lean_forward` covers (transformer block, resnet,
    ``Transformer2DModel``) under :func:`switchable_attention`: ``lean`` while ours are on, diffusers' otherwise."""
    if switch["ours"]:
        return lean(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def switchable_attention(unet, contexts: list[torch.Tensor]) -> Callable[[Callable], Callable]:
    """Install :class:`AttentionSwitch` processors and :func:`switched_block_forward` on ``unet``; returns
    ``ours(call)``, which runs ``call`` with our processors and blocks (without, a call runs diffusers'). The
    ``contexts``' keys and values are projected beforehand, as on every step of a generation but its first, so that
    no step's time or memory counts them."""
    installed = [p for p in unet.attn_processors.values() if isinstance(p, AttentionSwitch)]
    switch = installed[0].switch if installed else {"ours": False}  # a second call reuses the first's switch
    projections = ContextProjections()
    for module in unet.modules():
        if hasattr(module, "set_processor") and is_diffusers_default(module.get_processor()):
            module.set_processor(AttentionSwitch(projections, module.get_processor(), switch))
            module.forward = switched_forward.__get__(module)
        if getattr(module, "is_cross_attention", False) and isinstance(module.get_processor(), AttentionSwitch):
            with torch.no_grad():
                for context in contexts:
                    module.get_processor().projections.key_value(module, context, project_key_value)
    for module, lean in lean_forwards(unet).items():  # none on a second call: their forward is set
        module.forward = partial(switched_block_forward, module, lean, switch)

    def ours(call: Callable) -> Callable:
        def run():
            switch["ours"] = True
            try:
                return call()
            finally:
                switch["ours"] = False
        return run
    return ours


def step_calls(pipe, reference, size: int, device: torch.device, graphs: bool | None = None) -> dict:
    """Zero-argument calls of one sampling step at a guided timestep, per kind of step, for the per-step
    benchmarks (``benchmarks/profile_step.py``, ``benchmarks/count_ops.py``).

    ``plain`` is diffusers' UNet call; every other step runs as in our generation (:func:`switchable_attention`),
    ``plain-ours`` being our unguided step without recording (guidance off). Each call starts as a sampling step
    does, with no attention recorded yet (by any feature pass's state).
    ``guided-cfg-gelu`` and ``guided-split-gelu`` recompute only the feed-forward's gate (``--rb-recompute gelu``).
    With
    ``graphs`` (default: on CUDA), ``plain+record-graph``, ``guided-cfg-graph`` and ``guided-split-graph`` are
    those steps as CUDA graphs.
    """
    from omniportrait.guidance.config import FEATURE_PASSES
    from omniportrait.guidance.rb import ReferenceGuidance
    from omniportrait.pipelines import Identity

    with torch.no_grad():  # as in a generation
        bound = pipe.bind_identities(PROMPT, [Identity(reference, "woman")])
        cond = pipe.encode_text(PROMPT, None, 1, True, size, size, bound)
    pipe.scheduler.set_timesteps(50, device=device)  # on the GPU, as the pipeline has them
    t = pipe.scheduler.timesteps[30]
    side = size // pipe.vae_scale_factor
    latents = torch.randn(1, 4, side, side, device=device, dtype=pipe.unet.dtype)
    configs = {name: replace(EAGER, feature_pass=name) for name in FEATURE_PASSES}
    configs.update({f"{name}-gelu": replace(configs[name], recompute="gelu") for name in GRAPHED_PASSES})
    if graphs is None:
        graphs = device.type == "cuda"
    if graphs:  # captured once, replayed on the later calls
        configs.update({f"{name}-graph": replace(configs[name], cuda_graph=True) for name in GRAPHED_PASSES})
        configs["record-graph"] = configs["cfg-graph"]  # its own state, which never captures a guided step
    guidance = {name: ReferenceGuidance(pipe, config, bound, size, size, 1) for name, config in configs.items()}

    def fresh(name: str) -> ReferenceGuidance:
        for state in guidance.values():
            state.store.clear()
        return guidance[name]

    ours = switchable_attention(pipe.unet, [cond.prompt_embeds, *cond.prompt_embeds.chunk(2)])  # CFG, its halves
    calls = {"plain": lambda: pipe.predict_noise(latents, t, 0, cond, 7.5),
             "plain-ours": ours(lambda: pipe.predict_noise(latents, t, 0, cond, 7.5)),
             "plain+record": ours(lambda: fresh("cfg").plain_noise(latents, t, cond, 7.5))}
    if "record-graph" in guidance:
        calls["plain+record-graph"] = ours(lambda: fresh("record-graph").plain_noise(latents, t, cond, 7.5))
    for name in [name for name in guidance if name != "record-graph"]:
        calls[f"guided-{name}"] = ours(lambda name=name: fresh(name).guided_noise(latents, t, cond, 7.5))
    calls["vae-decode"] = lambda: fresh("cfg") and decoded(pipe, latents, in_bands=False)
    calls["vae-decode-banded"] = lambda: fresh("cfg") and decoded(pipe, latents, in_bands=True)
    calls["bind-identities"] = lambda: pipe.bind_identities(PROMPT, [Identity(reference, "woman")])
    return calls
