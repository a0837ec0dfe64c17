"""Model files are checked before anything loads: one line naming the file and what is wrong, exit 2."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from omniportrait.checks import check_safetensors_file, check_torch_file, read_safetensors_header
from omniportrait.cli import main
from omniportrait.errors import ConfigError
from omniportrait.files import write_json_atomic


@pytest.fixture
def pivot_folder(tmp_path):
    from omniportrait.models.tiny import tiny_components

    folder = tmp_path / "pie"
    tiny_components("sd15").pivot_encoder.save_pretrained(str(folder))
    return folder


def bad_files(tmp_path, pivot_folder):
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(bytes(range(256)) * 40)
    not_checkpoint = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(not_checkpoint))
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(pickle.dumps(ValueError("runs code when unpickled")))
    truncated = tmp_path / "truncated.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(64, 64)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    return {"random bytes": (["--base", str(random_bytes)], "not a safetensors file"),
            "not a checkpoint": (["--base", str(not_checkpoint)], "not a Stable Diffusion checkpoint"),
            "pickle": (["--base", str(pickled)], "Python objects besides weights"),
            "truncated": (["--base", str(truncated)], "truncated")}


def damaged_pivot(kind, folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-64])
        return "truncated"
    if kind == "bad json":
        (folder / "config.json").write_text("{not json")
        return "not valid JSON"
    if kind == "wrong width":
        config = json.loads((folder / "config.json").read_text())
        config["text_width"] = 48
        write_json_atomic(folder / "config.json", config)
        return "has shape"
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"] = "nonsense"
    write_json_atomic(folder / "config.json", config)
    return "does not describe a PivotIDEncoder"


def run_generate(tmp_path, astronaut_path, capsys, *extra):
    out = tmp_path / "out" / "o.png"
    code = main(["generate", "--preset", "tiny-sd15", "--reference", astronaut_path, "--prompt", "a woman",
                 "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize("case", ["random bytes", "not a checkpoint", "pickle", "truncated"])
def test_a_bad_base_file_is_one_line(case, tmp_path, astronaut_path, pivot_folder, capsys):
    args, message = bad_files(tmp_path, pivot_folder)[case]
    err = run_generate(tmp_path, astronaut_path, capsys, *args)
    assert message in err and args[1] in err


@pytest.mark.parametrize("kind", ["truncated", "bad json", "wrong width", "bad config"])
def test_a_damaged_pivot_encoder_is_one_line(kind, tmp_path, astronaut_path, pivot_folder, capsys):
    message = damaged_pivot(kind, pivot_folder)
    err = run_generate(tmp_path, astronaut_path, capsys, "--pivot-encoder", str(pivot_folder))
    assert message in err and str(pivot_folder) in err


def test_safetensors_checks_find_the_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.zeros(2, 3)}, str(path))
    assert read_safetensors_header(path)["a.weight"].shape == (2, 3)
    with pytest.raises(ConfigError, match="lacks the tensors b"):
        check_safetensors_file(path, required_keys=["b"])


def test_torch_files_load_weights_only(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(check_torch_file(good)["w"], torch.ones(2))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ConfigError, match="not a complete torch file"):
        check_torch_file(cut)
