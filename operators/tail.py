"""The tail of a run, spread over shard tasks: validate, export and index a committed step, then commit.

    plan      tail_shards(step_dir) -> [0, n)   n: the step's shards, at most one per data part
    shard k   the data parts i with i % n == k: the great-expectations suite over each part, its exports
              (Parquet, the Hugging Face layout, ShareGPT JSONL), its rows of the id index
              (`ids/bBBBBB/part-i.parquet`, bucketed by id hash), and the same for the run's dedup steps'
              parts (`dedup_index/<step>/part-i.parquet`: the survivors the no-churn rule reads); then
              `_tail/k.json`, the task's summary, written last: the shard's commit
    commit    every shard's summary for this very step commit; id uniqueness bucket by bucket (a repeated
              id repeats its hash, so both copies sit in one bucket); validation.json beside the step; the
              card; `_EXPORT.json`, the export's commit; files of an earlier export that no shard wrote now
              are removed

No task reads more than its shard's parts (the commit reads id hashes one bucket at a time: 8 bytes per
record, 16 MB per bucket), so the tail no longer grows with the corpus: before, validate, export and publish
each read the whole selected set in one task. `publish` then copies the export's Hugging Face files, id index
and survivors into the version folder without moving their bytes through the pod (server-side copies on S3,
hard links on a local disk; operators/datasets/versions.py).

A shard task whose summary already matches the step commit returns it (a retry after its commit); one killed
midway rewrote some files under the same names, and its retry writes them again.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.core import storage
from operators.core.arrays import count_repeats, unique_sorted
from operators.core.manifest import FileEntry, Manifest, read_manifest, step_manifest_uri
from operators.datasets.ids import IDS_SCHEMA, id_buckets, id_hash
from operators.export import FORMATS, ExportError, parquet_bytes, write_card, write_part

log = logging.getLogger("operators.tail")

SUMMARIES = "_tail"
EXPORT_COMMIT = "_EXPORT.json"
# The run's dedup steps whose survivors a published version keeps (the no-churn rule of later runs).
DEDUP_STEPS = ("exact_dedup", "near_dedup", "semantic_dedup")
# Folders the tail writes; only these are swept for files of an earlier export.
WRITTEN = ("parquet/", "hf/data/", "sharegpt/", "ids/", "dedup_index/")


def _committed(step_dir: str) -> tuple[Manifest, str]:
    from operators.validate import step_commit

    m = read_manifest(step_manifest_uri(step_dir))
    if m is None:
        raise ExportError(f"no committed step at {step_dir}")
    return m, step_commit(step_dir)


def tail_shards(step_dir: str) -> list[int]:
    """The tail's shard tasks for a committed step: one per shard of the step's plan (so the tail is as wide
    as the step before it), at most one per data part, at least one."""
    step_dir = storage.validate_uri(step_dir)
    m, _ = _committed(step_dir)
    return list(range(_shard_count(step_dir, m)))


def _shard_count(step_dir: str, m: Manifest) -> int:
    from operators.core.runner import StepFailed, load_plan

    try:
        planned = len(load_plan(step_dir).shards)
    except StepFailed:  # a step committed without a plan file (made by hand, or by an older version)
        planned = 1
    return max(1, min(planned, len(m.data_files())))


def tail_to_run(step_dir: str, out_dir: str, formats: tuple[str, ...] = FORMATS, validate: bool = True
                ) -> list[int]:
    """The shard tasks still to run: none when the export is committed for this very step commit (a night
    with nothing new: the shard tasks skip, and the commit finds its `_EXPORT.json`), else every one."""
    return [] if _export_done(step_dir, out_dir, formats, validate) else tail_shards(step_dir)


def _summary_uri(out_dir: str, shard: int) -> str:
    return storage.join(out_dir, SUMMARIES, f"{shard:05d}.json")


def _read_summary(out_dir: str, shard: int, commit: str, of: int, formats: tuple[str, ...]
                  ) -> dict[str, Any] | None:
    """Shard `shard`'s summary when it was written for this commit, shard count and formats; else None."""
    s = storage.read_json_object(_summary_uri(out_dir, shard))
    if s is None:
        return None
    same = s.get("step_sha256") == commit and s.get("of") == of and tuple(s.get("formats", ())) == formats
    return s if same else None


def _mine(files: list[FileEntry], shard: int, of: int) -> list[tuple[int, FileEntry]]:
    return [(i, f) for i, f in enumerate(files) if i % of == shard]


def _read(step_dir: str, f: FileEntry, columns: list[str] | None = None) -> pa.Table:
    with storage.open_input(storage.join(step_dir, f.path)) as fh:
        return pq.read_table(fh, columns=columns)


