"""Benchmark: near_dedup's one global task, pieces and merges against one task over every link.

    python bench/near_components.py [--sizes 50000,100000,200000] [--shards 8] [--seed 7] [--keep]

1. For each size, builds bench/dedup.py's corpus (bases with 1-4 lightly edited copies, near misses, a shared
   boilerplate opener, some Chinese), with random rewards, in `--shards` Parquet files, and runs the
   `near_dedup` step on it (every stage, in this process).
2. Reads what the stages recorded: linked records, distinct links, pieces (components per link partition),
   merge rows (records in more than one piece) and the labels the one global task merged.
3. The peer is what a single-task resolve does (datatrove's MinHash clustering, our resolve before pieces):
   scipy's `connected_components` over every link, with the survivor chosen per component. Both run on the
   same links, here, and the bytes each one's input holds are printed: every link's two keys and the linked
   records' keys, ranks and labels for the peer, the merge rows for ours. Both must choose the same survivors
   (checked: the step's drops against the peer's).
4. Prints one line per size, then how each count grows with the corpus, then LAST one JSON line.

The point is the growth: the peer's input grows with every linked record, ours with the merges only.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_json_line, print_machine_load, scratch_dir
from bench.dedup import build_corpus
from operators.cli import build_step
from operators.core import storage
from operators.core.manifest import read_manifest
from operators.core.runner import SHARDS_DIR, StorageArtifacts, read_step_table, run_all, stage_dir
from operators.core.step import concat_or_empty
from operators.schema import CANONICAL_SCHEMA
from operators.steps.dedup.near import FACT_LINKS, first_links, linked_facts
from operators.steps.dedup.pieces import resolve_merges


def write_corpus(directory: Path, n: int, shards: int, seed: int) -> None:
    """bench/dedup.py's texts as canonical records (random rewards, some missing) in `shards` files."""
    texts, _ = build_corpus(n, seed, 0.01, 0.05)
    rng = random.Random(seed + 1)
    rows = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "Rewrite this."}, {"from": "gpt", "value": t}],
             "label": None, "langdetect": "en", "source": "bench", "reward": None if rng.random() < 0.1
             else round(rng.random(), 2), "origin": None} for i, t in enumerate(texts)]
    directory.mkdir(parents=True)
    per = -(-n // shards)
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s * per:(s + 1) * per], schema=CANONICAL_SCHEMA),
                       directory / f"part-{s:03d}.parquet")


def stage_counters(step_dir: str, stage: str) -> dict[str, float]:
    """A partition stage's counters, summed over its tasks."""
    out: dict[str, float] = {}
    for uri in storage.list_files(storage.join(stage_dir(step_dir, stage), SHARDS_DIR)):
        m = read_manifest(uri)
        for k, v in (m.stats.counters if m is not None else {}).items():
            out[k] = out.get(k, 0.0) + v
    return out


