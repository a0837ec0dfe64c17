"""diffusers' plug-ins with identities and Reference-Based Guidance on: an IP-Adapter (``load_ip_adapter``,
``set_ip_adapter_scale``) and a LoRA (``load_lora_weights``, its ``scale``, ``fuse_lora``), each a tiny random one
written to disk offline in the layout the real ones use."""

import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from omniportrait.models.tiny import tiny_unet, tiny_vision_config
from omniportrait.pipelines import Identity
from tests.conftest import build, max_abs_diff

PROMPT = "a photo of a woman"
IMAGE_EMBED_WIDTH = 32  # the tiny CLIP vision tower's projection width


def generate(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs)


def with_identity(reference) -> dict:
    return {"identities": [Identity(reference, "woman")]}


# ----- IP-Adapter -----------------------------------------------------------------------------------------------
def write_ip_adapter(unet, folder, seed: int = 0) -> str:
    """A random IP-Adapter for ``unet`` as ``folder/ip.safetensors``, keys as in the released ones: ``image_proj.*``
    (the image-embedding projection to 4 tokens) and ``ip_adapter.<n>.to_{k,v}_ip.weight`` for the n-th processor
    (odd n, counting every attention layer: the cross-attention ones carry weights)."""
    generator = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    weights = {"image_proj.proj.weight": torch.randn(4 * width, IMAGE_EMBED_WIDTH, generator=generator) / 4,
               "image_proj.proj.bias": torch.zeros(4 * width), "image_proj.norm.weight": torch.ones(width),
               "image_proj.norm.bias": torch.zeros(width)}
    cross = [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn2.processor")]
    for number, name in zip(range(1, 2 * len(cross), 2), cross):
        channels = unet.get_submodule(name).to_q.out_features
        for projection in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{number}.{projection}.weight"] = torch.randn(channels, width, generator=generator) / 2
    save_file(weights, folder / "ip.safetensors")
    return str(folder)


def with_ip_adapter(pipe, folder):
    """``pipe`` with the random IP-Adapter loaded through diffusers' own loader (no image encoder)."""
    pipe.load_ip_adapter(write_ip_adapter(pipe.unet, folder), subfolder="", weight_name="ip.safetensors",
                         image_encoder_folder=None)
    return pipe


def image_embeds() -> list[torch.Tensor]:
    """Precomputed image embeddings as diffusers takes them under CFG: ``[uncond, cond]`` rows."""
    return [torch.randn(2, 1, IMAGE_EMBED_WIDTH, generator=torch.Generator().manual_seed(1))]


def ip_processor_calls(pipe) -> list[str]:
    """A list of layer names that grows whenever that layer's IP-Adapter processor attends to the image tokens."""
    calls = []
    for name, processor in pipe.unet.attn_processors.items():
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            processor.to_k_ip[0].register_forward_hook(lambda *args, _name=name: calls.append(_name))
    return calls


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_ip_adapter_scale_zero_equals_no_adapter_and_a_large_scale_changes_the_image(arch, tmp_path,
                                                                                     astronaut_reference):
    pipe = build(arch)
    none, guided_none = generate(pipe).images, generate(pipe, **with_identity(astronaut_reference))
    with_ip_adapter(pipe, tmp_path)
    pipe.set_ip_adapter_scale(0.0)
    zero = generate(pipe, ip_adapter_image_embeds=image_embeds()).images
    guided_zero = generate(pipe, ip_adapter_image_embeds=image_embeds(), **with_identity(astronaut_reference))
    pipe.set_ip_adapter_scale(5.0)
    large = generate(pipe, ip_adapter_image_embeds=image_embeds()).images
    guided_large = generate(pipe, ip_adapter_image_embeds=image_embeds(), **with_identity(astronaut_reference))
    print(f"{arch} IP-Adapter max |diff| vs none: scale 0 {max_abs_diff(zero, none):.3g}, scale 5 "
          f"{max_abs_diff(large, none):.3g}, guided scale 0 "
          f"{max_abs_diff(guided_zero.images, guided_none.images):.3g}, "
          f"guided scale 5 {max_abs_diff(guided_large.images, guided_none.images):.3g}")
    assert max_abs_diff(zero, none) <= 1e-6
    assert max_abs_diff(guided_zero.images, guided_none.images) <= 1e-6
    assert max_abs_diff(guided_zero.guidance.record.gen_masks, guided_none.guidance.record.gen_masks) <= 1e-6
    assert max_abs_diff(large, none) > 1e-2
    assert max_abs_diff(guided_large.images, guided_none.images) > 1e-2
    assert guided_large.guidance.record.guided_steps == guided_none.guidance.record.guided_steps > 0


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_ip_adapter_processors_keep_running_while_guidance_records_and_stay_in_place(arch, tmp_path,
                                                                                     astronaut_reference):
    pipe = with_ip_adapter(build(arch), tmp_path)
    before = dict(pipe.unet.attn_processors)
    calls = ip_processor_calls(pipe)
    output = generate(pipe, ip_adapter_image_embeds=image_embeds(), **with_identity(astronaut_reference))
    ip_layers = {name for name, processor in before.items() if isinstance(processor, IPAdapterAttnProcessor2_0)}
    recorded = {name + ".processor" for name in output.guidance.store.cross_layers}
    assert recorded and recorded <= ip_layers
    assert set(calls) == ip_layers and all(calls.count(name) >= 2 for name in ip_layers)  # every layer, every step
    assert output.guidance.record.guided_steps == 2
    assert pipe.unet.attn_processors == before


def tiny_image_encoder(pipe) -> None:
    """Give ``pipe`` a tiny CLIP vision tower and its image processor, for ``ip_adapter_image``."""
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(tiny_vision_config())
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_ip_adapter_image_is_encoded_by_the_pipeline_s_image_encoder(arch, tmp_path, astronaut_image,
                                                                     astronaut_reference):
    pipe = with_ip_adapter(build(arch), tmp_path)
    tiny_image_encoder(pipe)
    pipe.set_ip_adapter_scale(0.0)
    zero = generate(pipe, ip_adapter_image=astronaut_image, **with_identity(astronaut_reference))
    pipe.set_ip_adapter_scale(5.0)
    large = generate(pipe, ip_adapter_image=astronaut_image, **with_identity(astronaut_reference))
    assert max_abs_diff(large.images, zero.images) > 1e-2 and large.guidance.record.guided_steps > 0


# ----- LoRA -----------------------------------------------------------------------------------------------------
def write_lora(pipe, arch: str, folder) -> str:
    """A random rank-4 LoRA on the attention projections of the tiny UNet (``lora_B`` not zero, so it changes the
    output), saved by the pipeline class's ``save_lora_weights`` as ``folder/lora.safetensors``."""
    unet = tiny_unet(arch)
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet),
                                 weight_name="lora.safetensors")
    return str(folder)


