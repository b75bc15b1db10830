"""Batch passes that clear most records of most rules at once, so that the rules run in Python only where one
may fail.

A batch's turns are flattened into Arrow arrays. Each pass is a necessary condition of a rule failing (the
length rules and the lists exactly; refusals and template residue as literal matches over texts lowercased
like `str.lower`; echoes by their lengths; non-text characters by a count over ASCII texts). A record no
pass flags passes every rule but repetition, whose n-grams are counted in Python on its answers alone; a
flagged record goes through `rules.judge`, which names the reason. So every verdict is the rules' own: the
passes decide only where the rules look.

Where Arrow's kernels could read a text differently from Python (a few characters' lowercase, `\\s` and `\\w`
beyond ASCII), the pass flags the text rather than guess.
"""

from __future__ import annotations

import functools
import re
import string
from re import _parser as sre_parser  # type: ignore[attr-defined]  # the stdlib's own regex parser
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from operators.steps.filters.rules import _TEXT_CHARS, RuleSettings

Mask = npt.NDArray[np.bool_]


def _bools(arr: pa.Array | pa.ChunkedArray) -> Mask:
    return np.asarray(arr.fill_null(True).to_numpy(zero_copy_only=False), dtype=bool)


def _re2_class(chars: str) -> str:
    """An RE2 character class of exactly `chars`."""
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


# Every character `str.strip()` removes (`str.isspace`), for Arrow's `utf8_trim`; and the characters a
# case-insensitive RE2 literal may miss where `str.lower` then `in` finds it (the dotted capital I lowers to two
# characters). Both follow from the Unicode tables of the pinned Python and pyarrow; constants, because computing
# them costs every filter process half a second, and tests/test_filters.py recomputes them (`python_whitespace`,
# `fold_unsafe`), so an upgrade that moves either fails there.
PYTHON_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                     "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
FOLD_UNSAFE = "\u0130"


def python_whitespace() -> str:
    """Every character `str.strip()` removes, from the installed tables (`PYTHON_WHITESPACE` is this)."""
    return "".join(c for c in map(chr, range(0x110000)) if c.isspace())


def fold_unsafe() -> str:
    """The characters a case-insensitive RE2 literal may miss where Python's `str.lower` then `in` finds it: those
    that lower to several characters or to one outside their RE2 case-folding orbit, with the Unicode tables
    installed (`FOLD_UNSAFE` is this). In a text free of them, every phrase `str.lower` finds, `(?i)` finds."""
    unsafe = []
    for c in map(chr, range(0x110000)):
        low = c.lower()
        if low == c:
            continue
        folds = len(low) == 1 and pc.match_substring_regex(pa.array([c]), pattern=f"(?i)^{re.escape(low)}$")[0].as_py()
        if not folds:
            unsafe.append(c)
    return "".join(unsafe)


def _first_chars(items: Any) -> set[str] | None:
    """The characters a match of parsed pattern `items` must start with, or None where it is not a known set of
    literals (anchors, classes, optional heads): then no gate."""
    if not items:
        return None
    op, av = items[0]
    if op is sre_parser.LITERAL:
        return {chr(av)}
    if op is sre_parser.IN and all(o is sre_parser.LITERAL for o, _ in av):
        return {chr(a) for _, a in av}
    if op is sre_parser.SUBPATTERN:
        return _first_chars(av[-1])
    if op in (sre_parser.MAX_REPEAT, sre_parser.MIN_REPEAT) and av[0] >= 1:
        return _first_chars(av[2])
    if op is sre_parser.BRANCH:
        union: set[str] = set()
        for branch in av[1]:
            first = _first_chars(branch)
            if first is None:
                return None
            union |= first
        return union
    return None


