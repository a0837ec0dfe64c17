import pytest
import torch

from omniportrait.models.pivot_encoder import PivotIDEncoder
from omniportrait.models.tiny import tiny_pivot_encoder


def test_tiny_encoder_fuses_to_text_width():
    encoder = tiny_pivot_encoder(text_width=32)
    pixels = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    e_txt = torch.randn(2, 3, 32)
    assert encoder(pixels, e_txt).shape == (2, 3, 32)


def test_save_pretrained_round_trip_is_safetensors_and_exact(tmp_path):
    encoder = tiny_pivot_encoder(text_width=64)
    encoder.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = PivotIDEncoder.from_pretrained(tmp_path)
    pixels = torch.randn(1, 3, encoder.image_size, encoder.image_size)
    e_txt = torch.randn(1, 1, 64)
    original, restored = encoder.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[key], restored[key]) for key in original)
    with torch.no_grad():
        assert torch.allclose(encoder(pixels, e_txt), loaded(pixels, e_txt), atol=1e-6)
    assert loaded.config.text_width == 64


def test_identity_initialisation_returns_text_embedding():
    encoder = tiny_pivot_encoder(text_width=32)
    encoder.init_fusion_as_identity()
    pixels = torch.randn(1, 3, encoder.image_size, encoder.image_size)
    e_txt = torch.randn(1, 2, 32)
    with torch.no_grad():
        assert torch.allclose(encoder(pixels, e_txt), e_txt, atol=1e-6)


def test_default_config_is_clip_vit_l_14():
    from omniportrait.models.pivot_encoder import VIT_L_14

    assert (VIT_L_14["image_size"], VIT_L_14["patch_size"], VIT_L_14["projection_dim"]) == (224, 14, 768)


def test_old_config_without_fusion_loads_as_linear(tmp_path):
    """Folders saved before the fusion choice existed have no ``fusion`` key: they load as the paper's Linear."""
    import json

    encoder = tiny_pivot_encoder(text_width=32)
    encoder.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("fusion", "second_projection_dim", "fusion_hidden_dim"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = PivotIDEncoder.from_pretrained(tmp_path)
    assert loaded.config.fusion == "linear"
    assert torch.equal(loaded.fuse.weight, encoder.fuse.weight)


def test_mlp_fusion_with_second_projection_round_trips(tmp_path):
    from omniportrait.models.tiny import tiny_vision_config

    torch.manual_seed(0)
    encoder = PivotIDEncoder(vision_config=tiny_vision_config().to_dict(), text_width=64, fusion="mlp",
                             second_projection_dim=32, fusion_hidden_dim=48)
    assert encoder.ref_width == 64
    assert encoder.fuse.mlp1.fc1.weight.shape == (48, 128)
    pixels = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    e_ref = encoder.encode_image(pixels)
    assert e_ref.shape == (2, 64)
    with torch.no_grad():
        expected = encoder.vision(pixel_values=pixels).image_embeds
    assert torch.allclose(e_ref[:, :32], expected, atol=1e-6)  # the first projection is CLIP's image_embeds
    encoder.save_pretrained(tmp_path)
    loaded = PivotIDEncoder.from_pretrained(tmp_path)
    e_txt = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.equal(encoder(pixels, e_txt), loaded(pixels, e_txt))
    with pytest.raises(ValueError, match="only the linear fusion"):
        loaded.init_fusion_as_identity()


def test_unknown_fusion_is_refused():
    with pytest.raises(ValueError, match="fusion must be one of linear, mlp"):
        PivotIDEncoder(text_width=32, fusion="attention")
