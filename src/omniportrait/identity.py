"""Binding identities to class words in the prompt and fusing their pivot embeddings (paper §3.2, §4.6).

An :class:`Identity` pairs one reference photo with a class word of the prompt ("woman", "man", ...).
:func:`locate_class_word` finds the word's token positions; :func:`inject_identities` replaces the
text-encoder output at those positions with ``e_mix`` (DESIGN §2: post-fusion). A class word that the
tokenizer splits into several tokens gets the fusion on each of its tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from omniportrait.errors import ClassWordError

END_OF_WORD = "</w>"


@dataclass
class Identity:
    """One person to draw.

    Args:
        reference: photo path, PIL image, or an already prepared reference
            (:class:`omniportrait.faces.PreparedReference`).
        class_word: the prompt word this person binds to, e.g. ``"woman"``.
        occurrence: 1-based occurrence of the word to bind; ``None`` binds every occurrence.
        face_index: which face of the reference photo to use (largest first); ``None`` = the largest.
    """

    reference: str | os.PathLike | Image.Image | Any
    class_word: str
    occurrence: int | None = None
    face_index: int | None = None


@dataclass
class BoundIdentity:
    """An identity resolved for one generation: its token positions, reference and ``e_ref``."""

    identity: Identity
    positions: list[int]
    reference: Any = None
    e_ref: torch.Tensor | None = None


def _word_starts(tokens: list[str], index: int) -> bool:
    """True when ``tokens[index]`` begins a word (after BOS or after a token that ends a word)."""
    return index <= 1 or tokens[index - 1].endswith(END_OF_WORD)


def find_token_spans(tokenizer, prompt: str, word: str, truncate: bool = True) -> list[list[int]]:
    """Every span of token positions (BOS included in the indexing) where ``word`` appears as a whole word."""
    kwargs = dict(truncation=True, max_length=tokenizer.model_max_length) if truncate else {}
    ids = tokenizer(prompt, **kwargs).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    size = len(word_ids)
    return [
        list(range(start, start + size))
        for start in range(1, len(ids) - size + 1)
        if ids[start : start + size] == word_ids and _word_starts(tokens, start)
    ]


def locate_class_word(tokenizer, prompt: str, word: str, occurrence: int | None = None) -> list[int]:
    """Token positions of ``word`` in ``prompt`` (all occurrences, or the ``occurrence``-th, 1-based)."""
    if not word or not word.strip() or len(word.split()) != 1:
        raise ClassWordError(f"class word {word!r} must be one word, e.g. 'woman' or 'man'")
    spans = find_token_spans(tokenizer, prompt, word.strip())
    if not spans:
        if find_token_spans(tokenizer, prompt, word.strip(), truncate=False):
            raise ClassWordError(
                f"class word {word!r} comes after the text encoder's {tokenizer.model_max_length}-token limit; "
                "move it nearer the start of the prompt"
            )
        raise ClassWordError(
            f"class word {word!r} is not in the prompt {prompt!r}; write it in the prompt "
            f"(e.g. 'a photo of a {word} ...') or name the word the prompt uses"
        )
    if occurrence is None:
        return [position for span in spans for position in span]
    if not 1 <= occurrence <= len(spans):
        raise ClassWordError(
            f"class word {word!r} occurs {len(spans)} time(s) in the prompt; occurrence {occurrence} does not exist"
        )
    return spans[occurrence - 1]


def check_disjoint(bound: list[BoundIdentity]) -> None:
    """Two identities may not bind the same token (e.g. the same word twice without ``occurrence``)."""
    seen: dict[int, str] = {}
    for item in bound:
        for position in item.positions:
            if position in seen:
                raise ClassWordError(
                    f"identities for {seen[position]!r} and {item.identity.class_word!r} bind the same prompt "
                    "token; give each its own word, or an occurrence number (PHOTO:WORD:N)"
                )
            seen[position] = item.identity.class_word


def inject_identities(prompt_embeds: torch.Tensor, bound: list[BoundIdentity], pivot_encoder) -> torch.Tensor:
    """Replace the class-word states of ``prompt_embeds`` ``(B, L, D)`` by ``e_mix`` for each identity."""
    if not bound:
        return prompt_embeds
    mixed = prompt_embeds.clone()
    for item in bound:
        positions = torch.tensor(item.positions, device=prompt_embeds.device)
        e_txt = prompt_embeds[:, positions]
        e_ref = item.e_ref.to(prompt_embeds.device).expand(prompt_embeds.shape[0], -1)
        mixed[:, positions] = pivot_encoder.fuse_embeddings(e_ref, e_txt)
    return mixed
