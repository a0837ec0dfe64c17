"""The shared pipeline lifecycle: VAE precision around encoding and decoding."""

import pytest
import torch

from tests.conftest import build


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
