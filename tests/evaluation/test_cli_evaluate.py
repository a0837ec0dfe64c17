"""``omniportrait evaluate`` end to end on the tiny preset: 2 references × 3 prompts, reports, resume, sweep."""

import csv
import json

import pytest
from PIL import Image

from omniportrait.cli import main

TINY = ["--preset", "tiny-sd15", "--steps", "1", "--device", "cpu", "--clip-model", "tiny-random",
        "--blip-model", "tiny-random", "--no-progress"]


@pytest.fixture(scope="module")
def evaluation(references_dir, tmp_path_factory):
    """One full run: astronaut + mirror (+ a face-free photo to skip), 3 prompts, every metric."""
    output = tmp_path_factory.mktemp("evaluation")
    argv = ["evaluate", "--references", str(references_dir), "--output", str(output), "--max-prompts", "3",
            "--class-words", "astronaut.png=man"] + TINY
    assert main(argv) == 0
    return output, argv


def test_generates_every_job_once(evaluation):
    output, _ = evaluation
    images = sorted(p.relative_to(output / "images").as_posix() for p in (output / "images").rglob("*.png"))
    assert images == [f"default/{ref}/{prompt}-seed0.png" for ref in ("astronaut_png", "mirror_png")
                      for prompt in ("background-0", "clothing-0", "pose-0")]
    assert Image.open(output / "images/default/astronaut_png/pose-0-seed0.png").size == (64, 64)
    sidecar = json.loads((output / "images/default/mirror_png/pose-0-seed0.json").read_text())
    assert sidecar["job"]["prompt"] == "A person posing like a tourist in front of the Eiffel Tower"
    astronaut = json.loads((output / "images/default/astronaut_png/clothing-0-seed0.json").read_text())
    assert astronaut["job"]["prompt"] == "A man wearing a police uniform"


def test_report_table_names_models_and_unavailable_metrics(evaluation):
    output, _ = evaluation
    report = json.loads((output / "report.json").read_text())
    row = report["rows"][0]
    assert row["setting"] == "default" and row["images"] == 6
    for key in ("blip", "clip_t", "clip_i", "sim", "face_rate", "clip_iqa", "fid_clip"):
        assert isinstance(row["values"][key], float), key
    assert row["values"]["fid"] is None
    fid = next(m for m in report["metrics"] if m["name"] == "FID")
    assert not fid["available"] and fid["reason"]
    assert all(m["model"] for m in report["metrics"])
    markdown = (output / "report.md").read_text()
    header = "| Setting | Images | BLIP↑ | CLIP-T↑ | CLIP-I↑ | SIM↑ | Face found %↑ | IQA↑ | FID↓ | FID-CLIP↓ |"
    assert header in markdown
    assert "unavailable" in markdown and "dlib" in markdown and "random weights" in markdown
    with open(output / "report.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert rows[0]["FID"] == "unavailable"
    assert float(rows[0]["CLIP-I"]) == pytest.approx(row["values"]["clip_i"], abs=1e-3)


def test_per_category_breakdown(evaluation):
    output, _ = evaluation
    with open(output / "categories.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["category"] for r in rows] == ["pose", "clothing", "background"]
    assert all(r["images"] == "2" for r in rows)
    report = json.loads((output / "report.json").read_text())
    overall = report["rows"][0]["values"]["clip_i"]
    assert overall == pytest.approx(sum(r["values"]["clip_i"] for r in report["categories"]) / 3)


def test_face_free_reference_is_skipped_and_counted(evaluation):
    output, _ = evaluation
    report = json.loads((output / "report.json").read_text())
    assert [s["name"] for s in report["references"]["skipped"]] == ["blank.png"]
    assert [r["name"] for r in report["references"]["used"]] == ["astronaut.png", "mirror.png"]
    assert [r["class_word"] for r in report["references"]["used"]] == ["man", "person"]
    assert any("default class word 'person'" in note for note in report["notes"])


def test_fig5_plot_is_written(evaluation):
    output, _ = evaluation
    with Image.open(output / "tradeoff.png") as plot:
        assert plot.format == "PNG" and plot.width > 300


def test_rerun_resumes_without_regenerating(evaluation, capsys):
    output, argv = evaluation
    stamps = {p: p.stat().st_mtime_ns for p in (output / "images").rglob("*.png")}
    capsys.readouterr()
    assert main(argv) == 0
    assert "generated 0 image(s)" in capsys.readouterr().err
    assert main(argv + ["--rb-recompute", "gelu"]) == 0  # a way of running that keeps the images
    assert "generated 0 image(s)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (output / "images").rglob("*.png")} == stamps


def test_sweep_writes_one_row_per_value_and_the_tradeoff_plot(references_dir, tmp_path):
    argv = ["evaluate", "--references", str(references_dir), "--output", str(tmp_path), "--max-prompts", "1",
            "--sweep", "guidance-scale=3,7.5", "--metrics", "clip-t,clip-i"] + TINY
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["setting"] for row in report["rows"]] == ["guidance_scale=3", "guidance_scale=7.5"]
    assert [row["sweep"]["value"] for row in report["rows"]] == [3.0, 7.5]
    assert report["plot"] == {"x": "clip_t", "y": "clip_i", "file": "tradeoff.png", "reason": None}
    assert (tmp_path / "tradeoff.png").is_file()
    sidecar = json.loads((tmp_path / "images/guidance_scale=3/mirror_png/pose-0-seed0.json").read_text())
    assert sidecar["generation"]["sweep"] == {"guidance_scale": 3.0}


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_unknown_sweep_keyword_fails_before_generating(references_dir, tmp_path, capsys):
    code, err = run_cli(["evaluate", "--references", str(references_dir), "--output", str(tmp_path / "out"),
                         "--sweep", "no-such-knob=1,2"] + TINY, capsys)
    assert code == 2
    assert "no parameter 'no-such-knob'" in err and "guidance-scale" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "holds no image"),
    ("faceless", "no usable reference photo"),
])
def test_bad_references_folder(case, message, tmp_path, blank, capsys):
    folder = tmp_path / "refs"
    if case != "missing":
        folder.mkdir()
    if case == "faceless":
        blank.save(folder / "blank.png")
    code, err = run_cli(["evaluate", "--references", str(folder), "--output", str(tmp_path / "out")] + TINY, capsys)
    assert code == 2 and message in err
    assert err.startswith("omniportrait evaluate: error:")


def test_unknown_preset(references_dir, tmp_path, capsys):
    code, err = run_cli(["evaluate", "--references", str(references_dir), "--output", str(tmp_path),
                         "--preset", "tiny-sd3"], capsys)
    assert code == 2 and "unknown preset 'tiny-sd3'" in err


def test_cuda_graphs_on_the_cpu_fail_with_one_line_and_no_image(references_dir, tmp_path, capsys):
    code, err = run_cli(["evaluate", "--references", str(references_dir), "--output", str(tmp_path / "out"),
                         "--max-prompts", "1", "--rb-cuda-graph"] + TINY, capsys)
    error = err.strip().splitlines()[-1]  # after the warning about the face-free reference
    assert code == 2 and error.startswith("omniportrait evaluate: error:") and "need a CUDA device" in error
    assert "Traceback" not in err
    assert not list((tmp_path / "out").rglob("*.png"))