def whole_link_components(links: pa.Table) -> tuple[dict[int, int], float, int]:
    """The peer: scipy's components over every link and each component's survivor (smallest priority, then
    smallest key). Returns (dropped key -> kept key, seconds, bytes of what it holds)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    t0 = time.perf_counter()
    facts = linked_facts(links)
    keys = facts["key"].to_numpy()
    src = np.searchsorted(keys, links["key"].to_numpy())
    dst = np.searchsorted(keys, links["linked_key"].to_numpy())
    graph = coo_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(keys.size, keys.size)).tocsr()
    _, label = connected_components(graph, directed=False)
    prio = np.asarray(facts["priority"].to_numpy(), dtype=np.float64)
    order = np.lexsort((keys, prio))  # survivor order: priority, then key
    rank = np.empty(keys.size, dtype=np.int64)
    rank[order] = np.arange(keys.size)
    best = np.full(label.max() + 1, keys.size, dtype=np.int64)
    np.minimum.at(best, label, rank)
    kept = keys[order[best[label]]]
    seconds = time.perf_counter() - t0
    held = (src.nbytes + dst.nbytes + keys.nbytes + prio.nbytes + rank.nbytes + label.nbytes
            + graph.data.nbytes + graph.indices.nbytes + graph.indptr.nbytes + links.nbytes)
    dropped = kept != keys
    return dict(zip(keys[dropped].tolist(), kept[dropped].tolist(), strict=True)), seconds, held


def measure(n: int, shards: int, seed: int, keep: bool) -> dict[str, Any]:
    with scratch_dir("near-components-", keep) as tmp:
        src = tmp / "in"
        write_corpus(src, n, shards, seed)
        out = storage.validate_uri(str(tmp / "out"))
        t0 = time.perf_counter()
        run_all(build_step("near_dedup", {"target_shard_bytes": 1}), [str(src)], out)
        step_seconds = time.perf_counter() - t0
        art = StorageArtifacts(out)
        links_c, labels_c = stage_counters(out, "links"), stage_counters(out, "labels")
        # Every link the band partitions found, each once: the peer's input.
        found = (t for p in range(max(64, shards)) for t in art.shuffled("pairs", p))
        links = first_links(concat_or_empty(found, FACT_LINKS))
        peer, peer_s, peer_bytes = whole_link_components(links)
        merges = list(art.iter_tables("labels"))
        t0 = time.perf_counter()
        final, _ = resolve_merges(merges, art.iter_tables("links"))
        ours_s = time.perf_counter() - t0
        # The step's drops must be the peer's: the same records, each naming the same survivor.
        per = -(-n // shards)

        def rid(key: int) -> str:
            return f"r{(key >> 32) * per + (key & 0xFFFFFFFF)}"

        dropped = read_step_table(out, "dropped")
        got = dict(zip(dropped["id"].to_pylist(), dropped["detail"].to_pylist(), strict=True))
        want = {rid(k): f"near duplicate of {rid(v)}" for k, v in peer.items()}
        if got != want:
            raise SystemExit(f"{n} records: the step's drops differ from the whole-link components' "
                             f"({len(got)} vs {len(want)})")
        summary = art.summary("resolve")
        return {
            "records": n, "step_seconds": round(step_seconds, 1), "links": int(links.num_rows),
            "linked": int(labels_c.get("linked", 0)), "pieces": int(links_c.get("pieces", 0)),
            "merge_rows": int(labels_c.get("merges", 0)), "merged_labels": int(summary.get("merged_labels", 0)),
            "near_duplicates": int(summary["near_duplicates"]), "clusters": int(summary["clusters"]),
            "ours_bytes": int(sum(t.nbytes for t in merges)), "peer_bytes": int(peer_bytes),
            "ours_seconds": round(ours_s, 4), "peer_seconds": round(peer_s, 4), "final_rows": final.num_rows,
        }


def growth(rows: list[dict[str, Any]], key: str) -> str:
    a, b = rows[0], rows[-1]
    if not a[key]:
        return f"{key}: 0 -> {b[key]:,}"
    return f"{key}: {a[key]:,} -> {b[key]:,} (x{b[key] / a[key]:.2f} for x{b['records'] / a['records']:.2f} records)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50000,100000,200000")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folders")
    args = ap.parse_args(argv)
    print_machine_load()
    rows = [measure(int(n), args.shards, args.seed, args.keep) for n in args.sizes.split(",")]
    print(f"{'records':>9} {'links':>8} {'linked':>8} {'pieces':>8} {'merges':>7} {'merged':>7} "
          f"{'ours KiB':>9} {'peer KiB':>9} {'ratio':>6} {'ours s':>7} {'peer s':>7}")
    for r in rows:
        print(f"{r['records']:>9,} {r['links']:>8,} {r['linked']:>8,} {r['pieces']:>8,} {r['merge_rows']:>7,} "
              f"{r['merged_labels']:>7,} {r['ours_bytes'] / 1024:>9.0f} {r['peer_bytes'] / 1024:>9.0f} "
              f"{r['peer_bytes'] / max(1, r['ours_bytes']):>6.1f} {r['ours_seconds']:>7.3f} {r['peer_seconds']:>7.3f}")
    for key in ("linked", "merge_rows", "ours_bytes", "peer_bytes"):
        print(growth(rows, key))
    print_json_line({"sizes": rows, "shards": args.shards, "seed": args.seed,
                     "bytes_ratio_peer_to_ours": [round(r["peer_bytes"] / max(1, r["ours_bytes"]), 1) for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
