"""The evaluation prompts of the paper's Table 3 (30 prompts, 5 per category) and their class words.

Table 3 writes every prompt with "woman/man"; the paper picks the word that fits each reference. Here the
word is the ``{class_word}`` placeholder of :attr:`EvalPrompt.template`, filled per reference by
:func:`EvalPrompt.render`. Which word a reference gets is decided by :func:`resolve_class_words`: an
explicit mapping (``--class-words``) wins, every other reference gets the default word ("person"), and the
report says so. We do not guess gender from the photo: no offline classifier is reliable enough to put
in a benchmark, and a wrong word silently changes the CLIP-T and BLIP scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omniportrait.errors import ConfigError

CATEGORIES = ("pose", "clothing", "background", "action", "lighting", "style")
"""The six categories of Table 3, in the paper's order."""

DEFAULT_CLASS_WORD = "person"
"""Class word of a reference that ``--class-words`` does not name."""

PLACEHOLDER = "{class_word}"

# Table 3, verbatim; "woman/man" is replaced by the placeholder.
TABLE3: dict[str, tuple[str, ...]] = {
    "pose": (
        "A {class_word} posing like a tourist in front of the Eiffel Tower",
        "A {class_word} performing a yoga tree pose",
        "A {class_word} sitting cross-legged on the floor, smiling",
        "A {class_word} jumping in the air with joy",
        "A {class_word} looking back over their shoulder",
    ),
    "clothing": (
        "A {class_word} wearing a police uniform",
        "A {class_word} wearing a formal business suit",
        "A {class_word} wearing a traditional kimono",
        "A {class_word} in a superhero costume, crying disappointedly",
        "A {class_word} wearing a chef\u2019s white uniform",
    ),
    "background": (
        "A {class_word} on the beach",
        "A {class_word} standing in a snowy forest, looking very angry",
        "A {class_word} floating in outer space",
        "A {class_word} standing in a crowded city street",
        "A {class_word} inside an ancient library",
    ),
    "action": (
        "A {class_word} holding a piece of cake",
        "A {class_word} playing an acoustic guitar",
        "A {class_word} riding a bicycle, with sweat on face.",
        "A {class_word} drinking a cup of coffee",
        "A {class_word} taking a selfie with a phone",
    ),
    "lighting": (
        "A {class_word} wearing a Christmas hat in a bright scene",
        "A {class_word} wearing glasses illuminated by cinematic neon lights",
        "A {class_word} standing in the golden hour sunlight",
        "A {class_word} in a dark room with dramatic shadows",
        "A {class_word} under the moonlight",
    ),
    "style": (
        "A painting of a {class_word} in the style of Vincent Van Gogh",
        "An oil painting of a {class_word}",
        "A pencil sketch of a {class_word}",
        "A 3D render of a {class_word} in Pixar style",
        "A pop art style portrait of a {class_word}",
    ),
}


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of Table 3: its category, its index within the category (0-4) and its template."""

    category: str
    index: int
    template: str

    @property
    def key(self) -> str:
        """Stable short name, e.g. ``pose-0``; used in file names."""
        return f"{self.category}-{self.index}"

    def render(self, class_word: str) -> str:
        """The prompt with the reference's class word, e.g. ``A woman on the beach``."""
        return self.template.replace(PLACEHOLDER, class_word)


def table3_prompts() -> list[EvalPrompt]:
    """All 30 prompts of Table 3, category by category."""
    return [EvalPrompt(category, index, template)
            for category in CATEGORIES for index, template in enumerate(TABLE3[category])]


def select_prompts(
    categories: list[str] | None = None,
    per_category: int | None = None,
    max_prompts: int | None = None,
) -> list[EvalPrompt]:
    """A subset of Table 3 for quicker runs.

    ``categories`` keeps those categories; ``per_category`` keeps the first N of each; ``max_prompts``
    then takes N prompts round-robin over the categories (pose-0, clothing-0, background-0, ...), so a small
    run still covers several categories. All ``None``: the full table.
    """
    chosen = list(categories or CATEGORIES)
    unknown = [name for name in chosen if name not in CATEGORIES]
    if unknown:
        raise ConfigError(f"unknown prompt categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                          f"choose from {', '.join(CATEGORIES)}")
    for name, value in (("--prompts-per-category", per_category), ("--max-prompts", max_prompts)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    limit = per_category or len(TABLE3[CATEGORIES[0]])
    by_category = [[prompt for prompt in table3_prompts() if prompt.category == name][:limit] for name in chosen]
    round_robin = [column[row] for row in range(limit) for column in by_category if row < len(column)]
    if max_prompts is None:
        return sorted(round_robin, key=lambda p: (CATEGORIES.index(p.category), p.index))
    return round_robin[:max_prompts]


def parse_class_words(spec: str | None) -> dict[str, str]:
    """``--class-words``: ``a.jpg=man,b.jpg=woman`` or the path of a file with one ``NAME=WORD`` per line.

    In a file, ``NAME WORD`` and ``NAME,WORD`` are accepted too, and ``#`` starts a comment. ``NAME`` is a
    reference's file name (``alice.jpg``) or its stem (``alice``).
    """
    if not spec:
        return {}
    path = Path(spec).expanduser()
    if path.is_file():
        entries = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        source = f"class-words file {spec}"
    else:
        entries = [entry.strip() for entry in spec.split(",")]
        source = "--class-words"
    mapping: dict[str, str] = {}
    for entry in filter(None, entries):
        name, word = _split_entry(entry, source)
        mapping[name] = word
    return mapping


def _split_entry(entry: str, source: str) -> tuple[str, str]:
    """``NAME=WORD`` / ``NAME,WORD`` / ``NAME WORD`` -> (NAME, WORD), with one-word checks."""
    for separator in ("=", ",", None):
        parts = entry.rsplit(separator, 1) if separator else entry.rsplit(None, 1)
        if len(parts) == 2 and parts[0].strip() and parts[1].strip():
            name, word = parts[0].strip(), parts[1].strip()
            check_class_word(word, source)
            return name, word
    raise ConfigError(f"{source}: entry {entry!r} must look like NAME=WORD, e.g. alice.jpg=woman")


def check_class_word(word: str, source: str = "--class-word") -> str:
    """A class word is one word without spaces or braces, e.g. ``woman``."""
    if not word or len(word.split()) != 1 or "{" in word or "}" in word:
        raise ConfigError(f"{source}: class word {word!r} must be one word, e.g. woman, man or person")
    return word


def resolve_class_words(names: list[str], mapping: dict[str, str], default: str = DEFAULT_CLASS_WORD) -> dict[str, str]:
    """The class word of each reference file name: its mapping entry (by name or stem), else ``default``.

    A mapping entry that names no reference is an error, so a typo does not silently fall back.
    """
    check_class_word(default)
    words, used = {}, set()
    for name in names:
        stem = Path(name).stem
        key = name if name in mapping else stem if stem in mapping else None
        words[name] = mapping[key] if key is not None else default
        if key is not None:
            used.add(key)
    unused = sorted(set(mapping) - used)
    if unused:
        raise ConfigError(f"--class-words names {', '.join(unused)}, which is not among the references "
                          f"({', '.join(names)}); use the file name or its stem")
    return words
