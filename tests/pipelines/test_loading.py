import pytest
import torch
from diffusers import EulerDiscreteScheduler

from omniportrait.errors import ConfigError
from omniportrait.models.tiny import tiny_components
from omniportrait.pipelines import OmniPortraitSDXLPipeline
from omniportrait.pipelines.loading import PRESETS, get_preset, load_pipeline, resolve_device, resolve_dtype
from tests.conftest import max_abs_diff


def sample(pipe):
    return pipe("a woman", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_presets_name_arch_and_size():
    assert {name: (p.arch, p.size) for name, p in PRESETS.items()} == {
        "tiny-sd15": ("sd15", 64), "tiny-sdxl": ("sdxl", 64), "sd15": ("sd15", 512), "sdxl": ("sdxl", 1024)}
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("sd3")


def test_local_diffusers_folder_loads_with_its_architecture(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    tiny = tiny_components("sdxl")
    StableDiffusionXLPipeline(**tiny.components).save_pretrained(tmp_path / "base")
    tiny.pivot_encoder.save_pretrained(tmp_path / "pie")
    with pytest.warns(UserWarning, match="identity will be weak"):
        loaded = load_pipeline(None, base=str(tmp_path / "base"))
    assert isinstance(loaded, OmniPortraitSDXLPipeline) and loaded.pivot_encoder is None
    with_pie = load_pipeline(None, base=str(tmp_path / "base"), pivot_encoder=str(tmp_path / "pie"))
    preset = load_pipeline("tiny-sdxl")
    for pipe in (with_pie, preset):
        pipe.set_progress_bar_config(disable=True)
    assert max_abs_diff(sample(with_pie), sample(preset)) <= 1e-5


def test_pivot_encoder_of_the_wrong_width_is_refused(tmp_path):
    tiny_components("sdxl").pivot_encoder.save_pretrained(tmp_path / "pie-xl")
    with pytest.raises(ConfigError, match="wide"):
        load_pipeline("tiny-sd15", pivot_encoder=str(tmp_path / "pie-xl"))


def test_missing_paths_and_bad_names_are_config_errors(tmp_path):
    for kwargs in (dict(base=str(tmp_path / "none.safetensors")), dict(base=str(tmp_path)),
                   dict(pivot_encoder=str(tmp_path / "nope")), dict(scheduler="magic"), dict(dtype="fp8")):
        with pytest.raises(ConfigError):
            load_pipeline("tiny-sd15", **kwargs)


def test_any_scheduler_can_be_swapped_in():
    pipe = load_pipeline("tiny-sd15", scheduler="euler")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    pipe.set_progress_bar_config(disable=True)
    assert sample(pipe).shape == (1, 64, 64, 3)


def test_dtype_auto_is_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16


def test_a_cuda_device_the_machine_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"'cuda:2' is not on this machine; its CUDA devices: cuda:0, cuda:1"):
        resolve_device("cuda:2")
