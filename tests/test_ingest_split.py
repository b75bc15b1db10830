"""Split conversations in ingestion: parts `<base>_<n>` rejoined in order (in order, out of order, across
batches), not across files or shards (there the later part is trimmed), trimmed or quarantined by mode,
role order valid in every kept record, a part broken in the middle stays quarantined, and the ledger
in = kept + quarantined + merged holds with every repair counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from operators.cli import build_step
from operators.core import storage
from operators.core.manifest import Manifest
from operators.core.runner import read_step_table, run_all
from operators.steps.ingest.formats import Turn
from operators.steps.ingest.splits import Part, chains, joined_record, split_key, without_leading_answer


def conv(*turns: str) -> list[dict[str, str]]:
    """Turns written 'h:text' / 'g:text' / 's:text'."""
    role = {"h": "human", "g": "gpt", "s": "system"}
    return [{"from": role[t[0]], "value": t[2:]} for t in turns]


# ShareGPT's numbering: the suffix is the index of the part's first turn in the whole conversation, and a
# cut after an answer repeats that answer at the start of the next part (as in ShareGPT V3 itself).
A = [("A_0", conv("h:a1", "g:a2", "h:a3", "g:a4")), ("A_3", conv("g:a4", "h:a5", "g:a6")),
     ("A_5", conv("g:a6", "h:a7", "g:a8"))]
A_WHOLE = conv("h:a1", "g:a2", "h:a3", "g:a4", "h:a5", "g:a6", "h:a7", "g:a8")
B = [("B_0", conv("h:b1", "g:b2")), ("B_2", conv("h:b3", "g:b4"))]  # a cut before a question: no repeat


def write(path: Path, records: list[tuple[str, list[dict[str, str]]]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "conversations": c}) + "\n" for i, c in records))
    return path


def ingest(tmp_path: Path, inputs: list[Path], name: str = "out", **cfg: Any) -> tuple[Manifest, list[dict[str, Any]],
                                                                                     list[dict[str, Any]]]:
    out = storage.validate_uri(str(tmp_path / name))
    m = run_all(build_step("ingest", {"source_name": "s", **cfg}), [str(p) for p in inputs], out)
    st = m.stats
    assert st.records_in == st.records_kept + sum(st.dropped_by_reason.values())  # the ledger, merged included
    kept = read_step_table(out).to_pylist()
    dropped = read_step_table(out, "dropped").to_pylist() if st.records_dropped else []
    for r in kept:  # role order valid in every kept record
        roles = [t["from"] for t in r["conversations"] if t["from"] != "system"]
        assert roles == ["human", "gpt"] * (len(roles) // 2) and roles, r
    return m, kept, dropped


def by_origin(kept: list[dict[str, Any]]) -> dict[str, list[dict[str, str]]]:
    return {r["origin"]["id"]: r["conversations"] for r in kept}


def test_parts_in_order_and_out_of_order_are_rejoined(tmp_path: Path) -> None:
    # Ids that only count records (identity_0, identity_1) are kept apart: the first part's turns do not
    # end where the next id says it starts.
    other = [("identity_0", conv("h:unrelated question", "g:unrelated answer")),
             ("identity_1", conv("h:another question", "g:another answer"))]
    # A in order; B reversed and with a record in between.
    f = write(tmp_path / "in.jsonl", [*A, B[1], *other, B[0]])
    m, kept, dropped = ingest(tmp_path, [f])
    got = by_origin(kept)
    assert got["A_0,A_3,A_5"] == A_WHOLE
    assert got["B_0,B_2"] == conv("h:b1", "g:b2", "h:b3", "g:b4")
    assert got["identity_0"] == other[0][1] and got["identity_1"] == other[1][1]
    assert m.stats.records_in == 7 and m.stats.records_kept == 4
    assert m.stats.dropped_by_reason == {"merged": 3}
    assert m.stats.counters["split.rejoined_conversations"] == 2
    assert m.stats.counters["split.rejoined_parts"] == 3 == m.stats.dropped_by_reason["merged"]
    assert m.stats.counters["split.repeated_turns_removed"] == 2
    # The merged parts keep their raw text and name the record they went into.
    ids = {r["origin"]["id"]: r["id"] for r in kept}
    merged = {json.loads(d["raw"])["id"]: d["detail"] for d in dropped}
    assert set(merged) == {"A_3", "A_5", "B_2"} and all(d["reason"] == "merged" for d in dropped)
    assert ids["A_0,A_3,A_5"] in merged["A_5"] and ids["B_0,B_2"] in merged["B_2"]


def test_parts_across_batches_are_rejoined_but_not_across_files_or_shards(tmp_path: Path) -> None:
    f = write(tmp_path / "in.jsonl", [("Z_0", conv("h:q", "g:a")), *A])
    _, kept, _ = ingest(tmp_path, [f], "batches", batch_rows=2)  # A's parts arrive in two raw batches
    assert by_origin(kept)["A_0,A_3,A_5"] == A_WHOLE
    # Parts in two files (here also two shards) are never joined: the later part loses its repeated first
    # turn (trimmed) and stays a conversation of its own.
    f1, f2 = write(tmp_path / "p1.jsonl", A[:2]), write(tmp_path / "p2.jsonl", A[2:])
    m, kept, _ = ingest(tmp_path, [f1, f2], "files", target_shard_bytes=1)
    assert m.stats.shards == 2
    got = by_origin(kept)
    assert got == {"A_0,A_3": A_WHOLE[:6], "A_5": conv("h:a7", "g:a8")}
    assert m.stats.counters["split.trimmed"] == 1 and m.stats.counters["split.rejoined_parts"] == 1


def test_modes_trim_and_quarantine(tmp_path: Path) -> None:
    f = write(tmp_path / "in.jsonl", A + B)
    m, kept, _ = ingest(tmp_path, [f], "trim", split_conversations="trim")
    assert m.stats.records_kept == 5 and "merged" not in m.stats.dropped_by_reason
    assert by_origin(kept)["A_3"] == conv("h:a5", "g:a6") and m.stats.counters == {"split.trimmed": 2}
    m, _, dropped = ingest(tmp_path, [f], "quarantine", split_conversations="quarantine")
    assert m.stats.records_kept == 3 and m.stats.dropped_by_reason == {"broken_role_order": 2}
    assert not m.stats.counters and {json.loads(d["raw"])["id"] for d in dropped} == {"A_3", "A_5"}


def test_broken_role_order_in_the_middle_stays_quarantined(tmp_path: Path) -> None:
    c = [("C_0", conv("h:c1", "g:c2")), ("C_1", conv("g:c2", "h:c3", "h:c4", "g:c5"))]  # two questions in a row
    lone = [("D_7", conv("g:an answer whose question is elsewhere", "h:next question", "g:next answer")),
            ("E_0", conv("g:answer only", "h:question without answer"))]
    f = write(tmp_path / "in.jsonl", c + lone)
    m, kept, dropped = ingest(tmp_path, [f])
    got = by_origin(kept)
    assert got == {"C_0": conv("h:c1", "g:c2"), "D_7": conv("h:next question", "g:next answer")}
    assert m.stats.dropped_by_reason == {"broken_role_order": 2}
    assert {json.loads(d["raw"])["id"] for d in dropped} == {"C_1", "E_0"}
    assert m.stats.counters == {"split.trimmed": 1}


def part(n: int, *turns: str, row: int = 0) -> Part:
    return Part(row, f"x_{n}", "x", n, tuple(Turn(t["from"], t["value"]) for t in conv(*turns)))


def test_chains_rules() -> None:
    assert split_key("QWJhYvA_12") == ("QWJhYvA", 12) and split_key("plain") is None and split_key(7) is None
    a0, a3 = part(0, "h:1", "g:2", "h:3", "g:4"), part(3, "g:4", "h:5", "g:6", row=1)
    assert [len(r) for r, _ in chains([a3, a0])] == [2]  # out of order
    assert joined_record(chains([a3, a0])[0][0])["conversations"] == conv("h:1", "g:2", "h:3", "g:4", "h:5", "g:6")
    # Ids that count independent records (identity_0, identity_1, ...) are not parts of one conversation.
    assert [len(r) for r, _ in chains([part(0, "h:1", "g:2"), part(1, "h:3", "g:4", row=1)])] == [1, 1]
    # A gap (turns missing between the parts), a duplicate start, or a seam where roles repeat: not joined.
    assert [len(r) for r, _ in chains([a0, part(9, "h:9", "g:10", row=1)])] == [1, 1]
    assert [len(r) for r, _ in chains([a0, part(0, "h:1", "g:2", row=1)])] == [1, 1]
    assert [len(r) for r, _ in chains([a0, part(4, "g:other", "h:5", "g:6", row=1)])] == [1, 1]
    # A part that only repeats the previous part's last turn is merged (it adds nothing).
    assert chains([a0, part(3, "g:4", row=1)]) == [([a0, part(3, "g:4", row=1)], 1)]


@pytest.mark.parametrize(("fmt", "rec", "expect"), [
    ("sharegpt", {"conversations": conv("s:sys", "g:a", "h:q", "g:a2")}, conv("s:sys", "h:q", "g:a2")),
    ("openai", {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a2"}]},
     [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a2"}]),
    ("sharegpt", {"conversations": conv("h:q", "g:a")}, None),  # nothing to trim
    ("sharegpt", {"conversations": conv("g:a", "g:b")}, None),  # no question left after it
    ("alpaca", {"instruction": "q", "output": "a"}, None),
])
def test_without_leading_answer(fmt: str, rec: dict[str, Any], expect: Any) -> None:
    out = without_leading_answer(rec, fmt)
    assert (out if out is None else next(iter(v for k, v in out.items() if k in ("conversations", "messages")))) \
        == expect
