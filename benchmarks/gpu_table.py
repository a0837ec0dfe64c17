"""The markdown table of a ``bench --json`` report, the models side by side, as ``benchmarks/README.md`` shows them,
then each model's variants against the benchmark's targets, and whether any call began with memory an earlier
one left.

    python benchmarks/gpu_table.py $OUT/bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OFF_RATIO = 1.03  # guidance off, × diffusers' plain pipeline
FULL_RATIO, FULL_PEAK_GIB = 1.6, 12.0  # the full method on SDXL at 1024², every component loaded
PLAIN = "diffusers-plain"
LEFTOVER_GIB = 0.01  # more allocated than plain's at a call's start that counts as left by earlier calls


def number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


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


def model_name(entry: dict) -> str:
    return f"{entry['model']} {entry['size']}²"


def row_cells(row: dict | None) -> list[str]:
    """A variant's four cells for one model: not run, failed, or measured."""
    if row is None:
        return ["—"] * 4
    if row.get("error"):
        return ["failed"] + ["—"] * 3
    return [f"{row['seconds']:.3f}", number(row["ratio"], 2), number(row["peak_gib"], 2),
            number(row.get("sampling_peak_gib"), 2)]


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the JSON that `omniportrait bench --json` wrote")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    print("\n".join([markdown_table(report), *target_lines(report), *leftover_lines(report)]))


if __name__ == "__main__":
    main()
