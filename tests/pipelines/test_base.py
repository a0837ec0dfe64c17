"""The shared pipeline lifecycle: attention while sampling, VAE precision around encoding and decoding, and a
generation that fails midway (out of memory, say) putting back what it changed."""

import numpy as np
import pytest
import torch

from omniportrait.errors import ConfigError
from omniportrait.models.banded_decode import DEFAULT_BAND_MIB
from tests.conftest import build, out_of_memory_on_calls


def vae_input_dtypes(pipe) -> list[torch.dtype]:
    """Record the dtype each VAE encode/decode call receives."""
    seen = []
    for name in ("encode", "decode"):
        original = getattr(pipe.vae, name)

        def recording(sample, *args, _original=original, **kwargs):
            seen.append(sample.dtype)
            return _original(sample, *args, **kwargs)

        setattr(pipe.vae, name, recording)
    return seen


@pytest.mark.parametrize("arch, expected", [("sdxl", torch.float32), ("sd15", torch.float16)])
def test_fp16_vae_runs_in_fp32_only_where_the_model_asks_for_it(arch, expected):
    pipe = build(arch).to(torch.float16)
    assert pipe.vae.config.force_upcast
    seen = vae_input_dtypes(pipe)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = pipe.encode_image_latents(pixels)
    pipe.decode(latents.to(torch.float16), "np")
    assert seen == [expected, expected]
    assert latents.dtype == torch.float32 and pipe.vae.dtype == torch.float16


def decoder_input_dtypes(pipe) -> list[torch.dtype]:
    """Record the dtype the VAE decoder's first layer receives (diffusers' decode and the banded one both run it)."""
    seen = []
    pipe.vae.decoder.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    return seen


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_banded_decode_gives_the_same_images_in_the_working_precision(arch):
    pipe = build(arch)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = pipe.decode(latents, "np")
    pipe.enable_banded_decode(1e-6)  # one row per band
    half = build(arch).to(torch.float16)
    half.enable_banded_decode(1e-6)
    seen = decoder_input_dtypes(half)
    diffusers_decodes = vae_input_dtypes(pipe)
    banded = pipe.decode(latents, "np")
    assert diffusers_decodes == []  # the layers ran in bands, not through diffusers' decode
    half.decode(latents.half(), "np")
    assert abs(banded - whole).max() < 1e-5 and banded.shape == whole.shape
    assert seen == [torch.float32 if arch == "sdxl" else torch.float16]
    pipe.disable_banded_decode()
    assert (pipe.decode(latents, "np") == whole).all()


def test_a_decode_that_runs_out_of_memory_is_done_in_bands(arch, monkeypatch):
    from omniportrait.pipelines import base

    pipe = build(arch)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = pipe.decode(latents, "np")
    bands, decode_in_bands = [], base.decode_in_bands
    monkeypatch.setattr(pipe.vae, "decode", out_of_memory_on_calls(pipe.vae.decode))
    monkeypatch.setattr(base, "decode_in_bands", lambda *args: bands.append(args[2]) or decode_in_bands(*args))
    with pytest.warns(UserWarning, match="ran out of GPU memory; decoded in bands instead"):
        banded, in_bands, ran_out_of_memory = pipe.decode_images(latents, "np")
    assert bands == [DEFAULT_BAND_MIB] and in_bands and ran_out_of_memory and abs(banded - whole).max() < 1e-5
    pipe.enable_banded_decode(1)  # asked for: no whole decode is tried
    assert pipe.decode_images(latents, "np")[1:] == (True, False) and bands == [DEFAULT_BAND_MIB, 1]
    assert build(arch).decode_images(latents, "np")[1:] == (False, False)


@pytest.mark.parametrize("arch, dtype, device, default", [
    ("sdxl", torch.float16, "cuda", True),  # SDXL's VAE decodes in fp32 (force_upcast): its whole decode is the peak
    ("sdxl", torch.float32, "cuda", False),  # already fp32: nothing is upcast
    ("sdxl", torch.float16, "cpu", False),
    ("sd15", torch.float16, "cuda", False),  # decodes in fp16
])
def test_the_decode_runs_in_bands_by_default_where_the_vae_is_upcast_on_cuda(arch, dtype, device, default,
                                                                             monkeypatch):
    pipe = build(arch).to(dtype)
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda pipe: torch.device(device)))
    assert pipe.banded_decode is None and pipe.decodes_in_bands() is default
    pipe.disable_banded_decode()
    assert pipe.decodes_in_bands() is False
    pipe.enable_banded_decode()
    assert pipe.decodes_in_bands() is True


def test_banded_decode_needs_a_positive_band():
    with pytest.raises(ConfigError, match="positive"):
        build("sd15").enable_banded_decode(0)


def pipeline_state(pipe) -> tuple:
    """What a generation changes while it samples and must put back: attention processors, modules' forwards
    set on the instance, which weights require grad."""
    forwards = sorted(name for name, module in pipe.unet.named_modules() if "forward" in vars(module))
    return dict(pipe.unet.attn_processors), forwards, [p.requires_grad for p in pipe.unet.parameters()]


