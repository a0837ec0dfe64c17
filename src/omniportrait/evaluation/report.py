"""Reports: a Table 1-style table, a per-category breakdown (Table 3's six categories) and the Fig. 5 plot.

Files written into the output folder (each atomically):

- ``report.md``: Table 1 (one row per setting), the per-category table, the metric models (or why a metric is
  unavailable), the references used and skipped, notes, and the Fig. 5 plot;
- ``report.csv``: Table 1 as CSV; ``categories.csv``: the per-category breakdown;
- ``report.json``: everything above as data, plus the per-image records' count;
- ``tradeoff.png``: Fig. 5, text alignment (CLIP-T) against identity similarity (SIM; CLIP-I when SIM is
  unavailable), one point per setting of the sweep.

Numbers are means over images (values that do not exist, e.g. SIM against a reference dlib cannot embed,
are left out); an unavailable metric is printed "unavailable", never as a number.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from omniportrait.evaluation.metrics import ImageMetric, MetricStatus
from omniportrait.evaluation.prompts import CATEGORIES
from omniportrait.files import write_text_atomic

REPORT_FILES = {"markdown": "report.md", "csv": "report.csv", "json": "report.json",
                "categories": "categories.csv", "plot": "tradeoff.png"}
UNAVAILABLE = "unavailable"
NOT_AVAILABLE = "n/a"
TEXT_AXIS = ("clip_t",)
IDENTITY_AXIS = ("sim", "clip_i")


def mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def column_table(statuses: list[MetricStatus]) -> list[dict]:
    """Every reported column, in metric order, with its metric's availability."""
    return [{"key": column.key, "label": column.label, "header": column.header,
             "higher_is_better": column.higher_is_better, "metric": status.metric.name,
             "available": status.available, "per_image": isinstance(status.metric, ImageMetric)}
            for status in statuses for column in status.metric.columns]


def aggregate(records: list[dict], columns: list[dict]) -> dict:
    """Mean of each available per-image column over ``records``."""
    return {c["key"]: mean([r.get("scores", {}).get(c["key"]) for r in records]) if c["available"] else None
            for c in columns if c["per_image"]}


def table_rows(records: list[dict], settings, columns: list[dict], sets: dict[str, dict]) -> list[dict]:
    rows = []
    for setting in settings:
        chosen = [r for r in records if r["job"]["setting"] == setting.label]
        values = aggregate(chosen, columns)
        values.update({c["key"]: sets.get(setting.label, {}).get(c["key"]) if c["available"] else None
                       for c in columns if not c["per_image"]})
        rows.append({"setting": setting.label, "sweep": None if setting.name is None else
                     {"name": setting.name, "value": setting.value}, "images": len(chosen), "values": values})
    return rows


def category_rows(records: list[dict], settings, columns: list[dict]) -> list[dict]:
    rows = []
    for setting in settings:
        for category in CATEGORIES:
            chosen = [r for r in records if r["job"]["setting"] == setting.label and r["job"]["category"] == category]
            if chosen:
                rows.append({"setting": setting.label, "category": category, "images": len(chosen),
                             "values": aggregate(chosen, columns)})
    return rows


def notes_for(config, references, skipped, columns: list[dict], found: int, expected: int) -> list[str]:
    notes = []
    defaulted = [ref.name for ref in references if ref.class_word == config.default_class_word
                 and ref.name not in config.class_words and ref.path.stem not in config.class_words]
    if defaulted:
        notes.append(f"{len(defaulted)} reference(s) use the default class word '{config.default_class_word}' "
                     "(not named in --class-words); the paper writes woman/man per reference, which changes "
                     "CLIP-T and BLIP. Name them with --class-words NAME=woman,...")
    if config.generation.preset.startswith("tiny") and config.generation.base is None:
        notes.append(f"preset {config.generation.preset}: random-weight diffusion model; the numbers test the "
                     "evaluation plumbing only.")
    if skipped:
        notes.append(f"{len(skipped)} reference photo(s) skipped (no usable face): "
                     + "; ".join(f"{s.name}: {s.reason}" for s in skipped))
    if found < expected:
        notes.append(f"only {found} of {expected} images were found; rerun the same command to finish the rest.")
    keys = {c["key"] for c in columns if c["available"]}
    if keys & {"fid", "fid_clip"} and len(references) < 2:
        notes.append("FID needs at least 2 reference photos; it is n/a.")
    if "fid_clip" in keys:
        notes.append("FID-CLIP is a Fréchet distance on CLIP image embeddings, not comparable with the paper's "
                     "Inception FID.")
    if "sim" in keys:
        notes.append("SIM: a generated image without a detectable face scores 0 (see 'Face found %').")
    return notes


