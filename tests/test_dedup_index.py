"""exact_dedup's partition index: a night links only its new hash rows, against the index's group heads and each
other, and the result equals linking everything at once (operators/steps/dedup/partition_index.py)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.cli import build_step
from operators.core import storage
from operators.core.manifest import SHARDS_DIR, read_manifest, stage_dir
from operators.core.runner import StorageArtifacts, read_step_table, run_all
from operators.core.step import concat_or_empty
from operators.schema import CANONICAL_SCHEMA
from operators.steps.dedup import partition_index
from operators.steps.dedup.droplist import LINKS_SCHEMA
from operators.steps.dedup.exact import HASH_ROWS, link_new_rows
from operators.steps.dedup.partition_index import INDEX_DIR, Generation, best_base

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu",
         "xi", "pi", "rho", "sigma", "tau", "phi", "chi"]


def _rows(rng: random.Random, prefix: str, n: int, copies: list[dict]) -> list[dict]:
    out = [{"id": f"{prefix}-{i}", "conversations": [
        {"from": "human", "value": f"{prefix} {i} " + " ".join(rng.choice(WORDS) for _ in range(12))},
        {"from": "gpt", "value": " ".join(rng.choice(WORDS) for _ in range(30))}],
        "label": None, "langdetect": "en", "source": prefix, "reward": rng.random(), "origin": None}
        for i in range(n)]
    # Exact copies of earlier records (whole conversation), and copies of their prompt only.
    for j, c in enumerate(copies):
        out.append({**c, "id": f"{prefix}-copy{j}", "reward": 0.0})
        out.append({**c, "id": f"{prefix}-prompt{j}", "reward": 0.0, "conversations": [
            c["conversations"][0], {"from": "gpt", "value": f"another answer {j}"}]})
    return out


def _night(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), folder / f"{name}.parquet")


def _run(out: Path, folder: Path) -> str:
    # One shard per file, and new files sort after old ones (appended shards: larger record keys).
    run_all(build_step("exact_dedup", {"target_shard_bytes": 1, "partitions": 8}), [str(folder)], str(out))
    return str(out)


def _links(step_dir: str) -> list[tuple[int, int]]:
    """Every link of the newest index generation of each partition (what the next night builds on)."""
    out: list[tuple[int, int]] = []
    for p in (Path(step_dir) / INDEX_DIR / "resolve").iterdir():
        gen = max((Generation.parse(g.name, g.read_bytes()) for g in p.glob("gen-*.json")),
                  key=lambda g: len(g.covered))
        t = concat_or_empty([pq.read_table(p / f) for f in gen.links], LINKS_SCHEMA)
        out += zip(t["key"].to_pylist(), t["linked_key"].to_pylist(), strict=True)
    return sorted(out)


def _decisions(step_dir: str) -> tuple[list[str], dict[str, str]]:
    dropped = read_step_table(step_dir, "dropped")
    return (sorted(read_step_table(step_dir)["id"].to_pylist()),
            dict(zip(dropped["id"].to_pylist(), dropped["detail"].to_pylist(), strict=True)))


def _counters(step_dir: str) -> dict[str, float]:
    """The partition stage's counters, summed over its slot tasks."""
    total: dict[str, float] = {}
    for uri in storage.list_files(storage.join(stage_dir(step_dir, "resolve"), SHARDS_DIR)):
        m = read_manifest(uri)
        assert m is not None
        for k, v in m.stats.counters.items():
            total[k] = total.get(k, 0.0) + v
    return total


def test_nights_link_only_new_rows_and_equal_linking_everything(tmp_path: Path) -> None:
    rng = random.Random(5)
    first = _rows(rng, "a", 60, [])
    src = tmp_path / "src"
    _night(src, "n1-a", first)
    _night(src, "n1-b", _rows(rng, "b", 60, first[:5]))
    inc = tmp_path / "inc"
    _run(inc / "exact", src)
    assert _counters(str(inc / "exact"))["index_rows_reused"] == 0
    for night in (2, 3):
        # Each night: fresh records, copies of old ones, and copies among its own records.
        fresh = _rows(rng, f"c{night}", 40, first[10 * night:10 * night + 4])
        fresh += [{**r, "id": r["id"] + "-twin", "reward": 0.0} for r in fresh[:3]]
        _night(src, f"n{night}", fresh)
        got = _run(inc / "exact", src)
        full = _run(tmp_path / f"full{night}" / "exact", src)
        assert _links(got) == _links(full)
        assert _decisions(got) == _decisions(full)
        c, f = _counters(got), _counters(full)
        # Only the new night's hash rows were read and linked (one per record); the rest came from the index.
        assert c["index_rows_linked"] == len(fresh)
        assert c["index_rows_reused"] == f["index_rows_linked"] - len(fresh) > 0
        assert c["links"] == f["links"]
        details = _decisions(got)[1]
        assert any(d.startswith("duplicate of a-") for i, d in details.items() if i.startswith(f"c{night}-copy"))
        # Duplicates within the night itself.
        assert sum(i.startswith(f"c{night}-") and i.endswith("-twin") for i in details) == 3
    # The index keeps at most two generations per partition; every listed segment exists.
    gens = list((inc / "exact" / INDEX_DIR / "resolve").glob("p*/gen-*.json"))
    assert gens and max(len(list(p.glob("gen-*.json"))) for p in (inc / "exact" / INDEX_DIR / "resolve").iterdir()) <= 2
    for g in gens:
        gen = Generation.parse(g.name, g.read_bytes())
        assert all((g.parent / f).is_file() for f in (*gen.heads, *gen.links))


