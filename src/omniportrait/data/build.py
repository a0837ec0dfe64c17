"""Build an OmniPortrait-1M style training set (paper §4.1 and appendix A.1): plan, filter, annotate, shard.

The inputs are planned once, in a fixed order (:mod:`omniportrait.data.sources`), and cut into shards of
``shard_size`` consecutive inputs: shard ``i`` always holds the records of inputs
``i·shard_size … (i+1)·shard_size − 1`` that pass the filters, named by their plan position. A worker
builds one whole shard (:func:`process_shard`): read, filter (:mod:`omniportrait.data.filters`), detect the
face and the person, caption, find the person noun, align the face crop; then it publishes the shard
atomically and, last, its stats file. A shard counts as finished when its stats file exists, so a build
killed at any moment and rerun with the same arguments skips the finished shards, rebuilds the others and
ends with byte-identical shards.

Layout of the output folder::

    build.json                     arguments that decide the records, input kind, count and digest
    shards/shard-000000.tar        webdataset shard (--format folder: shards/shard-000000/ with plain files)
    stats/shard-000000.json        counts per reason, index rows, rejected inputs, time (written last)
    index.parquet                  one row per record (see omniportrait.data.records.index_row)
    report.md, report/*.png        counts per filter and the paper's Fig. 8 histograms

Shards run in this process (``workers=0``), in a local process pool (``workers=N``, the default is one per
CPU) or as Ray tasks (``ray_address``). Each worker process creates its face analyzer, captioner and
noun extractor once and reuses them for every shard it builds.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import re
import socket
import uuid
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from omniportrait.data.captions import (
    check_plugin_specs,
    make_captioner,
    make_face_analyzer,
    make_noun_extractor,
    metadata_caption,
)
from omniportrait.data.filters import (
    KEPT,
    FilterConfig,
    face_count_reason,
    metadata_score,
    person_reason,
    score_reason,
    size_reason,
)
from omniportrait.data.manifest import BUILD_FILE, BuildResult, flat_arguments
from omniportrait.data.records import TrainingRecord, index_row, record_to_sample
from omniportrait.data.report import finish_build
from omniportrait.data.shards import FolderShardWriter, TarShardWriter, remove_stale_temporaries
from omniportrait.data.sources import (
    InputReadError,
    InputRef,
    RawInput,
    detect_input_kind,
    download_url_table,
    expand_shard_paths,
    plan_digest,
    plan_folder,
    plan_tar_shards,
    read_input,
    require_img2dataset,
    url_table_columns,
)
from omniportrait.errors import ConfigError, DatasetBuildError, InvalidImageError, MissingDependencyError
from omniportrait.files import write_json_atomic

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "DEFAULT_FACE_SIZE",
    "BuildConfig",
    "BuildResult",
    "ShardTask",
    "Rejection",
    "build_dataset",
    "plan_inputs",
    "shard_tasks",
    "process_shard",
    "annotate_input",
    "shard_name",
    "record_key",
]

DEFAULT_SHARD_SIZE = 1000
"""Inputs per shard (a shard holds the records of that many consecutive inputs that pass the filters)."""

DEFAULT_FACE_SIZE = 224
"""Side of the aligned face crop: the CLIP ViT-L/14 input of the Pivot ID Encoder (DESIGN §2)."""

INPUT_FORMATS = ("auto", "folder", "webdataset", "urls")
OUTPUT_FORMATS = ("webdataset", "folder")
SHARDS_DIR = "shards"
STATS_DIR = "stats"
RUN_FILE = ".run"
"""Names the build run that owns the output folder now; a worker of an earlier run publishes nothing."""
DOWNLOAD_DIR = "download"
BUILD_FORMAT_VERSION = 1
RAY_CONNECT_TIMEOUT_S = 5.0
"""How long ``--ray HOST:PORT`` waits for the head node to answer before giving up."""


def default_workers() -> int:
    """One worker process per CPU."""
    return os.cpu_count() or 1


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs; the fields in :meth:`fingerprint` decide the records.

    Attributes:
        input: a folder of images (with ``NAME.txt`` / ``NAME.json`` sidecars), ``.tar`` shards (folder,
            file, brace pattern or glob) or a ``.parquet``/``.csv``/``.tsv`` URL table.
        output: the build folder (see the module docstring for its layout).
        input_format: ``auto`` (from the path), ``folder``, ``webdataset`` or ``urls``.
        output_format: ``webdataset`` (tar shards, default) or ``folder`` (plain files per record).
        shard_size: inputs per shard.
        filters: the paper's thresholds (:class:`~omniportrait.data.filters.FilterConfig`).
        face_size: side of the aligned face crop in pixels.
        face_analyzer: ``mediapipe`` or ``package.module:factory`` returning a ``FaceAnalyzer``.
        captioner: ``metadata``, ``blip2`` or ``package.module:factory`` (see :mod:`~omniportrait.data.captions`).
        captioner_model: BLIP-2 checkpoint for ``captioner="blip2"``.
        recaption: caption every image with the captioner, ignoring captions in the metadata.
        noun_extractor: ``rules`` or ``package.module:factory``.
        url_col: URL column of a URL table.
        caption_col: caption column of a URL table.
        workers: ``0``: build in this process; ``N``: a local pool of N processes (default: CPU count);
            with ``ray_address="local"``, the CPUs of the local Ray instance.
        ray_address: run shards as Ray tasks: ``auto`` (a cluster started with ``ray start``),
            ``ray://HOST:10001``, ``HOST:6379``, or ``local`` (start a local instance). An already
            initialised Ray session is used as it is.
        progress: show a progress bar over shards.
    """

    input: str
    output: str
    input_format: str = "auto"
    output_format: str = "webdataset"
    shard_size: int = DEFAULT_SHARD_SIZE
    filters: FilterConfig = field(default_factory=FilterConfig)
    face_size: int = DEFAULT_FACE_SIZE
    face_analyzer: str = "mediapipe"
    captioner: str = "metadata"
    captioner_model: str | None = None
    recaption: bool = False
    noun_extractor: str = "rules"
    url_col: str = "url"
    caption_col: str = "caption"
    workers: int = field(default_factory=default_workers)
    ray_address: str | None = None
    progress: bool = True

    def fingerprint(self) -> dict:
        """The arguments that decide the records, as stored in ``build.json`` (JSON types only)."""
        values = dataclasses.asdict(self)
        for name in ("output", "workers", "ray_address", "progress"):
            values.pop(name)
        return json.loads(json.dumps(values))


