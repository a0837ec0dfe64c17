"""The evaluation run (paper §4.2): generate every (setting, reference, prompt, seed) job, score it, report.

Jobs are listed in a fixed order and process ``i`` of ``n`` takes ``jobs[i::n]``: under ``accelerate launch``
(:func:`current_process` reads accelerate's ``PartialState``) every GPU or node takes a disjoint slice;
otherwise one process takes all. Each image is written atomically with a JSON sidecar (its job, the
generation settings and its per-image scores); the sidecar is the completion mark, so an interrupted run
resumes where it stopped and a finished image is never regenerated (nor rescored by the same model).
Each image uses its own ``torch.Generator`` seeded with the job's seed, so it does not depend on the slicing.
When every process is done, the main process reads all sidecars, computes the set metrics (FID) and
writes the report (:mod:`omniportrait.evaluation.report`). The output folder must be shared by all
processes (one machine, or a shared file system across nodes).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from omniportrait.errors import ConfigError
from omniportrait.evaluation.metrics import (
    DEFAULT_METRICS,
    ImageMetric,
    MetricConfig,
    MetricStatus,
    Sample,
    SetMetric,
    build_metrics,
    load_metrics,
)
from omniportrait.evaluation.prompts import DEFAULT_CLASS_WORD, EvalPrompt, resolve_class_words
from omniportrait.evaluation.references import Reference, SkippedReference, list_reference_files, prepare_references
from omniportrait.evaluation.sweep import Setting, Sweep, check_sweep
from omniportrait.files import write_json_atomic
from omniportrait.guidance.config import RBGuidanceConfig

IMAGES_DIR = "images"
GUIDANCE_RUNNING = ("cuda_graph", "recompute")  # RBGuidanceConfig fields that change how, not what, is drawn
SAME_IMAGES = ("device", *GUIDANCE_RUNNING, "banded_decode")  # GenerationConfig fields left out of the resume key
CONFIG_FILE = "evaluate-config.json"


@dataclass(frozen=True)
class GenerationConfig:
    """How images are generated: the model (as ``omniportrait generate``) and the sampling settings (§4.2)."""

    preset: str = "sd15"
    base: str | None = None
    arch: str | None = None
    pivot_encoder: str | None = None
    scheduler: str = "ddim"
    device: str = "auto"
    dtype: str = "auto"
    steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    # Guidance fields that change how, not what, is drawn (GUIDANCE_RUNNING); defaults as RBGuidanceConfig's.
    cuda_graph: bool | None = RBGuidanceConfig.cuda_graph  # CUDA-graph steps (None: where they can run): less host time
    recompute: str = RBGuidanceConfig.recompute  # the backward's recompute (``--rb-recompute``): less memory
    banded_decode: bool | None = None  # decode in bands (``--banded-decode``; None: the pipeline's default): the
    # same images up to rounding, less memory

    def pipeline_kwargs(self, setting_kwargs: dict) -> dict:
        """The keywords of ``pipe(...)`` for one job, given its sweep setting's keywords."""
        kwargs = dict(num_inference_steps=self.steps, guidance_scale=self.guidance_scale, height=self.height,
                      width=self.width, negative_prompt=self.negative_prompt)
        kwargs.update(setting_kwargs)  # a sweep may set any of them
        running = {name: getattr(self, name) for name in GUIDANCE_RUNNING
                   if getattr(self, name) != getattr(RBGuidanceConfig, name)}
        if running:
            kwargs["rb_guidance"] = replace(kwargs.get("rb_guidance") or RBGuidanceConfig(), **running)
        return kwargs


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run.

    Attributes:
        references: folder of reference photos.
        output: folder for images, sidecars and reports (shared by all processes).
        prompts: the Table 3 prompts to use (see :func:`~omniportrait.evaluation.prompts.select_prompts`).
        seeds: seeds ``first_seed … first_seed + seeds - 1`` per (reference, prompt).
        class_words: reference file name (or stem) -> class word; others get ``default_class_word``.
        sweep: one pipeline keyword varied over values (Fig. 5), or ``None``.
        metric_names: ``--metrics`` names to compute (default: all).
    """

    references: Path
    output: Path
    prompts: tuple[EvalPrompt, ...]
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    metrics: MetricConfig = field(default_factory=MetricConfig)
    metric_names: tuple[str, ...] = tuple(DEFAULT_METRICS)
    seeds: int = 1
    first_seed: int = 0
    class_words: dict[str, str] = field(default_factory=dict)
    default_class_word: str = DEFAULT_CLASS_WORD
    face_index: int | None = None
    sweep: Sweep | None = None
    batch_size: int = 8
    progress: bool = True


@dataclass(frozen=True)
class Job:
    """One image to generate and score."""

    setting: Setting
    reference: str
    class_word: str
    prompt: EvalPrompt
    seed: int

    @property
    def text(self) -> str:
        """The prompt with the reference's class word."""
        return self.prompt.render(self.class_word)

    @property
    def relative_path(self) -> Path:
        """``images/<setting>/<reference file name, dots as _>/<category>-<index>-seed<seed>.png``."""
        folder = self.reference.replace(".", "_")
        return Path(IMAGES_DIR, self.setting.label, folder, f"{self.prompt.key}-seed{self.seed}.png")

    def describe(self) -> dict:
        return {"setting": self.setting.label, "reference": self.reference, "class_word": self.class_word,
                "category": self.prompt.category, "prompt_index": self.prompt.index, "prompt": self.text,
                "seed": self.seed, "image": self.relative_path.as_posix()}


