"""DreamBooth identifiers: the rare word(s) that name the subject, and the class noun.

Plain Python: the tokenizer's vocabulary comes in as a dict. The paper binds the subject to a
rare token ("a [V] dog") so that the model need not unlearn a word's meaning; these functions
find the identifier in the prompts, refuse ambiguous ones before any work, and suggest rare
tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping

_WORD = re.compile(r"[^\W_][\w'-]*|[<\[][^\s>\]]*[>\]]")
# Short English words the rare-token filter must never offer, whatever their token id.
_ENGLISH_SHORT = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "from",
        "up",
        "out",
        "off",
        "as",
        "is",
        "am",
        "are",
        "was",
        "be",
        "do",
        "did",
        "has",
        "had",
        "he",
        "she",
        "it",
        "we",
        "us",
        "you",
        "me",
        "my",
        "his",
        "her",
        "our",
        "its",
        "him",
        "they",
        "them",
        "who",
        "why",
        "how",
        "yes",
        "no",
        "not",
        "all",
        "any",
        "few",
        "new",
        "old",
        "one",
        "two",
        "six",
        "ten",
        "man",
        "men",
        "boy",
        "car",
        "cat",
        "dog",
        "sun",
        "sky",
        "sea",
        "red",
        "tan",
        "art",
        "war",
        "ice",
        "eye",
        "ear",
        "arm",
        "leg",
        "toe",
        "bag",
        "box",
        "cup",
        "pen",
        "map",
        "bed",
        "bus",
        "van",
        "toy",
        "zoo",
        "zip",
        "yet",
        "via",
        "wow",
        "oak",
        "elk",
        "ash",
        "owl",
        "ant",
        "bee",
        "fox",
        "pig",
        "cow",
        "hen",
        "yak",
        "emu",
        "ape",
        "bat",
        "rat",
        "gnu",
        "eel",
        "cod",
        "koi",
    ]
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w/\\:]){re.escape(phrase)}(?![\w])", re.IGNORECASE)


def derive_identifier(instance_prompt: str, class_prompt: str, identifier: str = "") -> str:
    """The identifier: given, or the instance prompt's words that the class prompt lacks.

    Raises ValueError (before any work) when there is none, it is ambiguous, or the class
    prompt contains it.
    """
    instance, klass = instance_prompt.strip(), class_prompt.strip()
    if not instance:
        raise ValueError("the instance prompt is empty: describe the subject with its identifier, e.g. 'a photo of sks dog'")
    if not klass:
        raise ValueError("the class prompt is empty: describe the subject's class, e.g. 'a photo of dog'")
    identifier = identifier.strip()
    if identifier:
        if not _phrase_pattern(identifier).search(instance):
            raise ValueError(
                f"the identifier '{identifier}' is not in the instance prompt '{instance}': use it there, e.g. 'a photo of {identifier} dog'"
            )
        if _phrase_pattern(identifier).search(klass):
            raise ValueError(
                f"the class prompt '{klass}' contains the identifier '{identifier}': the class prompt describes any member of the class, without the identifier"
            )
        return identifier
    class_words = {w.lower() for w in _words(klass)}
    words = _words(instance)
    extra = [i for i, w in enumerate(words) if w.lower() not in class_words]
    if not extra:
        raise ValueError(
            f"the instance prompt '{instance}' has no identifier: it needs a word the class prompt '{klass}' lacks, "
            "e.g. 'a photo of sks dog' with the class prompt 'a photo of dog'"
        )
    if extra != list(range(extra[0], extra[-1] + 1)):
        listed = ", ".join(f"'{words[i]}'" for i in extra)
        raise ValueError(
            f"the instance prompt has several words the class prompt lacks ({listed}): set the identifier input to the one that names the subject"
        )
    return " ".join(words[i] for i in extra)


def class_word(instance_prompt: str, class_prompt: str, identifier: str) -> str:
    """The class noun: the first class-prompt word after the identifier, else the class prompt's last word."""
    match = _phrase_pattern(identifier).search(instance_prompt)
    class_words = {w.lower() for w in _words(class_prompt)}
    if match:
        for word in _words(instance_prompt[match.end() :]):
            if word.lower() in class_words:
                return word
    words = _words(class_prompt)
    return words[-1] if words else class_prompt.strip()


def rare_token_candidates(vocab: Mapping[str, int], low_fraction: float = 0.8) -> list[str]:
    """Whole-word tokens of 2-3 ASCII letters from the rarest part of a BPE vocabulary.

    BPE ids follow merge order, so the last ids are the rarest words; the paper samples
    short tokens from such a range (T5 ids 5000-10000 for Imagen).
    """
    if not vocab:
        return []
    size = max(vocab.values()) + 1
    low = int(size * low_fraction)
    found = []
    for token, index in vocab.items():
        word = token[:-4] if token.endswith("</w>") else None
        if word is None or not low <= index < size - 2:  # the last ids are start/end tokens
            continue
        if re.fullmatch(r"[a-z]{2,3}", word) and len(set(word)) > 1 and word not in _ENGLISH_SHORT:
            found.append((index, word))
    return [w for _, w in sorted(found)]


def suggest_identifier(vocab: Mapping[str, int], seed: int = 0, count: int = 1, accept: Callable[[str], bool] | None = None) -> str:
    """A rare-token identifier: ``count`` (1-3) rare whole-word tokens, space separated.

    Deterministic for a vocabulary and seed. ``accept`` can veto a token (e.g. one that
    another tokenizer of the same CLIP splits).
    """
    if not 1 <= count <= 3:
        raise ValueError(f"an identifier has 1-3 rare tokens (asked for {count})")
    candidates = rare_token_candidates(vocab)
    random.Random(seed).shuffle(candidates)
    chosen = [w for w in candidates if accept is None or accept(w)][:count]
    if len(chosen) < count:
        raise ValueError("the tokenizer's vocabulary has too few rare short tokens to suggest an identifier")
    return " ".join(chosen)