def plot_axes(columns: list[dict], rows: list[dict]) -> tuple[str | None, str | None, str | None]:
    """(x key, y key, reason when no plot): CLIP-T against SIM, else CLIP-I."""
    def first_with_values(keys):
        return next((key for key in keys if any(row["values"].get(key) is not None for row in rows)), None)

    x, y = first_with_values(TEXT_AXIS), first_with_values(IDENTITY_AXIS)
    if x is None or y is None:
        missing = "CLIP-T" if x is None else "SIM and CLIP-I"
        return x, y, f"Fig. 5 plot not drawn: {missing} has no value (unavailable or not requested)"
    return x, y, None


def build_report(config, settings, references, skipped, statuses: list[MetricStatus], records: list[dict],
                 sets: dict[str, dict], expected: int) -> dict:
    """The whole report as a JSON-ready dict."""
    from omniportrait import __version__

    columns = column_table(statuses)
    rows = table_rows(records, settings, columns, sets)
    x, y, plot_reason = plot_axes(columns, rows)
    gen = config.generation
    return {
        "title": "OmniPortrait evaluation (paper §4.2, Table 1 metrics on the Table 3 prompts)",
        "omniportrait_version": __version__,
        "model": {"preset": gen.preset, "base": gen.base, "pivot_encoder": gen.pivot_encoder,
                  "scheduler": gen.scheduler, "steps": gen.steps, "guidance_scale": gen.guidance_scale,
                  "height": gen.height, "width": gen.width},
        "sweep": None if config.sweep is None else {"name": config.sweep.name, "values": list(config.sweep.texts)},
        "prompts": len(config.prompts), "seeds": config.seeds,
        "columns": columns,
        "metrics": [status.describe() for status in statuses],
        "rows": rows,
        "categories": category_rows(records, settings, columns),
        "references": {"used": [{"name": r.name, "class_word": r.class_word} for r in references],
                       "skipped": [{"name": s.name, "reason": s.reason} for s in skipped]},
        "images": {"expected": expected, "found": len(records)},
        "plot": {"x": x, "y": y, "file": REPORT_FILES["plot"] if plot_reason is None else None,
                 "reason": plot_reason},
        "notes": notes_for(config, references, skipped, columns, len(records), expected),
    }


def format_value(value, column: dict) -> str:
    if not column["available"]:
        return UNAVAILABLE
    return NOT_AVAILABLE if value is None else f"{value:.2f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def table1_markdown(report: dict) -> str:
    columns = report["columns"]
    headers = ["Setting", "Images"] + [c["header"] for c in columns]
    rows = [[row["setting"], str(row["images"])] + [format_value(row["values"].get(c["key"]), c) for c in columns]
            for row in report["rows"]]
    return markdown_table(headers, rows)


def categories_markdown(report: dict) -> str:
    columns = [c for c in report["columns"] if c["per_image"]]
    headers = ["Setting", "Category", "Images"] + [c["header"] for c in columns]
    rows = [[row["setting"], row["category"], str(row["images"])]
            + [format_value(row["values"].get(c["key"]), c) for c in columns] for row in report["categories"]]
    return markdown_table(headers, rows)


