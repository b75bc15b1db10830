"""`pii` step: find personal data and secrets in every turn, and redact, drop or flag them per type.

Record-local. A redacted record is kept, with typed placeholders (`<EMAIL>`, `<EMAIL_2>` for a second address,
the same placeholder for the same value in every turn), so redaction changes no record count: the step counts
what it changed. A `drop` type sends the record to `dropped/` with reason `pii`. A `flag` type keeps the text
and counts it. Every record gets a `pii` column listing what was found, masked (`operators.text.pii.mask`),
so a reader can find the records that were touched without seeing a value. The detectors themselves are in
`operators.text.pii`.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar, Literal, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from operators.core.arrays import replace_column
from operators.core.step import BatchResult, Step, StepConfig, dropped_table
from operators.text.pii import (
    PII_TYPES,
    Finding,
    absent_gates,
    ascii_texts,
    candidate_texts,
    find_pii,
    mask,
    redact,
    secret_gates,
)

Action = Literal["redact", "drop", "flag", "off"]
PII_COLUMN = "pii"
PII_ENTRY = pa.struct([("type", pa.string()), ("subtype", pa.string()), ("action", pa.string()),
                       ("turn", pa.int32()), ("masked", pa.string())])
# Past tense of each action, as counters name it: `redacted.email`, `dropped.secret`, `flagged.phone`.
_DONE = {"redact": "redacted", "drop": "dropped", "flag": "flagged"}


class PiiConfig(StepConfig):
    """What to do with each type of personal data: `redact` (typed placeholder), `drop` (the record, reason
    `pii`), `flag` (keep the text, count it) or `off` (do not look)."""

    actions: dict[str, Action] = Field(
        default_factory=lambda: dict.fromkeys(PII_TYPES, cast(Action, "redact")),
        description=f"Per type ({', '.join(PII_TYPES)}): redact, drop, flag or off. A type not named is redacted.")
    roles: list[str] = Field(default_factory=list,
                             description="Turn roles to scan (human, gpt, system); empty scans every turn.")

    @field_validator("actions")
    @classmethod
    def _known_types(cls, v: dict[str, Action]) -> dict[str, Action]:
        unknown = sorted(set(v) - set(PII_TYPES))
        if unknown:
            raise ValueError(f"actions: unknown PII types {unknown}; known: {list(PII_TYPES)}")
        return v

    def action_of(self) -> dict[str, Action]:
        """Every type's action, the unnamed ones redacted."""
        return {t: self.actions.get(t, "redact") for t in PII_TYPES}


class PiiStep(Step[PiiConfig]):
    """Redact, drop or flag personal data and secrets in every turn of every record."""

    name: ClassVar[str] = "pii"
    config_model: ClassVar[type[StepConfig]] = PiiConfig

    def __init__(self, config: PiiConfig) -> None:
        super().__init__(config)
        self._actions = config.action_of()
        self._roles = frozenset(config.roles)

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        return scan_batch(pa.Table.from_batches([batch]), self._actions, self._roles)


