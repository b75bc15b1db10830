"""Text normalization shared by dedup and decontamination: case, whitespace and punctuation folded."""

from __future__ import annotations

import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+", re.UNICODE)
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize_text(text: str) -> str:
    """Lowercase, NFKC, punctuation removed, whitespace collapsed: 'Hello,  World!' -> 'hello world'."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def words(text: str) -> list[str]:
    """Lowercase word tokens."""
    return _WORD.findall(text.lower())