@dataclass(frozen=True)
class ShardTask:
    """One shard to build: its number, the plan position of its first input, and its inputs."""

    config: BuildConfig
    index: int
    first: int
    refs: tuple[InputRef, ...]
    run_id: str = ""
    """The build run this task belongs to; it publishes only while the output folder's run file names it
    (empty: no check)."""


@dataclass(frozen=True)
class Rejection:
    """Why an input did not become a record: a reason of :data:`~omniportrait.data.filters.REASONS`."""

    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "detail", readable_detail(self.detail))


_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def readable_detail(text: str) -> str:
    """``text`` without Python object addresses (PIL names the in-memory file it could not read as
    ``<_io.BytesIO object at 0x7f…>``): stats and reports stay the same from run to run and mean something."""
    return _OBJECT_REPR.sub(lambda match: "the input's bytes" if match.group(1).endswith("BytesIO")
                            else f"a {match.group(1).rpartition('.')[2]}", text)


def shard_name(index: int) -> str:
    """``shard-000012``: shards sort by name in plan order."""
    return f"shard-{index:06d}"


def record_key(position: int) -> str:
    """A record's key: its input's plan position, nine digits (webdataset keys must not contain dots)."""
    return f"{position:09d}"


def build_dataset(config: BuildConfig) -> BuildResult:
    """Build (or resume) the dataset described by ``config``; see the module docstring.

    Raises:
        ConfigError: bad arguments, a missing or empty input, no caption source, or an output folder
            holding a different build; raised before anything is written.
        MissingDependencyError: a URL table without ``img2dataset``, ``--ray`` without Ray.
        DatasetBuildError: a worker process died; rerun the same command to resume.
    """

    started = time.perf_counter()
    config = _normalized(config)
    _validate(config)
    kind = config.input_format if config.input_format != "auto" else detect_input_kind(config.input)
    output = Path(config.output)
    previous = _read_previous_build(output, config)
    check_plugin_specs(config.face_analyzer, config.captioner, config.noun_extractor)
    if kind == "urls":
        _check_url_table(config)
    refs = plan_inputs(config, kind, previous)
    if not refs:
        raise ConfigError(f"--input '{config.input}' holds no images to build from; check the path")
    _check_captions_available(refs, config)
    digest = plan_digest(refs)
    _write_build_file(output, config, kind, refs, digest, previous)
    run_id = _claim_output(output)
    tasks = [dataclasses.replace(task, run_id=run_id) for task in shard_tasks(refs, config)]
    pending = [task for task in tasks if not _shard_finished(output, task.index, config.output_format)]
    for folder in (output / SHARDS_DIR, output / STATS_DIR):
        remove_stale_temporaries(folder)
    _run_tasks(pending, config, already_done=len(tasks) - len(pending), total=len(tasks))
    return finish_build(output, config, len(refs), len(tasks), len(pending), time.perf_counter() - started)


