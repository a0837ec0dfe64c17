"""Tiny random CLIP and BLIP models, built offline from small configs (DESIGN §4).

They stand in for the hub models of the metrics when no weights can be downloaded: the model id
:data:`TINY_MODEL_ID` (``--clip-model tiny-random``) loads them, so the whole evaluation runs offline on the
tiny presets. Their numbers measure nothing (the weights are random) and the report says so; they test the
plumbing, and orderings that hold for any encoder (an image against itself beats an image against another).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForImageTextRetrieval,
    CLIPConfig,
    CLIPModel,
)

from omniportrait.evaluation.prompts import TABLE3
from omniportrait.models.tiny import TINY_SEED, tiny_text_config, tiny_tokenizer, tiny_vision_config

TINY_MODEL_ID = "tiny-random"
"""Model id that selects the tiny random models instead of hub weights."""

TINY_IMAGE_SIZE = 32
TINY_WIDTH = 32
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class TinyBundle:
    """A model and the processor that feeds it."""

    model: torch.nn.Module
    processor: object


def _image_processor(cls_name: str):
    """The slow (PIL) image processor: torchvision is not a dependency."""
    import transformers

    cls = getattr(transformers, f"{cls_name}Pil", None) or getattr(transformers, cls_name)
    if cls_name == "CLIPImageProcessor":
        square = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
        return cls(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size=square)
    return cls(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})


def tiny_clip() -> TinyBundle:
    """A random CLIP (32-wide towers, 32×32 images) with the tiny CLIP BPE tokenizer."""
    from transformers import CLIPProcessor

    tokenizer = tiny_tokenizer()
    torch.manual_seed(TINY_SEED)
    config = CLIPConfig(text_config=tiny_text_config(len(tokenizer)).to_dict(),
                        vision_config=tiny_vision_config().to_dict(), projection_dim=TINY_WIDTH)
    model = CLIPModel(config).eval()
    return TinyBundle(model, CLIPProcessor(image_processor=_image_processor("CLIPImageProcessor"), tokenizer=tokenizer))


def _bert_vocabulary() -> list[str]:
    """Special tokens, the words of Table 3, letters and digits: enough for the evaluation prompts."""
    words = {word.strip(".,\u2019'").lower()
             for prompts in TABLE3.values() for prompt in prompts for word in prompt.split()}
    words |= {"woman", "man", "person", "good", "bad", "photo", "red", "blue", "'", ".", ",", "\u2019"}
    words |= set("abcdefghijklmnopqrstuvwxyz0123456789")
    return list(BERT_SPECIALS) + sorted(word for word in words if word and "{" not in word)


@lru_cache(maxsize=None)
def _bert_vocab_file() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="omniportrait-tiny-bert-"))
    path = folder / "vocab.txt"
    path.write_text("\n".join(_bert_vocabulary()) + "\n")
    return path


def tiny_bert_tokenizer() -> BertTokenizer:
    """A WordPiece tokenizer over :func:`_bert_vocabulary`, built offline."""
    return BertTokenizer(str(_bert_vocab_file()))


def tiny_blip() -> TinyBundle:
    """A random BLIP image-text matching model (``BlipForImageTextRetrieval``) with a tiny BERT tokenizer."""
    from transformers import BlipProcessor

    tokenizer = tiny_bert_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=TINY_WIDTH, encoder_hidden_size=TINY_WIDTH,
                intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=2, sep_token_id=3, eos_token_id=3)
    vision = dict(hidden_size=TINY_WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=TINY_IMAGE_SIZE, patch_size=8)
    torch.manual_seed(TINY_SEED)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=TINY_WIDTH,
                        image_text_hidden_size=TINY_WIDTH)
    model = BlipForImageTextRetrieval(config).eval()
    return TinyBundle(model, BlipProcessor(image_processor=_image_processor("BlipImageProcessor"), tokenizer=tokenizer))
