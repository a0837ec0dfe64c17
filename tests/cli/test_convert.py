"""``omniportrait convert photomaker`` and ``--pivot-encoder`` with a PhotoMaker v1 checkpoint, on tiny SDXL."""

import warnings

import pytest
import torch

from omniportrait.cli import main
from omniportrait.errors import ConfigError
from omniportrait.models.photomaker import LORA_FILE
from omniportrait.models.tiny import tiny_unet
from omniportrait.pipelines.loading import load_pipeline
from omniportrait.pipelines.plugins import PIVOT_LORA, LoraSpec, load_loras

from .._photomaker import TEXT, tiny_id_encoder_state, tiny_lora_state, write_bin, write_safetensors

FAST = ["--steps", "2", "--dift-ensemble", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photomaker")
    return write_bin(folder / "photomaker-v1.bin", tiny_id_encoder_state(), tiny_lora_state(tiny_unet("sdxl")))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("converted") / "pm"
    assert main(["convert", "photomaker", str(checkpoint), "--out", str(out)]) == 0
    return out


def unet_output(pipe) -> torch.Tensor:
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 5, TEXT, generator=generator)
    added = {"text_embeds": torch.randn(1, 32, generator=generator), "time_ids": torch.randn(1, 6, generator=generator)}
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample


def lora_layers(unet) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in unet.named_modules() if isinstance(module, LoraLayer)]


def peft_state(unet) -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=PIVOT_LORA)


def test_convert_writes_encoder_and_lora(converted):
    assert (converted / "diffusion_pytorch_model.safetensors").is_file() and (converted / LORA_FILE).is_file()
    assert not list(converted.parent.glob(".*converting"))


def test_checkpoint_loads_encoder_and_lora_into_tiny_sdxl(checkpoint, converted):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint has its LoRA: no warning
        pipe = load_pipeline("tiny-sdxl", pivot_encoder=str(checkpoint), device="cpu")
    assert pipe.pivot_encoder.config.fusion == "mlp" and pipe.pivot_encoder.config.text_width == TEXT
    assert pipe.get_list_adapters() == {"unet": [PIVOT_LORA]}
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q" in lora_layers(pipe.unet)
    with_lora = unet_output(pipe)
    pipe.disable_lora()
    without = unet_output(pipe)
    print(f"PhotoMaker LoRA changes the tiny UNet output by max {(with_lora - without).abs().max():.3g}")
    assert (with_lora - without).abs().max() > 1e-3
    plain = load_pipeline("tiny-sdxl", pivot_encoder=str(converted), device="cpu")
    assert plain.get_list_adapters() == {"unet": [PIVOT_LORA]}  # the converted folder brings its LoRA
    pipe.enable_lora()
    ours, theirs = peft_state(pipe.unet), peft_state(plain.unet)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 4 * len(
        [n for n, _ in pipe.unet.named_modules() if n.endswith(("attn1", "attn2"))])
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert torch.equal(unet_output(plain), with_lora)


def test_user_loras_keep_the_pivot_lora_active(converted):
    pipe = load_pipeline("tiny-sdxl", pivot_encoder=str(converted), device="cpu")
    load_loras(pipe, [LoraSpec(converted / LORA_FILE, 0.5)])
    assert set(pipe.get_active_adapters()) == {PIVOT_LORA, "lora0"}


def test_generate_with_the_checkpoint_end_to_end(tmp_path, checkpoint, astronaut_path, capsys):
    out = tmp_path / "pm.png"
    assert main(["generate", "--preset", "tiny-sdxl", *FAST, "--pivot-encoder", str(checkpoint), "--reference",
                 astronaut_path, "--prompt", "a photo of a woman", "--out", str(out)]) == 0
    assert out.is_file()
    assert "no pivot encoder" not in capsys.readouterr().err


def test_photomaker_with_sd15_is_one_clear_line(tmp_path, checkpoint, astronaut_path, capsys, monkeypatch):
    from omniportrait.pipelines import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("refused only after loading"))
    code = main(["generate", "--preset", "tiny-sd15", *FAST, "--pivot-encoder", str(checkpoint), "--reference",
                 astronaut_path, "--prompt", "a woman", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert "is PhotoMaker's, made for SDXL" in err[-1] and "--preset sdxl" in err[-1]
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="made for SDXL: it fuses 64-wide text states but this model's are 32"):
        load_pipeline("tiny-sd15", pivot_encoder=str(checkpoint), device="cpu")  # the Python API refuses too


def checkpoint_like_image(folder):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "me.png")
    return folder / "me.png"


def test_bad_checkpoints_are_refused_before_loading(tmp_path, capsys):
    state = {k: v for k, v in tiny_id_encoder_state().items() if not k.startswith("fuse_module.layer_norm")}
    broken = write_safetensors(tmp_path / "broken.safetensors", state, None)
    assert main(["convert", "photomaker", str(broken), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lacks fuse_module.layer_norm.weight" in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", "photomaker", str(checkpoint_like_image(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    assert "is not a PhotoMaker checkpoint file (.bin" in capsys.readouterr().err
    text_file = tmp_path / "notes.txt"
    text_file.write_text("x")
    assert main(["generate", "--preset", "tiny-sdxl", "--pivot-encoder", str(text_file), "--reference",
                 str(text_file), "--prompt", "a woman", "--out", str(tmp_path / "y.png")]) == 2
    assert "neither a pivot encoder folder nor a PhotoMaker checkpoint" in capsys.readouterr().err


def test_checkpoint_without_lora_warns(tmp_path):
    path = write_bin(tmp_path / "no-lora.bin", tiny_id_encoder_state(), None)
    with pytest.warns(UserWarning, match="has no lora_weights"):
        pipe = load_pipeline("tiny-sdxl", pivot_encoder=str(path), device="cpu")
    assert not lora_layers(pipe.unet)


def test_train_starts_from_photomaker(tmp_path, checkpoint):
    """``train --init photomaker:CKPT`` fine-tunes the PhotoMaker encoder (the LoRA loaded and frozen) and
    exports it with its LoRA, loadable by ``--pivot-encoder``."""
    from omniportrait.models.pivot_encoder import PivotIDEncoder
    from omniportrait.training.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "records", count=4, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "records"), "--output", str(out), "--preset", "tiny-sdxl",
                 "--init", f"photomaker:{checkpoint}", "--max-steps", "2", "--batch-size", "2", "--num-workers",
                 "0", "--sample-every", "0", "--no-progress", "--no-tensorboard", "--learning-rate", "1e-3"]) == 0
    trained = PivotIDEncoder.from_pretrained(out / "pivot_encoder")
    start = PivotIDEncoder.from_photomaker(checkpoint)
    assert trained.config.fusion == "mlp" and (out / "pivot_encoder" / LORA_FILE).is_file()
    assert not torch.equal(trained.fuse.mlp1.fc1.weight, start.fuse.mlp1.fc1.weight)
    pipe = load_pipeline("tiny-sdxl", pivot_encoder=str(out / "pivot_encoder"), device="cpu")
    assert pipe.get_list_adapters() == {"unet": [PIVOT_LORA]}


def test_init_and_pivot_encoder_together_are_refused(tmp_path, checkpoint, converted, capsys):
    (tmp_path / "records").mkdir()
    assert main(["train", "--data", str(tmp_path / "records"), "--output", str(tmp_path / "run"), "--init",
                 f"photomaker:{checkpoint}", "--pivot-encoder", str(converted)]) == 2
    assert "give one" in capsys.readouterr().err
