import pytest

from omniportrait.errors import ClassWordError
from omniportrait.models.tiny import tiny_tokenizer
from omniportrait.identity import BoundIdentity, Identity, check_disjoint, locate_class_word


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def tokens_at(tokenizer, prompt, positions):
    ids = tokenizer(prompt).input_ids
    return tokenizer.convert_ids_to_tokens([ids[p] for p in positions])


def test_single_token_word(tokenizer):
    assert locate_class_word(tokenizer, "a woman on the beach", "woman") == [2]


def test_upper_case_prompt_and_word(tokenizer):
    assert locate_class_word(tokenizer, "A WOMAN on the beach", "Woman") == [2]


def test_multi_token_word_covers_all_its_tokens(tokenizer):
    positions = locate_class_word(tokenizer, "an astronaut in space", "astronaut")
    assert len(positions) == len(tokenizer.tokenize("astronaut")) > 1
    assert "".join(tokens_at(tokenizer, "an astronaut in space", positions)) == "astronaut</w>"


def test_word_twice_binds_both_or_the_chosen_one(tokenizer):
    prompt = "a woman and the woman"
    assert locate_class_word(tokenizer, prompt, "woman") == [2, 5]
    assert locate_class_word(tokenizer, prompt, "woman", occurrence=2) == [5]
    with pytest.raises(ClassWordError, match="occurs 2 time"):
        locate_class_word(tokenizer, prompt, "woman", occurrence=3)


def test_tail_of_another_word_is_not_a_match(tokenizer):
    # "aut" is spelled a-u-t</w>, exactly the tail of "astronaut": not a whole word there.
    with pytest.raises(ClassWordError, match="not in the prompt"):
        locate_class_word(tokenizer, "an astronaut", "aut")


def test_man_is_not_found_inside_woman(tokenizer):
    with pytest.raises(ClassWordError):
        locate_class_word(tokenizer, "a woman", "man")


def test_missing_word_says_what_to_do(tokenizer):
    with pytest.raises(ClassWordError, match="write it in the prompt"):
        locate_class_word(tokenizer, "a cat on the beach", "woman")


def test_word_past_the_token_limit(tokenizer):
    prompt = "a " * 80 + "woman"
    with pytest.raises(ClassWordError, match="77-token limit"):
        locate_class_word(tokenizer, prompt, "woman")


def test_two_identities_on_one_token_are_refused():
    bound = [BoundIdentity(Identity("a.jpg", "woman"), [2]), BoundIdentity(Identity("b.jpg", "woman"), [2, 5])]
    with pytest.raises(ClassWordError, match="same prompt token"):
        check_disjoint(bound)
