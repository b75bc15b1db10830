"""Exact dedup across shards: the right copy survives, clusters join across scopes, the ledger holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators.cli import build_step
from operators.core import storage
from operators.core.runner import read_step_table, run_all
from operators.dedup.unionfind import connected_components
from operators.schema import CANONICAL_SCHEMA


def rec(rid: str, q: str, a: str, reward: float | None = None) -> dict[str, Any]:
    return {"id": rid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
            "label": None, "langdetect": "en", "source": "s", "reward": reward, "origin": None}


def write_shards(d: Path, shards: list[list[dict[str, Any]]]) -> str:
    d.mkdir()
    for i, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), d / f"s{i}.parquet")
    return str(d)


def test_duplicates_across_shards_keep_the_best_copy(tmp_path: Path) -> None:
    src = write_shards(tmp_path / "in", [
        [rec("a1", "What is Rust?", "A language."), rec("u1", "Unique one?", "Yes.")],
        # Same text after normalization (case, punctuation, spaces), higher reward: this copy survives.
        [rec("a2", "what is  rust", "A LANGUAGE!", reward=0.9), rec("u2", "Unique two?", "Yes.")],
        # Same prompt, longer answer but no reward: still loses to the rewarded copy.
        [rec("a3", "What is Rust?", "A systems programming language.", reward=None)],
        # Same answer text under a different prompt: not a duplicate.
        [rec("u3", "What is Go?", "A language.")],
    ])
    out = storage.validate_uri(str(tmp_path / "out"))
    m = run_all(build_step("exact_dedup", {"target_shard_bytes": 1}), [src], out)
    assert m.stats.shards == 4
    assert m.stats.records_in == 6 and m.stats.dropped_by_reason == {"exact_duplicate": 2}
    assert sorted(read_step_table(out)["id"].to_pylist()) == ["a2", "u1", "u2", "u3"]
    dropped = read_step_table(out, "dropped")
    assert sorted(dropped["id"].to_pylist()) == ["a1", "a3"]
    assert set(dropped["detail"].to_pylist()) == {"duplicate of a2"}


def test_tie_breaks_on_answer_length_then_id_and_scope_choice(tmp_path: Path) -> None:
    src = write_shards(tmp_path / "in", [
        [rec("b", "Name a prime.", "2"), rec("c", "Name a prime.", "Seven is prime.")],
        [rec("a", "Name a prime.", "Seven is prime.")],
    ])
    out = storage.validate_uri(str(tmp_path / "out"))
    run_all(build_step("exact_dedup", {"target_shard_bytes": 1}), [src], out)
    assert read_step_table(out)["id"].to_pylist() == ["a"]  # longest answer, then smallest id
    out2 = storage.validate_uri(str(tmp_path / "out2"))
    run_all(build_step("exact_dedup", {"scopes": ["conversation"], "target_shard_bytes": 1}), [src], out2)
    assert sorted(read_step_table(out2)["id"].to_pylist()) == ["a", "b"]  # prompts may repeat now


def test_connected_components_transitive() -> None:
    labels = connected_components(6, np.array([0, 2, 4]), np.array([1, 1, 5]))
    assert labels.tolist() == [0, 0, 0, 3, 4, 4]
    assert connected_components(3, np.array([], dtype=np.int64), np.array([], dtype=np.int64)).tolist() == [0, 1, 2]
    rng = np.random.default_rng(0)
    left, right = rng.integers(0, 500, 400), rng.integers(0, 500, 400)
    labels = connected_components(500, left, right)
    assert all(labels[a] == labels[b] for a, b in zip(left, right, strict=True))
    assert all(labels[i] <= i for i in range(500))
