"""Ingest's pure normalization (formats) and its streaming readers.

End-to-end checks go through the step's own code, not a copy of it: reader rows of one file ->
the file's format as the step decides it (`detect_file_format`) -> `normalize_batch`, the step's
transform (`ingest_rows`). That lets every DropReason be asserted from bytes, and the ledger
(rows in == kept + quarantined, raw text kept) be fuzzed.
"""

from __future__ import annotations

import io
import json
import re
import tracemalloc
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.steps.ingest import readers
from operators.steps.ingest.formats import (
    ALL_DROP_REASONS,
    LABEL_KEYS,
    DropReason,
    Normalized,
    Rejected,
    SourceFormat,
    Turn,
    content_id,
    detect_format,
    normalize,
)
from operators.steps.ingest.readers import (
    RAW_SCHEMA,
    iter_json_array_batches,
    iter_jsonl_batches,
    sniff_container,
)
from operators.steps.ingest.step import (
    DETECT_SAMPLE,
    RAW_BATCH_SCHEMA,
    IngestConfig,
    detect_file_format,
    normalize_batch,
)

CONCRETE_FORMATS = [f for f in SourceFormat if f is not SourceFormat.AUTO]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -------------------------------------------------------------------------------------------
# helpers


Outcome = dict[str, Any] | Rejected  # a canonical record the step kept, or why it quarantined the row


def ingest_rows(rows: list[tuple[str, int, str | None]], fmt: SourceFormat = SourceFormat.AUTO) -> list[Outcome]:
    """What the ingest step decides for the reader rows of one file, per row in order.

    The file's format is chosen as `IngestStep.read` does (forced by the config, else `detect_file_format` over
    the first DETECT_SAMPLE rows); then the batch goes through the step's transform, `normalize_batch`. The
    ledger is checked here: one outcome per row, and every quarantined row keeps its raw text unchanged."""
    raws = [raw for raw, _, _ in rows]
    if fmt is SourceFormat.AUTO:
        detected = detect_file_format(raws[:DETECT_SAMPLE])
        fmt_name = detected.value if detected else ""
    else:
        fmt_name = fmt.value
    n = len(rows)
    batch = pa.record_batch([pa.array(raws, pa.string()), pa.array([line for _, line, _ in rows], pa.int64()),
                             pa.array([error for _, _, error in rows], pa.string()), pa.array(["f.jsonl"] * n),
                             pa.array([fmt_name] * n)], schema=RAW_BATCH_SCHEMA)
    res = normalize_batch(batch, IngestConfig(source_name="t", format=fmt))
    assert res.kept.num_rows + res.dropped.num_rows == n
    by_line: dict[int, Outcome] = {r["origin"]["line"]: r for r in res.kept.to_pylist()}
    raw_of = {line: raw for raw, line, _ in rows}
    for d in res.dropped.to_pylist():
        assert d["raw"] == raw_of[d["line"]] and d["file"] == "f.jsonl"  # nothing lost
        by_line[d["line"]] = Rejected(DropReason(d["reason"]), d["detail"])
    assert sorted(by_line) == sorted(raw_of)  # every row accounted for exactly once
    return [by_line[line] for _, line, _ in rows]


def reasons_of(outcomes: list[Outcome]) -> list[DropReason | None]:
    """Each row's drop reason, None for a kept row."""
    return [o.reason if isinstance(o, Rejected) else None for o in outcomes]


def rows_of(batches: Iterator[pa.RecordBatch]) -> list[tuple[str, int, str | None]]:
    out: list[tuple[str, int, str | None]] = []
    for batch in batches:
        assert batch.schema.equals(RAW_SCHEMA)
        assert batch.num_rows > 0
        out.extend(zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True))
    return out


def jsonl(data: bytes, batch_size: int = 1000, max_bytes: int = 1 << 20) -> list[tuple[str, int, str | None]]:
    return rows_of(iter_jsonl_batches(io.BytesIO(data), batch_size, max_bytes))


def jarray(data: bytes, batch_size: int = 1000, max_bytes: int = 1 << 20) -> list[tuple[str, int, str | None]]:
    return rows_of(iter_json_array_batches(io.BytesIO(data), batch_size, max_bytes))


