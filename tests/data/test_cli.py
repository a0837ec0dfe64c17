"""``omniportrait build-dataset``: the command line over the builder; bad input is one line, exit 2."""

from __future__ import annotations

import pytest

from omniportrait.cli import main


def _args(source, output, *extra) -> list[str]:
    return ["build-dataset", "--input", str(source), "--output", str(output), "--min-side", "256",
            "--shard-size", "3", "--workers", "0", "--no-progress", *extra]


def test_cli_builds_and_resumes(tmp_path, mixed_inputs, capsys):
    assert main(_args(mixed_inputs, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "kept 2 of 14 inputs" in out and "multiple_faces 1" in out and "5 built now" in out
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "index.parquet").is_file()
    assert main(_args(mixed_inputs, tmp_path / "out")) == 0
    assert "(0 built now)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp, src: _args(tmp / "missing", tmp / "out"), "does not exist"),
        (lambda tmp, src: _args(src, tmp / "out", "--shard-size", "0"), "--shard-size must be an integer in [1, "),
        (lambda tmp, src: _args(src, tmp / "out", "--captioner", "nope"), "captioner 'nope' is unknown"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, mixed_inputs, capsys, make_args, message):
    assert main(make_args(tmp_path, mixed_inputs)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omniportrait build-dataset: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_build_made_with_other_arguments(tmp_path, mixed_inputs, capsys):
    assert main(_args(mixed_inputs, tmp_path / "out")) == 0
    capsys.readouterr()
    assert main(_args(mixed_inputs, tmp_path / "out", "--min-side", "300")) == 2
    err = capsys.readouterr().err
    assert "different arguments (filters.min_side: 256 -> 300)" in err and "\n" not in err.strip()
