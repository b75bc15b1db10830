"""Split conversations: rejoin the parts of a long conversation, or trim a part's leading answer.

ShareGPT V3 ("unfiltered_cleaned_split") cut long conversations into parts with ids `<base>_<n>`, where
`n` is the index of the part's first turn in the original conversation. When the cut falls after an
assistant turn, the next part starts with that same turn again; when it falls before a human turn, the
next part starts with it. Either way every part after the first starts at or before the end of the
previous one, and 6,293 of the 17,672 records of the real file start with the assistant: valid
conversations that a role-order check alone would quarantine.

- rejoin (the default): parts of one base that arrive in one file are ordered by `n` and joined while
  each continues the previous one: its `n` is where the previous part ends (no turn missing), or one
  turn earlier when its first turn repeats the previous part's last turn (then dropped), and roles
  alternate at the seam. That is exactly how all 8,211 seams of the real file look, and it keeps ids
  that merely count records (`identity_0`, `identity_1`, ... of independent conversations) apart. The
  joined conversation replaces its first part, its `origin.id` lists the parts, the other parts leave
  the step as `merged` (reason column, raw record kept). What still starts with the assistant is then
  trimmed as below.
- trim: a record whose first non-system turn is the assistant's loses that turn, if the rest is a
  valid conversation (for a ShareGPT part that turn is the repeated end of the previous part).
- quarantine: neither; such records are `broken_role_order`, as before.

A record whose role order is broken anywhere else stays quarantined in every mode. Pure functions only.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from operators.steps.ingest.formats import (
    _OPENAI_ROLES,
    _SHAREGPT_ROLES,
    GPT,
    HUMAN,
    SYSTEM,
    SourceFormat,
    Turn,
    _sharegpt_turns,
)

MERGED = "merged"  # the reason a part leaves the step when it was joined into its conversation: not a loss
COUNTERS = ("split.rejoined_conversations", "split.rejoined_parts", "split.repeated_turns_removed",
            "split.trimmed")
_SPLIT_ID = re.compile(r"^(.+)_(\d{1,9})$")
_TURNS_FIELD = {SourceFormat.SHAREGPT: ("conversations", "from", _SHAREGPT_ROLES),
                SourceFormat.INFINITY: ("conversations", "from", _SHAREGPT_ROLES),
                SourceFormat.OPENAI: ("messages", "role", _OPENAI_ROLES)}


class SplitMode(StrEnum):
    """What ingest does with the parts of split conversations (see the module docstring)."""

    REJOIN = "rejoin"
    TRIM = "trim"
    QUARANTINE = "quarantine"


def split_key(origin_id: object) -> tuple[str, int] | None:
    """(base, n) of an id shaped `<base>_<n>`, else None."""
    if not isinstance(origin_id, str) or (m := _SPLIT_ID.match(origin_id)) is None:
        return None
    return m.group(1), int(m.group(2))


def raw_split_base(raw: str | None) -> str | None:
    """The split base of a raw JSON record's `id`, or None (used to keep a file's parts in one batch)."""
    if raw is None:
        return None
    try:
        rec = json.loads(raw, strict=False)
    except (ValueError, RecursionError):
        return None
    key = split_key(rec.get("id")) if isinstance(rec, dict) else None
    return key[0] if key else None


@dataclass(frozen=True)
class Part:
    """One split part of a ShareGPT record: its row in the batch, id, base, start index and turns."""

    row: int
    origin_id: str
    base: str
    n: int
    turns: tuple[Turn, ...]


def as_part(row: int, rec: Any, fmt: str) -> Part | None:
    """`rec` as a part that can be joined: a ShareGPT record with a split id and readable turns."""
    if fmt != SourceFormat.SHAREGPT or not isinstance(rec, dict):
        return None
    key = split_key(rec.get("id"))
    if key is None:
        return None
    turns = _sharegpt_turns(rec)
    if not isinstance(turns, list) or not turns:
        return None
    return Part(row, rec["id"], key[0], key[1], tuple(turns))


def _repeated(a: Part, b: Part) -> int | None:
    """Leading turns of `b` to drop when it continues `a` (0 or 1), or None when it does not continue it."""
    skip = a.n + len(a.turns) - b.n  # turns of `b` that `a` already holds
    if skip not in (0, 1) or (skip and b.turns[0] != a.turns[-1]):
        return None  # a gap, an overlap that is no repeat, or ids that merely count records
    if skip == len(b.turns):  # a part that only repeats the previous part's last turn: nothing to add
        return skip
    last, first = a.turns[-1].role, b.turns[skip].role
    if SYSTEM in (last, first) or last == first:
        return None
    return skip


def chains(parts: list[Part]) -> list[tuple[list[Part], int]]:
    """Parts of one base grouped into runs that continue each other, in order of `n` (then row); with the
    number of repeated turns each run drops. A run of one part is a part that cannot be joined."""
    out: list[tuple[list[Part], int]] = []
    for p in sorted(parts, key=lambda p: (p.n, p.row)):
        skip = _repeated(out[-1][0][-1], p) if out else None
        if skip is None:
            out.append(([p], 0))
        else:
            out[-1][0].append(p)
            out[-1] = (out[-1][0], out[-1][1] + skip)
    return out


def joined_record(run: list[Part]) -> dict[str, Any]:
    """A run of parts as one raw ShareGPT record whose `id` lists the parts."""
    turns = list(run[0].turns)
    for a, b in itertools.pairwise(run):
        turns.extend(b.turns[_repeated(a, b) or 0:])
    return {"id": ",".join(p.origin_id for p in run),
            "conversations": [{"from": t.role, "value": t.value} for t in turns]}


def without_leading_answer(rec: Any, fmt: str) -> dict[str, Any] | None:
    """`rec` without its first non-system turn when that turn is the assistant's, else None."""
    spec = _TURNS_FIELD.get(SourceFormat(fmt)) if fmt in set(SourceFormat) else None
    if spec is None or not isinstance(rec, Mapping):
        return None
    field, role_key, roles = spec
    turns = rec.get(field)
    if not isinstance(turns, list):
        return None

    def role(turn: object) -> str | None:
        name = turn.get(role_key) if isinstance(turn, dict) else None
        return roles.get(name) or roles.get(name.lower()) if isinstance(name, str) else None

    for k, t in enumerate(turns):
        if role(t) == SYSTEM:
            continue
        if role(t) != GPT or not any(role(u) == HUMAN for u in turns[k + 1:]):
            return None
        return {**rec, field: turns[:k] + turns[k + 1:]}
    return None