class Trickle(io.RawIOBase):
    """A stream that returns at most `step` bytes per read, like a slow socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._data.read(self._step if n < 0 else min(n, self._step))


class LazyLine(io.RawIOBase):
    """`prefix`, then `size` filler bytes made on demand, then `suffix`: never held whole."""

    def __init__(self, prefix: bytes, size: int, suffix: bytes, filler: bytes = b"x") -> None:
        self._parts = [prefix]
        self._left = size
        self._suffix = suffix
        self._filler = filler

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = 1 << 16 if n < 0 else n
        if self._parts[0]:
            out, self._parts[0] = self._parts[0][:n], self._parts[0][n:]
            return out
        if self._left:
            take = min(n, self._left)
            self._left -= take
            return self._filler * take
        out, self._suffix = self._suffix[:n], self._suffix[n:]
        return out


def roles(result: Normalized | Rejected) -> list[str]:
    assert isinstance(result, Normalized), result
    return [t.role for t in result.turns]


# -------------------------------------------------------------------------------------------
# formats: realistic records


def test_sharegpt_aliases_system_and_exact_text() -> None:
    record = {
        "id": "sg-1",
        "conversations": [
            {"from": "system", "value": "Be terse."},
            {"from": "USER", "value": "  What is 2+2?\n"},
            {"from": "ChatGPT", "value": "4"},
            {"from": "prompter", "value": "And 3+3?"},
            {"from": "bard", "value": "6"},
        ],
    }
    assert detect_format(record) is SourceFormat.SHAREGPT
    result = normalize(record, SourceFormat.SHAREGPT)
    assert isinstance(result, Normalized)
    assert result.turns == (
        Turn("system", "Be terse."),
        Turn("human", "  What is 2+2?\n"),  # text is never stripped
        Turn("gpt", "4"),
        Turn("human", "And 3+3?"),
        Turn("gpt", "6"),
    )
    assert (result.label, result.reward, result.origin_id, result.origin_source) == (None, None, "sg-1", None)


@pytest.mark.parametrize("alias", ["gpt", "assistant", "chatgpt", "bard", "bing", "model", "bot", "Model"])
def test_sharegpt_every_assistant_alias(alias: str) -> None:
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": alias, "value": "hello"}]}
    assert roles(normalize(record, SourceFormat.SHAREGPT)) == ["human", "gpt"]


def test_openai_messages_with_content_parts() -> None:
    record = {
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Line one"}, {"type": "text", "text": "two"}],
            },
            {"role": "assistant", "content": "Sure."},
        ]
    }
    assert detect_format(record) is SourceFormat.OPENAI
    result = normalize(record, SourceFormat.OPENAI)
    assert isinstance(result, Normalized)
    assert result.turns == (
        Turn("system", "You are helpful."),
        Turn("human", "Line one\ntwo"),
        Turn("gpt", "Sure."),
    )


def test_alpaca_with_system_input_and_history() -> None:
    record = {
        "system": "You translate.",
        "history": [["Say hi in French", "Salut"], ["And in German?", "Hallo"]],
        "instruction": "Translate to Spanish",
        "input": "Good morning",
        "output": "Buenos días",
    }
    assert detect_format(record) is SourceFormat.ALPACA
    result = normalize(record, SourceFormat.ALPACA)
    assert isinstance(result, Normalized)
    assert result.turns == (
        Turn("system", "You translate."),
        Turn("human", "Say hi in French"),
        Turn("gpt", "Salut"),
        Turn("human", "And in German?"),
        Turn("gpt", "Hallo"),
        Turn("human", "Translate to Spanish\n\nGood morning"),
        Turn("gpt", "Buenos días"),
    )


def test_alpaca_empty_optional_columns_are_absent() -> None:
    record = {"instruction": "Name a color.", "input": "", "system": "", "history": [], "output": "Blue"}
    result = normalize(record, SourceFormat.ALPACA)
    assert isinstance(result, Normalized)
    assert result.turns == (Turn("human", "Name a color."), Turn("gpt", "Blue"))


def test_infinity_keeps_label_reward_id_source() -> None:
    record = {
        "id": 12345,
        "conversations": [{"from": "human", "value": "Solve x+1=2"}, {"from": "gpt", "value": "x=1"}],
        "label": {"ability_en": ["math"], "cate_ability_en": ["Mathematical ability"]},
        "langdetect": "en",
        "source": "MetaMathQA",
        "reward": 3,
    }
    assert detect_format(record) is SourceFormat.INFINITY
    assert detect_format({"conversations": [], "langdetect": "en"}) is SourceFormat.INFINITY
    result = normalize(record, SourceFormat.INFINITY)
    assert isinstance(result, Normalized)
    assert result.turns == (Turn("human", "Solve x+1=2"), Turn("gpt", "x=1"))
    assert result.label == {
        "ability_en": ["math"],
        "ability_zh": [],
        "cate_ability_en": ["Mathematical ability"],
        "cate_ability_zh": [],
    }
    assert set(LABEL_KEYS) == set(result.label)
    assert result.reward == 3.0 and isinstance(result.reward, float)
    assert (result.origin_id, result.origin_source) == ("12345", "MetaMathQA")
    null_meta = normalize({**record, "label": None, "reward": None, "id": None}, SourceFormat.INFINITY)
    assert isinstance(null_meta, Normalized)
    assert (null_meta.label, null_meta.reward, null_meta.origin_id) == (None, None, None)


def test_detect_format_unknown_and_non_objects() -> None:
    assert detect_format({"prompt": "x", "completion": "y"}) is None
    assert detect_format({"instruction": "x"}) is None  # needs output too
    assert detect_format([1, 2]) is None  # type: ignore[arg-type]


def test_normalize_refuses_auto() -> None:
    with pytest.raises(ValueError, match="concrete"):
        normalize({"conversations": []}, SourceFormat.AUTO)


# -------------------------------------------------------------------------------------------
# formats: every rejection, exactly

SG, OA, AL, INF = SourceFormat.SHAREGPT, SourceFormat.OPENAI, SourceFormat.ALPACA, SourceFormat.INFINITY
H = {"from": "human", "value": "q"}
G = {"from": "gpt", "value": "a"}
S = {"from": "system", "value": "s"}
LONE_SURROGATE = json.loads('"bad \\ud800 text"')

REJECTIONS: list[tuple[str, Any, SourceFormat, DropReason]] = [
    ("list record", [H, G], SG, DropReason.NOT_AN_OBJECT),
    ("string record", "hello", OA, DropReason.NOT_AN_OBJECT),
    ("null record", None, AL, DropReason.NOT_AN_OBJECT),
    ("no conversations", {"id": 1}, SG, DropReason.MISSING_FIELD),
    ("turn without value", {"conversations": [{"from": "human"}, G]}, SG, DropReason.MISSING_FIELD),
    ("turn without from", {"conversations": [{"value": "q"}, G]}, INF, DropReason.MISSING_FIELD),
    ("no messages", {}, OA, DropReason.MISSING_FIELD),
    ("message without content", {"messages": [{"role": "user"}]}, OA, DropReason.MISSING_FIELD),
    ("alpaca without output", {"instruction": "x"}, AL, DropReason.MISSING_FIELD),
    ("conversations not a list", {"conversations": {"0": H}}, SG, DropReason.BAD_FIELD_TYPE),
    ("turn not an object", {"conversations": ["q", "a"]}, SG, DropReason.BAD_FIELD_TYPE),
    (
        "value not a string",
        {"conversations": [{"from": "human", "value": 3}, G]},
        SG,
        DropReason.BAD_FIELD_TYPE,
    ),
    ("from not a string", {"conversations": [{"from": 0, "value": "q"}, G]}, SG, DropReason.BAD_FIELD_TYPE),
    (
        "image content part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        OA,
        DropReason.BAD_FIELD_TYPE,
    ),
    ("null content", {"messages": [{"role": "assistant", "content": None}]}, OA, DropReason.BAD_FIELD_TYPE),
    ("alpaca output null", {"instruction": "x", "output": None}, AL, DropReason.BAD_FIELD_TYPE),
    (
        "alpaca bad history",
        {"instruction": "x", "output": "y", "history": [["q"]]},
        AL,
        DropReason.BAD_FIELD_TYPE,
    ),
    ("label not an object", {"conversations": [H, G], "label": ["math"]}, INF, DropReason.BAD_FIELD_TYPE),
    (
        "label list of non-strings",
        {"conversations": [H, G], "label": {"ability_en": [1]}},
        INF,
        DropReason.BAD_FIELD_TYPE,
    ),
    (
        "reward a string",
        {"conversations": [H, G], "label": {}, "reward": "high"},
        INF,
        DropReason.BAD_FIELD_TYPE,
    ),
    (
        "reward a boolean",
        {"conversations": [H, G], "label": {}, "reward": True},
        INF,
        DropReason.BAD_FIELD_TYPE,
    ),
    (
        "reward infinite",
        {"conversations": [H, G], "label": {}, "reward": float("inf")},
        INF,
        DropReason.BAD_FIELD_TYPE,
    ),
    ("id an object", {"conversations": [H, G], "id": {"x": 1}}, SG, DropReason.BAD_FIELD_TYPE),
    (
        "unknown sharegpt role",
        {"conversations": [H, {"from": "tool", "value": "{}"}]},
        SG,
        DropReason.UNKNOWN_ROLE,
    ),
    ("openai tool role", {"messages": [{"role": "tool", "content": "42"}]}, OA, DropReason.UNKNOWN_ROLE),
    (
        "openai function role",
        {"messages": [{"role": "function", "content": "42"}]},
        OA,
        DropReason.UNKNOWN_ROLE,
    ),
    ("whitespace turn", {"conversations": [H, {"from": "gpt", "value": " \n\t"}]}, SG, DropReason.EMPTY_TURN),
    (
        "empty system turn",
        {"conversations": [{"from": "system", "value": ""}, H, G]},
        SG,
        DropReason.EMPTY_TURN,
    ),
    ("empty content parts", {"messages": [{"role": "user", "content": []}]}, OA, DropReason.EMPTY_TURN),
    ("alpaca empty output", {"instruction": "x", "output": "  "}, AL, DropReason.EMPTY_TURN),
    ("starts with gpt", {"conversations": [G, H]}, SG, DropReason.BROKEN_ROLE_ORDER),
    ("two humans", {"conversations": [H, H, G]}, SG, DropReason.BROKEN_ROLE_ORDER),
    ("ends with human", {"conversations": [H, G, H]}, INF, DropReason.BROKEN_ROLE_ORDER),
    ("system in the middle", {"conversations": [H, S, G]}, SG, DropReason.BROKEN_ROLE_ORDER),
    ("two leading systems", {"conversations": [S, S, H, G]}, SG, DropReason.BROKEN_ROLE_ORDER),
    ("empty conversation", {"conversations": []}, SG, DropReason.NO_EXCHANGE),
    ("system only", {"conversations": [S]}, SG, DropReason.NO_EXCHANGE),
    ("openai system only", {"messages": [{"role": "system", "content": "s"}]}, OA, DropReason.NO_EXCHANGE),
    (
        "escaped lone surrogate",
        {"conversations": [{"from": "human", "value": LONE_SURROGATE}, G]},
        SG,
        DropReason.INVALID_UTF8,
    ),
    (
        "surrogate in label",
        {"conversations": [H, G], "label": {"ability_en": [LONE_SURROGATE]}},
        INF,
        DropReason.INVALID_UTF8,
    ),
]


@pytest.mark.parametrize(("record", "fmt", "reason"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_rejection_reason(record: Any, fmt: SourceFormat, reason: DropReason) -> None:
    result = normalize(record, fmt)
    assert isinstance(result, Rejected), result
    assert result.reason is reason, result
    assert result.detail and len(result.detail) < 200
    result.detail.encode("utf-8")  # details go to an Arrow column: must be valid UTF-8


def test_rejection_details_name_the_problem() -> None:
    empty = normalize({"conversations": [H, G, H, {"from": "gpt", "value": ""}]}, SG)
    assert empty == Rejected(DropReason.EMPTY_TURN, "turn 3 is empty")
    missing = normalize({"id": 1}, SG)
    assert missing == Rejected(DropReason.MISSING_FIELD, "missing 'conversations'")
    role = normalize({"conversations": [H, {"from": "tool" * 100, "value": "x"}]}, SG)
    assert isinstance(role, Rejected) and "turn 1" in role.detail and "tooltool" in role.detail
    assert len(role.detail) < 100  # a hostile role name does not bloat the quarantine


# Raw text (as a reader row) -> reason, for the reasons that only arise before normalize. Each row is read
# in a ShareGPT file (a good record follows it), except the one whose file matches no known format.
GOOD_SHAREGPT = json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
RAW_REJECTIONS: list[tuple[str, str | None, DropReason]] = [
    ('{"conversations": [', None, DropReason.BAD_JSON),
    ("[" * 100_000, None, DropReason.BAD_JSON),  # too deep for json: a RecursionError, not a crash
    ('{"prompt": "x", "completion": "y"}', None, DropReason.UNKNOWN_FORMAT),
    ("42", None, DropReason.NOT_AN_OBJECT),
    ("\\xff{}", DropReason.INVALID_UTF8.value, DropReason.INVALID_UTF8),
    ("x" * 10, DropReason.OVERSIZE.value, DropReason.OVERSIZE),
]


@pytest.mark.parametrize(("raw", "error", "reason"), RAW_REJECTIONS)
def test_raw_rejection_reason(raw: str, error: str | None, reason: DropReason) -> None:
    rows = [(raw, 1, error)] + ([] if reason is DropReason.UNKNOWN_FORMAT else [(GOOD_SHAREGPT, 2, None)])
    assert reasons_of(ingest_rows(rows)) == [reason, None][: len(rows)]


def test_every_drop_reason_is_reachable_from_bytes() -> None:
    """End to end from file bytes: each DropReason comes out of the readers + the step's transform, with the
    file's format detected as the step does it (one format per file)."""
    files = {
        "sharegpt": [
            b"{not json",  # bad_json
            b"[1, 2]",  # not_an_object
            b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}',  # invalid_utf8 (latin-1 byte)
            b'{"conversations": "' + b"z" * 300 + b'"}',  # oversize_record
            b'{"conversations": [], "label": {}}',  # no_exchange
            b'{"conversations": [{"from": "human", "value": "q"}]}'.replace(b'"value"', b'"valeur"'),  # missing_field
            GOOD_SHAREGPT.encode(),  # kept
        ],
        "alpaca": [
            b'{"instruction": "x", "output": "y", "input": 5}',  # bad_field_type
            b'{"instruction": "x", "output": ""}',  # empty_turn
        ],
        "openai": [
            b'{"messages": [{"role": "tool", "content": "1"}]}',  # unknown_role
            b'{"messages": [{"role": "user", "content": "hi"}]}',  # broken_role_order
        ],
        "unknown": [b'{"text": "plain"}'],  # unknown_format
    }
    got: dict[str, list[DropReason | None]] = {}
    for name, lines in files.items():
        rows = jsonl(b"\n".join(lines), max_bytes=200)
        assert len(rows) == len(lines)
        got[name] = reasons_of(ingest_rows(rows))
    R = DropReason
    assert got == {
        "sharegpt": [R.BAD_JSON, R.NOT_AN_OBJECT, R.INVALID_UTF8, R.OVERSIZE, R.NO_EXCHANGE, R.MISSING_FIELD, None],
        "alpaca": [R.BAD_FIELD_TYPE, R.EMPTY_TURN],
        "openai": [R.UNKNOWN_ROLE, R.BROKEN_ROLE_ORDER],
        "unknown": [R.UNKNOWN_FORMAT],
    }
    assert {r for rs in got.values() for r in rs if r is not None} == set(ALL_DROP_REASONS)


