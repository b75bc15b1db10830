"""Conversation columns (operators/text/turns.py) give what the per-record Python reading gives."""

from __future__ import annotations

import random

import pyarrow as pa

from operators.schema import CANONICAL_SCHEMA
from operators.text.turns import (
    first_turn,
    joined_role_turns,
    joined_turns,
    role_chars,
    turn_columns,
    turns_by_role,
)


def _conversations(seed: int) -> pa.ChunkedArray:
    rng = random.Random(seed)
    words = ["héllo", "world", "中文", "", "  x ", "🙂 ok"]
    out: list[list[dict[str, str]] | None] = []
    for _ in range(300):
        if rng.random() < 0.05:
            out.append(None)
            continue
        out.append([{"from": rng.choice(["human", "gpt", "system"]),
                     "value": " ".join(rng.choice(words) for _ in range(rng.randint(0, 5)))}
                    for _ in range(rng.randint(0, 5))])
    t = pa.Table.from_pylist([{"conversations": c} for c in out],
                             schema=pa.schema([CANONICAL_SCHEMA.field("conversations")]))
    # Two chunks, the second starting mid-way: offsets must not assume a chunk starts at zero.
    return pa.chunked_array([t.column(0).combine_chunks().slice(0, 120), t.column(0).combine_chunks().slice(120)])


def test_turn_helpers_equal_the_python_reading() -> None:
    col = _conversations(1)
    convs = [c or [] for c in col.to_pylist()]
    roles, values, offsets = turn_columns(col)
    assert first_turn(roles, values, offsets, "human").to_pylist() == \
        [next((t["value"] for t in c if t["from"] == "human"), "") for c in convs]
    assert role_chars(roles, values, offsets, "gpt").tolist() == \
        [sum(len(t["value"]) for t in c if t["from"] == "gpt") for c in convs]
    record, turn, texts = turns_by_role(col, ("human", "system"))
    assert list(zip(record.tolist(), turn.tolist(), texts.to_pylist(), strict=True)) == \
        [(r, i, t["value"]) for r, c in enumerate(convs) for i, t in enumerate(c) if t["from"] in ("human", "system")]
    assert joined_turns(values, offsets).to_pylist() == ["\n".join(t["value"] for t in c) for c in convs]
    assert joined_turns(values, offsets, 3).to_pylist() == ["\n".join(t["value"][:3] for t in c) for c in convs]
    assert joined_role_turns(col, "human").to_pylist() == \
        ["\n".join(t["value"] for t in c if t["from"] == "human") for c in convs]
    assert any(not c for c in convs) and len(set(record.tolist())) > 100  # empty and null records are exercised
