"""OmniPortrait: identity-customized portrait synthesis by pivotal optimization (SD1.5 and SDXL)."""

__version__ = "0.1.0"

from omniportrait.errors import OmniPortraitError  # noqa: E402


def __getattr__(name: str):
    """Lazy public API so that ``import omniportrait`` stays fast and optional extras stay optional."""
    lazy = {
        "Identity": "omniportrait.identity",
        "OmniPortraitSDPipeline": "omniportrait.pipelines.sd15",
        "OmniPortraitSDXLPipeline": "omniportrait.pipelines.sdxl",
        "PivotIDEncoder": "omniportrait.models.pivot_encoder",
        "load_pipeline": "omniportrait.pipelines.loading",
        "prepare_reference": "omniportrait.faces",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'omniportrait' has no attribute {name!r}")


__all__ = ["OmniPortraitError", "Identity", "OmniPortraitSDPipeline", "OmniPortraitSDXLPipeline",
           "PivotIDEncoder", "load_pipeline", "prepare_reference", "__version__"]
