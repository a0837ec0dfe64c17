import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from omniportrait.models.tiny import tiny_components
from omniportrait.pipelines import OmniPortraitSDPipeline, OmniPortraitSDXLPipeline

OURS = {"sd15": OmniPortraitSDPipeline, "sdxl": OmniPortraitSDXLPipeline}
THEIRS = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


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
