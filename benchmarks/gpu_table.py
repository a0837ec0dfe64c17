"""The markdown table of a ``bench --json`` report, the models side by side, as ``benchmarks/README.md`` shows them.

    python benchmarks/gpu_table.py $OUT/bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(report: list[dict]) -> str:
    """One row per variant (in the report's order), four columns per model: seconds, × plain, peak and the peak
    before the decode (GiB). A variant a model did not run shows ``—``."""
    header = ["variant"]
    for entry in report:
        name = f"{entry['model']} {entry['size']}²"
        header += [f"{name} s", "× plain", "peak GiB", "sampling GiB"]
    variants = list(dict.fromkeys(row["variant"] for entry in report for row in entry["rows"]))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        cells = [f"`{variant}`"]
        for entry in report:
            row = next((row for row in entry["rows"] if row["variant"] == variant), None)
            if row is None:
                cells += ["—"] * 4
                continue
            cells += [f"{row['seconds']:.3f}", f"{row['ratio']:.2f}", number(row["peak_gib"], 2),
                      number(row.get("sampling_peak_gib"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    conditions = {(entry["device"], entry["dtype"], entry["steps"], entry["guided_steps"]) for entry in report}
    for device, dtype, steps, guided in sorted(conditions):
        lines.append(f"\n{device}, {dtype}, {steps} steps of which {guided} guided")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the JSON that `omniportrait bench --json` wrote")
    args = parser.parse_args(argv)
    print(markdown_table(json.loads(args.report.read_text())))


if __name__ == "__main__":
    main()