def scan_batch(table: pa.Table, actions: dict[str, Action], roles: frozenset[str] = frozenset()) -> BatchResult:
    """Pure transform: find, then redact, drop or flag per `actions`; only turns of `roles` (empty: all)."""
    types = [t for t, a in actions.items() if a != "off"]
    convs = table.column("conversations").combine_chunks()
    turns = convs.flatten()
    texts = turns.field("value")
    # One RE2 pass over the batch's texts tells which may hold anything at all (most hold none of the shapes);
    # on those, finer passes tell which may hold a token or a secret's name, which hold no digit or fail a gate.
    # The per-text patterns then run where they may find something.
    candidates = candidate_texts(texts, types)
    if roles:
        candidates &= np.asarray(pc.is_in(turns.field("from"), pa.array(sorted(roles), pa.string()))
                                 .fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    scanned = np.flatnonzero(candidates)
    sub = texts.take(pa.array(scanned))
    ascii_ = ascii_texts(sub)
    secret = secret_gates(sub, ascii_) if "secret" in types else None
    absent = absent_gates(sub, ascii_)
    offsets = convs.offsets.to_numpy()
    offsets = offsets - offsets[0]
    n = len(table)
    entries: list[list[dict[str, object]]] = [[] for _ in range(n)]
    drop = np.zeros(n, dtype=bool)
    counters: Counter[str] = Counter()
    redacted: dict[int, str] = {}
    parents = np.repeat(np.arange(n), np.diff(offsets))
    names: dict[tuple[str, str], str] = {}
    last_row = -1
    for j, (i, text) in enumerate(zip(scanned.tolist(), sub.to_pylist(), strict=True)):
        if not text:
            continue
        known = [p for p, a in absent.items() if a[j]]
        found = find_pii(text, types, absent=known) if secret is None else \
            find_pii(text, types, token_hint=bool(secret[0][j]), secret_name=bool(secret[1][j]), absent=known)
        if not found:
            continue
        row = int(parents[i])
        if row != last_row:  # placeholders are numbered per record, across its turns
            names, last_row = {}, row
        turn = i - int(offsets[row])
        for f in found:
            act = actions[f.type]
            counters[f"found.{f.type}"] += 1
            counters[f"{_DONE[act]}.{f.type}"] += 1
            entries[row].append({"type": f.type, "subtype": f.subtype, "action": act, "turn": turn,
                                 "masked": mask(f)})
            drop[row] |= act == "drop"
        to_redact: list[Finding] = [f for f in found if actions[f.type] == "redact"]
        if to_redact:
            redacted[i] = redact(text, to_redact, names)
    for row, found_in_row in enumerate(entries):
        if not found_in_row or drop[row]:
            continue
        acts = {e["action"] for e in found_in_row}
        if "redact" in acts:
            counters["records_redacted"] += 1
        if "flag" in acts:
            counters["records_flagged"] += 1
    if redacted:
        values = texts.to_pylist()
        for i, text in redacted.items():
            values[i] = text
        table = replace_column(table, "conversations", _with_values(convs, turns, offsets, values))
    found_col = pa.array(entries, pa.list_(PII_ENTRY))
    if PII_COLUMN in table.column_names:  # a second pass (the synthesized set) adds to what the first found
        found_col = _concat_lists(table.column(PII_COLUMN).combine_chunks(), found_col)
    table = replace_column(table, PII_COLUMN, found_col)
    mask_keep = pa.array(~drop)
    dropped = table.filter(pc.invert(mask_keep))
    details = [_drop_detail(entries[r]) for r in np.flatnonzero(drop)]
    return BatchResult(kept=table.filter(mask_keep), dropped=dropped_table(dropped, ["pii"] * len(details), details),
                       counters=dict(counters))


def _drop_detail(entries: list[dict[str, object]]) -> str:
    """Which types made the record drop, with counts (never a value)."""
    c = Counter(str(e["type"]) + (f"/{e['subtype']}" if e["subtype"] else "") for e in entries
                if e["action"] == "drop")
    return "contains " + ", ".join(f"{k} ({v})" for k, v in sorted(c.items()))


def _with_values(convs: pa.ListArray, turns: pa.StructArray, offsets: np.ndarray, values: list[str | None]
                 ) -> pa.ListArray:
    """`convs` with each turn's value replaced, every other field of a turn as it was."""
    fields = [pa.array(values, pa.string()) if turns.type.field(k).name == "value" else turns.field(k)
              for k in range(turns.type.num_fields)]
    struct = pa.StructArray.from_arrays(fields, fields=list(turns.type))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), struct)


def _concat_lists(a: pa.ListArray, b: pa.ListArray) -> pa.Array:
    """Row-wise concatenation of two list columns of equal length."""
    rows = [(x or []) + (y or []) for x, y in zip(a.to_pylist(), b.to_pylist(), strict=True)]
    return pa.array(rows, pa.list_(PII_ENTRY))
