"""Near-dup step: lightly edited copies split across shards form one cluster; the best copy survives."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from operators.cli import build_step
from operators.core import storage
from operators.core.runner import read_step_table, run_all
from operators.schema import CANONICAL_SCHEMA
from tests.conftest import run_step_as_tasks

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


def _varied_corpus(seed: int, shards: int = 4) -> list[list[dict[str, Any]]]:
    """Clusters of 2-5 copies with 0-4 replaced words each (pairwise Jaccard 1.0 down to ~0.5, so verification decides
    some of them), rewards missing, tied or distinct, spread over shards; plus unrelated records."""
    rng = random.Random(seed)
    out: list[list[dict[str, Any]]] = [[] for _ in range(shards)]
    n = 0
    for c in range(40):
        base = paragraph(rng, rng.randint(100, 160))
        for _ in range(rng.randint(2, 5)):
            words = list(base)
            for _ in range(rng.choice([0, 1, 1, 2, 3, 4])):
                words[rng.randrange(len(words))] = f"x{rng.randint(0, 999)}"
            reward = rng.choice([None, 0.5, 0.5, rng.random()])
            out[rng.randrange(shards)].append(rec(f"r{n:04d}-c{c}", " ".join(words), reward))
            n += 1
    for _ in range(60):
        out[rng.randrange(shards)].append(rec(f"r{n:04d}-u", " ".join(paragraph(rng)), rng.choice([None, 0.3])))
        n += 1
    return out


def _reference_drops(shards: list[list[dict[str, Any]]], verify: bool = True) -> dict[str, str]:
    """The previous, whole-set resolve: every signature in one process, `duplicate_components` over all."""
    import numpy as np

    from operators.dedup.minhash import MinHashParams, band_hashes, duplicate_components, minhash_signatures
    from operators.steps.dedup.near import conversation_texts

    p = MinHashParams()
    rows = [r for s in shards for r in s]  # shard order, then row order: the order of the global keys
    t = pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)
    sig = minhash_signatures(conversation_texts(t), num_perm=p.num_perm, ngram=p.ngram, seed=p.seed)
    reward = np.array([np.nan if r["reward"] is None else r["reward"] for r in rows])
    comps = duplicate_components(np.arange(len(rows)), band_hashes(sig, *p.lsh()),
                                 signatures=sig if verify else None, threshold=p.threshold if verify else None,
                                 priority=np.where(np.isnan(reward), np.inf, -reward))
    drops = comps.filter(pc.invert(comps["keep"]))
    return {rows[k]["id"]: f"near duplicate of {rows[j]['id']}"
            for k, j in zip(drops["id"].to_pylist(), drops["keep_id"].to_pylist(), strict=True)}


def _write_shards(root: Path, shards: list[list[dict[str, Any]]]) -> str:
    d = root / "in"
    d.mkdir()
    for i, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), d / f"s{i}.parquet")
    return str(d)


def test_unverified_links_carry_their_facts_to_the_resolve(tmp_path: Path) -> None:
    """With `verify` off no signature moves, but the candidates' ids and priorities still reach the pairs (the
    resolve reads no shard): the drops equal the whole-set resolve's without verification."""
    shards = _varied_corpus(11)
    expected = _reference_drops(shards, verify=False)
    assert len(expected) >= len(_reference_drops(shards))
    out = storage.validate_uri(str(tmp_path / "out"))
    step = build_step("near_dedup", {"target_shard_bytes": 1, "band_partitions": 5, "minhash": {"verify": False}})
    m = run_all(step, [_write_shards(tmp_path, shards)], out)
    dropped = read_step_table(out, "dropped")
    assert dict(zip(dropped["id"].to_pylist(), dropped["detail"].to_pylist(), strict=True)) == expected
    assert m.stats.counters["resolve.records"] == m.stats.records_in
    gathered = pa.concat_tables(pq.read_table(f) for f in (tmp_path / "out" / "_stages" / "gather").rglob("*.parquet"))
    assert "signature" not in gathered.column_names and gathered.num_rows > 0


