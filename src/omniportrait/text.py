"""Person nouns: the class words an identity binds to (paper §3.2; an LLM extracts them in the paper).

The rule-based default covers a documented vocabulary, matched as whole words, case-insensitive, with plural
and possessive forms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PERSON_NOUNS = (
    "woman", "man", "person", "girl", "boy", "lady", "gentleman", "child", "kid", "baby", "teenager",
    "guy", "female", "male", "adult", "bride", "groom", "mother", "father", "grandmother", "grandfather",
    "actor", "actress", "model", "student", "athlete", "player", "doctor", "soldier", "people",
)
IRREGULAR_PLURALS = {"women": "woman", "men": "man", "children": "child", "people": "person", "ladies": "lady",
                     "gentlemen": "gentleman", "babies": "baby", "actresses": "actress"}

_WORD = re.compile(r"[A-Za-z]+(?:'s|’s|s')?")


@dataclass(frozen=True)
class NounSpan:
    """A person noun found in a text: the word as written, its singular lemma and character span."""

    word: str
    lemma: str
    start: int
    end: int


def lemma_of(token: str) -> str | None:
    """The singular person noun ``token`` stands for ("Women's" -> "woman"), or ``None``."""
    word = token.lower().replace("’", "'")
    word = word[:-2] if word.endswith("'s") else word[:-1] if word.endswith("s'") else word
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in PERSON_NOUNS:
        return word
    if word.endswith("s") and word[:-1] in PERSON_NOUNS:
        return word[:-1]
    return None


def find_person_nouns(text: str) -> list[NounSpan]:
    """Every person noun of ``text`` in order; the span covers the bare word (no possessive suffix)."""
    found = []
    for match in _WORD.finditer(text):
        lemma = lemma_of(match.group())
        if lemma is not None:
            bare = re.match(r"[A-Za-z]+", match.group()).group()
            found.append(NounSpan(bare, lemma, match.start(), match.start() + len(bare)))
    return found


def cut_by_tokenizer(tokenizer, text: str) -> str | None:
    """The end of ``text`` a CLIP tokenizer drops (it keeps ``model_max_length`` tokens, start and end marks
    included), as the words the user wrote; ``None`` when nothing is cut.

    Pipelines cut long prompts silently; front ends call this to say what was lost. A class word in the
    dropped part stays an error of its own (the identity cannot bind to it).
    """
    limit = int(getattr(tokenizer, "model_max_length", 77))
    ids = tokenizer(text, truncation=False, add_special_tokens=False).input_ids
    kept = limit - 2  # the start and end marks take two places
    if len(ids) <= kept:
        return None
    dropped = tokenizer.decode(ids[kept:], skip_special_tokens=True).strip()
    return dropped or None
