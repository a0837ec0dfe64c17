"""RB-Guidance on the tiny SD1.5 and SDXL pipelines (paper eqs. 9-11)."""

import numpy as np
import pytest
import torch

from omniportrait.guidance import RBGuidanceConfig
from omniportrait.guidance.mask import resize_mask
from omniportrait.guidance.rb import ReferenceGuidance
from omniportrait.pipelines import Identity
from omniportrait.pipelines.conditioning import GenerationCall
from tests.conftest import out_of_memory_on_calls

PROMPT = "a photo of a woman on the beach"
TWO = "a man and a woman on the beach"


def guidance_at_step(pipe, reference, prompt=PROMPT, words=("woman",), config=RBGuidanceConfig()):
    """A ReferenceGuidance ready to take a guided step, the latents and the conditioning."""
    bound = pipe.bind_identities(prompt, [Identity(reference, word) for word in words])
    cond = pipe.encode_text(prompt, None, 1, True, 64, 64, bound)
    guidance = ReferenceGuidance(pipe, config, bound, 64, 64, 1)
    pipe.scheduler.set_timesteps(10)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    return guidance, latents, cond


def test_energy_path_runs_and_gradient_is_zero_outside_the_mask(tiny_pipe, astronaut_reference):
    guidance, latents, cond = guidance_at_step(tiny_pipe, astronaut_reference)
    noise, gradient = guidance.noise_and_gradient(latents, torch.tensor(400), cond, 7.5)
    latent_mask = resize_mask(guidance.record.gen_masks, (32, 32))[:, 0:1].expand_as(gradient)
    assert torch.isfinite(noise).all()
    assert gradient[~latent_mask].abs().max() == 0
    assert gradient[latent_mask].abs().max() > 0


def test_small_step_against_the_gradient_lowers_the_energy(tiny_pipe, astronaut_reference):
    config = RBGuidanceConfig(background_masking=False)
    guidance, latents, cond = guidance_at_step(tiny_pipe, astronaut_reference, config=config)
    t = torch.tensor(400)
    _, gradient = guidance.noise_and_gradient(latents, t, cond, 7.5)
    masks, before = guidance.record.gen_masks, guidance.record.energies[0]
    step = 1e-2 * gradient / gradient.norm()
    guidance.noise_and_gradient(latents - step, t, cond, 7.5, masks=masks)
    assert guidance.record.energies[0] < before


def test_two_identities_have_disjoint_masks_and_gradients_inside_their_own(tiny_pipe, astronaut_reference):
    guidance, latents, cond = guidance_at_step(tiny_pipe, astronaut_reference, TWO, ("man", "woman"))
    guidance.noise_and_gradient(latents, torch.tensor(400), cond, 7.5)
    masks = guidance.record.gen_masks
    assert masks.shape[1] == 2 and (masks.sum(dim=1) <= 1).all()
    latent_masks = resize_mask(masks, (32, 32))
    for index, gradient in enumerate(guidance.record.gradients):
        outside = ~latent_masks[:, index : index + 1].expand_as(gradient)
        assert gradient[outside].abs().max() == 0


def test_non_finite_gradient_is_skipped_with_one_warning(tiny_pipe, astronaut_reference):
    guidance, latents, cond = guidance_at_step(tiny_pipe, astronaut_reference,
                                               config=RBGuidanceConfig(strength=float("inf")))
    for _ in range(2):
        _, gradient = guidance.noise_and_gradient(latents, torch.tensor(400), cond, 7.5)
    assert torch.equal(gradient, torch.zeros_like(gradient))
    assert (guidance.record.skipped_steps, guidance.record.guided_steps) == (2, 0)
    with pytest.warns(UserWarning, match="non-finite gradient on 2 step") as caught:
        guidance.finish()
    assert len(caught) == 1


def test_a_generation_warns_once_after_sampling_when_gradients_were_not_finite(tiny_pipe, astronaut_reference):
    with pytest.warns(UserWarning, match="non-finite gradient on 4 step") as caught:
        out = run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(strength=float("inf")))
    assert len([w for w in caught if "non-finite" in str(w.message)]) == 1
    assert np.isfinite(out.images).all()


def test_no_attention_is_kept_after_sampling(tiny_pipe, astronaut_reference):
    out = run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig())
    assert out.guidance.record.guided_steps > 0
    assert not out.guidance.store.self_qk and not out.guidance.store.cross_maps


def test_cuda_timesteps_are_read_from_the_host_schedule(tiny_pipe, astronaut_reference):
    guidance, _, _ = guidance_at_step(tiny_pipe, astronaut_reference)
    on_device = torch.tensor(0, device="meta")  # stands in for a CUDA tensor, which int() would wait for
    assert guidance.host_timestep(on_device, 3) == float(tiny_pipe.scheduler.timesteps[3])
    assert guidance.host_timestep(torch.tensor(400), 3) == 400.0