@pytest.mark.parametrize("partitions", [1, 3, 7, 16])
def test_shuffled_resolve_equals_the_whole_set_resolve(tmp_path: Path, partitions: int) -> None:
    """Any number of band partitions (fewer or more than the 4 shards that run the partition tasks) drops
    exactly what the whole-set resolve drops, with the same survivor named."""
    shards = _varied_corpus(11)
    expected = _reference_drops(shards)
    assert 40 < len(expected) < 120  # the fixture has real clusters (verification rejects a few links too)
    out = storage.validate_uri(str(tmp_path / "out"))
    step = build_step("near_dedup", {"target_shard_bytes": 1, "band_partitions": partitions})
    m = run_all(step, [_write_shards(tmp_path, shards)], out)
    assert m.stats.shards == 4
    dropped = read_step_table(out, "dropped")
    assert dict(zip(dropped["id"].to_pylist(), dropped["detail"].to_pylist(), strict=True)) == expected
    assert m.stats.counters["resolve.near_duplicates"] == len(expected)
    # The band rows really were shuffled: partition folders, each read on its own by one task.
    stage = tmp_path / "out" / "_stages" / "signatures"
    folders = sorted(p.name for p in stage.iterdir() if p.is_dir() and p.name.startswith("p"))
    assert len(folders) == partitions and folders[0] == "p00000"
    # Every partition was handled by exactly one of the 4 tasks.
    assert m.stats.counters["pairs.partitions"] == partitions == m.stats.counters["candidates.partitions"]
    # Only candidates' signatures moved: one per (candidate key, partition), never the whole corpus's.
    assert m.stats.counters["pairs.signatures_gathered"] == m.stats.counters["candidates.candidate_keys"]
    assert m.stats.counters["candidates.candidate_keys"] > 0
    # A pair linked in several band partitions reaches the resolve once: `links` keeps each link of a shard once.
    c = m.stats.counters
    assert c["links.links"] + c["links.repeats"] == c["pairs.links"] and c["links.partitions"] == 4
    if partitions > 1:
        assert c["links.repeats"] > 0
    if partitions == 1:
        assert m.stats.counters["candidates.candidate_keys"] < m.stats.records_in


def test_near_dedup_partition_tasks_as_separate_processes_match(tmp_path: Path) -> None:
    """The stages run as the orchestrator runs them: plan, then every map and partition task as its own CLI
    process (fresh step object, state only in storage), then the reduces; the drops equal the whole-set's."""
    shards = _varied_corpus(11)
    expected = _reference_drops(shards)
    out = str(tmp_path / "out")
    run_step_as_tasks("near_dedup", {"target_shard_bytes": 1, "band_partitions": 6}, [_write_shards(tmp_path, shards)],
                      out)
    dropped = read_step_table(storage.validate_uri(out), "dropped")
    assert dict(zip(dropped["id"].to_pylist(), dropped["detail"].to_pylist(), strict=True)) == expected


def test_bucket_members_and_shuffle_keep_buckets_whole() -> None:

    from operators.steps.dedup.near import bucket_members, shuffle_band_rows

    rows = pa.table({"key": pa.array([1, 2, 3, 4, 4, 5], pa.int64()), "band": pa.array([0, 0, 1, 0, 0, 1], pa.int32()),
                     "band_hash": pa.array([10, 10, 10, 11, 11, 12], pa.uint64())})
    # 1 and 2 share (0, 10); 3 has hash 10 in another band; 4 twice in one bucket is one member.
    assert bucket_members(rows).tolist() == [1, 2]
    parts = shuffle_band_rows(rows, 3)
    assert sorted(parts) == [0, 1, 2] and sum(t.num_rows for t in parts.values()) == 6
    for k, t in parts.items():
        assert all(h % 3 == k for h in t["band_hash"].to_pylist())


def test_crashed_map_attempt_leaves_no_shuffled_files(tmp_path: Path) -> None:
    """Shuffled partition files of an uncommitted attempt are removed when the shard is re-run."""
    from operators.core.runner import make_plan, run_map_stage

    shards = _varied_corpus(5, shards=2)
    step = build_step("near_dedup", {"target_shard_bytes": 1, "band_partitions": 4})
    out = storage.validate_uri(str(tmp_path / "out"))
    plan = make_plan(step, [_write_shards(tmp_path, shards)], out)
    stage = tmp_path / "out" / "_stages" / "signatures"
    (stage / "p00002").mkdir(parents=True)
    orphan = stage / "p00002" / "part-00000-00000-deadbeef.parquet"
    orphan.write_bytes(b"left by a killed attempt")
    other = stage / "p00002" / "part-00001-00000-deadbeef.parquet"
    other.write_bytes(b"shard 1's, not ours")
    run_map_stage(step, out, plan, "signatures", 0)
    assert not orphan.exists() and other.exists()
    assert any((stage / "p00002").glob("part-00000-*"))


