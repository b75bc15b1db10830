"""The canonical record: the published Infinity-Instruct schema, plus our own columns beside it."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

LABEL_FIELDS = ("ability_en", "ability_zh", "cate_ability_en", "cate_ability_zh")

TURN_TYPE = pa.struct([("from", pa.string()), ("value", pa.string())])
LABEL_TYPE = pa.struct([(name, pa.list_(pa.string())) for name in LABEL_FIELDS])
# Lineage: where a record came from, so any output row can be traced to a raw file and line.
ORIGIN_TYPE = pa.struct([
    ("file", pa.string()),
    ("line", pa.int64()),
    ("id", pa.string()),
    ("source", pa.string()),
    ("format", pa.string()),
])

CANONICAL_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("conversations", pa.list_(TURN_TYPE), nullable=False),
    pa.field("label", LABEL_TYPE),
    pa.field("langdetect", pa.string()),
    pa.field("source", pa.string()),
    pa.field("reward", pa.float64()),
    pa.field("origin", ORIGIN_TYPE),
])


def first_exchange(conversation: list[dict[str, Any]] | None) -> tuple[str, str]:
    """(first human turn, the answer that follows it) of a canonical conversation; empty strings when absent."""
    turns = conversation or []
    for i, t in enumerate(turns):
        if t.get("from") == "human":
            nxt = turns[i + 1] if i + 1 < len(turns) else None
            return t.get("value") or "", (nxt.get("value") or "") if nxt and nxt.get("from") == "gpt" else ""
    return "", ""
