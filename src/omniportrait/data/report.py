"""The index and the report of a build (paper appendix A.1 and Fig. 8), rebuilt from the shard stats.

Everything here is derived from ``stats/shard-*.json``, so a resumed build reports the whole dataset,
not only the shards of its last run. Stats files are read one at a time and the index is streamed into
``index.parquet``, so memory stays flat at a million records.

``report.md`` holds the counts per filter (with what remains after each step), the two histograms of the
paper's Fig. 8 as PNG (``report/face_area_ratio.png``: face box area over image area;
``report/face_confidence.png``: face detector confidence), and the throughput measured by the workers.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omniportrait.data.filters import KEPT, REASONS
from omniportrait.data.manifest import BUILD_FILE, BuildResult, flat_arguments
from omniportrait.files import write_bytes_atomic

__all__ = [
    "INDEX_FILE",
    "REPORT_FILE",
    "REPORT_DIR",
    "BuildSummary",
    "INDEX_SCHEMA_FIELDS",
    "load_stats_files",
    "summarize_and_index",
    "plot_histogram",
    "write_report",
    "finish_build",
]

INDEX_FILE = "index.parquet"
REPORT_FILE = "report.md"
REPORT_DIR = "report"
HISTOGRAM_BINS = 50
FAILURES_SHOWN = 20

INDEX_SCHEMA_FIELDS = (
    ("key", "string"), ("shard", "string"), ("source", "string"), ("caption", "string"),
    ("class_word", "string"), ("class_lemma", "string"), ("class_start", "int32"), ("class_end", "int32"),
    ("width", "int32"), ("height", "int32"),
    ("face_x0", "float64"), ("face_y0", "float64"), ("face_x1", "float64"), ("face_y1", "float64"),
    ("person_x0", "float64"), ("person_y0", "float64"), ("person_x1", "float64"), ("person_y1", "float64"),
    ("face_score", "float64"), ("face_area_ratio", "float64"), ("aesthetic", "float64"), ("watermark", "float64"),
)
"""Columns of ``index.parquet`` and their Arrow types (see :func:`omniportrait.data.records.index_row`)."""


@dataclass
class BuildSummary:
    """Totals over every shard's stats."""

    inputs: int = 0
    counts: Counter = field(default_factory=Counter)
    area_ratios: list[float] = field(default_factory=list)
    face_scores: list[float] = field(default_factory=list)
    worker_seconds: float = 0.0
    workers: set = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    def add(self, stats: dict) -> None:
        """Fold one shard's stats in."""
        self.inputs += int(stats["inputs"])
        self.counts.update(stats["counts"])
        self.area_ratios += [row["face_area_ratio"] for row in stats["records"]]
        self.face_scores += [row["face_score"] for row in stats["records"]]
        self.worker_seconds += float(stats.get("seconds", 0.0))
        self.workers.add(stats.get("worker", ""))
        room = FAILURES_SHOWN - len(self.failures)
        if room > 0:
            self.failures += [f"{r['source']}: {r['detail']}" for r in stats["rejected"] if r["reason"] == "failed"][:room]


def load_stats_files(output: Path) -> list[Path]:
    """The stats files of a build, in shard order."""
    return sorted((Path(output) / "stats").glob("shard-*.json"))