def test_all_drop_reasons_values() -> None:
    assert tuple(DropReason) == ALL_DROP_REASONS
    assert DropReason.OVERSIZE == "oversize_record"
    assert len({r.value for r in ALL_DROP_REASONS}) == len(ALL_DROP_REASONS) == 11


# -------------------------------------------------------------------------------------------
# content_id


def test_content_id_is_stable_and_pinned() -> None:
    turns = [Turn("human", "Hello"), Turn("gpt", "Hi! How can I help?")]
    # Pinned: ids are stored and compared across runs, so the encoding must never drift.
    assert content_id(turns) == "b5293a8f14f259b1c8f0eaaabe271e8a"
    assert content_id(tuple(Turn(t.role, t.value) for t in turns)) == content_id(turns)


def test_content_id_respects_turn_boundaries_roles_and_order() -> None:
    ab_c = content_id([Turn("human", "ab"), Turn("gpt", "c")])
    a_bc = content_id([Turn("human", "a"), Turn("gpt", "bc")])
    assert ab_c != a_bc
    assert content_id([Turn("human", "x"), Turn("gpt", "y")]) != content_id([Turn("gpt", "x"), Turn("human", "y")])
    assert content_id([Turn("human", "x"), Turn("gpt", "y")]) != content_id([Turn("human", "y"), Turn("gpt", "x")])
    assert content_id([Turn("human", "x")]) != content_id([Turn("human", "x"), Turn("gpt", "")])
    assert re.fullmatch(r"[0-9a-f]{32}", ab_c)  # 128 bits as lowercase hex


