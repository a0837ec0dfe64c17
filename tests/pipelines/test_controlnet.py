"""The ControlNet pipelines: diffusers' with no identity; control residuals in every guided pass that needs them."""

import numpy as np
import pytest
import torch
from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
from PIL import Image

from omniportrait.guidance import RBGuidanceConfig
from omniportrait.models.tiny import tiny_components, tiny_controlnet
from omniportrait.pipelines import Identity, OmniPortraitSDControlNetPipeline, OmniPortraitSDXLControlNetPipeline
from tests.conftest import max_abs_diff

OURS = {"sd15": OmniPortraitSDControlNetPipeline, "sdxl": OmniPortraitSDXLControlNetPipeline}
THEIRS = {"sd15": StableDiffusionControlNetPipeline, "sdxl": StableDiffusionXLControlNetPipeline}
PROMPT = "a photo of a woman dancing"


def control_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def build_controlnet(arch: str, ours: bool = True, count: int = 1):
    tiny = tiny_components(arch)
    nets = [tiny_controlnet(tiny.components["unet"], seed=index) for index in range(count)]
    kwargs = dict(tiny.components, controlnet=nets[0] if count == 1 else MultiControlNetModel(nets))
    if ours:
        kwargs["pivot_encoder"] = tiny.pivot_encoder
    pipe = (OURS if ours else THEIRS)[arch](**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, image, **kwargs):
    return pipe(PROMPT, image=image, height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


@pytest.mark.parametrize("options", [dict(), dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.25),
                                     dict(guess_mode=True)], ids=["default", "scale-window", "guess-mode"])
def test_with_no_identity_ours_equal_diffusers_controlnet_pipelines(options, arch):
    ours, theirs = build_controlnet(arch), build_controlnet(arch, ours=False)
    difference = max_abs_diff(generate(ours, control_image(), **options), generate(theirs, control_image(), **options))
    print(f"{arch} controlnet {options} parity max abs diff: {difference:.3g}")
    assert difference <= 1e-5


def test_multi_controlnet_equals_diffusers(arch):
    ours, theirs = build_controlnet(arch, count=2), build_controlnet(arch, ours=False, count=2)
    images, scales = [control_image(0), control_image(1)], [0.8, 0.5]
    difference = max_abs_diff(generate(ours, images, controlnet_conditioning_scale=scales),
                              generate(theirs, images, controlnet_conditioning_scale=scales))
    assert difference <= 1e-5


def test_the_control_image_changes_the_image(arch):
    pipe = build_controlnet(arch)
    assert max_abs_diff(generate(pipe, control_image(0)), generate(pipe, control_image(1))) > 1e-3


def guided(pipe, reference, **config):
    return generate(pipe, control_image(), identities=[Identity(reference, "woman")],
                    rb_guidance=RBGuidanceConfig(strength=5000.0, start=1.0, **config))


@pytest.mark.parametrize("feature_pass", ["cfg", "split", "separate"])
def test_every_guided_pass_gets_the_residuals_and_the_reference_pass_none(feature_pass, astronaut_reference):
    pipe = build_controlnet("sd15")
    calls = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("down_block_additional_residuals") is not None),
        with_kwargs=True)
    try:
        guided(pipe, astronaut_reference, feature_pass=feature_pass)
    finally:
        handle.remove()
    assert calls[0] is False  # the reference features' pass, before sampling
    assert all(calls[1:]) and len(calls) >= 5  # 4 guided steps, one or two passes each


def test_the_feature_passes_agree_and_the_guidance_still_acts_under_control(astronaut_reference):
    pipe = build_controlnet("sd15")
    batched = guided(pipe, astronaut_reference)
    for feature_pass in ("split", "separate"):
        assert max_abs_diff(guided(pipe, astronaut_reference, feature_pass=feature_pass), batched) < 1e-4
    plain = generate(pipe, control_image(), identities=[Identity(astronaut_reference, "woman")],
                     rb_guidance=RBGuidanceConfig(enabled=False))
    assert max_abs_diff(batched, plain) > 1e-4


def test_replayed_steps_with_a_controlnet_give_the_eager_images(monkeypatch, astronaut_reference):
    from omniportrait.guidance.steps import StepRunner
    from tests.guidance.test_graph import EmulatedGraphs

    pipe = build_controlnet("sd15")
    eager = guided(pipe, astronaut_reference, cuda_graph=False)
    monkeypatch.setattr(StepRunner, "graph_backend", EmulatedGraphs)
    EmulatedGraphs.calls.update(warm_up=0, capture=0, replay=0)
    assert max_abs_diff(guided(pipe, astronaut_reference, cuda_graph=True), eager) < 1e-5
    assert EmulatedGraphs.calls["replay"] > 0


def test_a_control_scale_that_changes_over_the_steps_runs_eagerly(monkeypatch, astronaut_reference):
    from omniportrait.errors import ConfigError
    from omniportrait.guidance.steps import StepRunner
    from tests.guidance.test_graph import EmulatedGraphs

    monkeypatch.setattr(StepRunner, "graph_backend", EmulatedGraphs)
    pipe = build_controlnet("sd15")
    identities = [Identity(astronaut_reference, "woman")]
    output = pipe(PROMPT, image=control_image(), height=64, width=64, num_inference_steps=4, output_type="np",
                  control_guidance_end=0.5, identities=identities, rb_guidance=RBGuidanceConfig(start=1.0))
    assert output.guidance.config.cuda_graph is False
    with pytest.raises(ConfigError, match="ControlNet scale that is the same at every step"):
        pipe(PROMPT, image=control_image(), height=64, width=64, num_inference_steps=4, control_guidance_end=0.5,
             identities=identities, rb_guidance=RBGuidanceConfig(cuda_graph=True))


@pytest.mark.parametrize("arch_name", ["sd15", "sdxl"])
def test_call_keeps_diffusers_controlnet_signature_and_optional_components(arch_name):
    import inspect

    ours = inspect.signature(OURS[arch_name].__call__).parameters
    theirs = inspect.signature(THEIRS[arch_name].__call__).parameters
    theirs_names = [name for name in theirs if name != "kwargs"]
    assert list(ours)[: len(theirs_names)] == theirs_names
    assert all(ours[name].default == theirs[name].default for name in theirs_names)
    assert list(ours)[len(theirs_names):] == ["identities", "rb_guidance"]
    assert OURS[arch_name]._optional_components == [*THEIRS[arch_name]._optional_components, "pivot_encoder"]


def test_from_pipe_both_ways_and_the_tuple_output(arch):
    ours = build_controlnet(arch)
    theirs = THEIRS[arch].from_pipe(ours)
    back = OURS[arch].from_pipe(theirs)
    assert back.controlnet is ours.controlnet and back.unet is ours.unet and back.pivot_encoder is None
    result = ours(PROMPT, image=control_image(), num_inference_steps=2, output_type="np", return_dict=False)
    assert isinstance(result, tuple) and result[0].shape == (1, 64, 64, 3)  # the size of the control image
