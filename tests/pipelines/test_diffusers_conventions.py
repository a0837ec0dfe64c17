"""diffusers' generic pipeline conventions, checked on our pipelines with tiny components: the call signature and
return types, batching, callbacks, output types, devices and dtypes, saving and loading, ``from_pipe``, and the
sampling arguments (``guidance_rescale``, ``clip_skip``, custom ``timesteps``/``sigmas``, DDIM's ``eta``) giving
diffusers' own image. Where a convention also applies with identities and RB-Guidance on, that case is checked too."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.utils import BaseOutput
from PIL import Image

from omniportrait.errors import ConfigError
from omniportrait.pipelines import Identity
from tests.conftest import OURS, THEIRS, build, max_abs_diff

PROMPT = "a photo of a woman"
OTHER_PROMPT = "a portrait of a woman"  # the class word at the same token position
SIZE, LATENT = 64, 32  # the tiny VAE downsamples by 2


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    """One tiny pipeline per architecture for the module; tests that change a pipeline make their own."""
    return build(request.param)


def arch_of(pipe) -> str:
    return "sdxl" if hasattr(pipe, "text_encoder_2") else "sd15"


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def generate(pipe, prompt=PROMPT, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", "generator": seeded(), **kwargs}
    return pipe(prompt, **kwargs)


def identity(reference) -> dict:
    return {"identities": [Identity(reference, "woman")]}


def diffusers_of(pipe, **components):
    """diffusers' own pipeline on the same components."""
    return THEIRS[arch_of(pipe)].from_pipe(pipe, **components)


# ----- signature and return types ---------------------------------------------------------------------------------
def test_call_keeps_diffusers_signature_and_appends_ours_as_keywords(pipe):
    ours = inspect.signature(type(pipe).__call__).parameters
    theirs = inspect.signature(THEIRS[arch_of(pipe)].__call__).parameters
    theirs_names = [name for name in theirs if name not in ("kwargs", "callback", "callback_steps")]
    assert list(ours)[: len(theirs_names)] == theirs_names
    assert all(ours[name].default == theirs[name].default for name in theirs_names)
    assert list(ours)[len(theirs_names):] == ["identities", "rb_guidance"]
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY for name in ("identities", "rb_guidance"))


def test_optional_components_extend_diffusers(pipe):
    theirs = THEIRS[arch_of(pipe)]._optional_components
    ours = type(pipe)._optional_components
    assert ours[: len(theirs)] == theirs and "pivot_encoder" in ours


def test_output_is_a_base_output_and_return_dict_false_is_diffusers_tuple(pipe):
    output = generate(pipe)
    assert isinstance(output, BaseOutput) and output.nsfw_content_detected is None
    returned = generate(pipe, return_dict=False)
    assert isinstance(returned, tuple) and len(returned) == (1 if arch_of(pipe) == "sdxl" else 2)
    assert np.array_equal(returned[0], output.images)
    assert type(returned) is type(diffusers_of(pipe)(PROMPT, num_inference_steps=1, output_type="latent",
                                                     return_dict=False))


def test_output_types(pipe):
    array = generate(pipe).images
    tensor = generate(pipe, output_type="pt").images
    latents = generate(pipe, output_type="latent").images
    images = generate(pipe, output_type="pil").images
    assert array.shape == (1, SIZE, SIZE, 3) and tensor.shape == (1, 3, SIZE, SIZE)
    assert latents.shape == (1, 4, LATENT, LATENT)
    assert isinstance(images, list) and isinstance(images[0], Image.Image) and images[0].size == (SIZE, SIZE)
    assert max_abs_diff(tensor.permute(0, 2, 3, 1).numpy(), array) <= 1e-6
    assert max_abs_diff(np.asarray(images[0]), np.round(array[0] * 255)) <= 1


# ----- batches ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_a_batch_of_prompts_gives_each_prompt_s_own_image(pipe, guided, astronaut_reference):
    extra = identity(astronaut_reference) if guided else {}
    batch = generate(pipe, [PROMPT, OTHER_PROMPT], generator=[seeded(0), seeded(1)], **extra).images
    alone = [generate(pipe, prompt, generator=seeded(seed), **extra).images[0]
             for seed, prompt in enumerate([PROMPT, OTHER_PROMPT])]
    assert batch.shape == (2, SIZE, SIZE, 3)
    assert max_abs_diff(batch, np.stack(alone)) <= 1e-4


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_num_images_per_prompt(pipe, guided, astronaut_reference):
    extra = identity(astronaut_reference) if guided else {}
    output = generate(pipe, [PROMPT, OTHER_PROMPT], num_images_per_prompt=3, **extra)
    assert output.images.shape == (6, SIZE, SIZE, 3)
    assert max_abs_diff(output.images[0], output.images[1]) > 1e-3  # each image its own noise
    if guided:
        assert output.guidance.record.gen_masks.shape[:2] == (6, 1)