def test_content_id_same_conversation_from_different_formats() -> None:
    sharegpt = normalize({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, SG)
    openai = normalize({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, OA)
    alpaca = normalize({"instruction": "q", "output": "a"}, AL)
    assert isinstance(sharegpt, Normalized) and isinstance(openai, Normalized) and isinstance(alpaca, Normalized)
    assert content_id(sharegpt.turns) == content_id(openai.turns) == content_id(alpaca.turns)


# -------------------------------------------------------------------------------------------
# readers: JSON Lines


def test_jsonl_rows_lines_blank_crlf_bom() -> None:
    data = b'\xef\xbb\xbf{"a": 1}\r\n\n   \r\n{"b": "\xc3\xa9"}\n\t\n{"c": 3}'
    assert jsonl(data) == [('{"a": 1}', 1, None), ('{"b": "é"}', 4, None), ('{"c": 3}', 6, None)]
    assert jsonl(b"") == []
    assert jsonl(b"\n\n  \n") == []


def test_jsonl_invalid_utf8_keeps_every_byte() -> None:
    rows = jsonl(b'{"ok": 1}\n{"v": "\xff\xfeabc"}\n')
    assert rows[1] == ('{"v": "\\xff\\xfeabc"}', 2, "invalid_utf8")
    # Through the step the row is quarantined as invalid_utf8 with that escaped text (checked by ingest_rows).
    assert reasons_of(ingest_rows(rows))[1] is DropReason.INVALID_UTF8


def test_jsonl_oversize_line_keeps_head_and_next_line_survives() -> None:
    big = b'{"v": "' + b"y" * 10_000 + b'"}'
    rows = jsonl(b'{"a": 1}\n' + big + b'\n{"b": 2}\n', max_bytes=5000)
    assert [(line, err) for _, line, err in rows] == [(1, None), (2, "oversize_record"), (3, None)]
    assert rows[1][0] == big[:4096].decode()
    assert rows[2][0] == '{"b": 2}'
    # Exactly at the limit is fine, one byte over is not; a CRLF's "\r" does not count.
    assert jsonl(b"x" * 100 + b"\r\n", max_bytes=100) == [("x" * 100, 1, None)]
    assert jsonl(b"x" * 101, max_bytes=100)[0][2] == "oversize_record"


def test_jsonl_batches_respect_batch_size() -> None:
    data = b"\n".join(b'{"i": %d}' % i for i in range(25))
    batches = list(iter_jsonl_batches(io.BytesIO(data), 10, 1 << 20))
    assert [b.num_rows for b in batches] == [10, 10, 5]
    with pytest.raises(ValueError):
        list(iter_jsonl_batches(io.BytesIO(data), 0, 1 << 20))


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_jsonl_chunk_boundaries_do_not_matter(chunk: int) -> None:
    data = b'{"a": 1}\r\n\n{"b": "\xe6\x95\xb0\xe5\xad\xa6"}\n' + b"z" * 50 + b"\r\n\xff\n{}"
    expected = jsonl(data, max_bytes=40)
    with mock.patch.object(readers, "_READ_CHUNK", chunk):
        assert jsonl(data, max_bytes=40) == expected
        assert rows_of(iter_jsonl_batches(Trickle(data, 5), 2, 40)) == expected
    assert [err for *_, err in expected] == [None, None, "oversize_record", "invalid_utf8", None]


def test_jsonl_oversize_line_is_never_held_in_memory() -> None:
    size = 24 << 20
    stream = LazyLine(b'{"a": 1}\n{"v": "', size, b'"}\n{"b": 2}\n')
    tracemalloc.start()
    try:
        rows = rows_of(iter_jsonl_batches(stream, 100, 4096))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(line, err) for _, line, err in rows] == [(1, None), (2, "oversize_record"), (3, None)]
    assert len(rows[1][0]) == 4096
    assert peak < 8 << 20, f"peak {peak} bytes for a {size}-byte line"


# -------------------------------------------------------------------------------------------
# readers: JSON array


def test_sniff_container() -> None:
    assert sniff_container(b'  \n [{"a": 1}]') == "json_array"
    assert sniff_container(b'\xef\xbb\xbf[{"a": 1}]') == "json_array"
    assert sniff_container(b'{"a": 1}\n{"a": 2}') == "jsonl"
    assert sniff_container(b"") == "jsonl"


def test_json_array_elements_reencoded_with_indices() -> None:
    elements = [
        {"conversations": [{"from": "human", "value": "数学 ✓"}]},
        12345,
        "s",
        [1, {"x": None}],
        -1.5e-3,
    ]
    data = json.dumps(elements, indent=2, ensure_ascii=True).encode()
    rows = jarray(b"\xef\xbb\xbf \n" + data + b"\n\n")
    assert rows == [(json.dumps(e, ensure_ascii=False), i, None) for i, e in enumerate(elements)]
    assert jarray(b"[]") == [] and jarray(b"") == [] and jarray(b"  [ ] ") == []
    assert jarray(b"[1,,2,]") == [("1", 0, None), ("2", 1, None)]  # separators are skipped leniently


def test_json_array_truncated_mid_element() -> None:
    rows = jarray(b'[{"a": 1}, {"b": [1, 2')
    assert rows == [('{"a": 1}', 0, None), ('{"b": [1, 2', 1, "bad_json")]


def test_json_array_truncated_between_elements() -> None:
    assert jarray(b'[{"a": 1},\n') == [('{"a": 1}', 0, None), ("", 1, "bad_json")]


def test_json_array_garbled_stops_with_remainder() -> None:
    rows = jarray(b'[{"a": 1}, {"b": 2 oops}, {"c": 3}]')
    assert rows == [('{"a": 1}', 0, None), ('{"b": 2 oops}, {"c": 3}]', 1, "bad_json")]
    assert jarray(b'{"not": "an array"}') == [('{"not": "an array"}', 0, "bad_json")]
    assert jarray(b"[1] trailing") == [("1", 0, None), ("trailing", 1, "bad_json")]
    remainder = jarray(b"[1, @" + b"x" * 200_000)[1][0]
    assert remainder.startswith("@x") and len(remainder) == 64 * 1024


def test_json_array_oversize_element_skipped_and_reading_goes_on() -> None:
    big = {"v": "y" * 10_000, "nested": ["]", '\\"', {"}": "["}]}
    data = json.dumps([{"a": 1}, big, {"b": 2}]).encode()
    for chunk in (1 << 20, 7, 1000):
        with mock.patch.object(readers, "_READ_CHUNK", chunk):
            rows = jarray(data, max_bytes=2000)
        assert [(line, err) for _, line, err in rows] == [(0, None), (1, "oversize_record"), (2, None)], chunk
        assert rows[1][0] == json.dumps(big)[:4096]
        assert rows[2][0] == '{"b": 2}'
    # Multibyte text: 1000 characters but 3000 bytes is over a 2000-byte limit.
    assert jarray(json.dumps(["数" * 1000], ensure_ascii=False).encode(), max_bytes=2000)[0][2] == "oversize_record"


def test_json_array_oversize_element_is_never_held_in_memory() -> None:
    size = 24 << 20
    stream = LazyLine(b'[{"a": 1}, {"v": "', size, b'"}, {"b": 2}]')
    tracemalloc.start()
    try:
        rows = rows_of(iter_json_array_batches(stream, 100, 4096))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(line, err) for _, line, err in rows] == [(0, None), (1, "oversize_record"), (2, None)]
    assert peak < 16 << 20, f"peak {peak} bytes for a {size}-byte element"


