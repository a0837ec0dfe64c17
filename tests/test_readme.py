"""The README's first commands are what a new user runs: keep them working."""

import shlex
from pathlib import Path

from omniportrait.cli import main

ROOT = Path(__file__).resolve().parents[1]


def top_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_generate_command_runs(tmp_path, monkeypatch):
    generate = next(line for line in top_commands() if line.startswith("omniportrait generate"))
    args = shlex.split(generate)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "out.png")
    monkeypatch.chdir(ROOT)
    assert main(args + ["--steps", "3", "--dift-ensemble", "1"]) == 0
    assert (tmp_path / "out.png").is_file() and (tmp_path / "out.json").is_file()


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(line for line in top_commands() if "pytest" in line)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