def test_a_damaged_index_falls_back_to_linking_everything(tmp_path: Path) -> None:
    rng = random.Random(9)
    first = _rows(rng, "a", 50, [])
    src = tmp_path / "src"
    _night(src, "n1", first)
    _run(tmp_path / "inc" / "exact", src)
    for seg in (tmp_path / "inc" / "exact" / INDEX_DIR).rglob("heads-*.parquet"):
        seg.write_bytes(b"not parquet")  # a torn or foreign file
    _night(src, "n2", _rows(rng, "b", 30, first[:4]))
    got = _run(tmp_path / "inc" / "exact", src)
    full = _run(tmp_path / "full" / "exact", src)
    assert _links(got) == _links(full) and _decisions(got) == _decisions(full)
    assert _counters(got)["index_rows_reused"] == 0  # nothing trusted from the damaged index


def test_segments_are_compacted_and_a_changed_shard_invalidates_the_base(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition_index, "MAX_SEGMENTS", 2)
    rng = random.Random(3)
    src = tmp_path / "src"
    first = _rows(rng, "a", 30, [])
    _night(src, "n1", first)
    for night in range(2, 6):
        _night(src, f"n{night}", _rows(rng, f"n{night}", 20, first[2 * night:2 * night + 2]))
        _run(tmp_path / "inc" / "exact", src)
    full = _run(tmp_path / "full" / "exact", src)
    assert _links(str(tmp_path / "inc" / "exact")) == _links(full) != []
    for p in (tmp_path / "inc" / "exact" / INDEX_DIR / "resolve").iterdir():
        newest = max((Generation.parse(g.name, g.read_bytes()) for g in p.glob("gen-*.json")),
                     key=lambda g: len(g.covered))
        assert len(newest.heads) <= 2 and len(newest.covered) == 5
    # A base is usable only while every shard it covers keeps its content key.
    gens = [Generation("gen-a.json", {0: "k0", 1: "k1"}, 10), Generation("gen-b.json", {0: "k0"}, 5)]
    assert best_base(gens, {0: "k0", 1: "k1", 2: "k2"}) is gens[0]
    assert best_base(gens, {0: "k0", 1: "CHANGED", 2: "k2"}) is gens[1]
    assert best_base(gens, {0: "other"}) is None