def summarize_and_index(output: Path) -> tuple[BuildSummary, Path]:
    """Read every stats file once: fold it into the summary and stream its rows into ``index.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in INDEX_SCHEMA_FIELDS])
    target = Path(output) / INDEX_FILE
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    summary = BuildSummary()
    try:
        with pq.ParquetWriter(temp, schema) as writer:
            for path in load_stats_files(output):
                stats = json.loads(path.read_text())
                summary.add(stats)
                if stats["records"]:
                    writer.write_table(pa.Table.from_pylist(stats["records"], schema=schema))
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return summary, target


def plot_histogram(values: list[float], path: Path, *, title: str, xlabel: str) -> Path:
    """A probability histogram over [0, 1] in :data:`HISTOGRAM_BINS` bins, saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5), dpi=100)
    axes = figure.subplots()
    data = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    if data.size:
        axes.hist(data, bins=np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1), weights=np.full(data.size, 1.0 / data.size),
                  color="#4C72B0", edgecolor="white", linewidth=0.5)
    else:
        axes.text(0.5, 0.5, "no records", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlim(0.0, 1.0)
    axes.set_title(f"{title} (n={data.size})")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("probability")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return write_bytes_atomic(path, buffer.getvalue())


def write_report(output: Path, build_info: dict, summary: BuildSummary, shards: int) -> Path:
    """Write ``report.md`` and its two PNG histograms; return the report's path."""
    output = Path(output)
    plot_histogram(summary.area_ratios, output / REPORT_DIR / "face_area_ratio.png",
                   title="Face-to-image area ratio", xlabel="face box area / image area")
    plot_histogram(summary.face_scores, output / REPORT_DIR / "face_confidence.png",
                   title="Face confidence", xlabel="face detector score")
    text = "\n".join(_report_lines(build_info, summary, shards)) + "\n"
    return write_bytes_atomic(output / REPORT_FILE, text.encode("utf-8"))


def _report_lines(build_info: dict, summary: BuildSummary, shards: int) -> list[str]:
    arguments = build_info.get("arguments", {})
    kept = summary.counts.get(KEPT, 0)
    lines = [
        "# Dataset build report",
        "",
        f"- input: `{arguments.get('input')}` ({build_info.get('input_kind')}, {summary.inputs} inputs)",
        f"- output: {kept} records in {shards} {arguments.get('output_format')} shards of "
        f"{arguments.get('shard_size')} inputs",
        "",
        "## Counts per filter",
        "",
        "Each input is counted under the first check it fails (paper appendix A.1; order as below).",
        "",
        "| step | rejected | share of inputs | remaining |",
        "| --- | ---: | ---: | ---: |",
    ]
    remaining = summary.inputs
    for reason in REASONS:
        count = summary.counts.get(reason, 0)
        remaining -= count
        lines.append(f"| {reason} | {count} | {_share(count, summary.inputs)} | {remaining} |")
    lines += [f"| **kept** | | {_share(kept, summary.inputs)} | **{kept}** |", ""]
    lines += _face_lines(summary)
    lines += _throughput_lines(summary)
    lines += _settings_lines(arguments)
    if summary.failures:
        lines += ["", "## Failed inputs (first ones)", ""] + [f"- {line}" for line in summary.failures]
    return lines


def _face_lines(summary: BuildSummary) -> list[str]:
    lines = [
        "## Face statistics (paper Fig. 8)",
        "",
        f"![Face-to-image area ratio]({REPORT_DIR}/face_area_ratio.png)",
        f"![Face confidence]({REPORT_DIR}/face_confidence.png)",
        "",
    ]
    if summary.area_ratios:
        lines += [
            "| quantity | mean | median | min | max |",
            "| --- | ---: | ---: | ---: | ---: |",
            _stat_row("face-to-image area ratio", summary.area_ratios),
            _stat_row("face confidence", summary.face_scores),
            "",
        ]
    return lines


def _throughput_lines(summary: BuildSummary) -> list[str]:
    if summary.worker_seconds <= 0:
        return []
    rate = summary.inputs / summary.worker_seconds
    return [
        "## Throughput",
        "",
        f"{summary.inputs} inputs in {summary.worker_seconds:.1f} worker-seconds over {len(summary.workers)} "
        f"worker process(es): {rate:.2f} inputs per second per worker (time of the shards' workers, "
        "summed over every run of this build).",
        "",
    ]


def _settings_lines(arguments: dict) -> list[str]:
    lines = ["## Settings", "", "| argument | value |", "| --- | --- |"]
    for name, value in sorted(flat_arguments(arguments).items()):
        lines.append(f"| {name} | `{value}` |")
    return lines


def _stat_row(name: str, values: list[float]) -> str:
    data = np.asarray(values, dtype=np.float64)
    return f"| {name} | {data.mean():.4f} | {np.median(data):.4f} | {data.min():.4f} | {data.max():.4f} |"


def _share(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}%" if total else "-"


def finish_build(output: Path, config, inputs: int, shards: int, built: int, seconds: float):
    """Write the index and the report from every shard's stats; return the :class:`BuildResult`."""
    output = Path(output)
    summary, index_path = summarize_and_index(output)
    build_info = json.loads((output / BUILD_FILE).read_text())
    report_path = write_report(output, build_info, summary, shards)
    counts = {reason: summary.counts.get(reason, 0) for reason in (*REASONS, KEPT)}
    return BuildResult(output=output, inputs=inputs, counts=counts, shards=shards, shards_built=built,
                       index_path=index_path, report_path=report_path, seconds=seconds, failures=summary.failures)
