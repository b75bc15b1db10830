"""Normalization of one raw instruction record into the canonical conversation shape.

Pure functions only: no I/O, no Airflow, no Arrow. The ingest step parses each raw JSON text,
picks a format (configured, or per record with :func:`detect_format`) and calls
:func:`normalize`, which returns either a :class:`Normalized` conversation or a
:class:`Rejected` verdict whose :class:`DropReason` value is what the quarantine's ``reason``
column holds.

This runs on hundreds of millions of records, so the hot path sticks to dict lookups,
``isinstance`` checks and C-level ``str`` methods: no regexes, and no objects beyond the turns
and the result.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import xxhash

__all__ = [
    "ALL_DROP_REASONS",
    "LABEL_KEYS",
    "DropReason",
    "Normalized",
    "Rejected",
    "SourceFormat",
    "Turn",
    "content_id",
    "detect_format",
    "normalize",
]


class SourceFormat(StrEnum):
    """Raw record layouts the ingest step understands."""

    AUTO = "auto"
    SHAREGPT = "sharegpt"
    OPENAI = "openai"
    ALPACA = "alpaca"
    INFINITY = "infinity"


class DropReason(StrEnum):
    """Every reason ingest quarantines a record; the values are what the ``reason`` column holds."""

    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    INVALID_UTF8 = "invalid_utf8"
    OVERSIZE = "oversize_record"
    UNKNOWN_FORMAT = "unknown_format"
    MISSING_FIELD = "missing_field"
    BAD_FIELD_TYPE = "bad_field_type"
    UNKNOWN_ROLE = "unknown_role"
    EMPTY_TURN = "empty_turn"
    BROKEN_ROLE_ORDER = "broken_role_order"
    NO_EXCHANGE = "no_exchange"


# Declaration order, so stats and reports list reasons the same way everywhere.
ALL_DROP_REASONS: tuple[DropReason, ...] = tuple(DropReason)

# The canonical `label` keys of the Infinity-Instruct schema.
LABEL_KEYS: tuple[str, ...] = ("ability_en", "ability_zh", "cate_ability_en", "cate_ability_zh")

HUMAN = "human"
GPT = "gpt"
SYSTEM = "system"


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn of a conversation; ``role`` is ``"human"``, ``"gpt"`` or ``"system"``."""

    role: str
    value: str