@pytest.mark.parametrize("no_churn", [False, True], ids=["plain", "no_churn"])
def test_pieces_decide_what_the_whole_link_table_decides(no_churn: bool) -> None:
    """Components by pieces (per link partition), labels (per shard) and merges (one task over the merges only)
    drop the records, name the survivors, count the clusters and bin their sizes as `decide_components` over
    every link at once: ties on priority broken by key, links repeated across partitions, records in many
    pieces, chains that cross every shard. And the merge task holds fewer rows than there are linked records.
    With no churn, a fifth of the records are published (never dropped, first to survive), and some published
    records have exact copies (the same id, linked to them): only the oldest row of an id is protected."""
    import numpy as np

    from operators.steps.dedup import pieces
    from operators.steps.dedup.droplist import KEY_SHIFT, cluster_sizes, decide_components, shuffle_rows, size_bins
    from operators.steps.dedup.near import first_links, linked_facts

    rng = np.random.default_rng(5)
    copies_found = 0
    for shards, per_shard, links, band_parts, star in [(3, 10, 20, 2, False), (5, 80, 500, 4, False),
                                                       (9, 300, 2500, 6, False), (8, 500, 1500, 5, True)]:
        keys = np.concatenate([(np.int64(s) << KEY_SHIFT) + np.arange(per_shard) for s in range(shards)])
        nodes = keys.size
        prio = rng.integers(0, 4, nodes).astype(np.float64)  # few values: many ties
        prio[rng.random(nodes) < 0.1] = np.inf  # no reward
        if star:  # LSH-like clusters: every member links to the cluster's smallest keys
            centre = rng.integers(0, nodes // 6, links)
            a, b = np.maximum(centre + rng.integers(1, 40, links), 0) % nodes, centre
        else:
            a, b = rng.integers(0, nodes, links), rng.integers(0, nodes, links)
        ids = np.array([f"id{k}" for k in keys], dtype=object)
        published: set[str] = set()
        if no_churn:
            published = set(ids[rng.random(nodes) < 0.2])
            # Exact copies of published records: the same id (ids are content hashes), linked to the original.
            originals = np.flatnonzero(np.isin(ids, list(published)))[: max(2, nodes // 25)]
            copies = np.minimum(originals + rng.integers(1, 50, originals.size), nodes - 1)
            ids[copies] = ids[originals]
            a, b = np.concatenate([a, copies]), np.concatenate([b, originals])
        a, b = np.maximum(a, b), np.minimum(a, b)  # a member links to a smaller key
        keep = a != b
        t = pa.table({"key": keys[a[keep]], "linked_key": keys[b[keep]], "id": ids[a[keep]].tolist(),
                      "priority": prio[a[keep]], "linked_id": ids[b[keep]].tolist(),
                      "linked_priority": prio[b[keep]]})

        def protected(rows: pa.Table, published: set[str] = published) -> np.ndarray:
            return np.array([i in published for i in rows["id"].to_pylist()], dtype=bool)

        expected, clusters = decide_components(first_links(t).select(["key", "linked_key"]), linked_facts(t),
                                               priority=lambda r: r["priority"].to_numpy(), protected=protected)
        # Band partitions: each link lands in one or two of them, each routes its own links to shards.
        homes = rng.integers(0, band_parts, t.num_rows)
        again = np.flatnonzero(rng.random(t.num_rows) < 0.3)
        routed: dict[int, list[pa.Table]] = {}
        for p in range(band_parts):
            mine = first_links(pa.concat_tables([t.filter(pa.array(homes == p)),
                                                 t.take(pa.array(again[(homes[again] + 1) % band_parts == p]))]))
            for shard, part in shuffle_rows(mine, pieces.link_routes(mine)).items():
                routed.setdefault(shard, []).append(part)
        piece_rows: dict[int, list[pa.Table]] = {}
        sizes = []
        for part, tables in routed.items():
            links_here = first_links(pa.concat_tables(tables))
            facts = linked_facts(links_here)
            rows, counts = pieces.link_pieces(links_here, facts, part, protected(facts))
            sizes.append(counts)
            for shard, r in shuffle_rows(rows, (rows["key"].to_numpy() >> KEY_SHIFT).astype(np.int64)).items():
                piece_rows.setdefault(shard, []).append(r)
        labelled = {s: pieces.node_labels(pa.concat_tables(r)) for s, r in piece_rows.items()}
        guarded = [pieces.protected_rows(best) for best, _ in labelled.values()]
        final, size_table = pieces.resolve_merges([m for _, m in labelled.values()], sizes, guarded)
        assert sum(g.num_rows for g in guarded) > 0 if no_churn else final["copy"].to_pylist() == [False] * len(final)
        copies_found += sum(final["copy"].to_pylist())
        got = []
        for best, _ in labelled.values():
            assert best.schema == pieces.PIECE_ROWS and best["key"].to_pylist() == sorted(set(best["key"].to_pylist()))
            chunks = (pa.Table.from_batches([b]) for b in final.to_batches(max_chunksize=7))
            dropped, kept_ids = pieces.final_drops(best, chunks)
            got.append(pa.table({"shard": pa.array((dropped >> KEY_SHIFT).astype(np.int32)),
                                 "row": pa.array(dropped & np.int64(0xFFFFFFFF)), "kept_id": kept_ids}))
        order = [("shard", "ascending"), ("row", "ascending")]
        assert pa.concat_tables(got).sort_by(order).equals(expected.sort_by(order)) and expected.num_rows > 0
        size, count = size_table["size"].to_numpy(), size_table["pieces"].to_numpy()
        assert int(count.sum()) == clusters
        assert int((size * count).sum()) - clusters == expected.num_rows
        assert size_bins(size, count) == cluster_sizes(expected["kept_id"])
        merges = sum(m.num_rows for _, m in labelled.values())
        linked = sum(b.num_rows for b, _ in labelled.values())
        assert 0 < merges < linked
    assert (copies_found > 0) == no_churn
