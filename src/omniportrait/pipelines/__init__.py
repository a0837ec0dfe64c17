"""SD1.5 and SDXL pipelines with the Pivot ID Encoder."""

from omniportrait.identity import Identity, locate_class_word
from omniportrait.pipelines.base import OmniPortraitOutput
from omniportrait.pipelines.conditioning import Conditioning
from omniportrait.pipelines.controlnet import OmniPortraitSDControlNetPipeline, OmniPortraitSDXLControlNetPipeline
from omniportrait.pipelines.sd15 import OmniPortraitSDPipeline
from omniportrait.pipelines.sdxl import OmniPortraitSDXLPipeline

__all__ = [
    "Conditioning",
    "Identity",
    "OmniPortraitOutput",
    "OmniPortraitSDControlNetPipeline",
    "OmniPortraitSDPipeline",
    "OmniPortraitSDXLControlNetPipeline",
    "OmniPortraitSDXLPipeline",
    "locate_class_word",
]
