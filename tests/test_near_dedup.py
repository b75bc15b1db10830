"""Near-dup step: lightly edited copies split across shards form one cluster; the best copy survives."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators.cli import build_step
from operators.core import storage
from operators.core.runner import read_step_table, run_all
from operators.schema import CANONICAL_SCHEMA

WORDS = ["river", "mountain", "engine", "lantern", "orbit", "velvet", "cobalt", "harbor", "meadow", "signal",
         "quartz", "ember", "saddle", "prism", "tunnel", "glacier", "falcon", "copper", "thistle", "beacon"]


def paragraph(rng: random.Random, n: int = 120) -> list[str]:
    return [rng.choice(WORDS) + str(rng.randint(0, 30)) for _ in range(n)]


def edit(words: list[str], rng: random.Random) -> str:
    """Replace one word: copies keep a shingle Jaccard of about 0.84, above the 0.7 threshold."""
    out = list(words)
    out[rng.randrange(len(out))] = "edited"
    return " ".join(out)


def rec(rid: str, text: str, reward: float | None = None) -> dict[str, Any]:
    return {"id": rid, "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": text}],
            "label": None, "langdetect": "en", "source": "s", "reward": reward, "origin": None}


def test_near_duplicates_across_shards(tmp_path: Path) -> None:
    rng = random.Random(3)
    base = [paragraph(rng) for _ in range(6)]
    shards: list[list[dict[str, Any]]] = [[], [], []]
    # Cluster 0: three light edits in three shards; the rewarded copy must survive.
    shards[0].append(rec("c0a", edit(base[0], rng)))
    shards[1].append(rec("c0b", edit(base[0], rng), reward=0.9))
    shards[2].append(rec("c0c", edit(base[0], rng)))
    # Cluster 1: two copies in two shards, no rewards: the smaller key (earlier shard) survives.
    shards[0].append(rec("c1a", edit(base[1], rng)))
    shards[2].append(rec("c1b", edit(base[1], rng)))
    for i in range(2, 6):  # unrelated records
        shards[i % 3].append(rec(f"u{i}", " ".join(base[i])))
    d = tmp_path / "in"
    d.mkdir()
    for i, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), d / f"s{i}.parquet")
    out = storage.validate_uri(str(tmp_path / "out"))
    m = run_all(build_step("near_dedup", {"target_shard_bytes": 1}), [str(d)], out)
    assert m.stats.shards == 3 and m.stats.records_in == 9
    assert m.stats.dropped_by_reason == {"near_duplicate": 3}
    assert sorted(read_step_table(out)["id"].to_pylist()) == ["c0b", "c1a", "u2", "u3", "u4", "u5"]
    details = dict(zip(read_step_table(out, "dropped")["id"].to_pylist(),
                       read_step_table(out, "dropped")["detail"].to_pylist(), strict=True))
    assert details == {"c0a": "near duplicate of c0b", "c0c": "near duplicate of c0b", "c1b": "near duplicate of c1a"}
    assert m.stats.counters["resolve.clusters"] == 2