def placeholder_gate(placeholders: tuple[re.Pattern[str], ...]) -> str | None:
    """The characters every placeholder match starts with, when each pattern starts with ASCII
    punctuation (no other character lowers or case-folds to one, so a prompt without them has no match);
    None when some pattern does not, and every prompt must be searched."""
    chars: set[str] = set()
    for pat in placeholders:
        first = _first_chars(sre_parser.parse(pat.pattern, pat.flags))
        if first is None or not first <= set(string.punctuation):
            return None
        chars |= first
    return "".join(sorted(chars)) or None


def _folded_literals(phrases: tuple[str, ...]) -> str:
    """A case-insensitive RE2 alternation of `phrases` (lowercase), an apostrophe also matching a right single
    quote (the refusal check reads one as the other)."""
    return "|".join(re.escape(p).replace("'", "['\u2019]") for p in phrases)


def _matches(texts: pa.Array, pattern: str) -> Mask:
    return _bools(pc.match_substring_regex(texts, pattern=pattern)) if pattern and len(texts) else \
        np.zeros(len(texts), dtype=bool)


def _per_row(values: npt.NDArray[Any], turn_row: npt.NDArray[np.int64], rows: int) -> npt.NDArray[np.int64]:
    """Sums of a per-turn count over each record's turns (exact: counts stay far below 2**53)."""
    return np.bincount(turn_row, weights=values, minlength=rows).astype(np.int64)


_NON_TEXT, _OPENS_SLOT, _SPACE = 1, 2, 4


@functools.cache
def _byte_classes(slot_starts: str) -> bytes:
    """A translate table from a text's bytes to bit flags: an ASCII character `rules.non_text_ratio` does not
    count as text; a character a placeholder match starts with; a byte that may belong to whitespace `str.strip`
    removes (ASCII whitespace, or any byte of a multi-byte character)."""
    flags = bytearray(256)
    for c in range(256):
        ch = chr(c)
        if c < 128 and _TEXT_CHARS.fullmatch(ch) is None:
            flags[c] |= _NON_TEXT
        if ch in slot_starts:
            flags[c] |= _OPENS_SLOT
        if c >= 128 or ch.isspace():
            flags[c] |= _SPACE
    return bytes(flags)


def _byte_counts(value: pa.StringArray, table: bytes) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64],
                                                                npt.NDArray[np.bool_]]:
    """Per text: its non-text bytes and its bytes that open a placeholder (both rare, so counted from their
    positions), and whether its first or last byte may be whitespace."""
    width = np.int64 if pa.types.is_large_string(value.type) else np.int32
    bounds = np.frombuffer(value.buffers()[1], dtype=width)[value.offset:value.offset + len(value) + 1]
    start = int(bounds[0])
    offsets = bounds.astype(np.int64) - start
    n = len(value)
    if n == 0 or offsets[-1] == 0:
        zeros = np.zeros(n, dtype=np.int64)
        return zeros, zeros, np.zeros(n, dtype=bool)
    data = value.buffers()[2]
    codes = np.frombuffer(bytes(memoryview(data)[start:start + int(offsets[-1])]).translate(table), dtype=np.uint8)
    where = np.flatnonzero(codes & (_NON_TEXT | _OPENS_SLOT))
    text_of = np.searchsorted(offsets, where, side="right") - 1
    flags = codes[where]
    non_text = np.bincount(text_of, weights=flags & _NON_TEXT, minlength=n).astype(np.int64)
    slots = np.bincount(text_of, weights=flags & _OPENS_SLOT, minlength=n).astype(np.int64)
    nonempty = offsets[1:] > offsets[:-1]
    first = np.where(nonempty, codes[np.minimum(offsets[:-1], len(codes) - 1)], 0)
    last = np.where(nonempty, codes[np.maximum(offsets[1:] - 1, 0)], 0)
    return non_text, slots, ((first | last) & _SPACE) > 0


def flat_turns(table: pa.Table) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], pa.Array, pa.Array]:
    """A batch's turns flattened: each record's first turn (one past the end last), each turn's record, and the
    turns' speakers and texts."""
    convs = table.column("conversations").combine_chunks()
    starts = convs.offsets.to_numpy().astype(np.int64)
    starts -= starts[0]
    turns = convs.flatten()
    return starts, np.repeat(np.arange(len(table)), np.diff(starts)), turns.field("from"), turns.field("value")


