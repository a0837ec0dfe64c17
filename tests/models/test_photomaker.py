"""PhotoMaker v1 checkpoints as Pivot ID Encoders: conversion, the fused embedding, refusals."""

import pytest
import torch

from omniportrait.errors import ConfigError
from omniportrait.models.photomaker import LORA_FILE, convert, lora_to_diffusers, read_checkpoint
from omniportrait.models.pivot_encoder import PivotIDEncoder

from .._photomaker import (
    FUSION_HIDDEN,
    PROJECTION_2,
    TEXT,
    reference_fused,
    tiny_id_encoder_state,
    write_bin,
    write_safetensors,
)

FAKE_LORA = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight":
             torch.ones(8, 4),
             "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
             torch.full((4, 8), 2.0)}


@pytest.fixture(scope="module")
def id_state():
    return tiny_id_encoder_state()


@pytest.fixture(scope="module", params=["bin", "safetensors"])
def checkpoint(request, tmp_path_factory, id_state):
    folder = tmp_path_factory.mktemp("photomaker")
    writer = write_bin if request.param == "bin" else write_safetensors
    return writer(folder / f"photomaker-tiny.{request.param}", id_state, FAKE_LORA)


def test_dimensions_are_read_from_the_weights(checkpoint):
    encoder = PivotIDEncoder.from_photomaker(checkpoint)
    config = encoder.config
    assert (config.fusion, config.text_width, config.second_projection_dim) == ("mlp", TEXT, PROJECTION_2)
    assert config.fusion_hidden_dim == FUSION_HIDDEN
    vision = encoder.vision.config
    assert (vision.hidden_size, vision.num_attention_heads, vision.num_hidden_layers) == (64, 1, 2)
    assert (vision.image_size, vision.patch_size, vision.intermediate_size) == (32, 8, 40)
    assert vision.hidden_act == "quick_gelu"


def test_fused_embedding_equals_photomakers(checkpoint, id_state):
    """What ``inject_identities`` puts at the class word (encode_image, then fuse_embeddings) is PhotoMaker's
    fused class-token embedding for one reference image."""
    encoder = PivotIDEncoder.from_photomaker(checkpoint)
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    text = torch.randn(2, TEXT, generator=generator)
    with torch.no_grad():
        ours = encoder.fuse_embeddings(encoder.encode_image(pixels), text)
        ours_tokens = encoder(pixels, text[:, None, :].expand(-1, 3, -1))
    expected = reference_fused(id_state, pixels, text)
    delta = (ours - expected).abs().max().item()
    print(f"fused embedding max |Δ| vs the PhotoMaker reference ({checkpoint.suffix}): {delta:.3g}")
    assert delta < 1e-5
    assert torch.allclose(ours_tokens, expected[:, None, :].expand(-1, 3, -1), atol=1e-5)
    assert (expected - text).abs().max() > 0.1  # the fusion does change the text state


def test_convert_round_trip(checkpoint, tmp_path, id_state):
    from safetensors.torch import load_file

    from omniportrait.pipelines.loading import check_pivot_encoder

    result = convert(checkpoint, tmp_path / "pm")
    assert (tmp_path / "pm" / "diffusion_pytorch_model.safetensors").is_file()
    assert result.lora == tmp_path / "pm" / LORA_FILE
    check_pivot_encoder(str(tmp_path / "pm"))
    original = PivotIDEncoder.from_photomaker(checkpoint).state_dict()
    loaded = PivotIDEncoder.from_pretrained(tmp_path / "pm").state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[key], loaded[key]) for key in original)
    assert torch.equal(loaded["projection_2.weight"], id_state["visual_projection_2.weight"])
    lora = load_file(str(result.lora))
    assert lora.keys() == {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight",
                           "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"}
    assert torch.equal(lora["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"],
                       torch.full((4, 8), 2.0))


def test_convert_refuses_a_non_empty_output(checkpoint, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        convert(checkpoint, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_checkpoint_without_lora_converts_with_a_warning(tmp_path, id_state):
    path = write_bin(tmp_path / "no-lora.bin", id_state, None)
    with pytest.warns(UserWarning, match="has no lora_weights"):
        result = convert(path, tmp_path / "out")
    assert result.lora is None and not (tmp_path / "out" / LORA_FILE).exists()


@pytest.mark.parametrize("writer", [write_bin, write_safetensors])
def test_missing_keys_are_named(tmp_path, id_state, writer):
    state = {k: v for k, v in id_state.items() if not k.startswith(("fuse_module.mlp2.", "visual_projection_2"))}
    path = writer(tmp_path / f"broken{'.bin' if writer is write_bin else '.safetensors'}", state, FAKE_LORA)
    with pytest.raises(ConfigError, match=r"lacks visual_projection_2.weight, fuse_module.mlp2.layernorm.weight"):
        read_checkpoint(path)


def test_other_files_are_refused(tmp_path, id_state):
    other = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": {"proj.weight": torch.ones(2, 2)}, "ip_adapter": {}}, other)
    with pytest.raises(ConfigError, match="has no id_encoder weights; it is not a PhotoMaker v1 checkpoint"):
        read_checkpoint(other)
    extra = dict(id_state, **{"fuse_module.gate.weight": torch.ones(2)})
    with pytest.raises(ConfigError, match="has unknown fuse.gate.weight"):
        PivotIDEncoder.from_photomaker(write_bin(tmp_path / "extra.bin", extra, None))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(write_safetensors(tmp_path / "whole.safetensors", id_state, None).read_bytes()[:-100])
    with pytest.raises(ConfigError, match="truncated"):
        read_checkpoint(cut)


def test_lora_keys_become_todays_diffusers_names():
    converted = lora_to_diffusers({"unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor"
                                   ".to_k_lora.up.weight": torch.ones(1),
                                   "unet.x.to_v.lora_A.weight": torch.zeros(1)})
    assert list(converted) == ["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight",
                               "unet.x.to_v.lora_A.weight"]