def test_plain_steps_record_cross_attention_only(tiny_pipe, astronaut_reference):
    guidance, latents, cond = guidance_at_step(tiny_pipe, astronaut_reference)
    guidance.plain_noise(latents, torch.tensor(400), cond, 7.5)
    assert guidance.store.cross_maps and not guidance.store.self_qk


def run(pipe, reference, **kwargs):
    return pipe(PROMPT, identities=[Identity(reference, "woman")], num_inference_steps=6, guidance_scale=7.5,
                output_type="np", generator=torch.Generator().manual_seed(0), **kwargs)


def test_no_rb_is_the_foundation_pipeline_bit_for_bit_and_rb_changes_the_image(tiny_pipe, astronaut_reference):
    off = run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(enabled=False))
    assert off.guidance is None
    bound = tiny_pipe.bind_identities(PROMPT, [Identity(astronaut_reference, "woman")])
    cond = tiny_pipe.encode_text(PROMPT, None, 1, True, 64, 64, bound)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    timesteps, _ = retrieve_timesteps(tiny_pipe.scheduler, 6, "cpu")
    latents = tiny_pipe.prepare_latents(1, 4, 64, 64, cond.prompt_embeds.dtype, "cpu",
                                        torch.Generator().manual_seed(0))
    foundation = tiny_pipe.decode(tiny_pipe.denoise(latents, timesteps, cond, GenerationCall(guidance_scale=7.5)), "np")
    assert np.array_equal(off.images, foundation)
    on = run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(strength=5000.0))
    assert on.guidance.record.guided_steps > 0
    assert np.abs(on.images - off.images).max() > 1e-4


@pytest.mark.parametrize("feature_pass", ["split", "separate"])
def test_every_feature_pass_gives_the_same_guidance_for_several_images(feature_pass, tiny_pipe, astronaut_reference):
    def images(**kwargs):
        return run(tiny_pipe, astronaut_reference, num_images_per_prompt=2,
                   rb_guidance=RBGuidanceConfig(**kwargs)).images

    fused, other = images(strength=5000.0), images(strength=5000.0, feature_pass=feature_pass)
    assert np.abs(fused - images(enabled=False)).max() > 1e-3  # the guidance changes the images
    assert np.abs(fused - other).max() < 1e-5


def test_split_feature_pass_gives_the_noise_and_gradient_of_the_batched_pass(tiny_pipe, astronaut_reference):
    pipe = tiny_pipe
    batched, latents, cond = guidance_at_step(pipe, astronaut_reference, config=RBGuidanceConfig(strength=5000.0))
    split, _, _ = guidance_at_step(pipe, astronaut_reference,
                                   config=RBGuidanceConfig(strength=5000.0, feature_pass="split"))
    noise, gradient = batched.noise_and_gradient(latents, torch.tensor(400), cond, 7.5)
    split_noise, split_gradient = split.noise_and_gradient(latents, torch.tensor(400), cond, 7.5)
    assert gradient.abs().max() > 1e-3
    assert torch.allclose(split_noise, noise, atol=1e-4)  # batch 1 and batch 2 kernels round differently
    assert torch.allclose(split_gradient, gradient, atol=1e-4 * float(gradient.abs().max()))
    assert torch.equal(split.record.gen_masks, batched.record.gen_masks)
    assert split.store.rows == batched.store.rows  # the store records CFG rows again on the next plain step


def test_gradient_interval_adds_the_last_gradient_between_recomputations(tiny_pipe, astronaut_reference):
    guidance, latents, cond = guidance_at_step(tiny_pipe, astronaut_reference,
                                               config=RBGuidanceConfig(gradient_interval=2))
    t = torch.tensor(400)
    guidance.noise(latents, t, 0, cond, 7.5)
    gradient = guidance.last_gradient
    reused = guidance.noise(latents, t, 1, cond, 7.5)
    plain = guidance.plain_noise(latents, t, cond, 7.5)
    assert gradient.abs().max() > 0
    assert torch.allclose(reused, plain + gradient, atol=1e-6)
    guidance.noise(0.9 * latents, t, 2, cond, 7.5)
    assert not torch.equal(guidance.last_gradient, gradient)
    assert (guidance.record.guided_steps, guidance.record.reused_steps) == (2, 1)


def test_gradient_interval_counts_backward_passes_over_a_generation(tiny_pipe, astronaut_reference):
    every = run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(start=1.0))
    third = run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(start=1.0, gradient_interval=3))
    assert (every.guidance.record.guided_steps, every.guidance.record.reused_steps) == (6, 0)
    assert (third.guidance.record.guided_steps, third.guidance.record.reused_steps) == (2, 4)


def test_gradient_interval_keeps_the_direction_of_the_guidance_effect(tiny_pipe, astronaut_reference):
    def latents(**kwargs):
        return tiny_pipe(PROMPT, identities=[Identity(astronaut_reference, "woman")], num_inference_steps=12,
                         output_type="latent", generator=torch.Generator().manual_seed(0),
                         rb_guidance=RBGuidanceConfig(**kwargs)).images.flatten()

    off = latents(enabled=False)
    every = latents(strength=5000.0) - off
    second = latents(strength=5000.0, gradient_interval=2) - off
    assert every.norm() > 0.1
    assert torch.nn.functional.cosine_similarity(every, second, dim=0) > 0.95
    assert (second - every).norm() < 0.3 * every.norm()