def _normalized(config: BuildConfig) -> BuildConfig:
    """Absolute paths, so that pool and Ray workers see the same files whatever their directory."""
    is_pattern = any(char in config.input for char in "{*?[")
    source = config.input if is_pattern else os.path.abspath(os.path.expanduser(config.input))
    return dataclasses.replace(config, input=source, output=os.path.abspath(os.path.expanduser(config.output)))


def _validate(config: BuildConfig) -> None:
    """One-line errors for argument values that cannot work."""
    if config.input_format not in INPUT_FORMATS:
        raise ConfigError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, not '{config.input_format}'")
    if config.output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, not '{config.output_format}'")
    if config.shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {config.shard_size}")
    if config.face_size < 16:
        raise ConfigError(f"--face-size must be at least 16 pixels, got {config.face_size}")
    if config.workers < 0:
        raise ConfigError(f"--workers must be 0 (this process) or more, got {config.workers}")
    if config.filters.min_side < 0:
        raise ConfigError(f"--min-side must be 0 or more, got {config.filters.min_side}")
    if config.filters.person_tolerance < 0:
        raise ConfigError(f"--person-tolerance must be 0 or more, got {config.filters.person_tolerance}")
    if os.path.isfile(config.output):
        raise ConfigError(f"--output '{config.output}' is a file; pass a folder for the build")


def _read_previous_build(output: Path, config: BuildConfig) -> dict | None:
    """The ``build.json`` of an earlier run of this build, or ``None`` for a new one.

    Refuses a folder that holds other files, or a build made with different arguments.
    """
    build_file = output / BUILD_FILE
    if not build_file.is_file():
        if output.is_dir() and any(not p.name.startswith(".") for p in output.iterdir()):
            raise ConfigError(
                f"--output '{output}' is not empty and holds no {BUILD_FILE}; pass a new or empty folder"
            )
        return None
    try:
        previous = json.loads(build_file.read_text())
        arguments = previous["arguments"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"'{build_file}' is unreadable ({err}); delete the folder or choose another --output") from err
    before, now = flat_arguments(arguments), flat_arguments(config.fingerprint())
    changed = [f"{name}: {before.get(name)!r} -> {now.get(name)!r}" for name in sorted(set(before) | set(now))
               if before.get(name) != now.get(name)]
    if changed:
        raise ConfigError(
            f"--output '{output}' holds a build made with different arguments ({'; '.join(changed)}); "
            "rerun with the same arguments to resume it, or choose another --output"
        )
    return previous


def _check_url_table(config: BuildConfig) -> None:
    """The URL table has the URL column, and captions come from somewhere; img2dataset is installed."""
    columns = url_table_columns(config.input)
    if config.url_col not in columns:
        raise ConfigError(
            f"the URL table '{config.input}' has no column '{config.url_col}' (columns: {', '.join(columns)}); "
            "pass --url-col"
        )
    if config.caption_col not in columns and config.captioner == "metadata":
        raise ConfigError(
            f"the URL table '{config.input}' has no caption column '{config.caption_col}' and no captioner is "
            "configured; pass --caption-col or --captioner blip2"
        )
    require_img2dataset()


def plan_inputs(config: BuildConfig, kind: str, previous: dict | None = None) -> list[InputRef]:
    """Every input of the build in plan order (downloading a URL table first)."""
    if kind == "folder":
        if not os.path.isdir(config.input):
            raise ConfigError(f"--input '{config.input}' is not a folder of images")
        return plan_folder(config.input, exclude=config.output)
    if kind == "webdataset":
        return plan_tar_shards(expand_shard_paths(config.input))
    if kind == "urls":
        output = Path(config.output)
        if previous is None:
            _write_build_file(output, config, kind, [], None, None)
        columns = url_table_columns(config.input)
        extra = [c for c in (*config.filters.aesthetic_keys, *config.filters.watermark_keys) if c in columns]
        caption_col = config.caption_col if config.caption_col in columns else None
        shards = download_url_table(
            config.input, str(output / DOWNLOAD_DIR), url_col=config.url_col, caption_col=caption_col,
            extra_columns=extra, processes=max(1, config.workers), shard_size=config.shard_size,
        )
        return plan_tar_shards(shards)
    raise ConfigError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, not '{kind}'")