def _index_part(table: pa.Table, out_dir: str, index: int, buckets: int) -> tuple[Counter[tuple[str, str]], list[str]]:
    """Part `index`'s rows of the id index, one file per hash bucket; returns (counts by source and domain,
    URIs written). Vectorized per part: a bucket is a slice of the part sorted by bucket."""
    n = table.num_rows
    blank = pa.array([""] * n, pa.string())
    cols = table.column_names
    t = pa.table([table["id"].cast(pa.string()),
                  pc.fill_null(table["source"].cast(pa.string()), "") if "source" in cols else blank,
                  pc.fill_null(table["domain"].cast(pa.string()), "") if "domain" in cols else blank,
                  id_hash(table["id"].to_pylist())], schema=IDS_SCHEMA)
    grouped = t.group_by(["source", "domain"]).aggregate([("id", "count")])
    counts = Counter(dict(zip(zip(grouped["source"].to_pylist(), grouped["domain"].to_pylist(), strict=True),
                              grouped["id_count"].to_pylist(), strict=True)))
    hb = (t["h"].to_numpy() % np.uint64(buckets)).astype(np.int64)
    order = np.argsort(hb, kind="stable")
    edges = np.searchsorted(hb[order], np.arange(buckets + 1))
    by_bucket = t.take(pa.array(order))
    written = []
    for b in range(buckets):
        uri = storage.join(out_dir, "ids", f"b{b:05d}", f"part-{index:05d}.parquet")
        storage.write_bytes(uri, parquet_bytes(by_bucket.slice(edges[b], edges[b + 1] - edges[b])))
        written.append(uri)
    return counts, written


def _survivors(run_root: str, out_dir: str, shard: int, of: int) -> tuple[dict[str, int], list[str]]:
    """The id hashes each dedup step of the run kept, for this shard's share of that step's parts, sorted per
    part; returns (hashes per step, URIs written)."""
    counts: dict[str, int] = {}
    written: list[str] = []
    for step in DEDUP_STEPS:
        d = storage.join(run_root, step)
        m = read_manifest(step_manifest_uri(d))
        if m is None:  # not in this run, or switched off
            continue
        counts[step] = 0
        for i, f in _mine(m.data_files(), shard, of):
            h = unique_sorted(id_hash(_read(d, f, ["id"])["id"].to_pylist()).to_numpy())
            uri = storage.join(out_dir, "dedup_index", step, f"part-{i:05d}.parquet")
            storage.write_bytes(uri, parquet_bytes(pa.table({"h": pa.array(h, pa.uint64())})))
            written.append(uri)
            counts[step] += int(h.size)
    return counts, written


def tail_shard(step_dir: str, out_dir: str, shard: int, *, formats: tuple[str, ...] = FORMATS,
               run_root: str | None = None, validate: bool = True) -> dict[str, Any]:
    """Shard task `shard` of the tail (see the module docstring); returns its summary."""
    step_dir, out_dir = storage.validate_uri(step_dir), storage.validate_uri(out_dir)
    m, commit = _committed(step_dir)
    of = _shard_count(step_dir, m)
    if not 0 <= shard < of:
        raise ExportError(f"shard {shard} out of range: the tail of {step_dir} has {of} shard tasks")
    done = _read_summary(out_dir, shard, commit, of, formats)
    same_run = done is not None and done["run_root"] == (storage.validate_uri(run_root) if run_root else None)
    if done is not None and same_run and (done["validated"] or not validate):
        log.info("tail shard %d of %d: already done for this commit", shard, of)
        return done
    files = m.data_files()
    buckets = id_buckets(sum(f.rows for f in files))
    checks = None
    if validate:
        from operators.validate import PartChecks

        checks = PartChecks()
    counts: Counter[str] = Counter()
    by_source_domain: Counter[tuple[str, str]] = Counter()
    written: list[str] = []
    for i, f in _mine(files, shard, of):
        table = _read(step_dir, f)
        if checks is not None:
            checks.check(f.path, table)
        part_counts, uris = write_part(table, out_dir, i, len(files), formats)
        counts.update(part_counts)
        written += uris
        part_by, uris = _index_part(table, out_dir, i, buckets)
        by_source_domain.update(part_by)
        written += uris
    survivors, uris = _survivors(storage.validate_uri(run_root), out_dir, shard, of) if run_root else ({}, [])
    written += uris
    summary = {"step_dir": step_dir, "step_sha256": commit, "shard": shard, "of": of, "formats": list(formats),
               "run_root": storage.validate_uri(run_root) if run_root else None, "validated": checks is not None,
               "checks": checks.state() if checks is not None else None,
               "counts": {"train": counts["train"], "replay": counts["replay"]}, "id_buckets": buckets,
               "by_source_domain": [[s, d, n] for (s, d), n in sorted(by_source_domain.items())],
               "survivors": survivors, "files": [u[len(out_dir) + 1:] for u in written]}
    storage.write_bytes(_summary_uri(out_dir, shard), json.dumps(summary).encode())
    return summary