def test_json_array_invalid_utf8_element_then_next_is_fine() -> None:
    rows = jarray(b'[{"v": "caf\xe9"}, {"w": "ok"}]')
    assert rows == [('{"v": "caf\\xe9"}', 0, "invalid_utf8"), ('{"w": "ok"}', 1, None)]


def test_json_array_escaped_lone_surrogate_stays_escaped() -> None:
    rows = jarray(b'[{"conversations": [{"from": "human", "value": "\\ud800"}, {"from": "gpt", "value": "a"}]}]')
    raw, _, error = rows[0]
    assert error is None and "\\ud800" in raw
    assert reasons_of(ingest_rows(rows)) == [DropReason.INVALID_UTF8]


def test_json_array_too_deep_element_is_bad_json_and_reading_goes_on() -> None:
    deep = b"[" * 50_000 + b"]" * 50_000
    rows = jarray(b"[" + deep + b', {"ok": 1}]')
    assert [(line, err) for _, line, err in rows] == [(0, "bad_json"), (1, None)]
    assert rows[1][0] == '{"ok": 1}'


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16])
def test_json_array_chunk_boundaries_do_not_matter(chunk: int) -> None:
    elements = [123456789, -0.125, "é数", True, None, {"k": [1e10, 'x\\y"z']}, 1e-7, "\u2028"]
    data = json.dumps(elements, ensure_ascii=False).encode()
    with mock.patch.object(readers, "_READ_CHUNK", chunk):
        rows = rows_of(iter_json_array_batches(Trickle(data, 3), 3, 1 << 20))
    assert rows == [(json.dumps(e, ensure_ascii=False), i, None) for i, e in enumerate(elements)]


