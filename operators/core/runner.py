"""Runs a step over storage: plan the shards, run each shard, reduce. The only place steps meet I/O.

Commit protocol, per shard: clean files a previous failed attempt left, stream input batches through
the pure transform, write bounded parts under a fresh attempt id, check the ledger, then commit the
shard manifest with a create-if-absent write. The reduce checks every shard's manifest and files,
merges stats, checks the ledger again, and commits the step manifest last. A manifest whose config
hash matches means "done": re-runs skip it; one whose hash differs is stale and is redone.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from operators.core import storage
from operators.core.manifest import (
    SHARDS_DIR,
    STATS_NAME,
    FileEntry,
    Manifest,
    config_hash,
    read_manifest,
    shard_manifest_uri,
    step_manifest_uri,
)
from operators.core.stats import LedgerError, StepStats, merge, peak_rss_mb
from operators.core.step import REASON, Plan, Step
from operators.core.writer import PartWriter

log = logging.getLogger("operators.runner")

PLAN_NAME = "_plan.json"
PROGRESS_EVERY_S = 10.0


class StepFailed(RuntimeError):
    """A step could not complete; the message says which shard and why."""


def plan_uri(step_dir: str) -> str:
    return storage.join(step_dir, PLAN_NAME)


def make_plan(step: Step[Any], inputs: list[str], step_dir: str) -> Plan:
    """List the inputs, group them into shards and persist the plan so every shard task agrees on it.

    A committed step output with a different config hash is stale: its step manifest is removed so the
    reduce will commit afresh (shard outputs are replaced shard by shard).
    """
    step_dir = storage.validate_uri(step_dir)
    files = step.resolve_inputs(inputs)
    shards = step.group_shards(files)
    cfg = step.config.model_dump(mode="json")
    chash = config_hash(step.name, step.version, cfg, [f"{u}:{s}" for u, s in files])
    plan = Plan(step=step.name, config_hash=chash, config=cfg, inputs=list(inputs), shards=shards)
    current = read_manifest(step_manifest_uri(step_dir))
    if current is not None and current.config_hash != chash:
        log.info("step %s: committed output has config hash %s, new plan %s: recomputing",
                 step.name, current.config_hash, chash)
        storage.delete(step_manifest_uri(step_dir))
    storage.write_bytes(plan_uri(step_dir), plan.model_dump_json(indent=2).encode())
    total = sum(s.bytes for s in shards)
    log.info("step %s: planned %d shard(s) over %d file(s), %.1f MiB, config hash %s",
             step.name, len(shards), len(files), total / 2**20, chash)
    return plan


def load_plan(step_dir: str) -> Plan:
    """The plan persisted by `make_plan`, or a clear error if planning never ran."""
    uri = plan_uri(step_dir)
    if not storage.exists(uri):
        raise StepFailed(f"no plan at {uri}: run `python -m operators plan ...` first")
    return Plan.model_validate_json(storage.read_bytes(uri))


def _cleanup_uncommitted(step_dir: str, shard: int, keep: set[str]) -> int:
    """Delete files of `shard` that no committed manifest lists (left by a crashed attempt)."""
    removed = 0
    prefix = f"part-{shard:05d}-"
    for uri in storage.list_files(step_dir):
        rel = uri[len(step_dir) + 1:]
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(prefix) and rel not in keep:
            storage.delete(uri)
            removed += 1
    return removed


def run_shard(step: Step[Any], step_dir: str, plan: Plan, shard_index: int) -> Manifest:
    """Run one shard of a planned step and commit its manifest (or return the committed one)."""
    step_dir = storage.validate_uri(step_dir)
    if not 0 <= shard_index < len(plan.shards):
        raise StepFailed(f"shard {shard_index} out of range: plan has {len(plan.shards)} shard(s)")
    if step.config.model_dump(mode="json") != plan.config:
        raise StepFailed(f"step {step.name}: config differs from the one planned in {plan_uri(step_dir)}; "
                         "re-run the plan with this config")
    spec = plan.shards[shard_index]
    m_uri = shard_manifest_uri(step_dir, shard_index)
    existing = read_manifest(m_uri)
    if existing is not None and existing.config_hash == plan.config_hash:
        log.info("step %s shard %d: already committed (%d kept), skipping",
                 step.name, shard_index, existing.stats.records_kept)
        return existing
    if existing is not None:
        storage.delete(m_uri)
    removed = _cleanup_uncommitted(step_dir, shard_index, keep=set())
    if removed:
        log.info("step %s shard %d: removed %d file(s) of an earlier uncommitted attempt",
                 step.name, shard_index, removed)

    attempt = uuid.uuid4().hex[:8]
    cfg = step.config
    kept_w = PartWriter(step_dir, shard_index, attempt, "data", cfg.max_part_rows, cfg.max_part_bytes)
    drop_w = PartWriter(step_dir, shard_index, attempt, "dropped", cfg.max_part_rows, cfg.max_part_bytes,
                        subdir="dropped")
    stats = StepStats(step=step.name, bytes_in=spec.bytes)
    reasons: Counter[str] = Counter()
    counters: Counter[str] = Counter()
    t0 = last = time.perf_counter()
    log.info("step %s shard %d: reading %d file(s), %.1f MiB", step.name, shard_index, len(spec.uris),
             spec.bytes / 2**20)
    for batch in step.read(spec):
        result = step.transform(batch)
        out_rows = result.kept.num_rows + result.dropped.num_rows
        if out_rows != batch.num_rows:
            raise LedgerError(
                f"step {step.name} shard {shard_index}: a batch of {batch.num_rows} records came out as "
                f"{result.kept.num_rows} kept + {result.dropped.num_rows} dropped"
            )
        stats.records_in += batch.num_rows
        kept_w.write(result.kept)
        if result.dropped.num_rows:
            drop_w.write(result.dropped)
            for item in pc.value_counts(result.dropped.column(REASON)).to_pylist():
                reasons[str(item["values"])] += int(item["counts"])
        counters.update(result.counters)
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            log.info("step %s shard %d: %d read, %d kept, %d dropped, %.0f records/s", step.name,
                     shard_index, stats.records_in, kept_w.rows_written, sum(reasons.values()),
                     stats.records_in / (now - t0))
    files: list[FileEntry] = kept_w.close() + drop_w.close()
    stats.records_kept = sum(f.rows for f in files if f.kind == "data")
    written_dropped = sum(f.rows for f in files if f.kind == "dropped")
    stats.dropped_by_reason = dict(sorted(reasons.items()))
    stats.counters = dict(sorted(counters.items()))
    stats.bytes_out = sum(f.bytes for f in files)
    stats.seconds = round(time.perf_counter() - t0, 3)
    stats.peak_rss_mb = peak_rss_mb()
    stats.check_ledger()
    if written_dropped != stats.records_dropped:
        raise LedgerError(f"step {step.name} shard {shard_index}: {stats.records_dropped} dropped records "
                          f"counted but {written_dropped} written to dropped/")
    manifest = Manifest(step=step.name, config_hash=plan.config_hash, shard=shard_index, attempt=attempt,
                        files=files, stats=stats)
    lost = [f.path for f in files if not storage.exists(storage.join(step_dir, f.path))]
    if lost:  # a concurrent attempt's cleanup removed our files: never commit a manifest that lies
        raise StepFailed(f"step {step.name} shard {shard_index}: {len(lost)} file(s) of attempt {attempt} "
                         f"vanished before commit (a concurrent attempt?); retry the shard")
    if not storage.commit_if_absent(m_uri, manifest.to_bytes()):
        for f in files:  # we lost the race: our files are orphans, the winner's are the truth
            storage.delete(storage.join(step_dir, f.path))
        winner = read_manifest(m_uri)
        if winner is None or winner.config_hash != plan.config_hash:
            raise StepFailed(f"shard {shard_index}: another writer committed a different output")
        log.info("step %s shard %d: another attempt committed first (%s); using it", step.name,
                 shard_index, winner.attempt)
        return winner
    log.info("step %s shard %d: read %d, kept %d, dropped %d %s in %.1fs (%.0f records/s), peak %.0f MiB",
             step.name, shard_index, stats.records_in, stats.records_kept, stats.records_dropped,
             stats.dropped_by_reason, stats.seconds, stats.records_in / max(stats.seconds, 1e-9),
             stats.peak_rss_mb)
    return manifest


def _file_ok(step_dir: str, f: FileEntry) -> bool:
    uri = storage.join(step_dir, f.path)
    return storage.exists(uri) and storage.file_size(uri) == f.bytes


def reduce_step(step_name: str, step_dir: str) -> Manifest:
    """Check every shard's commit, merge stats, check the ledger, and commit the step manifest."""
    step_dir = storage.validate_uri(step_dir)
    plan = load_plan(step_dir)
    current = read_manifest(step_manifest_uri(step_dir))
    if current is not None and current.config_hash == plan.config_hash:
        log.info("step %s: already committed, skipping reduce", step_name)
        return current
    shard_manifests: list[Manifest] = []
    missing: list[int] = []
    for spec in plan.shards:
        m = read_manifest(shard_manifest_uri(step_dir, spec.index))
        if m is None or m.config_hash != plan.config_hash:
            missing.append(spec.index)
        else:
            shard_manifests.append(m)
    if missing:
        raise StepFailed(f"step {step_name}: shard(s) {missing[:20]} not committed for config "
                         f"{plan.config_hash}; re-run them before the reduce")
    broken = [m.shard for m in shard_manifests if not all(_file_ok(step_dir, f) for f in m.files)]
    if broken:
        # Uncommit the damaged shards so that re-running them repairs the step.
        for shard in broken:
            storage.delete(shard_manifest_uri(step_dir, shard if shard is not None else -1))
        raise StepFailed(f"step {step_name}: committed files of shard(s) {broken} are missing or have the wrong "
                         "size; those shards were uncommitted, re-run them and the reduce")
    files = [f for m in shard_manifests for f in m.files]
    stats = merge(m.stats for m in shard_manifests)
    stats.check_ledger()
    listed = {f.path for f in files}
    for uri in storage.list_files(step_dir):  # garbage: parts of stale or lost attempts
        rel = uri[len(step_dir) + 1:]
        if rel.rsplit("/", 1)[-1].startswith("part-") and rel not in listed:
            storage.delete(uri)
    storage.write_bytes(storage.join(step_dir, STATS_NAME), stats.model_dump_json(indent=2).encode())
    manifest = Manifest(step=step_name, config_hash=plan.config_hash, files=files, stats=stats)
    if current is not None:
        storage.delete(step_manifest_uri(step_dir))
    if not storage.commit_if_absent(step_manifest_uri(step_dir), manifest.to_bytes()):
        winner = read_manifest(step_manifest_uri(step_dir))
        if winner is None or winner.config_hash != plan.config_hash:
            raise StepFailed(f"step {step_name}: another writer committed a different step manifest")
        return winner
    log.info("step %s: committed %d shard(s): in %d, kept %d, dropped %d %s", step_name, len(plan.shards),
             stats.records_in, stats.records_kept, stats.records_dropped, stats.dropped_by_reason)
    return manifest


def run_all(step: Step[Any], inputs: list[str], step_dir: str) -> Manifest:
    """Plan, run every shard in this process, reduce: the whole step without an orchestrator."""
    plan = make_plan(step, inputs, step_dir)
    for spec in plan.shards:
        run_shard(step, step_dir, plan, spec.index)
    return reduce_step(step.name, step_dir)


def read_step_table(step_dir: str, kind: str = "data") -> pa.Table:
    """Read a committed step's output (small outputs only: tests, reports, samples)."""
    import pyarrow.parquet as pq

    m = read_manifest(step_manifest_uri(step_dir))
    if m is None:
        raise StepFailed(f"no committed step at {step_dir}")
    tables = []
    for f in m.files:
        if f.kind == kind:
            with storage.open_input(storage.join(step_dir, f.path)) as fh:
                tables.append(pq.read_table(fh))
    return pa.concat_tables(tables) if tables else pa.table({})


__all__ = ["SHARDS_DIR", "StepFailed", "load_plan", "make_plan", "read_step_table", "reduce_step",
           "run_all", "run_shard"]
