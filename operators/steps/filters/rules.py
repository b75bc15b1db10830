"""The rule checks, as pure functions over one conversation. Each returns None (keep) or (reason, detail).

Reasons are stable strings: they appear in `dropped/`'s `reason` column, in stats and in reports.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from operators.text.normalize import normalize_text, words

Verdict = tuple[str, str] | None
Turns = Sequence[dict[str, str]]

DEFAULT_REFUSALS = (
    "i'm sorry, but i can't", "i am sorry, but i can't", "i'm sorry, but i cannot", "i cannot assist with",
    "i can't assist with", "i can't help with that", "i cannot help with that", "i'm unable to help",
    "i am unable to provide", "i apologize, but i cannot", "i apologize, but i can't",
    "i'm not able to provide", "as an ai, i cannot", "i cannot fulfill", "i can't fulfill",
)
DEFAULT_TEMPLATE_RESIDUE = (
    "as an ai language model", "as a large language model", "i am an ai language model",
    "as an ai assistant developed by openai", "openai's guidelines", "my knowledge cutoff",
)
# Unfilled prompt-template slots: {input}, {{question}}, <INSERT TEXT HERE>, [INSERT ...].
DEFAULT_PLACEHOLDERS = (
    r"\{\{?\s*(input|instruction|question|query|prompt|context|text|output|answer|response)\s*\}?\}",
    r"<\s*insert[^>]*>",
    r"\[\s*insert[^\]]*\]",
)


@dataclass(frozen=True)
class RuleSettings:
    """Thresholds of the rule checks (built from the step config)."""

    min_turns: int
    max_turns: int
    min_chars: int
    max_chars: int
    min_answer_chars: int
    languages: frozenset[str]
    refusals: tuple[str, ...]
    template_residue: tuple[str, ...]
    placeholders: tuple[re.Pattern[str], ...]
    repetition_ngram: int
    max_repetition_ratio: float
    max_non_text_ratio: float
    sources_allow: frozenset[str]
    sources_deny: frozenset[str]


def check_source(source: str, s: RuleSettings) -> Verdict:
    if source in s.sources_deny:
        return "source_denied", f"source {source!r} is on the deny list"
    if s.sources_allow and source not in s.sources_allow:
        return "source_not_allowed", f"source {source!r} is not on the allow list"
    return None


def check_length(turns: Turns, s: RuleSettings) -> Verdict:
    n = sum(1 for t in turns if t["from"] != "system")
    if n < s.min_turns:
        return "too_few_turns", f"{n} turns < {s.min_turns}"
    if n > s.max_turns:
        return "too_many_turns", f"{n} turns > {s.max_turns}"
    chars = sum(len(t["value"]) for t in turns)
    if chars < s.min_chars:
        return "too_short", f"{chars} chars < {s.min_chars}"
    if chars > s.max_chars:
        return "too_long", f"{chars} chars > {s.max_chars}"
    return None


def check_language(lang: str | None, s: RuleSettings) -> Verdict:
    if s.languages and (lang or "unknown") not in s.languages:
        return "language", f"language {lang!r} not in {sorted(s.languages)}"
    return None


def check_answers(turns: Turns, s: RuleSettings) -> Verdict:
    prev_human = ""
    for i, t in enumerate(turns):
        if t["from"] == "human":
            prev_human = t["value"]
        elif t["from"] == "gpt":
            value = t["value"].strip()
            if len(value) < s.min_answer_chars:
                return "empty_answer", f"answer {i} has {len(value)} chars"
            # Normalizing is costly on long texts; an echo has about the prompt's length, so test that first.
            if abs(len(value) - len(prev_human.strip())) <= 0.2 * len(value) + 8 and (
                    normalize_text(value) == normalize_text(prev_human)):
                return "echoed_answer", f"answer {i} repeats its prompt"
    return None


def check_refusal(turns: Turns, s: RuleSettings) -> Verdict:
    for i, t in enumerate(turns):
        if t["from"] == "gpt":
            head = t["value"][:400].lower().replace("\u2019", "'")
            for phrase in s.refusals:
                if phrase in head:
                    return "refusal", f"answer {i} contains {phrase!r}"
    return None


def check_template_residue(turns: Turns, s: RuleSettings) -> Verdict:
    for i, t in enumerate(turns):
        low = t["value"].lower()
        if t["from"] == "gpt":
            for phrase in s.template_residue:
                if phrase in low:
                    return "template_residue", f"turn {i} contains {phrase!r}"
        elif t["from"] == "human":
            for pat in s.placeholders:
                if (m := pat.search(low)) is not None:
                    return "template_residue", f"turn {i} has unfilled placeholder {m.group(0)!r}"
    return None


REPETITION_WINDOW = 20_000  # characters: degenerate loops show up early, and this bounds the cost


def _ngram_ratio(toks: Sequence[str] | Sequence[bytes], n: int, at_most: float = -1.0) -> float:
    """`repeated_ngram_ratio` of tokens `toks`; with `at_most`, any value up to it may stand for a ratio that
    is at most `at_most` (a cheap bound decides most texts)."""
    if len(toks) < 2 * n:
        return 0.0
    total = len(toks) - n + 1
    # n-grams that start with different tokens differ, and all but the last n - 1 tokens start one: there are
    # at least (distinct tokens - (n - 1)) distinct n-grams. When that bound already keeps the ratio under the
    # limit, the n-grams need not be built (one set of tokens instead of one of tuples).
    bound = 1.0 - (len(set(toks)) - (n - 1)) / total
    if bound <= at_most:
        return bound
    # zip over shifted views builds the n-grams in C instead of slicing per position.
    return 1.0 - len(set(zip(*(toks[i:] for i in range(n)), strict=False))) / total


# ASCII bytes that are not word characters, as spaces: for ASCII text, a bytes translate and split give `words`'
# tokens (as bytes, which count the same) at half the cost of the str translate.
_ASCII_NON_WORD_BYTES = bytes(c if chr(c).isalnum() or c == 95 else 32 for c in range(256))


def _window_tokens(text: str) -> list[str] | list[bytes]:
    """The word tokens of `text`'s first `REPETITION_WINDOW` characters (bytes for ASCII text, `words` otherwise)."""
    text = text[:REPETITION_WINDOW]
    if text.isascii():
        return text.encode().lower().translate(_ASCII_NON_WORD_BYTES).split()
    return words(text)