# -------------------------------------------------------------------------------------------
# property-based fuzzing

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
role_names = st.sampled_from(["human", "gpt", "system", "user", "assistant", "GPT", "tool", "", "bing"]) | st.text(
    max_size=8
)
turn_values = st.sampled_from(["hi", " ", "", "\n", "x y", LONE_SURROGATE]) | st.text(max_size=10) | json_scalars
sharegpt_turns = st.lists(st.fixed_dictionaries({"from": role_names, "value": turn_values}) | json_values, max_size=6)
shaped_records = st.one_of(
    st.fixed_dictionaries(
        {"conversations": sharegpt_turns},
        optional={
            "label": st.none()
            | st.dictionaries(st.sampled_from(LABEL_KEYS), st.lists(st.text(max_size=5)) | json_values),
            "reward": json_scalars,
            "id": json_scalars,
            "source": json_scalars,
            "langdetect": st.just("en"),
        },
    ),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": role_names,
                        "content": turn_values
                        | st.lists(
                            st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": turn_values}),
                            max_size=3,
                        ),
                    }
                ),
                max_size=6,
            )
        }
    ),
    st.fixed_dictionaries(
        {"instruction": turn_values, "output": turn_values},
        optional={
            "input": turn_values,
            "system": turn_values,
            "history": st.lists(st.lists(turn_values, min_size=1, max_size=3), max_size=3) | json_values,
        },
    ),
)


