"""Suite-wide settings: never touch the network; shared tiny pipelines and a real reference photo."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: the workers already fill the cores
    torch.set_num_threads(1)
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from omniportrait.models.tiny import tiny_components  # noqa: E402
from omniportrait.pipelines import OmniPortraitSDPipeline, OmniPortraitSDXLPipeline  # noqa: E402

OURS = {"sd15": OmniPortraitSDPipeline, "sdxl": OmniPortraitSDXLPipeline}
THEIRS = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="session")
def astronaut_image() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def astronaut_path(tmp_path_factory, astronaut_image) -> str:
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    astronaut_image.save(path)
    return str(path)


@pytest.fixture(scope="session")
def astronaut_reference(astronaut_image):
    from omniportrait.faces import prepare_reference

    return prepare_reference(astronaut_image)


def max_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def out_of_memory_on_calls(call, first: int = 1, last: int | None = None):
    """``call``, raising CUDA's out-of-memory error on its calls numbered ``first`` to ``last`` (counted from 1;
    ``last=None``: every call from ``first`` on)."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) >= first and (last is None or len(calls) <= last):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return call(*args, **kwargs)

    return failing


def build(arch: str, ours: bool = True, with_pie: bool = True):
    tiny = tiny_components(arch)
    cls = OURS[arch] if ours else THEIRS[arch]
    kwargs = dict(tiny.components)
    if ours:
        kwargs["pivot_encoder"] = tiny.pivot_encoder if with_pie else None
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session", params=["sd15", "sdxl"])
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_pipe(arch):
    return build(arch)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def unet_and_context(request):
    """A tiny UNet (each test module its own), a CFG-sized context and SDXL's added conditioning."""
    tiny = tiny_components(request.param)
    unet = tiny.components["unet"]
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    extra = None
    if request.param == "sdxl":
        extra = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return unet, context, extra
