"""Captions and person nouns: metadata captions, the rule-based extractor, BLIP-2 on a tiny real model."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniportrait.data.captions import (
    Blip2Captioner,
    RuleNounExtractor,
    metadata_caption,
    make_noun_extractor,
    resolve_factory,
)
from omniportrait.data.loader import iter_records
from omniportrait.errors import ConfigError

TINY_WORDS = ("Ġwoman", "Ġin", "Ġa", "Ġspacesuit")


@pytest.mark.parametrize(
    ("caption", "word", "lemma", "span"),
    [
        ("a woman in a spacesuit", "woman", "woman", (2, 7)),
        ("Portrait of a young Man, smiling", "Man", "man", (20, 23)),
        ("the girls' school photo", "girls", "girl", (4, 9)),
        ("two women's hands and a dog", "women", "woman", (4, 9)),
        ("a child and her mother", "child", "child", (2, 7)),
    ],
)
def test_rule_extractor_returns_the_first_person_noun_span(caption, word, lemma, span):
    noun = RuleNounExtractor().extract(caption)
    assert (noun.word, noun.lemma, (noun.start, noun.end)) == (word, lemma, span)
    assert caption[noun.start : noun.end] == word


def test_rule_extractor_finds_nothing_without_a_person_noun():
    assert RuleNounExtractor().extract("an astronaut in a spacesuit") is None
    assert RuleNounExtractor().extract("a mannequin in a shop window") is None


def test_metadata_caption_prefers_the_txt_sidecar():
    assert metadata_caption("  a man  ", {"caption": "a woman"}) == "a man"
    assert metadata_caption(None, {"caption": " a woman "}) == "a woman"
    assert metadata_caption("", {"caption": 3}) is None


def test_plugin_specs():
    assert isinstance(make_noun_extractor("rules"), RuleNounExtractor)
    assert resolve_factory("tests.data.stubs:FixedCaptioner", "captioner")().caption(None) == "a photo of a person"
    with pytest.raises(ConfigError, match="built-in name or 'package.module:factory'"):
        resolve_factory("llm", "noun extractor")
    with pytest.raises(ConfigError, match="cannot load captioner"):
        resolve_factory("tests.data.no_such_module:x", "captioner")
    with pytest.raises(ConfigError, match="not callable"):
        resolve_factory("tests.data.test_captions:TINY_WORDS", "captioner")


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory) -> Path:
    """A real BLIP-2 (ViT + Q-Former + OPT) saved like a Hub checkpoint, with a 7-token vocabulary and
    its OPT head set to always say "woman": its caption is known in advance."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, PreTrainedTokenizerFast
    from transformers.models.blip.image_processing_blip import BlipImageProcessor

    vocab = {token: index for index, token in enumerate(("</s>", "<pad>", "<image>") + TINY_WORDS)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="</s>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="</s>", additional_special_tokens=["<image>"])
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                            encoder_hidden_size=32, vocab_size=100),
        text_config=dict(model_type="opt", vocab_size=len(vocab), hidden_size=32, ffn_dim=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                         bos_token_id=0, eos_token_id=0, pad_token_id=1),
        num_query_tokens=4, image_token_index=vocab["<image>"],
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # one-hot (tied) embeddings and a constant last hidden state pointing at "Ġwoman"
        decoder = model.language_model.model.decoder
        decoder.embed_tokens.weight.copy_(torch.eye(len(vocab), 32))
        decoder.final_layer_norm.weight.zero_()
        decoder.final_layer_norm.bias.copy_(10 * torch.eye(len(vocab), 32)[vocab["Ġwoman"]])
    folder = tmp_path_factory.mktemp("tiny_blip2") / "model"
    model.save_pretrained(folder)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                   num_query_tokens=4).save_pretrained(folder)
    return folder


def test_blip2_captioner_runs_a_real_checkpoint(tiny_blip2, astronaut_image):
    captioner = Blip2Captioner(str(tiny_blip2), device="cpu", max_new_tokens=3)
    assert captioner.caption(astronaut_image) == "woman woman woman"


def test_build_with_blip2_recaptions(tmp_path, tiny_blip2, astronaut_image):
    from omniportrait.data.build import build_dataset

    from tests.data.helpers import small_config

    source = tmp_path / "in"
    source.mkdir()
    astronaut_image.save(source / "a.png")
    astronaut_image.save(source / "b.png")
    (source / "a.txt").write_text("a man")
    config = small_config(source, tmp_path / "out", captioner="blip2", captioner_model=str(tiny_blip2))
    records = {r.source: r for r in iter_records(build_dataset(config).output)}
    assert records["a.png"].caption == "a man"  # the metadata caption wins without --recaption
    assert records["b.png"].caption.startswith("woman woman") and records["b.png"].class_span == (0, 5)
    again = build_dataset(small_config(source, tmp_path / "re", captioner="blip2",
                                       captioner_model=str(tiny_blip2), recaption=True))
    assert {r.class_word for r in iter_records(again.output)} == {"woman"}


def test_unloadable_blip2_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load the BLIP-2 captioner"):
        Blip2Captioner(str(tmp_path / "missing"), device="cpu")