def test_half_precision_gradient_does_not_underflow(astronaut_reference):
    from tests.conftest import build

    pipe = build("sd15").to(torch.float16)
    guidance, latents, cond = guidance_at_step(pipe, astronaut_reference)
    _, gradient = guidance.noise_and_gradient(latents.to(torch.float16), torch.tensor(400), cond, 7.5)
    assert gradient.dtype == torch.float32 and torch.isfinite(gradient).all()
    assert gradient.abs().max() > 0


@pytest.mark.parametrize("where", ["generated_masks", "backward"])  # before / after the running mean is updated
def test_a_cfg_step_out_of_memory_goes_on_with_the_split_pass(where, tiny_pipe, astronaut_reference, monkeypatch):
    from omniportrait.guidance import rb

    split = run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(strength=5000.0, feature_pass="split"))
    with monkeypatch.context() as patch:
        if where == "backward":
            patch.setattr(rb.torch.autograd, "grad", out_of_memory_on_calls(torch.autograd.grad, last=1))
        else:
            patch.setattr(rb.ReferenceGuidance, "generated_masks",
                          out_of_memory_on_calls(rb.ReferenceGuidance.generated_masks, last=1))
        with pytest.warns(UserWarning, match="ran out of GPU memory; it and the later steps use the split pass"):
            fallen_back = run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(strength=5000.0))
    assert fallen_back.guidance.config.feature_pass == "split"
    assert fallen_back.guidance.record.gradient_steps == split.guidance.record.gradient_steps  # counted once
    assert np.array_equal(fallen_back.images, split.images)  # the running mean as if split had run all along


@pytest.mark.parametrize("config", [RBGuidanceConfig(feature_pass="split"), RBGuidanceConfig(feature_pass="separate")])
def test_out_of_memory_in_another_pass_is_raised(config, tiny_pipe, astronaut_reference, monkeypatch):
    from omniportrait.guidance import rb

    monkeypatch.setattr(rb.torch.autograd, "grad", out_of_memory_on_calls(torch.autograd.grad, last=1))
    with pytest.raises(torch.OutOfMemoryError):
        run(tiny_pipe, astronaut_reference, rb_guidance=config)


@pytest.mark.parametrize("feature_pass", ["cfg", "split"])
def test_without_cfg_the_guidance_runs_on_the_one_conditional_pass(feature_pass, tiny_pipe, astronaut_reference):
    """A guidance scale <= 1 means no CFG, as in diffusers: every row of the UNet batch is conditional."""
    def images(**config):
        return tiny_pipe(PROMPT, identities=[Identity(astronaut_reference, "woman")], num_inference_steps=4, guidance_scale=1.0,
                         output_type="np", generator=torch.Generator().manual_seed(0),
                         rb_guidance=RBGuidanceConfig(strength=5000.0, start=1.0, **config))

    guided = images(feature_pass=feature_pass)
    assert guided.guidance.record.guided_steps == 4 and guided.guidance.record.gen_masks.shape[0] == 1
    assert np.abs(guided.images - images(enabled=False).images).max() > 1e-3


def test_each_gradient_step_reports_its_calibration_numbers(tiny_pipe, astronaut_reference):
    out = run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(strength=5000.0, start=1.0))
    steps = out.calibration()
    assert len(steps) == out.guidance.record.guided_steps == 6
    for step in steps:
        (row,) = step["identities"]
        assert 0.0 <= row["mean_similarity"] <= 1.0 and row["ref_mask_points"] >= 1
        assert 0 <= row["gen_mask_points"] <= out.guidance.record.feature_size[0] * out.guidance.record.feature_size[1]
        assert row["gradient_to_noise"] > 0
    reference = out.guidance.references[0]
    assert steps[0]["identities"][0]["ref_mask_points"] == int(reference.mask.sum())
    assert [step["timestep"] for step in steps] == sorted((step["timestep"] for step in steps), reverse=True)


def test_the_gradient_to_noise_ratio_grows_with_the_strength_and_per_point_scales_it_by_the_mask(
        tiny_pipe, astronaut_reference):
    def first_ratio(**config):
        out = run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(start=1.0, **config))
        return out.calibration()[0]["identities"][0]

    low, high = first_ratio(strength=10.0), first_ratio(strength=1000.0)
    assert high["gradient_to_noise"] == pytest.approx(100 * low["gradient_to_noise"], rel=1e-3)
    per_point = first_ratio(strength=10.0, strength_per_point=True)
    assert per_point["gradient_to_noise"] == pytest.approx(low["gradient_to_noise"] * low["ref_mask_points"],
                                                           rel=1e-3)
