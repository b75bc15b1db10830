"""Seeded generators of hostile input records and files (volume for tests/reliability/test_hostile_files.py).

Each generator returns the file's expected record count with it, so a test can check that no record is lost:
every line (JSONL), element (JSON array) or row (Parquet) must come out of ingest as kept or quarantined.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DEPTH = 10_000  # nesting depth of the deepest records


def _valid(rng: random.Random, i: int) -> dict[str, object]:
    kind = rng.randrange(3)
    q, a = f"question {i} {rng.random()}", f"answer {i} {rng.random()}"
    if kind == 0:
        return {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if kind == 1:
        return {"instruction": q, "input": "", "output": a}
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def hostile_line(rng: random.Random, i: int) -> bytes:
    """One JSONL line (no newline, never blank) of a randomly chosen hostile kind, or now and then a valid one."""
    rec = _valid(rng, i)
    good = _dumps(rec)
    kind = rng.randrange(16)
    if kind == 0:  # broken JSON: cut anywhere, or garbage after it
        return good[: rng.randrange(1, len(good))] if rng.random() < 0.5 else good + b" }{"
    if kind == 1:  # wrong types
        return rng.choice([b'{"conversations": 5}', b'{"conversations": [{"from": 1, "value": ["x"]}]}',
                           b'{"instruction": null, "output": {}}', b'{"messages": "hi"}',
                           b'{"conversations": [null, true, 3.5]}', b'{"messages": [{"role": [], "content": 1}]}'])
    if kind == 2:  # nesting 10,000 levels deep, inside a record and bare
        deep = b"[" * DEPTH + b"]" * DEPTH
        return b'{"conversations": ' + deep + b"}" if rng.random() < 0.5 else b'{"a":' * DEPTH + b"1" + b"}" * DEPTH
    if kind == 3:  # NUL and control characters, raw and escaped
        ctrl = bytes(rng.choice([0, 1, 7, 8, 27, 31, 127]) for _ in range(5))
        return good.replace(b"question", b"q" + ctrl, 1) if rng.random() < 0.5 else good.replace(b"question",
                                                                                                b"\\u0000", 1)
    if kind == 4:  # invalid UTF-8: stray continuation, overlong, surrogate, truncated sequence
        bad = rng.choice([b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"])
        return good.replace(b"answer", b"ans" + bad, 1)
    if kind == 5:  # BOMs in the middle of a file: UTF-8 and UTF-16
        return rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]) + good
    if kind == 6:  # not an object
        return rng.choice([b"[1, 2]", b'"text"', b"42", b"null", b"true", b"-", b"NaN", b"[]"])
    if kind == 7:  # numbers past every limit
        return rng.choice([b'{"reward": 1e999999, "instruction": "a", "output": "b"}',
                           b'{"reward": ' + b"9" * 5000 + b', "instruction": "a", "output": "b"}'])
    if kind == 8:  # lone surrogate escapes, odd escapes
        return good.replace(b"question", rng.choice([b"\\ud800", b"\\udfff\\ud800", b"\\x41", b"\\u12"]), 1)
    if kind == 9:  # empty or missing turns and fields
        return rng.choice([b'{"conversations": []}', b'{"conversations": [{"from": "human", "value": ""}]}',
                           b'{"instruction": "", "output": ""}', b"{}", b'{"messages": [{"role": "user"}]}'])
    if kind == 10:  # unknown roles, broken role order
        return rng.choice([b'{"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}',
                           b'{"conversations": [{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}]}'])
    if kind == 11:  # CR inside, tabs, a record ending in a lone backslash
        return good[:-1] + b'\r, "x": "\t\\"}' if rng.random() < 0.5 else good[:-2] + b"\\"
    if kind == 12:  # split-conversation ids that collide (exercise the rejoin on hostile parts)
        return _dumps({"id": f"s_{rng.randrange(3)}", "conversations": [
            {"from": rng.choice(["human", "gpt"]), "value": "x" * rng.randrange(0, 3)},
            {"from": "gpt", "value": "y"}]})
    return good  # kinds 13-15: valid records of mixed formats in one file


def write_jsonl(path: Path, n: int, seed: int) -> int:
    """`n` hostile lines; returns `n` (every line is a record)."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        for i in range(n):
            f.write(hostile_line(rng, i) + (b"\r\n" if i % 7 == 0 else b"\n"))
    return n


def hostile_element(rng: random.Random, i: int) -> bytes:
    """One JSON-array element: syntactically valid (a syntax error ends an array, see the reader) but hostile."""
    rec = _valid(rng, i)
    kind = rng.randrange(8)
    if kind == 0:
        return b"[" * DEPTH + b"]" * DEPTH
    if kind == 1:
        return rng.choice([b'{"conversations": 5}', b'{"messages": "hi"}', b"null", b"42", b'"s"'])
    if kind == 2:
        return _dumps(rec).replace(b"question", b"q\x00\x01\x1f", 1)
    if kind == 3:
        return _dumps(rec).replace(b"answer", b"a\xff\xc0\xaf", 1)
    if kind == 4:
        return _dumps(rec).replace(b"question", b"\\ud800", 1)
    if kind == 5:
        return b'{"reward": ' + b"9" * 5000 + b', "instruction": "a", "output": "b"}'
    return _dumps(rec)


def write_json_array(path: Path, n: int, seed: int) -> int:
    """A JSON array of `n` hostile elements; returns `n`."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.write(b"\xef\xbb\xbf[\n")
        for i in range(n):
            f.write((b",\n" if i else b"") + hostile_element(rng, i))
        f.write(b"\n]\n")
    return n


def write_parquet(path: Path, n: int, seed: int) -> int:
    """A Parquet file of `n` rows whose columns look like a record format but hold hostile values; returns `n`."""
    rng = random.Random(seed)
    texts = ["", "\x00", "a\x01b\x1f", "\ufeffbom", "x" * 5000, "[" * 1000, "\u202eRTL", "ok question", None]
    roles = ["user", "assistant", "robot", "", None, "system"]
    msgs = [[{"role": rng.choice(roles), "content": rng.choice(texts)} for _ in range(rng.randrange(0, 4))]
            if rng.random() > 0.1 else None for _ in range(n)]
    table = pa.table({
        "id": [rng.choice([str(i), f"p_{i % 5}", None]) for i in range(n)],
        "messages": pa.array(msgs, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        "reward": [rng.choice([None, 1.0, float("nan"), float("inf"), -1e308]) for _ in range(n)],
    })
    pq.write_table(table, path, row_group_size=max(1, n // 3))
    return n