def check_result(result: Normalized | Outcome) -> None:
    """Whatever comes out must be a rejection, a normalized record or a kept canonical record, internally
    consistent, and Arrow-safe."""
    if isinstance(result, Rejected):
        assert result.reason in ALL_DROP_REASONS
        result.detail.encode("utf-8")
        return
    if isinstance(result, dict):  # kept by the step: its id is the content hash of exactly these turns
        turns = [Turn(t["from"], t["value"]) for t in result["conversations"]]
        assert result["id"] == content_id(turns) and result["source"] == "t"
        result = Normalized(tuple(turns), None, None, None, None)
    assert isinstance(result, Normalized)
    seq = [t.role for t in result.turns]
    body = seq[1:] if seq and seq[0] == "system" else seq
    assert body and body == ["human", "gpt"] * (len(body) // 2)
    for turn in result.turns:
        assert turn.value.strip()
        turn.value.encode("utf-8")
    assert len(content_id(result.turns)) == 32


@FUZZ
@given(record=json_values | shaped_records, fmt=st.sampled_from(CONCRETE_FORMATS))
def test_fuzz_normalize_never_raises(record: Any, fmt: SourceFormat) -> None:
    check_result(normalize(record, fmt))
    detected = detect_format(record) if isinstance(record, dict) else None
    if detected is not None:
        check_result(normalize(record, detected))


@FUZZ
@given(lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20))
def test_fuzz_jsonl_bytes_ledger(lines: list[bytes]) -> None:
    data = b"\n".join(lines)
    non_blank = [
        i + 1 for i, line in enumerate(lines) if line.removesuffix(b"\r") and not line.removesuffix(b"\r").isspace()
    ]
    rows = rows_of(iter_jsonl_batches(io.BytesIO(data), 3, 30))
    assert [line for _, line, _ in rows] == non_blank  # exactly one row per non-blank line
    results = ingest_rows(rows)  # checks one outcome per row and the raw text of every quarantined one
    assert len(results) == len(non_blank)
    for result in results:
        check_result(result)


