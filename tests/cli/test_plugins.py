"""``omniportrait generate`` with plug-ins on the tiny presets: ControlNets, an IP-Adapter, LoRAs (offline, CPU)."""

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniportrait.cli import main
from omniportrait.cli.plugins import IDENTITY_CROPS, ip_adapter_from_args
from omniportrait.errors import ConfigError
from omniportrait.pipelines.plugins import (
    DEFAULT_CONTROLNETS,
    ControlNetChoice,
    IPAdapterSpec,
    controlnet_source,
    hub_ip_adapter,
    image_encoder_folder,
    parse_lora,
    source_kind,
)

FAST = ["--preset", "tiny-sd15", "--steps", "2", "--dift-ensemble", "2", "--width", "64", "--height", "64"]
PROMPT = ["--prompt", "a woman dancing"]


def generate(astronaut_path, out: Path, *extra: str) -> int:
    return main(["generate", *FAST, *PROMPT, "--reference", astronaut_path, "--out", str(out), *extra])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def sidecar(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def write_tiny_lora(path: Path, seed: int = 1) -> Path:
    """A LoRA for the tiny SD1.5 UNet's attention projections, in diffusers' PEFT layout, with random weights
    (``init_lora_weights=False``: a LoRA that starts as a no-op would not change the image)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from omniportrait.models.tiny import tiny_unet

    unet = tiny_unet("sd15")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(path.parent), unet_lora_layers=layers, weight_name=path.name)
    return path


@pytest.fixture(scope="module")
def no_person(tmp_path_factory) -> str:
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "coffee.jpg"
    Image.fromarray(data.coffee()).save(path)
    return str(path)


def refused(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_pose_control_and_lora_are_saved_recorded_and_reproduced(tmp_path, astronaut_path, capsys):
    lora = write_tiny_lora(tmp_path / "tiny.safetensors")
    out, controls = tmp_path / "a.png", tmp_path / "controls"
    assert generate(astronaut_path, out, "--control", f"pose:{astronaut_path}", "--save-control", str(controls),
                    "--lora", f"{lora}:0.7") == 0
    assert [p.name for p in controls.iterdir()] == ["control-0-pose.png"]
    skeleton = pixels(controls / "control-0-pose.png")
    assert skeleton.shape == (64, 64, 3) and skeleton.max() > 0 and (skeleton.sum(-1) == 0).mean() > 0.5
    meta = sidecar(out)
    control = meta["plugins"]["controls"][0]
    assert control["kind"] == "pose" and control["scale"] == 1.0 and control["controlnet"]["source"] == "tiny"
    assert len(control["image_sha256"]) == 64
    digest = hashlib.sha256(lora.read_bytes()).hexdigest()
    assert meta["plugins"]["loras"] == [{"path": str(lora), "scale": 0.7, "sha256": digest}]
    assert "wrote 1 control image(s)" in capsys.readouterr().err
    reproduce = meta["reproduce"]
    assert reproduce[reproduce.index("--control") + 1] == f"pose:{astronaut_path}"
    assert reproduce[reproduce.index("--lora") + 1] == f"{lora}:0.7"
    again = tmp_path / "again.png"
    assert main(reproduce[1:-2] + ["--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_a_lora_changes_the_image(tmp_path, astronaut_path):
    lora = write_tiny_lora(tmp_path / "tiny.safetensors")
    plain, styled, half = tmp_path / "plain.png", tmp_path / "styled.png", tmp_path / "half.png"
    assert generate(astronaut_path, plain, "--no-rb") == 0
    assert generate(astronaut_path, styled, "--no-rb", "--lora", str(lora)) == 0
    assert generate(astronaut_path, half, "--no-rb", "--lora", f"{lora}:0.3") == 0
    assert np.abs(pixels(plain) - pixels(styled)).max() > 8
    assert np.abs(pixels(half) - pixels(styled)).max() > 0  # the scale reaches the adapter
    assert sidecar(styled)["plugins"]["loras"][0]["scale"] == 1.0


def test_two_canny_controls_run_as_a_multi_controlnet(tmp_path, astronaut_path):
    plain, controlled, controls = tmp_path / "plain.png", tmp_path / "canny.png", tmp_path / "controls"
    assert generate(astronaut_path, plain) == 0
    assert generate(astronaut_path, controlled, "--control", f"canny:{astronaut_path}:0.5", "--control",
                    f"canny:{astronaut_path}:0.5", "--save-control", str(controls)) == 0
    assert sorted(p.name for p in controls.iterdir()) == ["control-0-canny.png", "control-1-canny.png"]
    meta = sidecar(controlled)
    assert [c["scale"] for c in meta["plugins"]["controls"]] == [0.5, 0.5]
    assert meta["reproduce"].count("--control") == 2
    assert np.abs(pixels(plain) - pixels(controlled)).max() > 0


def test_tiny_ip_adapter_runs_and_is_recorded(tmp_path, astronaut_path):
    out = tmp_path / "ip.png"
    assert generate(astronaut_path, out, "--no-rb", "--ip-adapter", "tiny", "--ip-adapter-image", astronaut_path,
                    "--ip-adapter-scale", "0.6") == 0
    adapter = sidecar(out)["plugins"]["ip_adapter"]
    assert adapter["source"] == "tiny" and adapter["scale"] == 0.6 and len(adapter["image_sha256"]) == 64
    assert "--ip-adapter-image" in sidecar(out)["reproduce"]
    plain = tmp_path / "plain.png"
    assert generate(astronaut_path, plain, "--no-rb") == 0
    assert np.abs(pixels(plain) - pixels(out)).max() > 0


def test_pose_control_on_tiny_sdxl(tmp_path, astronaut_path):
    out = tmp_path / "xl.png"
    argv = ["generate", *FAST, "--preset", "tiny-sdxl", *PROMPT, "--reference", astronaut_path, "--out", str(out),
            "--control", f"pose:{astronaut_path}:0.8"]
    assert main(argv) == 0
    assert sidecar(out)["plugins"]["controls"][0]["scale"] == 0.8


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: these refusals must come before."""
    import omniportrait.pipelines.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


@pytest.mark.parametrize(("extra", "message"), [
    (["--control", "pose:{no_person}"], "no person found in"),
    (["--controlnet", "pose=/no/such"], "/no/such does not exist"),
    (["--control", "image:{astronaut}"], "has no default ControlNet"),
    (["--control", "pose:{astronaut}", "--controlnet", "canny=tiny"], "names a kind no --control uses"),
    (["--save-control", "{tmp}/controls"], "--save-control writes the control images"),
    (["--ip-adapter-scale", "0.5"], "--ip-adapter-scale needs --ip-adapter"),
    (["--lora", "{tmp}/x.safetensors:0.5"], "does not exist"),
])
def test_refused_before_loading_in_one_line(extra, message, tmp_path, astronaut_path, no_person, no_loading, capsys):
    out = tmp_path / "out.png"
    preset = ["--preset", "sd15"] if "image:{astronaut}" in extra else []
    values = dict(no_person=no_person, astronaut=astronaut_path, tmp=tmp_path)
    argv = ["generate", *FAST, *preset, *PROMPT, "--reference", astronaut_path, "--out", str(out),
            *[part.format(**values) for part in extra]]
    assert message in refused(argv, capsys)
    assert list(tmp_path.iterdir()) == []


def test_controlnet_sources_and_names():
    assert controlnet_source("pose", "sd15", [], tiny=False) == DEFAULT_CONTROLNETS["sd15"]["pose"]
    assert controlnet_source("canny", "sdxl", [], tiny=False) == "xinsir/controlnet-canny-sdxl-1.0"
    assert controlnet_source("pose", "sd15", [], tiny=True) == "tiny"
    assert controlnet_source("pose", "sd15", [ControlNetChoice("pose", "me/pose")], tiny=True) == "me/pose"
    assert source_kind("owner/name", (".safetensors",)) == "hub"
    assert hub_ip_adapter("h94/IP-Adapter", "sdxl") == ("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.safetensors")
    assert hub_ip_adapter("h94/IP-Adapter/models/a.bin", "sd15") == ("h94/IP-Adapter", "models", "a.bin")
    with pytest.raises(ConfigError, match="does not exist"):
        source_kind("./here.safetensors", (".safetensors",))


def test_a_lora_path_with_colons_is_read_from_the_right(tmp_path):
    lora = write_tiny_lora(tmp_path / "a:b.safetensors")
    assert parse_lora(str(lora)).scale == 1.0 and parse_lora(str(lora)).path == lora
    assert parse_lora(f"{lora}:0.25").scale == 0.25


def test_an_ip_adapter_needs_an_image_or_identities():
    args = argparse.Namespace(ip_adapter="tiny", ip_adapter_scale=None, ip_adapter_image=None, reference=[],
                              identity=[])
    with pytest.raises(ConfigError, match="--ip-adapter needs --ip-adapter-image IMG, .* or identities"):
        ip_adapter_from_args(args)
    args.reference = ["a.png"]
    assert ip_adapter_from_args(args) == IPAdapterSpec("tiny", 1.0, None)


def test_the_identities_face_crops_are_the_ip_adapters_images_under_rb_guidance(tmp_path, astronaut_path):
    pivot, plain = tmp_path / "pivot.png", tmp_path / "plain.png"
    assert generate(astronaut_path, pivot, "--ip-adapter", "tiny", "--rb-start", "1") == 0
    assert generate(astronaut_path, plain, "--rb-start", "1") == 0
    meta = sidecar(pivot)
    adapter = meta["plugins"]["ip_adapter"]
    assert adapter["image"] == IDENTITY_CROPS and adapter["image_sha256"] is None
    assert "--ip-adapter-image" not in meta["reproduce"] and "--ip-adapter" in meta["reproduce"]
    assert meta["rb_guidance"]["mask_source"] == "attention" and "detect: no face found" in meta["rb_guidance"][
        "mask_reason"]
    assert np.abs(pixels(pivot) - pixels(plain)).max() > 0


def test_hub_vit_h_adapters_take_the_vit_h_image_encoder():
    assert image_encoder_folder("hub", "ip-adapter-plus-face_sdxl_vit-h.safetensors") == "models/image_encoder"
    assert image_encoder_folder("hub", "ip-adapter-plus-face_sd15.safetensors") == "image_encoder"
    assert image_encoder_folder("file", "ip-adapter-plus-face_sdxl_vit-h.safetensors") == "image_encoder"


def test_tiny_ip_adapter_with_rb_guidance_on(tmp_path, astronaut_path):
    out = tmp_path / "ip-rb.png"
    assert generate(astronaut_path, out, "--ip-adapter", "tiny", "--ip-adapter-image", astronaut_path,
                    "--rb-start", "1") == 0
    meta = sidecar(out)
    assert meta["plugins"]["ip_adapter"]["source"] == "tiny" and "--ip-adapter" in meta["reproduce"]