@dataclass
class ProcessInfo:
    """This process's place in a data-parallel run (``index`` of ``count``)."""

    index: int = 0
    count: int = 1
    device: str | None = None
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait_for_everyone(self) -> None:
        if self.state is not None and self.count > 1:
            self.state.wait_for_everyone()


WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
"""Set by ``accelerate launch`` / ``torchrun`` (or MPI) when several processes run."""


BARRIER_TIMEOUT = timedelta(days=1)
"""How long a process whose slice is done waits at the final barrier for the others (torch's default, 10 minutes for
NCCL, ends a resumed run whose leftover images fell unevenly on the processes)."""


def launched_processes() -> int:
    return max(int(os.environ.get(name, "1") or 1) for name in WORLD_SIZE_VARIABLES)


def current_process(cpu: bool = False) -> ProcessInfo:
    """accelerate's process index, count and device under ``accelerate launch`` or ``torchrun``; else one process.

    accelerate's shared state is only created for a multi-process launch, so a single-process run leaves it
    untouched for other code in the same process. ``cpu`` (or no CUDA) uses the gloo backend on CPU.
    """
    if launched_processes() <= 1:
        return ProcessInfo()
    try:
        import torch
        from accelerate import PartialState
    except ImportError:
        return ProcessInfo()
    state = PartialState(cpu=cpu or not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    if state.num_processes <= 1:
        return ProcessInfo()
    return ProcessInfo(state.process_index, state.num_processes, str(state.device), state)


def build_jobs(settings: list[Setting], references: list[Reference], prompts: Sequence[EvalPrompt],
               seeds: Sequence[int]) -> list[Job]:
    """Every (setting, reference, prompt, seed) combination, in a fixed order."""
    return [Job(setting, reference.name, reference.class_word, prompt, seed)
            for setting in settings for reference in references for prompt in prompts for seed in seeds]


def shard(jobs: list[Job], index: int, count: int) -> list[Job]:
    """Process ``index`` of ``count`` takes every ``count``-th job from ``index``: disjoint slices covering all."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is outside 0..{count - 1}")
    return jobs[index::count]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generation_key(job: Job, config: GenerationConfig, reference_sha: str) -> dict:
    """Everything that determines an image; a finished image is reused only when its key is unchanged (the device
    and the ways of running that keep the image, :data:`SAME_IMAGES`, do not change it; the dtype does, as the one
    ``auto`` stands for on the device)."""
    settings = {k: v for k, v in asdict(config).items() if k not in SAME_IMAGES}
    return {**settings, "dtype": dtype_name(config), "prompt": job.text, "seed": job.seed,
            "reference_sha256": reference_sha, "sweep": job.setting.describe()}


def dtype_name(config: GenerationConfig) -> str:
    """The dtype the images are made in: ``auto`` is fp16 on CUDA and fp32 elsewhere, so a CUDA run does not reuse a
    CPU run's images."""
    from omniportrait.pipelines.loading import resolve_device, resolve_dtype

    return str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")


def read_sidecar(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Workspace:
    """The output folder: images, their sidecars, and the generation key each must match."""

    def __init__(self, output: Path, generation: GenerationConfig, references: list[Reference]) -> None:
        self.output = output
        self.generation = generation
        self.reference_sha = {ref.name: file_sha256(ref.path) for ref in references}

    def image_path(self, job: Job) -> Path:
        return self.output / job.relative_path

    def sidecar_path(self, job: Job) -> Path:
        return self.image_path(job).with_suffix(".json")

    def key(self, job: Job) -> dict:
        return generation_key(job, self.generation, self.reference_sha[job.reference])

    def finished(self, job: Job) -> dict | None:
        """The job's sidecar when its image exists and was made with the current settings, else ``None``."""
        sidecar = read_sidecar(self.sidecar_path(job))
        if sidecar is None or not self.image_path(job).is_file():
            return None
        return sidecar if sidecar.get("generation") == json.loads(json.dumps(self.key(job))) else None


def progress_bar(items, description: str, enabled: bool, process: ProcessInfo, total: int | None = None):
    """A tqdm bar on stderr, labelled with the process when several run."""
    from tqdm.auto import tqdm

    label = description if process.count == 1 else f"{description} [{process.index + 1}/{process.count}]"
    return tqdm(items, desc=label, unit="image", total=total, disable=not enabled, file=sys.stderr)


def load_generation_pipeline(config: GenerationConfig, device: str):
    from omniportrait.pipelines.loading import load_pipeline

    pipe = load_pipeline(config.preset, config.base, config.arch, config.pivot_encoder, device, config.dtype,
                         config.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.banded_decode = config.banded_decode  # None: the pipeline's default
    return pipe


def generate_images(jobs: list[Job], references: dict[str, Reference], workspace: Workspace, config: EvalConfig,
                    process: ProcessInfo, device: str) -> int:
    """Generate the jobs whose image is not finished; returns how many were generated."""
    import torch

    from omniportrait.images import save_image_atomic
    from omniportrait.identity import Identity

    pending = [job for job in jobs if workspace.finished(job) is None]
    if not pending:
        return 0
    gen = config.generation
    pipe = load_generation_pipeline(gen, device)
    check_sweep(config.sweep, pipe.__call__)
    fallbacks = MemoryFallbacks()
    try:
        for job in progress_bar(pending, "generate", config.progress, process):
            kwargs = fallbacks.applied(gen.pipeline_kwargs(job.setting.kwargs))
            started = time.perf_counter()
            output = pipe(job.text, identities=[Identity(references[job.reference].prepared, job.class_word)],
                          generator=torch.Generator("cpu").manual_seed(job.seed), **kwargs)
            fallbacks.learn(output, pipe)
            image = output.images[0]
            del output  # its guidance state, not held through the next image's generation
            save_image_atomic(image, workspace.image_path(job))
            record = {"job": job.describe(), "generation": workspace.key(job), "scores": {}, "score_models": {},
                      "elapsed_s": round(time.perf_counter() - started, 3)}
            write_json_atomic(workspace.sidecar_path(job), record)
    finally:
        del pipe
        release_memory()
    return len(pending)


@dataclass
class MemoryFallbacks:
    """What an image of this run went on with after running out of GPU memory (the ``split`` feature pass, eager
    steps, a banded decode; each gives the same image up to rounding), carried to the later images so that each
    does not first run out of memory again."""

    guidance: dict[str, Any] = field(default_factory=dict)  # RBGuidanceConfig fields

    def learn(self, output, pipe) -> None:
        """Note what ``output``'s call fell back to, with a warning; a banded decode is enabled on ``pipe``."""
        changes = output.memory_fallbacks()
        if output.guidance is not None:
            self.guidance.update(output.guidance.fell_back)
        if output.decode_ran_out_of_memory:
            pipe.enable_banded_decode()
        if changes:
            warnings.warn(f"an image ran out of GPU memory; the later images of this run start with "
                          f"{' and '.join(changes)} (the same images up to rounding)", stacklevel=2)

    def applied(self, kwargs: dict) -> dict:
        """A job's pipeline keywords with what was learned (the ``split`` pass only where ``cfg`` was asked for, as a
        sweep may set another)."""
        asked = kwargs.get("rb_guidance") or RBGuidanceConfig()
        changes = {name: value for name, value in self.guidance.items()
                   if name != "feature_pass" or asked.feature_pass == "cfg"}
        return {**kwargs, "rb_guidance": replace(asked, **changes)} if changes else kwargs


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def needs_score(sidecar: dict, metric: ImageMetric) -> bool:
    """True unless the sidecar holds every column of ``metric``, computed by the same model."""
    scores = sidecar.get("scores", {})
    same_model = sidecar.get("score_models", {}).get(metric.name) == metric.model_name
    return not same_model or any(column.key not in scores for column in metric.columns)


def sample_for(job: Job, workspace: Workspace, references: dict[str, Reference],
               crops: dict[str, Image.Image]) -> Sample:
    reference = references[job.reference]
    if job.reference not in crops:
        crops[job.reference] = reference.face_crop()
    with Image.open(workspace.image_path(job)) as image:
        generated = image.convert("RGB")
    return Sample(generated, job.text, job.reference, reference.image, crops[job.reference])


def score_images(jobs: list[Job], references: dict[str, Reference], workspace: Workspace,
                 statuses: list[MetricStatus], config: EvalConfig, process: ProcessInfo) -> int:
    """Score this process's images with every available per-image metric; returns the number of scores added."""
    sidecars = {job: workspace.finished(job) for job in jobs}
    crops: dict[str, Image.Image] = {}
    added = 0
    for status in statuses:
        metric = status.metric
        if not (status.available and isinstance(metric, ImageMetric)):
            continue
        todo = [job for job, sidecar in sidecars.items() if sidecar is not None and needs_score(sidecar, metric)]
        bar = progress_bar(None, f"score {metric.name}", config.progress and bool(todo), process, total=len(todo))
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start : start + config.batch_size]
            scores = metric.score([sample_for(job, workspace, references, crops) for job in batch])
            for job, values in zip(batch, scores):
                sidecars[job].setdefault("scores", {}).update(values)
                sidecars[job].setdefault("score_models", {})[metric.name] = metric.model_name
                write_json_atomic(workspace.sidecar_path(job), sidecars[job])
            bar.update(len(batch))
            added += len(batch)
        bar.close()
    return added


class LazyImages(Sequence):
    """Image files opened only when sliced, so set metrics never hold every image at once."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.open(path) for path in self.paths[index]]
        return self.open(self.paths[index])

    @staticmethod
    def open(path: Path) -> Image.Image:
        with Image.open(path) as image:
            return image.convert("RGB")


def set_scores(records: list[dict], settings: list[Setting], references: list[Reference], workspace: Workspace,
               statuses: list[MetricStatus]) -> dict[str, dict]:
    """Set metrics (FID) per setting: that setting's generated images against the reference photos."""
    results: dict[str, dict] = {setting.label: {} for setting in settings}
    reference_images = LazyImages([ref.path for ref in references])
    for status in statuses:
        if not (status.available and isinstance(status.metric, SetMetric)):
            continue
        for setting in settings:
            paths = [workspace.output / r["job"]["image"] for r in records if r["job"]["setting"] == setting.label]
            results[setting.label].update(status.metric.score_set(LazyImages(paths), reference_images))
    return results


@dataclass
class EvaluationResult:
    """What the main process produced: the report data and the files written."""

    report: dict
    files: dict[str, Path]
    generated: int
    skipped: list[SkippedReference]


def resolve_settings(sweep: Sweep | None) -> list[Setting]:
    return sweep.settings() if sweep else [Setting()]


def check_sweep_early(config: EvalConfig) -> Sweep | None:
    """Check the sweep against the pipeline class before any model is loaded (when the class is known)."""
    from omniportrait.pipelines.loading import PIPELINE_CLASSES, get_preset

    preset = get_preset(config.generation.preset)
    arch = config.generation.arch or (preset.arch if config.generation.base is None else None)
    return check_sweep(config.sweep, PIPELINE_CLASSES[arch].__call__) if arch else config.sweep


def metric_device(config: EvalConfig, process: ProcessInfo) -> str:
    from omniportrait.pipelines.loading import resolve_device

    return process.device or str(resolve_device(config.generation.device))


def run_evaluation(config: EvalConfig, process: ProcessInfo | None = None) -> EvaluationResult | None:
    """Generate, score and report; returns the result on the main process, ``None`` on the others."""
    from omniportrait.evaluation.report import build_report, write_report

    process = process or current_process(cpu=config.generation.device == "cpu")
    if config.seeds < 1 or config.generation.steps < 1 or config.batch_size < 1:
        raise ConfigError("--seeds, --steps and --batch-size must be at least 1")
    if not config.prompts:
        raise ConfigError("no prompts selected; check --categories, --prompts-per-category and --max-prompts")
    sweep = check_sweep_early(config)
    config = replace(config, sweep=sweep)
    files = list_reference_files(config.references)
    class_words = resolve_class_words([f.name for f in files], config.class_words, config.default_class_word)
    references, skipped = prepare_references(files, class_words, config.face_index, config.progress and process.is_main)
    if not references:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped)
        raise ConfigError(f"no usable reference photo in {config.references} ({reasons})")
    if skipped and process.is_main:
        print(f"warning: skipped {len(skipped)} reference photo(s) without a usable face: "
              + ", ".join(s.name for s in skipped), file=sys.stderr)
    by_name = {ref.name: ref for ref in references}
    settings = resolve_settings(config.sweep)
    seeds = list(range(config.first_seed, config.first_seed + config.seeds))
    jobs = build_jobs(settings, references, config.prompts, seeds)
    mine = shard(jobs, process.index, process.count)
    workspace = Workspace(config.output, config.generation, references)
    device = metric_device(config, process)
    generated = generate_images(mine, by_name, workspace, config, process, device)
    metric_config = replace(config.metrics, device=device)
    statuses = load_metrics([m for m in build_metrics(list(config.metric_names), metric_config)
                             if isinstance(m, ImageMetric) or process.is_main])
    score_images(mine, by_name, workspace, statuses, config, process)
    process.wait_for_everyone()
    if not process.is_main:
        return None
    records = [sidecar for sidecar in map(workspace.finished, jobs) if sidecar is not None]
    sets = set_scores(records, settings, references, workspace, statuses)
    report = build_report(config, settings, references, skipped, statuses, records, sets, len(jobs))
    written = write_report(report, config.output)
    write_json_atomic(config.output / CONFIG_FILE, config_record(config))
    return EvaluationResult(report, written, generated, skipped)


def config_record(config: EvalConfig) -> dict:
    """The run's configuration as JSON (for the record; resuming does not need it)."""
    return {"references": str(config.references), "generation": asdict(config.generation),
            "metrics": asdict(config.metrics), "metric_names": list(config.metric_names), "seeds": config.seeds,
            "first_seed": config.first_seed, "prompts": [p.key for p in config.prompts],
            "class_words": config.class_words, "default_class_word": config.default_class_word,
            "sweep": None if config.sweep is None else {"name": config.sweep.name, "values": list(config.sweep.texts)}}