def test_link_new_rows_matches_linking_all_rows_at_once() -> None:
    """The pure core, on random hash rows with many collisions: links from an index plus new rows equal the
    links of all rows at once, whatever the split between old and new keys."""
    from operators.steps.dedup.exact import group_links

    rng = np.random.default_rng(1)
    n = 3000
    keys = np.arange(n, dtype=np.int64) * 7 + 3
    h1 = rng.integers(0, 400, n).astype(np.uint64)
    h2 = (h1 * np.uint64(3) + rng.integers(0, 2, n).astype(np.uint64)) % np.uint64(5)
    rows = pa.table({"key": keys, "h1": h1, "h2": h2, "reward": rng.random(n), "answer_len": keys % 11,
                     "id": [f"r{k}" for k in keys]}, schema=HASH_ROWS)
    at, heads_of, _ = group_links(keys, h1, h2)
    want = sorted(zip(keys[at].tolist(), heads_of.tolist(), strict=True))
    for cut in (0, 1, 1500, n):
        heads, l1 = link_new_rows([], rows.slice(0, cut))
        heads2, l2 = link_new_rows([heads.slice(0, heads.num_rows // 2), heads.slice(heads.num_rows // 2)],
                                   rows.slice(cut))
        links = pa.concat_tables([l1, l2])
        got = sorted(zip(links["key"].to_pylist(), links["linked_key"].to_pylist(), strict=True))
        assert got == want, cut
        # Links carry their record's facts.
        assert links["id"].to_pylist() == [f"r{k}" for k in links["key"].to_pylist()]
        groups = {(int(a), int(b)) for a, b in zip(h1, h2, strict=True)}
        assert heads.num_rows + heads2.num_rows == len(groups)


def test_near_centres_and_new_rows_link_like_all_rows_at_once() -> None:
    """near_dedup's pure core: a night's band rows linked against the index's bucket centres (and each other)
    give exactly the links of all band rows at once, with a verifier that rejects some pairs (so members try
    several centres), however the rows split between nights."""
    from operators.dedup.minhash import candidate_pairs
    from operators.steps.dedup.near import BAND_ROWS, BUCKET_ORDER, CENTRES, bucket_rows

    rng = np.random.default_rng(4)
    n = 4000
    rows = pa.table({"key": np.arange(n, dtype=np.int64) * 3 + 1, "band": rng.integers(0, 4, n).astype(np.int32),
                     "band_hash": rng.integers(0, 300, n).astype(np.uint64)}, schema=BAND_ROWS)

    def verify(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((a * 31 + b * 17) % 5) != 0  # a deterministic verdict per pair: about 1 in 5 rejected

    want = candidate_pairs(rows, verify=verify, max_rounds=CENTRES).to_pylist()
    for cuts in ([0, n], [0, 1000, n], [0, 2000, 2001, 3500, n]):
        segments: list[pa.Table] = []
        got: list[dict] = []
        for lo, hi in itertools.pairwise(cuts):
            both, centres, old_keys = bucket_rows(segments, rows.slice(lo, hi - lo))
            links = candidate_pairs(both, verify=verify, max_rounds=CENTRES)
            got += links.filter(pa.array(~np.isin(links["key"].to_numpy(), old_keys))).to_pylist()
            assert centres.to_pylist() == centres.sort_by([(c, "ascending") for c in BUCKET_ORDER]).to_pylist()
            segments.append(centres)
        assert sorted(got, key=lambda r: (r["key"], r["linked_key"])) == want, cuts
        # The index keeps at most CENTRES keys per bucket.
        index = pa.concat_tables(segments)
        sizes = index.group_by(["band", "band_hash"]).aggregate([("key", "count")])["key_count"].to_numpy()
        assert sizes.max() <= CENTRES


def test_near_dedup_nights_link_only_new_band_rows_and_gather_only_needed_signatures(tmp_path: Path) -> None:
    rng = random.Random(8)
    first = _rows(rng, "a", 50, [])
    src = tmp_path / "src"
    _night(src, "n1-a", first)
    _night(src, "n1-b", _rows(rng, "b", 50, []))
    _night(src, "n1-c", _rows(rng, "c", 50, []))

    def near(out: Path) -> str:
        run_all(build_step("near_dedup", {"target_shard_bytes": 1, "band_partitions": 8}), [str(src)], str(out))
        return str(out)

    near(tmp_path / "inc" / "near")
    fresh = _rows(rng, "d", 30, [])
    # Near copies of two records of the first file only (one word changed in the answer).
    for j, r in enumerate(first[:2]):
        turns = [dict(t) for t in r["conversations"]]
        turns[1]["value"] = turns[1]["value"].replace(turns[1]["value"].split()[3], "changed", 1)
        fresh.append({**r, "id": f"d-near{j}", "reward": 0.0, "conversations": turns})
    _night(src, "n2", fresh)
    got, full = near(tmp_path / "inc" / "near"), near(tmp_path / "full" / "near")
    assert _decisions(got) == _decisions(full)
    assert {i for i, d in _decisions(got)[1].items() if d.startswith("near duplicate of a-")} == {"d-near0", "d-near1"}

    def stage_manifests(step_dir: str, stage: str) -> list:
        return [read_manifest(u) for u in storage.list_files(storage.join(stage_dir(step_dir, stage), SHARDS_DIR))]

    def links_of(step_dir: str) -> list:  # every link the band partitions sent on to the link partitions
        found = (t for p in range(64) for t in StorageArtifacts(step_dir).shuffled("pairs", p))
        return concat_or_empty(found, LINKS_SCHEMA).select(LINKS_SCHEMA.names).sort_by(
            [("key", "ascending"), ("linked_key", "ascending")]).to_pylist()

    links = {s: links_of(d) for s, d in (("got", got), ("full", full))}
    assert links["got"] == links["full"] != []
    pairs = {k: sum(m.stats.counters[k] for m in stage_manifests(got, "pairs")) for k in
             ("index_rows_linked", "index_rows_reused")}
    full_rows = sum(m.stats.counters["index_rows_linked"] for m in stage_manifests(full, "pairs"))
    assert 0 < pairs["index_rows_linked"] < full_rows / 3 and pairs["index_rows_reused"] > 0
    assert pairs["index_rows_linked"] + pairs["index_rows_reused"] == full_rows
    # Only shards holding a candidate read their signatures: the new shard and file a's (the copies' originals).
    gather = {m.shard: m.stats.records_in for m in stage_manifests(got, "gather")}
    assert gather[0] > 0 and gather[3] > 0 and gather[1] == gather[2] == 0, gather