def _unique_ids(out_dir: str, buckets: int, parts: set[str]) -> tuple[int, int]:
    """(ids, repeated ids) over the id index `parts` wrote, one bucket in memory at a time."""
    records = repeats = 0
    for b in range(buckets):
        prefix = f"ids/b{b:05d}/"
        hashes = []
        for p in sorted(parts):
            if p.startswith(prefix):
                with storage.open_input(storage.join(out_dir, p)) as fh:
                    hashes.append(pq.read_table(fh, columns=["h"])["h"].to_numpy())
        h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
        records += int(h.size)
        repeats += count_repeats(h)
    return records, repeats


def tail_commit(step_dir: str, out_dir: str, *, formats: tuple[str, ...] = FORMATS, name: str = "dataset",
                validate: bool = True) -> dict[str, Any]:
    """Commit the tail: check every shard's summary, validate run-wide, write the card and `_EXPORT.json`.

    Raises ExportError naming a shard task that has not run for this commit, and ValidationFailed (after
    writing validation.json) when the data broke the suite; the export is then not committed."""
    step_dir, out_dir = storage.validate_uri(step_dir), storage.validate_uri(out_dir)
    done = _export_done(step_dir, out_dir, formats, validate)
    if done is not None:
        log.info("tail of %s: already committed for this commit", step_dir)
        return done
    m, commit = _committed(step_dir)
    of = _shard_count(step_dir, m)
    summaries = []
    for k in range(of):
        s = _read_summary(out_dir, k, commit, of, formats)
        if s is None or (validate and not s["validated"]):
            raise ExportError(f"tail shard {k} of {of} has not run for this commit of {step_dir}: run "
                              f"`python -m operators export --input {step_dir} --output {out_dir} --shard {k}`")
        summaries.append(s)
    parts = {p for s in summaries for p in s["files"]}
    buckets = summaries[0]["id_buckets"]
    if validate:
        from operators.validate import missing_columns, write_validation

        records, repeats = _unique_ids(out_dir, buckets, parts)
        write_validation(step_dir, commit, [s["checks"] for s in summaries], records=records, duplicates=repeats,
                         missing=missing_columns(step_dir))
    counts = {split: sum(s["counts"][split] for s in summaries) for split in ("train", "replay")}
    card = [write_card(out_dir, name, counts)] if "hf" in formats else []
    stale = [u for u in storage.list_files(out_dir)
             if u[len(out_dir) + 1:].startswith(WRITTEN) and u[len(out_dir) + 1:] not in parts]
    for u in stale:
        storage.delete(u)
    by_source_domain: Counter[tuple[str, str]] = Counter()
    survivors: Counter[str] = Counter()
    for s in summaries:
        by_source_domain.update({(src, dom): n for src, dom, n in s["by_source_domain"]})
        survivors.update(s["survivors"])
    files = sorted(storage.join(out_dir, p) for p in parts)
    summary = {"step_dir": step_dir, "out_dir": out_dir, "step_sha256": commit, "formats": list(formats),
               "validated": validate, "run_root": summaries[0]["run_root"], "counts": counts, "shards": of,
               "id_buckets": buckets,
               "split_bytes": {sp: sum(storage.file_size(u) for u in files if f"/hf/data/{sp}-" in u) for sp in counts},
               "by_source_domain": [{"source": s, "domain": d, "records": n}
                                    for (s, d), n in sorted(by_source_domain.items())],
               "dedup_survivors": dict(survivors), "stale_removed": len(stale),
               "files": [u for u in files if "/ids/" not in u and "/dedup_index/" not in u] + card}
    storage.write_bytes(storage.join(out_dir, EXPORT_COMMIT), json.dumps(summary, indent=2).encode())
    return summary


def committed_export(out_dir: str, step_dir: str) -> dict[str, Any] | None:
    """`_EXPORT.json` of `out_dir` when it commits an export of this very step commit; else None."""
    s = storage.read_json_object(storage.join(storage.validate_uri(out_dir), EXPORT_COMMIT))
    if s is None:
        return None
    _, commit = _committed(storage.validate_uri(step_dir))
    return s if s.get("step_sha256") == commit else None


def _export_done(step_dir: str, out_dir: str, formats: tuple[str, ...], validate: bool) -> dict[str, Any] | None:
    """The committed export when it already is what this tail would commit (same step commit and formats,
    validated if asked); else None."""
    done = committed_export(out_dir, step_dir)
    ok = done is not None and tuple(done["formats"]) == formats and (done["validated"] or not validate)
    return done if ok else None


def export_step(step_dir: str, out_dir: str, formats: tuple[str, ...] = FORMATS, name: str = "dataset",
                run_root: str | None = None, validate: bool = False) -> dict[str, Any]:
    """The whole tail in this process: every shard task, then the commit. Returns the commit's summary."""
    for k in tail_shards(step_dir):
        tail_shard(step_dir, out_dir, k, formats=formats, run_root=run_root, validate=validate)
    return tail_commit(step_dir, out_dir, formats=formats, name=name, validate=validate)