@pytest.mark.filterwarnings("ignore:a guided step with the batched cfg feature pass ran out of GPU memory")
@pytest.mark.parametrize("where", ["scheduler step", "guided backward"])
def test_a_generation_that_fails_midway_leaves_the_pipeline_as_it_was(arch, astronaut_reference, monkeypatch,
                                                                       where):
    from omniportrait.guidance import rb
    from omniportrait.pipelines import Identity

    def generate(pipe):
        return pipe("a photo of a woman", identities=[Identity(astronaut_reference, "woman")], num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    pipe, fresh = build(arch), build(arch)
    for unet in (pipe.unet, fresh.unet):
        unet.requires_grad_(True)  # as from_pretrained leaves it
    before = pipeline_state(pipe)
    with monkeypatch.context() as patch:  # 4 DDIM steps, the last three guided (t <= 0.6 T)
        if where == "scheduler step":
            patch.setattr(pipe.scheduler, "step", out_of_memory_on_calls(pipe.scheduler.step, 3))
        else:  # inside the guided step (gates recomputed, grad enabled), and again in the split pass it falls back to
            patch.setattr(rb.torch.autograd, "grad", out_of_memory_on_calls(torch.autograd.grad, 3))
        with pytest.raises(torch.OutOfMemoryError):
            generate(pipe)
    assert pipeline_state(pipe) == before
    assert torch.equal(generate(pipe), generate(fresh))


def test_a_vae_the_bands_do_not_support_decodes_whole_and_says_so():
    pipe = build("sdxl")
    pipe.enable_banded_decode()
    pipe.vae.enable_tiling()  # diffusers' tiles instead
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert pipe.decode_images(latents, "np")[1:] == (False, False)


def test_the_reference_is_encoded_on_the_execution_device_where_the_vae_is_offloaded():
    """Model offload keeps the VAE on the CPU until its hook moves it, not its inputs, to the execution device
    (``meta`` stands in for CUDA here), as diffusers' pipelines send their images there."""
    from accelerate import cpu_offload_with_hook

    pipe = build("sd15")
    cpu_offload_with_hook(pipe.vae, execution_device=torch.device("meta"))
    assert pipe.vae.device.type == "cpu" and pipe._execution_device.type == "meta"
    latents = pipe.encode_image_latents(torch.zeros(1, 3, 16, 16))
    side = 16 // pipe.vae_scale_factor
    assert latents.device.type == "meta" and latents.shape == (1, 4, side, side)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_a_pipeline_offloaded_layer_by_layer_generates_what_it_does_in_place(arch, astronaut_reference):
    """accelerate's sequential offload, as ``enable_sequential_cpu_offload`` sets it up (the CPU standing in for the
    execution device): every weight waits on ``meta`` until its layer runs, so the reference's pixels, the pivot
    encoder's input and the reference timestep must go to the execution device, and the bands (asked for here)
    give way to diffusers' decode, which calls each layer's hook."""
    from accelerate import cpu_offload

    from omniportrait.pipelines import Identity

    def generate(pipe):
        return pipe("a woman on the beach", identities=[Identity(astronaut_reference, "woman")], num_inference_steps=4,
                    output_type="np", generator=torch.Generator().manual_seed(0))

    expected = generate(build(arch))
    pipe = build(arch)
    pipe.enable_banded_decode()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            cpu_offload(component, torch.device("cpu"), offload_buffers=len(component._parameters) > 0)
    assert pipe.unet.conv_in.weight.device.type == "meta"
    output = generate(pipe)
    assert output.guidance.record.guided_steps > 0 and not output.decoded_in_bands
    assert np.array_equal(output.images, expected.images)


def test_the_pivot_encoder_is_moved_by_its_offload_hook_before_it_encodes(astronaut_reference):
    """Model offload's hook moves a component when it is called; ``encode_image`` is not its ``forward``, so the
    pipeline runs the hook itself (``meta`` stands in for CUDA here)."""
    from accelerate import cpu_offload_with_hook

    from omniportrait.pipelines import Identity

    pipe = build("sd15")
    cpu_offload_with_hook(pipe.pivot_encoder, execution_device=torch.device("meta"))
    (bound,) = pipe.bind_identities("a woman on the beach", [Identity(astronaut_reference, "woman")])
    assert bound.e_ref.device.type == "meta"


def test_a_pivot_encoder_the_offloading_left_alone_encodes_where_it_is(astronaut_reference):
    """A pipeline offloaded before the pivot encoder joined it (``from_diffusers`` of an offloaded diffusers
    pipeline): the encoder's input goes where its weights are, not to the execution device."""
    from accelerate import cpu_offload_with_hook

    from omniportrait.pipelines import Identity

    pipe = build("sd15")
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name != "pivot_encoder":
            cpu_offload_with_hook(component, execution_device=torch.device("meta"))
    assert pipe._execution_device.type == "meta"
    (bound,) = pipe.bind_identities("a woman on the beach", [Identity(astronaut_reference, "woman")])
    assert bound.e_ref.device.type == "cpu"