def test_prompt_embeds_give_the_prompt_s_image_and_identities_need_the_text(pipe, astronaut_reference):
    if arch_of(pipe) == "sdxl":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device="cpu")
        given = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                     negative_pooled_prompt_embeds=negative_pooled)
    else:
        embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
        given = dict(prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert max_abs_diff(generate(pipe, None, **given).images, generate(pipe).images) <= 1e-6
    with pytest.raises(ConfigError, match="prompt as text"):
        generate(pipe, None, **given, **identity(astronaut_reference))


# ----- callbacks --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_a_callback_sees_the_tensors_it_asks_for_and_can_change_the_latents(pipe, guided, astronaut_reference):
    extra = identity(astronaut_reference) if guided else {}
    seen = []

    def zero_latents(pipeline, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 1 else {}

    names = list(type(pipe)._callback_tensor_inputs)
    output = generate(pipe, output_type="latent", callback_on_step_end=zero_latents,
                      callback_on_step_end_tensor_inputs=names, **extra)
    assert seen == [(0, sorted(names)), (1, sorted(names))]
    assert torch.equal(output.images, torch.zeros_like(output.images))


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_a_callback_can_stop_sampling_early(pipe, guided, astronaut_reference):
    extra = identity(astronaut_reference) if guided else {}
    steps, kept = [], []

    def interrupt(pipeline, step, timestep, tensors):
        steps.append(step)
        kept.append(tensors["latents"].clone())
        pipeline._interrupt = True
        return {}

    output = generate(pipe, num_inference_steps=3, output_type="latent", callback_on_step_end=interrupt, **extra)
    assert steps == [0] and torch.equal(output.images, kept[0])
    after = generate(pipe, num_inference_steps=3, output_type="latent", **extra).images
    assert max_abs_diff(after, kept[0]) > 1e-3  # the next call runs every step again


# ----- devices, dtypes, saving and loading ------------------------------------------------------------------------
def test_to_moves_every_component_and_sets_the_dtype():
    pipe = build("sd15")
    assert pipe.to("cpu") is pipe and pipe.device.type == "cpu"
    pipe.to(torch.bfloat16)
    modules = [pipe.unet, pipe.vae, pipe.text_encoder, pipe.pivot_encoder]
    assert pipe.dtype == torch.bfloat16 and all(module.dtype == torch.bfloat16 for module in modules)
    assert generate(pipe, num_inference_steps=1, output_type="latent").images.dtype == torch.bfloat16


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.pivot_encoder) is type(pipe.pivot_encoder)
    assert max_abs_diff(generate(loaded).images, generate(pipe).images) <= 1e-6


def test_from_pipe_both_ways_shares_the_components(pipe):
    theirs = diffusers_of(pipe)
    assert type(theirs) is THEIRS[arch_of(pipe)] and theirs.unet is pipe.unet
    ours = OURS[arch_of(pipe)].from_pipe(theirs)
    assert type(ours) is OURS[arch_of(pipe)] and ours.unet is pipe.unet and ours.pivot_encoder is None
    theirs.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    assert max_abs_diff(generate(theirs).images, generate(pipe).images) <= 1e-5
    assert max_abs_diff(generate(ours).images, generate(pipe).images) <= 1e-6


# ----- sampling arguments: diffusers' own image ---------------------------------------------------------------------
def assert_diffusers_image(pipe, **kwargs):
    """Our image equals diffusers' for the same arguments, and differs from the defaults' (so the argument acted)."""
    ours = generate(pipe, **kwargs).images
    theirs = diffusers_of(pipe)
    theirs.set_progress_bar_config(disable=True)
    assert max_abs_diff(ours, generate(theirs, **kwargs).images) <= 1e-5
    assert max_abs_diff(ours, generate(pipe).images) > 1e-4


def test_guidance_rescale(pipe, astronaut_reference):
    assert_diffusers_image(pipe, guidance_rescale=0.7)
    guided, rescaled = (generate(pipe, guidance_rescale=rescale, **identity(astronaut_reference))
                        for rescale in (0.0, 0.7))
    assert max_abs_diff(guided.images, rescaled.images) > 1e-4 and rescaled.guidance.record.guided_steps > 0


def test_clip_skip_on_sdxl():
    """SDXL only: diffusers' SD1.x ``encode_prompt`` with ``clip_skip`` reads ``text_encoder.text_model``, which
    transformers 5's ``CLIPTextModel`` no longer has (it fails the same in diffusers' own pipeline)."""
    assert_diffusers_image(build("sdxl"), clip_skip=1)


def test_eta_with_ddim(pipe):
    assert pipe.scheduler.__class__.__name__ == "DDIMScheduler"
    assert_diffusers_image(pipe, eta=1.0)


@pytest.mark.parametrize("schedule", [{"timesteps": [999, 500, 100]}, {"sigmas": [14.0, 3.0, 0.5]}],
                         ids=["timesteps", "sigmas"])
def test_custom_schedules(pipe, schedule):
    euler = OURS[arch_of(pipe)].from_pipe(pipe, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    euler.set_progress_bar_config(disable=True)
    seen = []
    generate(euler, callback_on_step_end=lambda p, i, t, x: seen.append(float(t)) or {},
             **schedule)
    expected = schedule.get("timesteps") or euler.scheduler.timesteps.tolist()
    assert len(seen) >= 2 and seen == pytest.approx(expected)
    if "sigmas" in schedule:
        assert euler.scheduler.sigmas[: len(seen)].tolist() == pytest.approx(schedule["sigmas"][: len(seen)])
    assert_diffusers_image(euler, **schedule)