def repeated_ngram_ratio(text: str, n: int) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram (0 for texts shorter than 2n words)."""
    return _ngram_ratio(_window_tokens(text), n)


def answer_repetition(i: int, answer: str, s: RuleSettings) -> Verdict:
    """The repetition rule on answer `i` of a conversation."""
    r = _ngram_ratio(_window_tokens(answer), s.repetition_ngram, s.max_repetition_ratio)
    if r > s.max_repetition_ratio:
        return "repetition", f"answer {i}: {r:.2f} of its {s.repetition_ngram}-grams repeat"
    return None


def repetitive(answers: Sequence[str], s: RuleSettings) -> list[int]:
    """Positions of the `answers` the repetition rule fails, in one loop (the filter's hot path: most records
    need only this rule in Python)."""
    n, limit = s.repetition_ngram, s.max_repetition_ratio
    failed = []
    for pos, text in enumerate(answers):
        if _ngram_ratio(_window_tokens(text), n, limit) > limit:
            failed.append(pos)
    return failed


def check_repetition(turns: Turns, s: RuleSettings) -> Verdict:
    for i, t in enumerate(turns):
        if t["from"] == "gpt" and (v := answer_repetition(i, t["value"], s)) is not None:
            return v
    return None


_TEXT_CHARS = re.compile(r"""[\w\s.,;:!?'"()\[\]{}<>/=+*#`%&|\\$@^~-]+""")


# The ASCII characters `_TEXT_CHARS` matches, deleted by a translate: for ASCII text that leaves exactly the
# non-text characters, several times faster than the regex.
_ASCII_TEXT_DELETE = str.maketrans({chr(c): None for c in range(128) if _TEXT_CHARS.fullmatch(chr(c))})


def non_text_ratio(text: str) -> float:
    """Fraction of characters that are neither letters, digits, whitespace nor common punctuation."""
    if not text:
        return 0.0
    if text.isascii():
        return len(text.translate(_ASCII_TEXT_DELETE)) / len(text)
    return len(_TEXT_CHARS.sub("", text)) / len(text)


def check_non_text(turns: Turns, s: RuleSettings) -> Verdict:
    text = "".join(t["value"] for t in turns)
    r = non_text_ratio(text)
    if r > s.max_non_text_ratio:
        return "non_text", f"{r:.2f} of characters are not text"
    return None


# Order matters: the first failing check names the reason; cheap checks first.
CONVERSATION_CHECKS: tuple[Callable[[Turns, RuleSettings], Verdict], ...] = (
    check_length, check_answers, check_refusal, check_template_residue, check_repetition, check_non_text,
)
ALL_REASONS = (
    "source_denied", "source_not_allowed", "language", "too_few_turns", "too_many_turns", "too_short",
    "too_long", "empty_answer", "echoed_answer", "refusal", "template_residue", "repetition", "non_text",
)


def judge(turns: Turns, source: str, lang: str | None, s: RuleSettings) -> Verdict:
    """Apply every rule to one record; None means keep."""
    return (check_source(source, s) or check_language(lang, s)
            or next((v for check in CONVERSATION_CHECKS if (v := check(turns, s)) is not None), None))