def _check_captions_available(refs: list[InputRef], config: BuildConfig) -> None:
    """Without a captioner, at least one input must bring a caption sidecar or metadata."""
    if config.captioner == "metadata" and not any(ref.has_caption_source for ref in refs):
        raise ConfigError(
            f"no input of '{config.input}' has a caption (NAME.txt, or NAME.json with a 'caption') and no "
            "captioner is configured; add caption sidecars or pass --captioner blip2"
        )


def _write_build_file(output: Path, config: BuildConfig, kind: str, refs: list[InputRef], digest: str | None,
                      previous: dict | None) -> None:
    """Create ``build.json``, or check that the input still plans to what the earlier run planned."""
    from omniportrait import __version__

    if previous is not None and previous.get("plan_digest") and digest is not None:
        if previous["plan_digest"] != digest:
            raise ConfigError(
                f"the input changed since the build in '{output}' started ({previous.get('inputs')} inputs then, "
                f"{len(refs)} now); restore it, or choose another --output"
            )
        return
    write_json_atomic(output / BUILD_FILE, {
        "format": BUILD_FORMAT_VERSION,
        "omniportrait": __version__,
        "arguments": config.fingerprint(),
        "input_kind": kind,
        "inputs": len(refs),
        "shard_size": config.shard_size,
        "shards": -(-len(refs) // config.shard_size) if refs else 0,
        "plan_digest": digest,
    }, indent=1, sort_keys=True)


def shard_tasks(refs: list[InputRef], config: BuildConfig) -> list[ShardTask]:
    """Cut the plan into consecutive shards of ``config.shard_size`` inputs."""
    size = config.shard_size
    return [ShardTask(config, index, start, tuple(refs[start : start + size]))
            for index, start in enumerate(range(0, len(refs), size))]


def _claim_output(output: Path) -> str:
    """Make this run the owner of ``output``: a fresh run id in its run file, which workers check before they
    publish, so a worker left over from a killed run cannot write into the folder this run builds."""
    run_id = uuid.uuid4().hex
    write_json_atomic(output / RUN_FILE, {"run": run_id, "pid": os.getpid(), "host": socket.gethostname()})
    return run_id


def _check_still_owner(output: Path, task: ShardTask) -> None:
    """``DatasetBuildError`` when another run took over ``output`` since ``task`` was handed out."""
    if not task.run_id:
        return
    try:
        owner = json.loads((output / RUN_FILE).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner != task.run_id:
        raise DatasetBuildError(f"{output} is now built by another run; shard {task.index} of this one is "
                                "not published")


def _shard_path(output: Path, index: int, output_format: str) -> Path:
    suffix = ".tar" if output_format == "webdataset" else ""
    return output / SHARDS_DIR / f"{shard_name(index)}{suffix}"


def _stats_path(output: Path, index: int) -> Path:
    return output / STATS_DIR / f"{shard_name(index)}.json"


def _shard_finished(output: Path, index: int, output_format: str) -> bool:
    """Finished: the shard and, written after it, its stats file both exist."""
    return _stats_path(output, index).is_file() and _shard_path(output, index, output_format).exists()


# ---------------------------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class _Components:
    analyzer: object
    captioner: object | None
    noun_extractor: object


@functools.lru_cache(maxsize=2)
def worker_components(analyzer: str, captioner: str, captioner_model: str | None, noun_extractor: str) -> _Components:
    """The face analyzer, captioner and noun extractor of this process, created on first use."""
    return _Components(make_face_analyzer(analyzer), make_captioner(captioner, captioner_model),
                       make_noun_extractor(noun_extractor))


def process_shard(task: ShardTask) -> dict:
    """Build one shard: annotate its inputs, publish the shard, then its stats file; return the stats."""
    started, started_cpu = time.perf_counter(), time.process_time()
    config = task.config
    output = Path(config.output)
    components = worker_components(config.face_analyzer, config.captioner, config.captioner_model,
                                   config.noun_extractor)
    shard_path = _shard_path(output, task.index, config.output_format)
    writer = TarShardWriter(shard_path) if config.output_format == "webdataset" else FolderShardWriter(shard_path)
    counts: Counter = Counter()
    rows, rejected = [], []
    try:
        for offset, ref in enumerate(task.refs):
            key = record_key(task.first + offset)
            outcome = annotate_input(ref, key, config, components)
            if isinstance(outcome, Rejection):
                counts[outcome.reason] += 1
                rejected.append({"key": key, "source": ref.source, "reason": outcome.reason, "detail": outcome.detail})
                continue
            record, source_bytes = outcome
            writer.add(key, record_to_sample(record, source_bytes))
            rows.append(index_row(record, shard_path.name))
            counts[KEPT] += 1
        _check_still_owner(output, task)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    stats = {
        "shard": shard_path.name,
        "index": task.index,
        "inputs": len(task.refs),
        "counts": dict(sorted(counts.items())),
        "records": rows,
        "rejected": rejected,
        "seconds": round(time.perf_counter() - started, 4),
        "cpu_seconds": round(time.process_time() - started_cpu, 4),
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }
    _check_still_owner(output, task)
    write_json_atomic(_stats_path(output, task.index), stats, indent=1, sort_keys=True)
    return stats


def annotate_input(ref: InputRef, key: str, config: BuildConfig, components: _Components):
    """``(TrainingRecord, source image bytes)`` for an input that passes every filter, else a
    :class:`Rejection`. Never raises for a bad input: unexpected errors become ``failed``."""
    try:
        return _annotate(ref, key, config, components)
    except Exception as err:  # one broken input must not stop a million-image build
        return Rejection("failed", f"{type(err).__name__}: {err}")


def _annotate(ref: InputRef, key: str, config: BuildConfig, components: _Components):
    """The filter chain of :mod:`omniportrait.data.filters`, in its documented order."""
    try:
        raw = read_input(ref)
    except InputReadError as err:
        return Rejection("corrupt", str(err))
    image = _decode_checked(raw, config.filters)
    if isinstance(image, Rejection):
        return image
    reason = score_reason(raw.metadata, config.filters)
    if reason:
        return Rejection(reason)
    faces = components.analyzer.analyze(image)
    reason = face_count_reason(faces)
    if reason:
        return Rejection(reason, f"{len(faces)} faces")
    face = faces[0]
    reason = person_reason(face, config.filters)
    if reason:
        return Rejection(reason, f"face box {_box_text(face.box)}, person box {_box_text(face.person_box)}")
    caption = _choose_caption(raw, image, components.captioner, config.recaption)
    if caption is None:
        return Rejection("no_caption")
    noun = components.noun_extractor.extract(caption)
    if noun is None:
        return Rejection("no_person_noun", caption[:200])
    return _make_record(key, ref, raw, image, face, caption, noun, config), raw.data


def _decode_checked(raw: RawInput, filters: FilterConfig) -> Image.Image | Rejection:
    """The upright RGB image, or ``corrupt`` / ``too_small`` (checked on the header, before decoding)."""
    from omniportrait.images import MAX_PIXELS, load_image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(raw.data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            return Rejection("corrupt", f"decompression bomb or over the pixel limit: {err}")
        except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError ...
            return Rejection("corrupt", f"not a readable image: {err}")
        with opened:
            reason = size_reason(opened.size, filters)
            if reason:
                return Rejection(reason, f"{opened.size[0]}x{opened.size[1]}")
            if opened.size[0] * opened.size[1] > MAX_PIXELS:
                return Rejection("corrupt", f"{opened.size[0]}x{opened.size[1]} is over the pixel limit")
            try:
                return load_image(opened)
            except InvalidImageError as err:
                return Rejection("corrupt", str(err))


def _choose_caption(raw: RawInput, image: Image.Image, captioner, recaption: bool) -> str | None:
    """The metadata caption, or the captioner's when there is none (or always with ``recaption``)."""
    given = metadata_caption(raw.caption, raw.metadata)
    if captioner is not None and (recaption or given is None):
        return captioner.caption(image).strip() or None
    return given


def _make_record(key, ref, raw, image, face, caption, noun, config: BuildConfig) -> TrainingRecord:
    """Align the face crop and assemble the record."""
    from omniportrait.faces import align_face

    aligned = align_face(image, face, config.face_size)
    return TrainingRecord(
        key=key,
        image=image,
        caption=caption,
        class_word=caption[noun.start : noun.end],
        class_lemma=noun.lemma,
        class_span=(noun.start, noun.end),
        face_crop=aligned.image,
        face_mask=face.mask,
        face_crop_mask=aligned.mask,
        face_box=tuple(float(v) for v in face.box),
        person_box=tuple(float(v) for v in face.person_box),
        face_score=float(face.score),
        crop_matrix=aligned.matrix,
        source=ref.source,
        aesthetic=metadata_score(raw.metadata, config.filters.aesthetic_keys),
        watermark=metadata_score(raw.metadata, config.filters.watermark_keys),
        metadata=raw.metadata,
    )


def _box_text(box) -> str:
    return "none" if box is None else "(" + ", ".join(f"{v:.0f}" for v in box) + ")"


# -------------------------------------------------------------------------------------------- executors


def _run_tasks(tasks: list[ShardTask], config: BuildConfig, *, already_done: int, total: int) -> None:
    """Build ``tasks`` here, in a process pool or on Ray, with a progress bar over all shards."""
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=already_done, unit="shard", desc="build-dataset", disable=not config.progress,
              dynamic_ncols=True) as bar:
        def on_done(stats: dict) -> None:
            bar.update(1)
            bar.set_postfix(kept=stats["counts"].get(KEPT, 0), refresh=False)

        if not tasks:
            return
        if config.ray_address:
            _run_on_ray(tasks, config, on_done)
        elif config.workers == 0:
            for task in tasks:
                on_done(process_shard(task))
        else:
            _run_in_pool(tasks, config.workers, on_done)


def _run_in_pool(tasks: list, workers: int, on_done: Callable[[dict], None], build=None) -> None:
    """A local pool of ``workers`` spawned processes (MediaPipe and torch are not fork-safe) running
    ``build(task)`` (default :func:`process_shard`); each worker dies with this process
    (:func:`~omniportrait.processes.die_with_parent`)."""
    from omniportrait.processes import die_with_parent

    build = build or process_shard
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context,
                                                initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(build, task) for task in tasks]
        try:
            for future in concurrent.futures.as_completed(futures):
                on_done(future.result())
        except concurrent.futures.process.BrokenProcessPool as err:
            raise DatasetBuildError(
                f"a worker process died ({err}); finished shards are kept, rerun the same command to resume"
            ) from err
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _run_on_ray(tasks: list[ShardTask], config: BuildConfig, on_done: Callable[[dict], None]) -> None:
    """One Ray task per shard (1 CPU each); the output folder must be shared by every node."""
    try:
        import ray
    except ImportError as err:
        raise MissingDependencyError(f"--ray needs Ray ({err}); pip install 'omniportrait[dataset]'") from err
    started_here = not ray.is_initialized()
    reaper = _init_ray(ray, config) if started_here else None
    try:
        remote = ray.remote(num_cpus=1, max_retries=2)(process_shard)
        pending = [remote.remote(task) for task in tasks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_done(_ray_result(ray, done[0]))
    finally:
        if started_here:
            ray.shutdown()
        if reaper is not None:
            reaper.kill()
            reaper.wait()


def _init_ray(ray, config: BuildConfig):
    """Connect to the cluster at ``config.ray_address`` or start a local instance for ``local``; for a local
    instance, return the watcher that stops its processes if this one is killed
    (:func:`~omniportrait.processes.reap_when_gone`)."""
    from omniportrait.processes import descendants, reap_when_gone

    address = config.ray_address
    try:
        if address == "local":
            ray.init(num_cpus=config.workers or None, include_dashboard=False, log_to_driver=False)
            return reap_when_gone(os.getpid(), descendants(os.getpid()))
        _check_reachable(address)
        ray.init(address=address, log_to_driver=False)
        return None
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"cannot connect to Ray at '{address}' ({err}); start it with 'ray start --head' or pass --ray local"
        ) from err


def _check_reachable(address: str) -> None:
    """For ``HOST:PORT`` and ``ray://HOST:PORT``, a quick TCP check: Ray itself waits minutes on a dead address."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {host}:{port}: {err}") from err


def _ray_result(ray, ref) -> dict:
    """``ray.get`` that re-raises our own errors as themselves and a dead worker as DatasetBuildError."""
    from omniportrait.errors import OmniPortraitError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, OmniPortraitError):
            raise err.cause from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as err:
        raise DatasetBuildError(
            f"a Ray worker died ({type(err).__name__}); finished shards are kept, rerun the same command to resume"
        ) from err