def may_fail(table: pa.Table, s: RuleSettings) -> tuple[Mask, Mask]:
    """Per record: whether a rule other than repetition and non-text may fail it (False proves that every such
    rule passes; True sends the record to `rules.judge`), and whether the non-text rule must be computed in
    Python (a non-ASCII text; for the others it is decided here, a failure flagged)."""
    n = len(table)
    starts, turn_row, speaker, value = flat_turns(table)
    turn_flag = _bools(pc.is_null(value)) | _bools(pc.is_null(speaker))
    value = value.fill_null("")
    # The lists and the language: exact.
    flag = np.zeros(n, dtype=bool)
    source = table.column("source").fill_null("")
    if s.sources_deny:
        flag |= _bools(pc.is_in(source, pa.array(sorted(s.sources_deny), pa.string())))
    if s.sources_allow:
        flag |= ~_bools(pc.is_in(source, pa.array(sorted(s.sources_allow), pa.string())))
    if s.languages:
        lang = table.column("langdetect").fill_null("unknown")
        flag |= ~_bools(pc.is_in(lang, pa.array(sorted(s.languages), pa.string())))
    # Turns and characters: exact.
    chars = pc.utf8_length(value).to_numpy(zero_copy_only=False).astype(np.int64)
    system, gpt, human = (_bools(pc.equal(speaker, r)) for r in ("system", "gpt", "human"))
    n_turns = _per_row((~system).astype(np.int64), turn_row, n)
    n_chars = _per_row(chars, turn_row, n)
    flag |= (n_turns < s.min_turns) | (n_turns > s.max_turns) | (n_chars < s.min_chars) | (n_chars > s.max_chars)
    gate = placeholder_gate(s.placeholders) if s.placeholders else None
    non_text, slots, edge_space = _byte_counts(value, _byte_classes(gate or ""))
    # Answers: empty ones exactly; an echo is possible only when an answer's length is near its prompt's.
    # Stripped lengths: a text whose first and last bytes cannot be whitespace strips to itself.
    stripped = chars.copy()
    edged = np.flatnonzero(edge_space)
    if len(edged):
        trimmed = pc.utf8_trim(value.take(pa.array(edged)), PYTHON_WHITESPACE)
        stripped[edged] = pc.utf8_length(trimmed).to_numpy(zero_copy_only=False)
    last_human = np.maximum.accumulate(np.where(human, np.arange(len(human)), -1)) if len(human) else turn_row
    prompt = np.where(last_human >= starts[turn_row], stripped[np.maximum(last_human, 0)], 0)
    turn_flag |= gpt & ((stripped < s.min_answer_chars) | (np.abs(stripped - prompt) <= 0.2 * stripped + 9))
    # Refusals and template residue in answers: a case-insensitive literal pass finds every phrase `str.lower`
    # finds, and more (anywhere in an answer, not only its head), unless a text holds a character it may miss.
    phrases = _folded_literals(s.refusals + s.template_residue)
    pattern = "|".join(x for x in ("(?i)" + phrases if phrases else "", _re2_class(FOLD_UNSAFE)) if x)
    turn_flag |= gpt & _matches(value, pattern)
    # Unfilled placeholders in prompts: a match starts with one of the gate's characters, or every prompt is
    # searched.
    if s.placeholders:
        turn_flag |= human & ((slots > 0) if gate else True)
    flag |= _per_row(turn_flag.astype(np.int64), turn_row, n) > 0
    # Non-text characters over the whole record: counted over ASCII texts; a record with any other text is
    # left to Python.
    non_ascii = _per_row((~_bools(pc.string_is_ascii(value))).astype(np.int64), turn_row, n) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        flag |= ~non_ascii & (_per_row(non_text, turn_row, n) / n_chars > s.max_non_text_ratio)
    return flag, non_ascii
