"""A seeded sample of a synthesis run's evolved instructions, stratified by (strategy, round).

The population is every kept candidate of the run's committed `evolve` steps (`evolve_r1`, `evolve_r2`, ...): the
instructions that went on to `respond`. Each stratum (strategy, evolution round) gets a share of the sample in
proportion to its size (largest remainder, at least one item per stratum while the sample allows), so the sample's
pooled error rate estimates the population's without weights; inside a stratum the items with the smallest
hash of (seed, id) are taken, so the sample depends on the data and the seed only, not on shard layout or read
order. Items are listed in hash order (strata interleaved), so a reviewer who stops half way has covered every
stratum about evenly.

Reads are bounded: one pass over (id, lineage) of the kept parts, then one pass that decodes only the texts of the
chosen items, their parents and their seeds. Texts are redacted like the report's (no raw personal data in the UI)
and cut at TEXT_CHARS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import xxhash

from operators.core import storage
from operators.core.manifest import Manifest, read_manifest, step_manifest_uri
from operators.review import REVIEW_DIR
from operators.schema import first_exchange
from operators.text.pii import redact_all

FORMAT = 1
SAMPLE_NAME = "sample.json"
DEFAULT_SIZE = 100
MAX_SIZE = 2000  # a review page lists every item; past this a page is no longer reviewable
TEXT_CHARS = 4000
Stratum = tuple[str, int]  # (strategy, round)


def sample_uri(run_root: str) -> str:
    """Where the run's review sample lives."""
    return storage.join(run_root, REVIEW_DIR, SAMPLE_NAME)


def evolve_steps(run_root: str) -> list[tuple[str, Manifest]]:
    """The committed `evolve` steps directly under `run_root` (one listing of its child folders, not of its parts)."""
    fs, path = storage.filesystem(run_root)
    try:
        children = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError:
        return []
    out = []
    for info in sorted(children, key=lambda i: i.path):
        if info.type != pafs.FileType.Directory:
            continue
        step_dir = storage.join(run_root, info.base_name)
        m = read_manifest(step_manifest_uri(step_dir))
        if m is not None and m.step == "evolve":
            out.append((step_dir, m))
    return out


def _tables(step_dir: str, m: Manifest, columns: list[str]) -> Iterator[pa.Table]:
    for f in m.files:
        if f.kind == "data" and f.rows:
            with storage.open_input(storage.join(step_dir, f.path)) as fh:
                pf = pq.ParquetFile(fh)
                for batch in pf.iter_batches(batch_size=16_384, columns=columns):
                    yield pa.Table.from_batches([batch])


def hash_key(seed: int, item_id: str) -> int:
    """The item's place in the seeded order (smaller = drawn first)."""
    return xxhash.xxh3_64_intdigest(f"review:{seed}:{item_id}".encode())


def allocate(sizes: dict[Stratum, int], n: int) -> dict[Stratum, int]:
    """Items per stratum for a sample of `n`: proportional to size (largest remainder), at least one per stratum
    while `n` allows, never more than a stratum holds."""
    total = sum(sizes.values())
    keys = sorted(k for k, v in sizes.items() if v > 0)
    if n >= total:
        return {k: sizes[k] for k in keys}
    alloc = {k: (1 if n >= len(keys) else 0) for k in keys}
    while sum(alloc.values()) < n:
        # The stratum furthest below its proportional share gets the next item (ties: the larger, then the first).
        k = max((k for k in keys if alloc[k] < sizes[k]),
                key=lambda k: (sizes[k] * n / total - alloc[k], sizes[k], -keys.index(k)))
        alloc[k] += 1
    return alloc


def _plan_inputs(step_dir: str) -> list[str]:
    plan = storage.read_json_object(storage.join(step_dir, "_plan.json")) or {}
    return [storage.validate_uri(str(i)) for i in plan.get("inputs", [])]