def with_lora(pipe, arch: str, folder):
    pipe.load_lora_weights(write_lora(pipe, arch, folder), weight_name="lora.safetensors")
    return pipe


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_scale_zero_equals_no_lora_and_scale_one_changes_the_image(arch, tmp_path, astronaut_reference):
    pipe = build(arch)
    none, guided_none = generate(pipe).images, generate(pipe, **with_identity(astronaut_reference))
    with_lora(pipe, arch, tmp_path)
    zero = generate(pipe, cross_attention_kwargs={"scale": 0.0}).images
    guided_zero = generate(pipe, cross_attention_kwargs={"scale": 0.0}, **with_identity(astronaut_reference))
    one = generate(pipe).images
    guided_one = generate(pipe, cross_attention_kwargs={"scale": 1.0}, **with_identity(astronaut_reference))
    print(f"{arch} LoRA max |diff| vs none: scale 0 {max_abs_diff(zero, none):.3g}, scale 1 "
          f"{max_abs_diff(one, none):.3g}, guided scale 0 {max_abs_diff(guided_zero.images, guided_none.images):.3g}, "
          f"guided scale 1 {max_abs_diff(guided_one.images, guided_none.images):.3g}")
    assert max_abs_diff(zero, none) <= 1e-6
    assert max_abs_diff(guided_zero.images, guided_none.images) <= 1e-6
    assert max_abs_diff(one, none) > 1e-2
    assert max_abs_diff(guided_one.images, guided_none.images) > 1e-2 and guided_one.guidance.record.guided_steps > 0


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_fused_lora_gives_the_unfused_image_with_guidance_on(arch, tmp_path, astronaut_reference):
    pipe = with_lora(build(arch), arch, tmp_path)
    unfused, guided_unfused = generate(pipe).images, generate(pipe, **with_identity(astronaut_reference))
    pipe.fuse_lora()
    fused, guided_fused = generate(pipe).images, generate(pipe, **with_identity(astronaut_reference))
    print(f"{arch} fused vs unfused LoRA max |diff|: {max_abs_diff(fused, unfused):.3g}, guided "
          f"{max_abs_diff(guided_fused.images, guided_unfused.images):.3g}")
    assert max_abs_diff(fused, unfused) <= 1e-4
    assert max_abs_diff(guided_fused.images, guided_unfused.images) <= 1e-4
    assert guided_fused.guidance.record.guided_steps > 0
