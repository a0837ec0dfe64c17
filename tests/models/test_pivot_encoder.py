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
