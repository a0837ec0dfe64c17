"""SD1.5 and SDXL pipelines with the Pivot ID Encoder."""

from omniportrait.pipelines.base import Conditioning, OmniPortraitOutput
from omniportrait.identity import Identity, locate_class_word
from omniportrait.pipelines.sd15 import OmniPortraitSDPipeline
from omniportrait.pipelines.sdxl import OmniPortraitSDXLPipeline

__all__ = [
    "Conditioning",
    "Identity",
    "OmniPortraitOutput",
    "OmniPortraitSDPipeline",
    "OmniPortraitSDXLPipeline",
    "locate_class_word",
]