@dataclass(frozen=True, slots=True)
class Normalized:
    """A record that passed normalization, in the canonical Infinity-Instruct shape."""

    turns: tuple[Turn, ...]
    label: dict[str, list[str]] | None
    reward: float | None
    origin_id: str | None
    origin_source: str | None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that failed normalization: the reason and a short human-readable detail."""

    reason: DropReason
    detail: str


_SHAREGPT_ROLES: dict[str, str] = {
    "human": HUMAN,
    "user": HUMAN,
    "prompter": HUMAN,
    "gpt": GPT,
    "assistant": GPT,
    "chatgpt": GPT,
    "bard": GPT,
    "bing": GPT,
    "model": GPT,
    "bot": GPT,
    "system": SYSTEM,
}
# "developer" is what current OpenAI APIs call the system message; tool/function turns are not
# instruction data and stay unknown.
_OPENAI_ROLES: dict[str, str] = {"user": HUMAN, "assistant": GPT, "system": SYSTEM, "developer": SYSTEM}

_DETAIL_MAX = 48


class _Missing:
    """Sentinel type: tells a missing key from one present with a null value."""

    __slots__ = ()


_MISSING: Any = _Missing()


def _show(value: object) -> str:
    # repr escapes lone surrogates and control characters, so a detail is always Arrow-safe;
    # truncation keeps a hostile multi-megabyte role name out of the quarantine's detail column.
    text = repr(value)
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def is_utf8_safe(text: str) -> bool:
    """True when `text` encodes as UTF-8 (no lone surrogates), so Arrow can store it."""
    # json.loads turns an escaped lone surrogate ("\ud800") into a str that UTF-8 (and so Arrow)
    # cannot encode; catching it here quarantines the record instead of crashing the writer.
    # isascii() is a C-level flag check, so the common case costs nothing.
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_blank(text: str) -> bool:
    # No strip(): it would allocate a copy of every turn just to test it.
    return not text or text.isspace()


def detect_format(record: Mapping[str, Any]) -> SourceFormat | None:
    """Guess a record's layout from its keys; ``None`` when no known layout matches.

    ``conversations`` with ``label`` or ``langdetect`` is Infinity-Instruct, ``conversations``
    alone is ShareGPT, ``messages`` is OpenAI chat, ``instruction`` with ``output`` is Alpaca.
    A value that is not a mapping (any other JSON value) also yields ``None``.
    """
    if not isinstance(record, Mapping):
        return None
    if "conversations" in record:
        if "label" in record or "langdetect" in record:
            return SourceFormat.INFINITY
        return SourceFormat.SHAREGPT
    if "messages" in record:
        return SourceFormat.OPENAI
    if "instruction" in record and "output" in record:
        return SourceFormat.ALPACA
    return None


def _check_order(turns: Sequence[Turn]) -> Rejected | None:
    """Optional single leading system turn, then human/gpt alternating, ending with gpt."""
    start = 1 if turns and turns[0].role == SYSTEM else 0
    if start == len(turns):
        return Rejected(DropReason.NO_EXCHANGE, "no human/gpt turns")
    expected = HUMAN
    for index in range(start, len(turns)):
        role = turns[index].role
        if role != expected:
            if role == SYSTEM:
                detail = f"turn {index} is a system turn; only one leading system turn is allowed"
            else:
                detail = f"turn {index} is {role!r}, expected {expected!r}"
            return Rejected(DropReason.BROKEN_ROLE_ORDER, detail)
        expected = GPT if expected == HUMAN else HUMAN
    if expected == GPT:
        return Rejected(DropReason.BROKEN_ROLE_ORDER, "conversation ends with a human turn")
    return None


def _sharegpt_turns(record: Mapping[str, Any]) -> list[Turn] | Rejected:
    conv = record.get("conversations", _MISSING)
    if conv is _MISSING:
        return Rejected(DropReason.MISSING_FIELD, "missing 'conversations'")
    if not isinstance(conv, list):
        return Rejected(DropReason.BAD_FIELD_TYPE, f"'conversations' is a {_json_type(conv)}, not an array")
    roles = _SHAREGPT_ROLES
    turns: list[Turn] = []
    n_exchange = 0
    for index, item in enumerate(conv):
        if not isinstance(item, dict):
            return Rejected(DropReason.BAD_FIELD_TYPE, f"turn {index} is a {_json_type(item)}, not an object")
        raw_role = item.get("from", _MISSING)
        if raw_role is _MISSING:
            return Rejected(DropReason.MISSING_FIELD, f"turn {index} missing 'from'")
        value = item.get("value", _MISSING)
        if value is _MISSING:
            return Rejected(DropReason.MISSING_FIELD, f"turn {index} missing 'value'")
        if not isinstance(raw_role, str):
            return Rejected(DropReason.BAD_FIELD_TYPE, f"turn {index} 'from' is a {_json_type(raw_role)}")
        role = roles.get(raw_role)
        if role is None:
            # Exact match first: lower() allocates, and almost every record uses canonical case.
            role = roles.get(raw_role.lower())
            if role is None:
                return Rejected(DropReason.UNKNOWN_ROLE, f"turn {index} has unknown role {_show(raw_role)}")
        if not isinstance(value, str):
            return Rejected(DropReason.BAD_FIELD_TYPE, f"turn {index} 'value' is a {_json_type(value)}")
        # Inlined _is_blank / is_utf8_safe fast paths: this loop runs once per turn of every record.
        if not value or value.isspace():
            return Rejected(DropReason.EMPTY_TURN, f"turn {index} is empty")
        if not value.isascii() and not is_utf8_safe(value):
            return Rejected(DropReason.INVALID_UTF8, f"turn {index} contains a lone surrogate")
        if role != SYSTEM:
            n_exchange += 1
        turns.append(Turn(role, value))
    if n_exchange == 0:
        return Rejected(DropReason.NO_EXCHANGE, "no human/gpt turns")
    return turns


def _openai_content(content: object, index: int) -> str | Rejected:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return Rejected(DropReason.BAD_FIELD_TYPE, f"message {index} 'content' is a {_json_type(content)}")
    texts: list[str] = []
    for part_index, part in enumerate(content):
        if not isinstance(part, dict):
            return Rejected(
                DropReason.BAD_FIELD_TYPE,
                f"message {index} content part {part_index} is a {_json_type(part)}, not an object",
            )
        kind = part.get("type")
        if kind != "text":
            return Rejected(
                DropReason.BAD_FIELD_TYPE,
                f"message {index} content part {part_index} has type {_show(kind)}, not 'text'",
            )
        text = part.get("text", _MISSING)
        if text is _MISSING:
            return Rejected(DropReason.MISSING_FIELD, f"message {index} content part {part_index} missing 'text'")
        if not isinstance(text, str):
            return Rejected(
                DropReason.BAD_FIELD_TYPE,
                f"message {index} content part {part_index} 'text' is a {_json_type(text)}",
            )
        texts.append(text)
    return texts[0] if len(texts) == 1 else "\n".join(texts)


def _openai_turns(record: Mapping[str, Any]) -> list[Turn] | Rejected:
    messages = record.get("messages", _MISSING)
    if messages is _MISSING:
        return Rejected(DropReason.MISSING_FIELD, "missing 'messages'")
    if not isinstance(messages, list):
        return Rejected(DropReason.BAD_FIELD_TYPE, f"'messages' is a {_json_type(messages)}, not an array")
    roles = _OPENAI_ROLES
    turns: list[Turn] = []
    n_exchange = 0
    for index, item in enumerate(messages):
        if not isinstance(item, dict):
            return Rejected(DropReason.BAD_FIELD_TYPE, f"message {index} is a {_json_type(item)}, not an object")
        raw_role = item.get("role", _MISSING)
        if raw_role is _MISSING:
            return Rejected(DropReason.MISSING_FIELD, f"message {index} missing 'role'")
        if not isinstance(raw_role, str):
            return Rejected(DropReason.BAD_FIELD_TYPE, f"message {index} 'role' is a {_json_type(raw_role)}")
        role = roles.get(raw_role)
        if role is None:
            role = roles.get(raw_role.lower())
            if role is None:
                return Rejected(DropReason.UNKNOWN_ROLE, f"message {index} has unknown role {_show(raw_role)}")
        content = item.get("content", _MISSING)
        if content is _MISSING:
            return Rejected(DropReason.MISSING_FIELD, f"message {index} missing 'content'")
        value = _openai_content(content, index)
        if isinstance(value, Rejected):
            return value
        # Inlined _is_blank / is_utf8_safe fast paths: this loop runs once per turn of every record.
        if not value or value.isspace():
            return Rejected(DropReason.EMPTY_TURN, f"message {index} is empty")
        if not value.isascii() and not is_utf8_safe(value):
            return Rejected(DropReason.INVALID_UTF8, f"message {index} contains a lone surrogate")
        if role != SYSTEM:
            n_exchange += 1
        turns.append(Turn(role, value))
    if n_exchange == 0:
        return Rejected(DropReason.NO_EXCHANGE, "no user/assistant messages")
    return turns


def _alpaca_text(record: Mapping[str, Any], key: str, *, required: bool) -> str | Rejected | None:
    value = record.get(key)
    if value is None:
        if required:
            if key in record:
                return Rejected(DropReason.BAD_FIELD_TYPE, f"{key!r} is null")
            return Rejected(DropReason.MISSING_FIELD, f"missing {key!r}")
        return None
    if not isinstance(value, str):
        return Rejected(DropReason.BAD_FIELD_TYPE, f"{key!r} is a {_json_type(value)}, not a string")
    if not is_utf8_safe(value):
        return Rejected(DropReason.INVALID_UTF8, f"{key!r} contains a lone surrogate")
    return value


def _alpaca_turns(record: Mapping[str, Any]) -> list[Turn] | Rejected:
    instruction = _alpaca_text(record, "instruction", required=True)
    if isinstance(instruction, Rejected):
        return instruction
    output = _alpaca_text(record, "output", required=True)
    if isinstance(output, Rejected):
        return output
    extra = _alpaca_text(record, "input", required=False)
    if isinstance(extra, Rejected):
        return extra
    system = _alpaca_text(record, "system", required=False)
    if isinstance(system, Rejected):
        return system
    assert instruction is not None and output is not None  # required=True never returns None
    if _is_blank(instruction):
        return Rejected(DropReason.EMPTY_TURN, "'instruction' is empty")
    if _is_blank(output):
        return Rejected(DropReason.EMPTY_TURN, "'output' is empty")

    turns: list[Turn] = []
    # Alpaca exports carry `system: ""` / `input: ""` columns on every row; an empty optional
    # column means "absent", not an empty turn.
    if system is not None and not _is_blank(system):
        turns.append(Turn(SYSTEM, system))
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            return Rejected(DropReason.BAD_FIELD_TYPE, f"'history' is a {_json_type(history)}, not an array")
        for index, pair in enumerate(history):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                return Rejected(DropReason.BAD_FIELD_TYPE, f"history item {index} is not a [query, answer] pair")
            for side, role in ((0, HUMAN), (1, GPT)):
                text = pair[side]
                if not isinstance(text, str):
                    return Rejected(DropReason.BAD_FIELD_TYPE, f"history item {index}[{side}] is a {_json_type(text)}")
                if _is_blank(text):
                    return Rejected(DropReason.EMPTY_TURN, f"history item {index}[{side}] is empty")
                if not is_utf8_safe(text):
                    return Rejected(DropReason.INVALID_UTF8, f"history item {index}[{side}] contains a lone surrogate")
                turns.append(Turn(role, text))
    human = instruction if extra is None or _is_blank(extra) else instruction + "\n\n" + extra
    turns.append(Turn(HUMAN, human))
    turns.append(Turn(GPT, output))
    return turns


def _label(record: Mapping[str, Any]) -> dict[str, list[str]] | Rejected | None:
    label = record.get("label")
    if label is None:
        return None
    if not isinstance(label, dict):
        return Rejected(DropReason.BAD_FIELD_TYPE, f"'label' is a {_json_type(label)}, not an object")
    out: dict[str, list[str]] = {}
    for key in LABEL_KEYS:
        items = label.get(key)
        if items is None:
            out[key] = []
            continue
        if not isinstance(items, list):
            return Rejected(DropReason.BAD_FIELD_TYPE, f"label {key!r} is a {_json_type(items)}, not an array")
        for item in items:
            if not isinstance(item, str):
                return Rejected(DropReason.BAD_FIELD_TYPE, f"label {key!r} holds a {_json_type(item)}")
            if not is_utf8_safe(item):
                return Rejected(DropReason.INVALID_UTF8, f"label {key!r} contains a lone surrogate")
        # A copy, so the result never aliases the caller's parsed record.
        out[key] = list(items)
    return out


def _reward(record: Mapping[str, Any]) -> float | Rejected | None:
    reward = record.get("reward")
    if reward is None:
        return None
    if isinstance(reward, bool) or not isinstance(reward, int | float):
        return Rejected(DropReason.BAD_FIELD_TYPE, f"'reward' is a {_json_type(reward)}, not a number")
    try:
        value = float(reward)
    except OverflowError:
        return Rejected(DropReason.BAD_FIELD_TYPE, "'reward' does not fit a float")
    # Python's json accepts NaN/Infinity literals; a non-finite reward would poison any
    # downstream ranking or mean, so it is a bad value rather than data.
    if not math.isfinite(value):
        return Rejected(DropReason.BAD_FIELD_TYPE, f"'reward' is {value}")
    return value


def _origin(record: Mapping[str, Any]) -> tuple[str | None, str | None] | Rejected:
    raw_id = record.get("id")
    origin_id: str | None
    if raw_id is None:
        origin_id = None
    elif isinstance(raw_id, str):
        if not is_utf8_safe(raw_id):
            return Rejected(DropReason.INVALID_UTF8, "'id' contains a lone surrogate")
        origin_id = raw_id
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        try:
            origin_id = str(raw_id)
        except ValueError:  # beyond sys.get_int_max_str_digits(): not an id anyone wrote on purpose
            return Rejected(DropReason.BAD_FIELD_TYPE, "'id' is an integer too long to convert")
    else:
        return Rejected(DropReason.BAD_FIELD_TYPE, f"'id' is a {_json_type(raw_id)}, not a string or integer")
    source = record.get("source")
    if source is not None:
        if not isinstance(source, str):
            return Rejected(DropReason.BAD_FIELD_TYPE, f"'source' is a {_json_type(source)}, not a string")
        if not is_utf8_safe(source):
            return Rejected(DropReason.INVALID_UTF8, "'source' contains a lone surrogate")
    return origin_id, source


def _finish(
    record: Mapping[str, Any],
    turns: list[Turn] | Rejected,
    label: dict[str, list[str]] | None = None,
    reward: float | None = None,
) -> Normalized | Rejected:
    if isinstance(turns, Rejected):
        return turns
    broken = _check_order(turns)
    if broken is not None:
        return broken
    origin = _origin(record)
    if isinstance(origin, Rejected):
        return origin
    return Normalized(tuple(turns), label, reward, origin[0], origin[1])


def _normalize_sharegpt(record: Mapping[str, Any]) -> Normalized | Rejected:
    return _finish(record, _sharegpt_turns(record))


def _normalize_openai(record: Mapping[str, Any]) -> Normalized | Rejected:
    return _finish(record, _openai_turns(record))


def _normalize_alpaca(record: Mapping[str, Any]) -> Normalized | Rejected:
    return _finish(record, _alpaca_turns(record))


def _normalize_infinity(record: Mapping[str, Any]) -> Normalized | Rejected:
    turns = _sharegpt_turns(record)
    if isinstance(turns, Rejected):
        return turns
    # Conversation problems outrank metadata problems, as for the other formats.
    broken = _check_order(turns)
    if broken is not None:
        return broken
    label = _label(record)
    if isinstance(label, Rejected):
        return label
    reward = _reward(record)
    if isinstance(reward, Rejected):
        return reward
    origin = _origin(record)
    if isinstance(origin, Rejected):
        return origin
    return Normalized(tuple(turns), label, reward, origin[0], origin[1])


_NORMALIZERS: dict[str, Callable[[Mapping[str, Any]], Normalized | Rejected]] = {
    SourceFormat.SHAREGPT: _normalize_sharegpt,
    SourceFormat.OPENAI: _normalize_openai,
    SourceFormat.ALPACA: _normalize_alpaca,
    SourceFormat.INFINITY: _normalize_infinity,
}


def normalize(record: Any, fmt: SourceFormat) -> Normalized | Rejected:
    """Normalize one parsed JSON value laid out as ``fmt`` into canonical turns.

    Never raises on data: any JSON value yields exactly one :class:`Normalized` or
    :class:`Rejected`. Turn text is kept byte-exact (only Alpaca's ``instruction`` and ``input``
    are joined with a blank line, by definition of that format). Raises ``ValueError`` only for
    a programming error: ``fmt`` must be a concrete format, never ``AUTO`` (resolve it with
    :func:`detect_format` first).
    """
    normalizer = _NORMALIZERS.get(fmt)
    if normalizer is None:
        raise ValueError(f"normalize() needs a concrete source format, got {fmt!r}")
    if not isinstance(record, dict) and not isinstance(record, Mapping):
        return Rejected(DropReason.NOT_AN_OBJECT, f"record is a JSON {_json_type(record)}, not an object")
    return normalizer(record)


# Length prefixes make the encoding injective: ("ab", "c") and ("a", "bc") hash different bytes.
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ROLE_PREFIX: dict[str, bytes] = {
    role: _U32.pack(len(role.encode("utf-8"))) + role.encode("utf-8") for role in (HUMAN, GPT, SYSTEM)
}


def content_id(turns: Sequence[Turn]) -> str:
    """Stable 128-bit content hash (32 hex chars) of a conversation's roles and texts.

    The hashed bytes are, for each turn in order: the role's UTF-8 byte length as a
    little-endian u32, the role's UTF-8 bytes, the value's UTF-8 byte length as a little-endian
    u64, the value's UTF-8 bytes; hashed with XXH3-128. The encoding is fully specified (no
    dependence on ``json`` or Python versions), so the same conversation gets the same id on
    every run and machine, and turn boundaries are part of the identity.
    """
    parts: list[bytes] = []
    append = parts.append
    for turn in turns:
        role = turn.role
        prefix = _ROLE_PREFIX.get(role)
        if prefix is None:
            encoded_role = role.encode("utf-8", "surrogatepass")
            prefix = _U32.pack(len(encoded_role)) + encoded_role
        # surrogatepass: never raise on a hand-built Turn; normalize() already rejects surrogates.
        data = turn.value.encode("utf-8", "surrogatepass")
        append(prefix)
        append(_U64.pack(len(data)))
        append(data)
    return xxhash.xxh3_128_hexdigest(b"".join(parts))
