"""Table 3 prompts and class words."""

import pytest

from omniportrait.errors import ConfigError
from omniportrait.evaluation.prompts import (
    CATEGORIES,
    parse_class_words,
    resolve_class_words,
    select_prompts,
    table3_prompts,
)


def test_table3_has_30_prompts_5_per_category():
    prompts = table3_prompts()
    assert len(prompts) == 30
    assert [p.category for p in prompts[::5]] == list(CATEGORIES)
    assert all(p.template.count("{class_word}") == 1 for p in prompts)
    assert len({p.key for p in prompts}) == 30


def test_prompts_are_the_papers_verbatim():
    texts = [p.render("woman") for p in table3_prompts()]
    assert texts[0] == "A woman posing like a tourist in front of the Eiffel Tower"
    assert "A woman riding a bicycle, with sweat on face." in texts
    assert "A woman wearing a chef\u2019s white uniform" in texts
    assert texts[-1] == "A pop art style portrait of a woman"
    assert table3_prompts()[25].render("man") == "A painting of a man in the style of Vincent Van Gogh"


def test_max_prompts_goes_round_robin_over_categories():
    assert [p.key for p in select_prompts(max_prompts=3)] == ["pose-0", "clothing-0", "background-0"]
    assert [p.key for p in select_prompts(max_prompts=8)][6:] == ["pose-1", "clothing-1"]


def test_per_category_and_category_subset():
    chosen = select_prompts(categories=["style", "pose"], per_category=2)
    assert [p.key for p in chosen] == ["pose-0", "pose-1", "style-0", "style-1"]
    with pytest.raises(ConfigError, match="poses"):
        select_prompts(categories=["poses"])
    with pytest.raises(ConfigError, match="at least 1"):
        select_prompts(max_prompts=0)


def test_class_words_from_flag_and_file(tmp_path):
    assert parse_class_words("alice.jpg=woman, bob=man") == {"alice.jpg": "woman", "bob": "man"}
    mapping = tmp_path / "words.txt"
    mapping.write_text("# who is who\nalice.jpg woman\nbob.png,man\ncarol=girl\n")
    assert parse_class_words(str(mapping)) == {"alice.jpg": "woman", "bob.png": "man", "carol": "girl"}
    with pytest.raises(ConfigError, match="one word"):
        parse_class_words("alice.jpg=young woman")


def test_unnamed_references_get_the_default_word_and_typos_fail():
    words = resolve_class_words(["alice.jpg", "bob.png", "carol.jpg"], {"alice.jpg": "woman", "bob": "man"})
    assert words == {"alice.jpg": "woman", "bob.png": "man", "carol.jpg": "person"}
    with pytest.raises(ConfigError, match="alcie"):
        resolve_class_words(["alice.jpg"], {"alcie": "woman"})