def metrics_markdown(report: dict) -> str:
    lines = []
    for metric in report["metrics"]:
        state = "" if metric["available"] else f" — **unavailable**: {metric['reason']}"
        lines.append(f"- **{metric['name']}** ({metric['kind']}): {metric['model']}{state}")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    model = report["model"]
    sweep = report["sweep"]
    used, skipped = report["references"]["used"], report["references"]["skipped"]
    parts = [
        f"# {report['title']}",
        f"Model: preset `{model['preset']}`" + (f", base `{model['base']}`" if model["base"] else "")
        + (f", pivot encoder `{model['pivot_encoder']}`" if model["pivot_encoder"] else "")
        + f"; {model['scheduler']}, {model['steps']} steps, CFG {model['guidance_scale']}"
        + (f"; sweep of `{sweep['name']}` over {', '.join(sweep['values'])}" if sweep else "") + ".",
        f"{len(used)} reference(s) × {report['prompts']} prompt(s) × {report['seeds']} seed(s); "
        f"{report['images']['found']} of {report['images']['expected']} images.",
        "## Table 1", table1_markdown(report),
        "## Per category", categories_markdown(report) if report["categories"] else "No images.",
        "## Metrics and the models behind them", metrics_markdown(report),
        "## References",
        "Used: " + ", ".join(f"{r['name']} ({r['class_word']})" for r in used) + ".",
        f"Skipped: {len(skipped)}" + "".join(f"\n- {s['name']}: {s['reason']}" for s in skipped),
        "## Fig. 5: text alignment against identity similarity",
        f"![Fig. 5]({report['plot']['file']})" if report["plot"]["file"] else report["plot"]["reason"],
    ]
    if report["notes"]:
        parts += ["## Notes", "\n".join(f"- {note}" for note in report["notes"])]
    return "\n\n".join(parts) + "\n"


def csv_text(headers: list[str], rows: list[list]) -> str:
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return stream.getvalue()


def csv_value(value, column: dict) -> str:
    if not column["available"]:
        return UNAVAILABLE
    return "" if value is None else f"{value:.4f}"


def table1_csv(report: dict) -> str:
    columns = report["columns"]
    return csv_text(["setting", "images"] + [c["label"] for c in columns],
                    [[row["setting"], row["images"]] + [csv_value(row["values"].get(c["key"]), c) for c in columns]
                     for row in report["rows"]])


def categories_csv(report: dict) -> str:
    columns = [c for c in report["columns"] if c["per_image"]]
    return csv_text(["setting", "category", "images"] + [c["label"] for c in columns],
                    [[row["setting"], row["category"], row["images"]]
                     + [csv_value(row["values"].get(c["key"]), c) for c in columns] for row in report["categories"]])


def tradeoff_figure(report: dict):
    """Fig. 5: one point per setting, text alignment on x, identity similarity on y, labelled by setting."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels = {c["key"]: c["label"] for c in report["columns"]}
    x_key, y_key = report["plot"]["x"], report["plot"]["y"]
    points = [(row["values"][x_key], row["values"][y_key], row["setting"]) for row in report["rows"]
              if row["values"].get(x_key) is not None and row["values"].get(y_key) is not None]
    figure = Figure(figsize=(5, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=report["model"]["preset"])
    for x, y, label in points:
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel(f"{labels[x_key]} (text alignment) ↑")
    axes.set_ylabel(f"{labels[y_key]} (identity similarity) ↑")
    sweep = report["sweep"]
    axes.set_title("Prompt consistency vs identity preservation" + (f" ({sweep['name']} sweep)" if sweep else ""),
                   fontsize=9)
    axes.xaxis.set_major_locator(MaxNLocator(5))
    axes.yaxis.set_major_locator(MaxNLocator(6))
    axes.ticklabel_format(useOffset=False)  # close values: whole numbers on the ticks, no offset over the label
    axes.margins(0.25)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def tradeoff_png(report: dict) -> bytes:
    buffer = io.BytesIO()
    tradeoff_figure(report).savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(report: dict, output: Path) -> dict[str, Path]:
    """Write every report file into ``output``; returns their paths by kind."""
    paths = {kind: output / name for kind, name in REPORT_FILES.items()}
    write_text_atomic(paths["markdown"], render_markdown(report))
    write_text_atomic(paths["csv"], table1_csv(report))
    write_text_atomic(paths["categories"], categories_csv(report))
    write_text_atomic(paths["json"], json.dumps(report, indent=2, default=str))
    if report["plot"]["file"]:
        write_text_atomic(paths["plot"], tradeoff_png(report))
    else:
        paths.pop("plot").unlink(missing_ok=True)  # a plot left by an earlier run would not match this report
    return paths
