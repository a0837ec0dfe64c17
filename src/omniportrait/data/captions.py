"""Captions and person nouns for dataset records (paper §3.2 and §4.1).

The paper captions every image with BLIP-2 and asks an LLM for the caption's person noun. Both are
pluggable here:

- captioner: ``"metadata"`` (default, offline) uses the caption of the input's ``.txt`` sidecar or its
  metadata's ``caption``; ``"blip2"`` runs a BLIP-2 checkpoint through ``transformers`` (``--captioner-model``,
  default :data:`DEFAULT_BLIP2_MODEL`, downloaded from the Hub on first use) for images without a caption,
  or for every image with ``recaption``; ``"package.module:factory"`` names any callable returning an
  object with ``caption(image) -> str``.
- person-noun extractor: ``"rules"`` (default) returns the first person noun of the caption from the
  vocabulary :data:`omniportrait.text.PERSON_NOUNS` (plurals and possessives handled, see
  :func:`omniportrait.text.find_person_nouns`); ``"package.module:factory"`` names any callable returning
  an object with ``extract(caption) -> NounSpan | None``.

Plugins are created once per worker process.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Protocol, runtime_checkable

from PIL import Image

from omniportrait.errors import ConfigError
from omniportrait.text import NounSpan, find_person_nouns

__all__ = [
    "DEFAULT_BLIP2_MODEL",
    "Captioner",
    "NounExtractor",
    "RuleNounExtractor",
    "Blip2Captioner",
    "metadata_caption",
    "resolve_factory",
    "make_captioner",
    "make_noun_extractor",
    "make_face_analyzer",
    "check_plugin_specs",
]

DEFAULT_BLIP2_MODEL = "Salesforce/blip2-opt-2.7b"
"""BLIP-2 checkpoint used by ``--captioner blip2`` without ``--captioner-model``."""


@runtime_checkable
class Captioner(Protocol):
    """Describes an image in one sentence."""

    def caption(self, image: Image.Image) -> str:
        ...


@runtime_checkable
class NounExtractor(Protocol):
    """Finds the person noun of a caption that the identity binds to."""

    def extract(self, caption: str) -> NounSpan | None:
        ...


class RuleNounExtractor:
    """The first person noun of the caption (vocabulary :data:`omniportrait.text.PERSON_NOUNS`).

    The span covers the bare word as written ("Women's" -> "Women"), which is the token the Pivot ID
    Encoder's fused embedding replaces.
    """

    def extract(self, caption: str) -> NounSpan | None:
        nouns = find_person_nouns(caption)
        return nouns[0] if nouns else None


class Blip2Captioner:
    """BLIP-2 captions through ``transformers`` (paper §4.1); loads the model on creation.

    Args:
        model: Hub id or local folder of a BLIP-2 checkpoint (processor and model).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:N"``.
        max_new_tokens: caption length limit in tokens.
    """

    def __init__(self, model: str = DEFAULT_BLIP2_MODEL, device: str = "auto", max_new_tokens: int = 30) -> None:
        import torch
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = Blip2ForConditionalGeneration.from_pretrained(model, dtype=dtype).to(self.device).eval()
        except OSError as err:
            raise ConfigError(
                f"cannot load the BLIP-2 captioner '{model}' ({err}); pass --captioner-model with a local "
                "folder or a Hub id you can download"
            ) from err
        self.max_new_tokens = max_new_tokens

    def caption(self, image: Image.Image) -> str:
        import torch

        inputs = self.processor(images=image, return_tensors="pt").to(self.device, self.model.dtype)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def metadata_caption(sidecar_caption: str | None, metadata: dict) -> str | None:
    """The caption of the ``.txt`` sidecar, else the metadata's ``caption`` string, else ``None``."""
    if sidecar_caption and sidecar_caption.strip():
        return sidecar_caption.strip()
    value = metadata.get("caption")
    return value.strip() if isinstance(value, str) and value.strip() else None


def resolve_factory(spec: str, what: str) -> Callable[[], object]:
    """The callable named by ``"package.module:attribute"``; :class:`ConfigError` when it is not one."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{what} '{spec}' is unknown; use a built-in name or 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot load {what} '{spec}' ({err}); check the module path and name") from err
    if not callable(factory):
        raise ConfigError(f"{what} '{spec}' is not callable; name a class or a function that returns one")
    return factory


def make_captioner(spec: str, model: str | None) -> Captioner | None:
    """The captioner named by ``spec`` (``None`` for ``"metadata"``: captions come from the inputs)."""
    if spec == "metadata":
        return None
    if spec == "blip2":
        return Blip2Captioner(model or DEFAULT_BLIP2_MODEL)
    return resolve_factory(spec, "captioner")()


def make_noun_extractor(spec: str) -> NounExtractor:
    """The person-noun extractor named by ``spec``."""
    if spec == "rules":
        return RuleNounExtractor()
    return resolve_factory(spec, "noun extractor")()


def make_face_analyzer(spec: str):
    """The :class:`~omniportrait.faces.FaceAnalyzer` named by ``spec``; ``"mediapipe"`` is the process-wide
    :func:`~omniportrait.faces.default_analyzer`."""
    if spec == "mediapipe":
        from omniportrait.faces import default_analyzer

        return default_analyzer()
    return resolve_factory(spec, "face analyzer")()


def check_plugin_specs(analyzer: str, captioner: str, noun_extractor: str) -> None:
    """Fail early, in the main process, on a plugin name that cannot be loaded (nothing is created)."""
    if analyzer != "mediapipe":
        resolve_factory(analyzer, "face analyzer")
    if captioner == "blip2":
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError("--captioner blip2 needs transformers; pip install transformers")
    elif captioner != "metadata":
        resolve_factory(captioner, "captioner")
    if noun_extractor != "rules":
        resolve_factory(noun_extractor, "noun extractor")