def _texts(dirs: list[str], ids: set[str]) -> dict[str, str]:
    """First human turn of the records `ids` among the committed steps `dirs`: each part's `id` column is read,
    and its conversations only when it holds one of them."""
    out: dict[str, str] = {}
    if not ids:
        return out
    wanted = pa.array(sorted(ids), pa.string())
    for d in dirs:
        m = read_manifest(step_manifest_uri(d))
        for f in m.files if m is not None else []:
            if f.kind != "data" or not f.rows:
                continue
            with storage.open_input(storage.join(d, f.path)) as fh:
                pf = pq.ParquetFile(fh)
                hit = pc.is_in(pf.read(columns=["id"])["id"], wanted)
                if not pc.any(hit).as_py():
                    continue
                t = pf.read(columns=["id", "conversations"]).filter(hit)
            for rid, conv in zip(t["id"].to_pylist(), t["conversations"].to_pylist(), strict=True):
                out.setdefault(rid, first_exchange(conv)[0])
    return out


def _clip(text: str) -> str:
    text = redact_all(text.strip())
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS].rstrip() + " …"


def build_sample(run_root: str, n: int = DEFAULT_SIZE, seed: int = 0, gate: float = 0.05) -> dict[str, Any]:
    """The review sample of the run at `run_root` (not written): its items, strata sizes and settings."""
    if not 1 <= n <= MAX_SIZE:
        raise ValueError(f"sample size must be 1..{MAX_SIZE}, got {n}")
    steps = evolve_steps(run_root)
    population: dict[Stratum, list[tuple[int, str, str, str, str]]] = {}  # stratum -> (key, id, step, root, parent)
    for step_dir, m in steps:
        name = step_dir.rsplit("/", 1)[-1]
        for t in _tables(step_dir, m, ["id", "lineage"]):
            for rid, lin in zip(t["id"].to_pylist(), t["lineage"].to_pylist(), strict=True):
                lin = lin or {}
                k = (str(lin.get("strategy") or "?"), int(lin.get("round") or 0))
                population.setdefault(k, []).append(
                    (hash_key(seed, rid), rid, name, str(lin.get("root_id") or ""), str(lin.get("parent_id") or "")))
    alloc = allocate({k: len(v) for k, v in population.items()}, n)
    chosen = sorted(((row, k) for k, rows in population.items() for row in sorted(rows)[:alloc.get(k, 0)]))
    # Texts: the evolved items and their parents live in the evolve steps, the seeds in what those steps read.
    own = {row[1] for row, _ in chosen} | {row[4] for row, _ in chosen}
    texts = _texts([d for d, _ in steps], own)
    seed_dirs = list(dict.fromkeys(i for d, _ in steps for i in _plan_inputs(d)))
    texts.update(_texts(seed_dirs, {row[3] for row, _ in chosen} - set(texts)))
    items = []
    for (_, rid, step, root, parent), (strategy, round_) in chosen:
        item = {"id": rid, "step": step, "strategy": strategy, "round": round_, "seed_id": root,
                "seed": _clip(texts.get(root, "")), "evolved": _clip(texts.get(rid, ""))}
        if parent and parent != root:
            item["parent"] = _clip(texts.get(parent, ""))  # round > 1: the version it was evolved from
        items.append(item)
    return {"format": FORMAT, "seed": seed, "size": n, "gate": gate,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "steps": [d.rsplit("/", 1)[-1] for d, _ in steps],
            "strata": [{"strategy": k[0], "round": k[1], "population": len(population[k]), "sampled": alloc.get(k, 0)}
                       for k in sorted(population)],
            "items": items}


def read_sample(run_root: str) -> dict[str, Any] | None:
    """The run's review sample, or None when no review has started."""
    got = storage.read_json_object(sample_uri(run_root))
    return got if got is not None and got.get("format") == FORMAT else None


def load_or_create(run_root: str, n: int = DEFAULT_SIZE, seed: int = 0, gate: float = 0.05) -> dict[str, Any]:
    """The run's review sample, drawn and written on first use. Every reviewer of a run sees one sample: two
    first visitors racing both draw it, and the create-if-absent commit keeps one of the two (equal) samples."""
    got = read_sample(run_root)
    if got is not None:
        return got
    sample = build_sample(run_root, n, seed, gate)
    if not sample["items"]:
        return sample  # nothing to review yet (no evolve step committed): write nothing
    storage.commit_if_absent(sample_uri(run_root), json.dumps(sample, indent=1).encode())
    got = read_sample(run_root)
    assert got is not None
    return got


__all__ = ["DEFAULT_SIZE", "FORMAT", "MAX_SIZE", "SAMPLE_NAME", "allocate", "build_sample", "evolve_steps",
           "hash_key", "load_or_create", "read_sample", "sample_uri"]
