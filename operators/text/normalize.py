"""Text normalization shared by dedup and decontamination: case, whitespace and punctuation folded."""

from __future__ import annotations

import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+", re.UNICODE)
_WORD = re.compile(r"\w+", re.UNICODE)


# ASCII characters that are neither word (`\w`: letters, digits, underscore) nor space (`\s`) characters.
_ASCII_PUNCT = str.maketrans({chr(c): " " for c in range(128)
                              if not (chr(c).isalnum() or chr(c) == "_" or chr(c).isspace())})


def normalize_text(text: str) -> str:
    """Lowercase, NFKC, punctuation removed, whitespace collapsed: 'Hello,  World!' -> 'hello world'.

    ASCII text (most of a corpus) takes a translate table and a split, 3x the regex passes: NFKC leaves ASCII
    as it is, and for ASCII `str.isalnum`/`str.isspace` are exactly the regex's word and space classes. Exact
    dedup hashes this, so both paths must agree character for character (tests/test_normalize.py)."""
    if text.isascii():
        return " ".join(text.lower().translate(_ASCII_PUNCT).split())
    return normalize_text_general(text)


def normalize_text_general(text: str) -> str:
    """`normalize_text` for any text: NFKC, lowercase, regex passes."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


# ASCII characters that are not word characters (`\w`): for ASCII text, a translate to spaces and a split give
# the regex's tokens at twice its speed (the filters tokenize every answer).
_ASCII_NON_WORD = str.maketrans({chr(c): " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")})


def words(text: str) -> list[str]:
    """Lowercase word tokens (runs of word characters)."""
    low = text.lower()
    if low.isascii():
        return low.translate(_ASCII_NON_WORD).split()
    return _WORD.findall(low)


# -- tokens for benchmark matching (decontamination) -------------------------------------------------
# Stronger than normalize_text, which exact dedup and the filters hash with and so must not change:
# Unicode compatibility forms (NFKC: full-width letters, ligatures, no-break spaces), case (casefold:
# 'ß' == 'ss'), Latin diacritics ('café' == 'cafe'), apostrophes deleted rather than spaced ("don't" ==
# "don’t" == "dont") and invisible format characters (zero-width space, soft hyphen, BOM) deleted, so a
# word split by one stays one word. Every other non-alphanumeric character, underscore included, ends a
# token: quotes, dashes and punctuation of any script are separators.
_MATCH_DELETE = re.compile("['\u2019\u2018\u02bc`\u00ad\u200b\u200c\u200d\u2060\ufeff]")
_MATCH_MARKS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")
_MATCH_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)


def _match_fold(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    if text.isascii():  # the common case: two C-level replaces, not a regex pass
        return text.replace("'", "").replace("`", "")
    return _MATCH_MARKS.sub("", unicodedata.normalize("NFD", _MATCH_DELETE.sub("", text)))


# For ASCII text (NFKC leaves it as it is, casefold is lower): letters lowered, digits kept, every other byte a
# separator, and the apostrophe and backtick deleted (`_ASCII_MATCH_DELETE`): one bytes translate and a split,
# several times faster than the regex over the folded text. Both paths must give the same tokens
# (tests/test_normalize.py).
_ASCII_MATCH = bytes(c + 32 if 65 <= c <= 90 else c if 48 <= c <= 57 or 97 <= c <= 122 else 32 for c in range(256))
_ASCII_MATCH_DELETE = b"'`"


def match_tokens(text: str) -> list[str]:
    """Tokens for benchmark matching: 'Don’t  SHOUT—café!' -> ['dont', 'shout', 'cafe']."""
    if text.isascii():
        return text.encode().translate(_ASCII_MATCH, _ASCII_MATCH_DELETE).decode().split()
    return match_tokens_general(text)


def match_tokens_general(text: str) -> list[str]:
    """`match_tokens` for any text: the folding, then the token regex."""
    return _MATCH_TOKEN.findall(_match_fold(text))


def match_token_spans(text: str) -> list[tuple[str, int, int]]:
    """`match_tokens(text)` with each token's (start, end) character span in `text`.

    Folds character by character to keep offsets, so it is slower: use it only to show a match. Where
    per-character folding tokenizes differently from the whole-text folding (composed characters
    around a combining mark), the spans are those of this tokenization; callers compare tokens."""
    folded: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        f = _match_fold(ch)
        folded.append(f)
        where.extend([i] * len(f))
    flat = "".join(folded)
    return [(m.group(), where[m.start()], where[m.end() - 1] + 1) for m in _MATCH_TOKEN.finditer(flat)]
