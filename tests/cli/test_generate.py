"""``omniportrait generate`` end to end on the tiny preset, with good and bad input (DESIGN §5)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from omniportrait.cli import main

FAST = ["--preset", "tiny-sd15", "--steps", "4", "--dift-ensemble", "2"]


def generate(*args):
    return main(["generate", *FAST, *args])


def test_writes_png_and_sidecar_and_is_reproducible(tmp_path, astronaut_path, capsys):
    out = tmp_path / "a.png"
    assert generate("--reference", astronaut_path, "--prompt", "a woman on the beach", "--out", str(out),
                    "--save-masks", str(tmp_path / "masks")) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["parameters"]["seed"] == 0 and meta["parameters"]["steps"] == 4
    assert meta["identities"][0]["class_word"] == "woman" and meta["identities"][0]["sha256"]
    assert meta["rb_guidance"]["strength"] == 8.5 and meta["versions"]["diffusers"]
    assert "sim" in meta["identities"][0]  # None here: the tiny model draws no detectable face
    assert "SIM to 'woman' reference" in capsys.readouterr().err
    assert {p.name for p in (tmp_path / "masks").iterdir()} == {"mgen-0.png", "mref-0.png", "matches-0.png"}
    again = tmp_path / "b.png"
    assert main(meta["reproduce"][1:-2] + ["--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    # CUDA graphs left to the run: eager on the CPU, and the reproducing machine decides for itself
    assert meta["rb_guidance"]["cuda_graph"] is None and meta["parameters"]["cuda_graph"] is False
    assert not any("cuda-graph" in arg for arg in meta["reproduce"])
    # so is the banded decode: whole on the CPU, in bands where SDXL's fp32 decode runs on CUDA
    assert meta["parameters"]["banded_decode"] is False and not any("banded" in arg for arg in meta["reproduce"])


def test_eager_steps_asked_for_stay_in_the_reproduce_line(tmp_path, astronaut_path):
    out = tmp_path / "a.png"
    assert generate("--reference", astronaut_path, "--prompt", "a woman on the beach", "--out", str(out),
                    "--no-rb-cuda-graph") == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["rb_guidance"]["cuda_graph"] is False and "--no-rb-cuda-graph" in meta["reproduce"]


def test_guidance_options_and_banded_decode_reach_the_run_and_the_reproduce_line(tmp_path, astronaut_path):
    out = tmp_path / "a.png"
    assert generate("--reference", astronaut_path, "--prompt", "a woman on the beach", "--out", str(out),
                    "--rb-feature-pass", "split", "--rb-interval", "2", "--rb-recompute", "gelu",
                    "--banded-decode") == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["rb_guidance"]["feature_pass"] == "split" and meta["rb_guidance"]["gradient_interval"] == 2
    assert meta["rb_guidance"]["recompute"] == "gelu" and meta["parameters"]["banded_decode"] is True
    reproduce = " ".join(meta["reproduce"])
    assert "--rb-feature-pass split" in reproduce and "--rb-interval 2" in reproduce
    assert "--rb-recompute gelu" in reproduce and "--banded-decode" in reproduce
    whole = tmp_path / "whole.png"
    whole_args = [arg if arg != "--banded-decode" else "--no-banded-decode" for arg in meta["reproduce"][1:-2]]
    assert main(whole_args + ["--out", str(whole)]) == 0
    whole_meta = json.loads(whole.with_suffix(".json").read_text())
    assert whole_meta["parameters"]["banded_decode"] is False and "--no-banded-decode" in whole_meta["reproduce"]
    difference = np.abs(np.asarray(Image.open(out), dtype=int) - np.asarray(Image.open(whole), dtype=int))
    assert difference.max() <= 1  # the same image up to rounding
    projection = tmp_path / "projection.png"
    assert main(meta["reproduce"][1:-2] + ["--rb-recompute", "projection", "--out", str(projection)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(projection)))  # the same gradient


def test_several_images_and_identities(tmp_path, astronaut_path):
    out = tmp_path / "pair.png"
    assert generate("--identity", f"{astronaut_path}:man", "--identity", f"{astronaut_path}:woman",
                    "--prompt", "a man and a woman at the beach", "--num-images", "2", "--out", str(out)) == 0
    assert sorted(p.name for p in tmp_path.glob("pair-*.png")) == ["pair-0.png", "pair-1.png"]
    assert json.loads((tmp_path / "pair-1.json").read_text())["parameters"]["seed"] == 1


def bad_inputs(tmp_path, astronaut_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    corrupt = tmp_path / "cut.jpg"
    Image.open(astronaut_path).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:3000])
    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), "white").save(blank)
    ok = ["--prompt", "a woman on the beach"]
    return {
        "missing file": (["--reference", str(tmp_path / "nope.jpg"), *ok], "does not exist"),
        "not an image": (["--reference", str(not_image), *ok], "image"),
        "corrupt": (["--reference", str(corrupt), *ok], ""),
        "no face": (["--reference", str(blank), *ok], "face"),
        "no class word": (["--reference", astronaut_path, "--prompt", "a cat on the beach"], "person word"),
        "word not in prompt": (["--identity", f"{astronaut_path}:man", *ok], "not in the prompt"),
        "unknown preset": (["--reference", astronaut_path, *ok, "--preset", "nope"], "unknown preset"),
        "missing checkpoint": (["--reference", astronaut_path, *ok, "--base", str(tmp_path / "m.safetensors")],
                               "does not exist"),
        "bad out": (["--reference", astronaut_path, *ok, "--out", str(tmp_path / "x.jpg")], ".png"),
        "bad identity": (["--identity", "just-a-path", *ok], "PHOTO:WORD"),
        "cuda graph on cpu": (["--reference", astronaut_path, *ok, "--rb-cuda-graph"], "need a CUDA device"),
    }


CASES = ["missing file", "not an image", "corrupt", "no face", "no class word", "word not in prompt",
         "unknown preset", "missing checkpoint", "bad out", "bad identity", "cuda graph on cpu"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_nonzero_no_output(case, tmp_path, astronaut_path, capsys):
    args, expected = bad_inputs(tmp_path, astronaut_path)[case]
    out = tmp_path / "out" / "o.png"
    if "--out" not in args:
        args = args + ["--out", str(out)]
    code = main(["generate", *FAST, *args] if "--preset" not in args else ["generate", "--steps", "2", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert expected.lower() in err.lower()
    assert not out.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, named, not_named", [
    ([], ["--width"], ["--rb-feature-pass", "--num-images", "--rb-recompute", "--banded-decode"]),  # both taken already
    (["--rb-feature-pass", "split", "--rb-recompute", "gelu", "--banded-decode", "--num-images", "2"],
     ["--rb-recompute projection", "--num-images"], ["--rb-feature-pass", "--banded-decode"]),
    (["--rb-feature-pass", "split", "--banded-decode"], ["--width"], ["--rb-", "--banded-decode"]),
])
def test_out_of_memory_is_one_line_naming_the_options_not_in_use(flags, named, not_named, monkeypatch, tmp_path,
                                                                   astronaut_path, capsys):
    import torch

    from omniportrait.pipelines import OmniPortraitSDPipeline

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(OmniPortraitSDPipeline, "__call__", out_of_memory)
    out = tmp_path / "o.png"
    code = generate("--reference", astronaut_path, "--prompt", "a woman", "--out", str(out), *flags)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "ran out of memory" in err and not out.exists()
    assert all(flag in err for flag in named) and not any(flag in err for flag in not_named)


def test_console_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "omniportrait.cli", "generate", "--preset", "tiny-sd15",
                             "--reference", str(tmp_path / "missing.png"), "--prompt", "a woman",
                             "--out", str(tmp_path / "o.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


def test_a_run_that_ran_out_of_memory_records_what_it_fell_back_to(monkeypatch, tmp_path, astronaut_path, capsys):
    import torch
    from diffusers import AutoencoderKL

    from omniportrait.guidance import rb
    from tests.conftest import out_of_memory_on_calls

    out, again = tmp_path / "a.png", tmp_path / "again.png"
    with monkeypatch.context() as patch:  # the first guided step's backward, and every whole decode
        patch.setattr(rb.torch.autograd, "grad", out_of_memory_on_calls(torch.autograd.grad, last=1))
        patch.setattr(AutoencoderKL, "decode", out_of_memory_on_calls(AutoencoderKL.decode))
        assert generate("--reference", astronaut_path, "--prompt", "a woman on the beach", "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "it and the later steps use the split pass" in err and "decoded in bands instead" in err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["rb_guidance"]["feature_pass"] == "split" and meta["parameters"]["banded_decode"] is True
    reproduce = meta["reproduce"]
    assert "--rb-feature-pass" in reproduce and "--banded-decode" in reproduce
    assert main(reproduce[1:-2] + ["--out", str(again)]) == 0  # what ran, without running out of memory
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_the_sidecar_holds_each_guided_step_s_calibration_and_a_summary_line_is_printed(tmp_path, astronaut_path,
                                                                                         capsys):
    import json

    from omniportrait.cli import main

    out = tmp_path / "out.png"
    assert main(["generate", "--preset", "tiny-sd15", "--reference", astronaut_path, "--prompt", "a woman",
                 "--steps", "4", "--dift-ensemble", "1", "--rb-start", "1", "--rb-strength-per-point",
                 "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert len(meta["calibration"]) == 4 and meta["rb_guidance"]["strength_per_point"] is True
    assert "--rb-strength-per-point" in meta["reproduce"]
    assert "RB-Guidance (p=8.5, 4 gradient steps): identity 0: match" in capsys.readouterr().err
