import torch

from omniportrait.models.tiny import WHOLE_WORDS, tiny_components, tiny_tokenizer


def test_tokenizer_has_whole_word_tokens_and_spells_other_words():
    tokenizer = tiny_tokenizer()
    assert all(len(tokenizer.tokenize(word)) == 1 for word in WHOLE_WORDS)
    assert len(tokenizer.tokenize("astronaut")) > 1
    assert tokenizer.model_max_length == 77


def test_components_are_deterministic():
    first, second = tiny_components("sdxl"), tiny_components("sdxl")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = first.components[name].state_dict(), second.components[name].state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert first.pivot_encoder.config.text_width == first.components["unet"].config.cross_attention_dim