@FUZZ
@given(records=st.lists(json_values | shaped_records, max_size=8), crlf=st.booleans())
def test_fuzz_jsonl_records_ledger(records: list[Any], crlf: bool) -> None:
    newline = b"\r\n" if crlf else b"\n"
    data = newline.join(json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass") for r in records)
    rows = rows_of(iter_jsonl_batches(io.BytesIO(data), 4, 1 << 16))
    assert len(rows) == len(records)
    for result in ingest_rows(rows):
        check_result(result)


@FUZZ
@given(
    elements=st.lists(json_values, max_size=8),
    indent=st.none() | st.integers(0, 3),
    chunk=st.integers(1, 64),
)
def test_fuzz_json_array_roundtrip(elements: list[Any], indent: int | None, chunk: int) -> None:
    data = json.dumps(elements, indent=indent, ensure_ascii=False).encode()
    with mock.patch.object(readers, "_READ_CHUNK", chunk):
        rows = rows_of(iter_json_array_batches(io.BytesIO(data), 3, 1 << 20))
    assert [(line, err) for _, line, err in rows] == [(i, None) for i in range(len(elements))]
    for (raw, _, _), element in zip(rows, elements, strict=True):
        assert raw == json.dumps(element, ensure_ascii=False)


@FUZZ
@given(data=st.binary(max_size=200) | st.binary(max_size=100).map(lambda b: b"[" + b), chunk=st.integers(1, 16))
def test_fuzz_json_array_bytes_never_raise(data: bytes, chunk: int) -> None:
    with mock.patch.object(readers, "_READ_CHUNK", chunk):
        rows = rows_of(iter_json_array_batches(io.BytesIO(data), 3, 64))
    assert [line for _, line, _ in rows] == list(range(len(rows)))
    for raw, _, error in rows:
        if error is None:
            json.loads(raw)  # a readable row is valid JSON
    for result in ingest_rows(rows):
        check_result(result)
