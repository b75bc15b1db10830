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
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from operators.core import faults, storage
from operators.core.manifest import (
    SHARDS_DIR,
    STATS_NAME,
    FileEntry,
    Manifest,
    config_hash,
    read_manifest,
    read_off,
    shard_manifest_uri,
    stage_dir,
    step_manifest_uri,
)
from operators.core.stats import LedgerError, StepStats, merge, peak_rss_mb
from operators.core.step import (
    REASON,
    SHARD_ROWS,
    Plan,
    Stage,
    StageRows,
    Step,
    aligned_groups,
    extend_shards,
    shard_key,
    shuffle_dir,
    slot_partitions,
)
from operators.core.writer import PartWriter, part_shard

log = logging.getLogger("operators.runner")

PLAN_NAME = "_plan.json"
# A reduce stage's last committed manifest, kept (with its files) while the stage recomputes for a new plan, so a
# step can keep earlier decisions (select's and dsir's `freeze`); removed once the new output is committed.
PREVIOUS_NAME = "_PREVIOUS.json"
PROGRESS_EVERY_S = 10.0
# Config hash prefix of an output a fused task computed before its step was planned (`operators.core.fusion`):
# the plan commits it under its own hash when the content keys agree.
PREPARED = "prepared:"


class StepFailed(RuntimeError):
    """A step could not complete; the message says which shard and why."""


def plan_uri(step_dir: str) -> str:
    return storage.join(step_dir, PLAN_NAME)


def make_plan(step: Step[Any], inputs: list[str], step_dir: str, aligned: bool = False) -> Plan:
    """List the inputs, group them into shards and persist the plan so every shard task agrees on it.

    `aligned` (a step in a chain, reading one committed upstream step): shard k is the upstream's shard k's
    output, so that a fused task can run shard k of both (`operators.core.fusion`) and every step of a chain
    has the chain head's shard count. A committed step output with a different config hash is stale: its step
    manifest is removed so the reduce will commit afresh (shard outputs are replaced shard by shard).
    """
    step_dir = storage.validate_uri(step_dir)
    files = step.resolve_inputs(inputs)
    cfg, base = step_identity(step)
    shards = None
    previous = _previous_plan(step_dir)
    upstream = upstream_shard_count(inputs) if aligned else None
    if upstream is not None:
        shards = aligned_groups(files, upstream)
    elif previous is not None and previous.base_hash == base:
        # Same code and config over more inputs (a night's new files): old shards keep their files and
        # indices, so their committed outputs are reused by content key; only new shards do work.
        shards = extend_shards(previous.shards, files, step.group_shards)
    if shards is None:
        shards = step.group_shards(files)
    step.num_shards = len(shards)
    chash = config_hash(step.name, step.version, cfg, [f"{u}:{s}" for u, s in files])
    plan = Plan(step=step.name, config_hash=chash, config=cfg, inputs=list(inputs), shards=shards, base_hash=base)
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


def step_identity(step: Step[Any]) -> tuple[dict[str, Any], str]:
    """A step's config as plans record it, and the hash of its code and config without inputs (`Plan.base_hash`):
    a plan and a fused task's provisional plan must agree on both for their content keys to agree."""
    cfg = step.config.model_dump(mode="json")
    return cfg, config_hash(step.name, step.version, cfg, [])


def committed_upstream(inputs: list[str]) -> str | None:
    """The one committed step directory `inputs` read (through steps that are off), or None (several inputs,
    or not a committed step: raw files, a source folder)."""
    seen: set[str] = set()
    while len(inputs) == 1 and inputs[0] not in seen:
        uri = storage.validate_uri(inputs[0])
        seen.add(uri)
        if read_manifest(step_manifest_uri(uri)) is not None:
            return uri
        passed_on = read_off(uri)
        if passed_on is None:
            return None
        inputs = passed_on
    return None


def upstream_shard_count(inputs: list[str]) -> int | None:
    """How many shards the one committed upstream step of `inputs` planned, or None (see `committed_upstream`)."""
    upstream = committed_upstream(inputs)
    return None if upstream is None else len(load_plan(upstream).shards)


def shards_to_run(plan: Plan, step_dir: str) -> list[int]:
    """The shard indices whose tasks have work to do under `plan`: none when the step is already committed under
    this plan's config hash (same code, config and input files), else every shard.

    A DAG maps its stage and shard tasks over this list, so a step that is up to date (a night with nothing new,
    a cleared run re-run, the second of two racing runs) costs its plan and reduce tasks, not one task per shard
    and stage, each a process or a pod start that would only find its commit and exit. The test is the one the
    reduce makes before skipping."""
    current = read_manifest(step_manifest_uri(storage.validate_uri(step_dir)))
    if current is not None and current.config_hash == plan.config_hash:
        log.info("step %s: already committed under this plan (config hash %s): up to date, its %d shard task(s) "
                 "and stage tasks skip", plan.step, plan.config_hash, len(plan.shards))
        return []
    return [s.index for s in plan.shards]


def _previous_plan(step_dir: str) -> Plan | None:
    """The plan an earlier run left in `step_dir`, or None (none, or unreadable: then plan afresh)."""
    uri = plan_uri(step_dir)
    if not storage.exists(uri):
        return None
    try:
        return Plan.model_validate_json(storage.read_bytes(uri))
    except ValueError:
        log.warning("ignoring unreadable earlier plan %s", uri)
        return None


def _reuse(m_uri: str, existing: Manifest | None, key: str | None, plan: Plan, folder: str,
           what: str) -> Manifest | None:
    """Re-commit `existing` for this plan when its content key is `key` and its files are intact; else None.

    The files stay where they are: the new manifest lists the same files under the new config hash, and
    `reused_from` says that no work was done (the stats still describe the output)."""
    if existing is None or key is None or existing.shard_key != key:
        return None
    if not all(_file_ok(folder, f) for f in existing.files):
        return None
    # Work a fused task did ahead of this plan (`operators.core.fusion`) was done for it: no reuse to report,
    # unless that task itself reused an earlier commit.
    prepared = existing.config_hash.startswith(PREPARED)
    reused = existing.model_copy(update={
        "config_hash": plan.config_hash,
        "reused_from": existing.reused_from if prepared else existing.reused_from or existing.config_hash})
    storage.write_bytes(m_uri, reused.to_bytes())
    if prepared:
        log.info("%s: prepared by the upstream's shard task (key %s): committing it", what, key)
    else:
        log.info("%s: input and config unchanged (key %s): reusing its committed output", what, key)
    return reused


def load_plan(step_dir: str) -> Plan:
    """The plan persisted by `make_plan`, or a clear error if planning never ran."""
    uri = plan_uri(step_dir)
    if not storage.exists(uri):
        raise StepFailed(f"no plan at {uri}: run `python -m operators plan ...` first")
    return Plan.model_validate_json(storage.read_bytes(uri))


def _part_files(folder: str, subdirs: tuple[str, ...] = ("",)) -> list[tuple[str, str]]:
    """(uri, path relative to `folder`) of part files directly in `folder` or its given subfolders."""
    out = []
    for uri in storage.list_files(folder):
        rel = uri[len(folder) + 1:]
        parent, _, name = rel.rpartition("/")
        if name.startswith("part-") and parent in subdirs:
            out.append((uri, rel))
    return out


def _sweep(folder: str, keep: set[str], shard: int | None = None, subdirs: tuple[str, ...] = ("", "dropped"),
           shuffled: bool = False) -> int:
    """Delete part files in `folder` (of `shard`, or of every shard) whose paths are not in `keep` (what the
    committed manifests list): parts of crashed attempts, of an attempt that lost the commit race, of a stale
    output.

    Runs only after the manifest is committed, never before an attempt starts: a sweep before writing could
    delete the files of a concurrent attempt that commits in between, leaving a committed manifest whose files
    are gone. After the commit, any other attempt of this shard loses its commit and adopts this manifest
    (and one whose files were swept before its commit notices, see `_commit_written`).
    With `shuffled`, also the partition subfolders a shuffling map stage writes."""
    removed = 0
    prefix = "part-" if shard is None else f"part-{shard:05d}-"
    if shuffled:
        parents = {uri[len(folder) + 1:].rpartition("/")[0] for uri in storage.list_files(folder)}
        subdirs = subdirs + tuple(sorted(p for p in parents if p.startswith("p") and p[1:].isdigit()))
    for uri, rel in _part_files(folder, subdirs):
        if rel.rpartition("/")[2].startswith(prefix) and rel not in keep:
            storage.delete(uri)
            removed += 1
    return removed


def _commit_written(uri: str, manifest: Manifest, folder: str, what: str, sweep: dict[str, Any]) -> Manifest:
    """Commit a manifest of files this attempt wrote, then sweep the folder's leftovers (`sweep`: `_sweep`'s
    keyword arguments). If some of those files vanished before the commit (a concurrent attempt committed
    and swept them), adopt that attempt's committed manifest: never commit a manifest whose files are gone."""
    lost = [f.path for f in manifest.files if not storage.exists(storage.join(folder, f.path))]
    if lost:
        winner = read_manifest(uri)
        if winner is None or winner.config_hash != manifest.config_hash:
            raise StepFailed(f"{what}: {len(lost)} file(s) of attempt {manifest.attempt} vanished before commit "
                             "and no other attempt committed; retry it")
        for f in manifest.files:
            storage.delete(storage.join(folder, f.path))
        log.info("%s: another attempt committed first (%s) and swept ours; using it", what, winner.attempt)
        return winner
    committed = _commit(uri, manifest, folder, what)
    removed = _sweep(folder, {f.path for f in committed.files}, **sweep)
    if removed:
        log.info("%s: removed %d file(s) of other, uncommitted attempts", what, removed)
    return committed


def run_shard(step: Step[Any], step_dir: str, plan: Plan, shard_index: int) -> Manifest:
    """Run one shard of a planned step and commit its manifest (or return the committed one)."""
    step_dir = storage.validate_uri(step_dir)
    if not 0 <= shard_index < len(plan.shards):
        raise StepFailed(f"shard {shard_index} out of range: plan has {len(plan.shards)} shard(s)")
    m_uri, done, key, stale = _open_shard(step, step_dir, plan, shard_index)
    if done is not None:
        return done
    if stale:  # another plan's commit, or a prepared one whose key differs (never a concurrent attempt's new one)
        storage.delete(m_uri)
    artifacts = StorageArtifacts(step_dir)
    step.begin_shard(shard_index)
    step.bind(artifacts, shard_index)
    attempt = uuid.uuid4().hex[:8]
    step.open_shard(step_dir, shard_index, attempt)
    try:
        with _parts_freed_when_full(step_dir, attempt, f"step {step.name} shard {shard_index}"):
            return _run_open_shard(step, step_dir, plan, shard_index, attempt, m_uri, key)
    finally:
        step.close_shard()


def _open_shard(step: Step[Any], step_dir: str, plan: Plan, shard_index: int
                ) -> tuple[str, Manifest | None, str | None, bool]:
    """Checks before a shard's transform: (manifest URI, its commit under `plan` if done or reusable by content
    key, the shard's content key, whether a stale commit is in the way)."""
    _bind_plan(step, step_dir, plan)
    m_uri = shard_manifest_uri(step_dir, shard_index)
    existing = read_manifest(m_uri)
    if existing is not None and existing.config_hash == plan.config_hash:
        log.info("step %s shard %d: already committed (%d kept), skipping",
                 step.name, shard_index, existing.stats.records_kept)
        return m_uri, existing, existing.shard_key, False
    _require_stages(step, step_dir, plan)
    digest = step.transform_digest(StorageArtifacts(step_dir), shard_index)
    key = None if digest is None else shard_key(plan, plan.shards[shard_index], "transform", digest)
    reused = _reuse(m_uri, existing, key, plan, step_dir, f"step {step.name} shard {shard_index}")
    return m_uri, reused, key, reused is None and existing is not None


def adopt_shard(step: Step[Any], step_dir: str, plan: Plan, shard_index: int, stage: str | None = None) -> bool:
    """Whether the shard's head (its record transform, or map stage `stage`) is committed under `plan` once this
    returns: already, or now, because a fused task prepared it (or an earlier plan committed it) under the same
    content key. False: it still has to run. Reads and commits manifests only."""
    if stage is None:
        return _open_shard(step, step_dir, plan, shard_index)[1] is not None
    return _open_stage_shard(step, step_dir, plan, stage, "map", shard_index, delete=False)[2] is not None


@contextmanager
def _parts_freed_when_full(folder: str, attempt: str, what: str) -> Iterator[None]:
    """On a full disk, delete the part files this attempt wrote before failing. It covers the parts' writes and
    their commit (a manifest that finds no space is not committed either); nothing is written after a commit.

    They are uncommitted, and only this attempt writes files with its id, so nothing else can be using them;
    left in place they would hold on to the space an operator frees for the retry. (An LLM step's cache
    segments are not part files: they stay, and the retry takes its paid results from them.)"""
    try:
        yield
    except storage.StorageFull:
        suffix = f"-{attempt}.parquet"
        mine = [u for u in storage.list_files(folder) if u.rpartition("/")[2].startswith("part-")
                and u.endswith(suffix)]
        for uri in mine:
            storage.delete(uri)
        log.warning("%s: the disk is full; removed this attempt's %d uncommitted part file(s)", what, len(mine))
        raise


def _run_open_shard(step: Step[Any], step_dir: str, plan: Plan, shard_index: int, attempt: str,
                    m_uri: str, key: str | None) -> Manifest:
    spec = plan.shards[shard_index]
    cfg = step.config
    kept_w = PartWriter(step_dir, shard_index, attempt, "data", cfg.max_part_rows, cfg.max_part_bytes)
    drop_w = PartWriter(step_dir, shard_index, attempt, "dropped", cfg.max_part_rows, cfg.max_part_bytes,
                        subdir="dropped")
    stats = StepStats(step=step.name, bytes_in=spec.bytes)
    reasons: Counter[str] = Counter()
    counters: Counter[str] = Counter()
    fanout = step.outputs_per_input()
    t0 = last = time.perf_counter()
    log.info("step %s shard %d: reading %d file(s), %.1f MiB", step.name, shard_index, len(spec.uris),
             spec.bytes / 2**20)
    for batch in step.read(spec):
        result = step.transform(batch)
        out_rows = result.kept.num_rows + result.dropped.num_rows
        if out_rows != batch.num_rows * fanout:
            raise LedgerError(
                f"step {step.name} shard {shard_index}: a batch of {batch.num_rows} records"
                f"{f' x {fanout} candidates' if fanout > 1 else ''} came out as "
                f"{result.kept.num_rows} kept + {result.dropped.num_rows} dropped"
            )
        stats.records_in += batch.num_rows * fanout
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
                        files=files, stats=stats, shard_key=key)
    committed = _commit_written(m_uri, manifest, step_dir, f"step {step.name} shard {shard_index}",
                                {"shard": shard_index})
    if committed is not manifest:
        return committed
    log.info("step %s shard %d: read %d, kept %d, dropped %d %s in %.1fs (%.0f records/s), peak %.0f MiB",
             step.name, shard_index, stats.records_in, stats.records_kept, stats.records_dropped,
             stats.dropped_by_reason, stats.seconds, stats.records_in / max(stats.seconds, 1e-9),
             stats.peak_rss_mb)
    return manifest


def _stage_counters(step_name: str, step_dir: str) -> dict[str, float]:
    """Numbers from reduce-stage summaries (duplicates found, KL reduction, ...) for the step's stats."""
    out: dict[str, float] = {}
    from operators.core.registry import step_class  # local: the registry imports step modules

    try:
        cls = step_class(step_name)
    except KeyError:
        return out
    # Map tasks count only in steps that say what (reading every shard's manifest costs a read per shard).
    kinds = ("partition", "map") if cls.stage_counters is not Step.stage_counters else ("partition",)
    for st in cls.stages:
        if st.kind in kinds:  # counters of its tasks, summed (tasks may count partitions of none)
            summed: Counter[str] = Counter()
            for uri in storage.list_files(storage.join(stage_dir(step_dir, st.name), SHARDS_DIR)):
                if (sm := read_manifest(uri)) is not None:
                    summed.update(sm.stats.counters)
            out.update({f"{st.name}.{k}": float(v) for k, v in sorted(summed.items())})
        if st.kind != "reduce":
            continue
        m = read_manifest(step_manifest_uri(stage_dir(step_dir, st.name)))
        for key, value in (m.summary if m else {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{st.name}.{key}"] = float(value)
            elif isinstance(value, dict):
                out.update({f"{st.name}.{key}.{k}": float(v) for k, v in value.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)})
    return out


# A local write renames its temp file within seconds; one this old was left by a killed writer. Young ones may
# belong to a straggling concurrent attempt, so they stay (no reader lists them either way).
TEMP_MAX_AGE_S = 900.0


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
    stats.counters.update(_stage_counters(step_name, step_dir))
    reused = sum(m.reused_from is not None for m in shard_manifests)
    if reused:  # only incremental runs carry it: a full run's stats stay as they were
        stats.counters["shards_reused"] = float(reused)
    _sweep(step_dir, {f.path for f in files})  # garbage: parts of stale or lost attempts
    swept = storage.sweep_temp_files(step_dir, TEMP_MAX_AGE_S)
    if swept:
        log.info("step %s: removed %d temp file(s) that killed writers left", step_name, swept)
    storage.write_bytes(storage.join(step_dir, STATS_NAME), stats.model_dump_json(indent=2).encode())
    manifest = Manifest(step=step_name, config_hash=plan.config_hash, files=files, stats=stats)
    if current is not None:
        storage.delete(step_manifest_uri(step_dir))
    committed = _commit(step_manifest_uri(step_dir), manifest, step_dir, f"step {step_name}", owns_files=False)
    if committed is not manifest:
        return committed
    log.info("step %s: committed %d shard(s): in %d, kept %d, dropped %d %s", step_name, len(plan.shards),
             stats.records_in, stats.records_kept, stats.records_dropped, stats.dropped_by_reason)
    return manifest


def run_all(step: Step[Any], inputs: list[str], step_dir: str) -> Manifest:
    """Plan, run every stage and shard in this process, reduce: the whole step without an orchestrator."""
    plan = make_plan(step, inputs, step_dir)
    for stage in step.stages:
        if stage.kind in ("map", "partition"):
            run_one = run_map_stage if stage.kind == "map" else run_partition_stage
            for spec in plan.shards:
                run_one(step, step_dir, plan, stage.name, spec.index)
        else:
            run_reduce_stage(step, step_dir, plan, stage.name)
        faults.point("stage.done")  # between stages: this one committed, the next not started
    for spec in plan.shards:
        run_shard(step, step_dir, plan, spec.index)
    faults.point("stage.done")
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


def _bind_plan(step: Step[Any], step_dir: str, plan: Plan) -> None:
    """Fail unless the step's config is the planned one; then tell the step how many shards the plan has."""
    if step.config.model_dump(mode="json") != plan.config:
        raise StepFailed(f"step {step.name}: config differs from the one planned in {plan_uri(step_dir)}; "
                         "re-run the plan with this config")
    step.num_shards = len(plan.shards)


def _stage(step: Step[Any], name: str, kind: str) -> Stage:
    for st in step.stages:
        if st.name == name and st.kind == kind:
            return st
    raise StepFailed(f"step {step.name} has no {kind} stage {name!r}; stages: {[s.name for s in step.stages]}")


def _require_stages(step: Step[Any], step_dir: str, plan: Plan, before: str | None = None) -> None:
    """Fail clearly unless every stage before `before` (or all stages) is committed for this plan."""
    for st in step.stages:
        if st.name == before:
            return
        sdir = stage_dir(step_dir, st.name)
        if st.kind == "reduce":
            m = read_manifest(step_manifest_uri(sdir))
            if m is None or m.config_hash != plan.config_hash:
                raise StepFailed(f"step {step.name}: stage {st.name!r} is not committed; run it first")
        else:
            missing = [s.index for s in plan.shards
                       if (m := read_manifest(shard_manifest_uri(sdir, s.index))) is None
                       or m.config_hash != plan.config_hash]
            if missing:
                raise StepFailed(f"step {step.name}: stage {st.name!r} shard(s) {missing[:20]} not committed")


class StorageArtifacts:
    """Committed stage outputs of one step directory, read lazily from storage."""

    def __init__(self, step_dir: str) -> None:
        self.step_dir = step_dir
        # Committed stages never change under a reader, so their file lists are listed once (a partition
        # task asks for them once per partition; listing S shard manifests each time would cost S x P).
        self._listed: dict[str, list[FileEntry]] = {}

    def _files(self, stage: str) -> list[FileEntry]:
        if stage not in self._listed:
            self._listed[stage] = self._list_files(stage)
        return self._listed[stage]

    def _list_files(self, stage: str) -> list[FileEntry]:
        sdir = stage_dir(self.step_dir, stage)
        reduced = read_manifest(step_manifest_uri(sdir))
        if reduced is not None:
            return reduced.files
        files: list[FileEntry] = []
        for uri in storage.list_files(storage.join(sdir, SHARDS_DIR)):
            m = read_manifest(uri)
            if m is not None:
                files.extend(m.files)
        return files

    def _read(self, stage: str, rel: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        with storage.open_input(storage.join(stage_dir(self.step_dir, stage), rel)) as fh:
            return pq.read_table(fh, columns=columns)

    def iter_tables(self, stage: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for f in self._files(stage):
            if "/" not in f.path:  # a shuffling stage's partitions are read with `shuffled`
                yield self._read(stage, f.path, columns)

    def partition(self, stage: str, shard: int) -> pa.Table | None:
        prefix = f"part-{shard:05d}-"
        tables = [self._read(stage, f.path) for f in self._files(stage) if f.path.startswith(prefix)]
        return pa.concat_tables(tables) if tables else None

    def shard_rows(self, stage: str, shard: int) -> Iterator[pa.Table]:
        m = read_manifest(shard_manifest_uri(stage_dir(self.step_dir, stage), shard))
        for f in m.files if m is not None else []:
            if "/" not in f.path:
                yield self._read(stage, f.path)

    def records_in(self, stage: str) -> int:
        total = 0
        for uri in storage.list_files(storage.join(stage_dir(self.step_dir, stage), SHARDS_DIR)):
            m = read_manifest(uri)
            total += m.stats.records_in if m is not None else 0
        return total

    def shard_keys(self, stage: str) -> dict[int, str | None]:
        out: dict[int, str | None] = {}
        for uri in storage.list_files(storage.join(stage_dir(self.step_dir, stage), SHARDS_DIR)):
            m = read_manifest(uri)
            if m is not None and m.shard is not None:
                out[m.shard] = m.shard_key
        return out

    def _previous(self, stage: str) -> Manifest | None:
        return read_manifest(storage.join(stage_dir(self.step_dir, stage), PREVIOUS_NAME))

    def previous_summary(self, stage: str) -> dict[str, Any] | None:
        m = self._previous(stage)
        return None if m is None else m.summary

    def previous_partition(self, stage: str, shard: int) -> pa.Table | None:
        m = self._previous(stage)
        prefix = f"part-{shard:05d}-"
        tables = [self._read(stage, f.path) for f in (m.files if m else []) if f.path.startswith(prefix)]
        return pa.concat_tables(tables) if tables else None

    def shuffled(self, stage: str, partition: int, shards: Collection[int] | None = None) -> Iterator[pa.Table]:
        prefix = shuffle_dir(partition) + "/"
        for f in self._files(stage):
            # Shuffled parts are `pNNNNN/part-<shard>-...`, written by their shard's task.
            if f.path.startswith(prefix) and (shards is None or part_shard(f.path) in shards):
                yield self._read(stage, f.path)

    def summary(self, stage: str) -> dict[str, Any]:
        m = read_manifest(step_manifest_uri(stage_dir(self.step_dir, stage)))
        if m is None:
            raise StepFailed(f"stage {stage!r} of {self.step_dir} is not committed")
        return m.summary


def _commit(uri: str, manifest: Manifest, folder: str, what: str, owns_files: bool = True) -> Manifest:
    """Commit `manifest` at `uri` (create-if-absent); on a lost race adopt the winner's.

    When this attempt wrote the listed files itself (`owns_files`), a lost race deletes them: they are
    orphans. A step manifest only lists files the shards own, so it never deletes anything.
    """
    if storage.commit_if_absent(uri, manifest.to_bytes()):
        return manifest
    if owns_files:
        for f in manifest.files:
            storage.delete(storage.join(folder, f.path))
    winner = read_manifest(uri)
    if winner is None or winner.config_hash != manifest.config_hash:
        raise StepFailed(f"{what}: another writer committed a different output")
    log.info("%s: another attempt committed first (%s); using it", what, winner.attempt)
    return winner


def _open_stage_shard(step: Step[Any], step_dir: str, plan: Plan, stage: str, kind: str,
                      shard_index: int, delete: bool = True) -> tuple[str, str, Manifest | None, str | None]:
    """Checks before a per-shard stage task: (stage dir, manifest URI, the committed manifest if done, the
    shard's content key for this stage).

    A map stage's output committed under another plan is reused when its content key matches. Files that
    earlier uncommitted attempts left are swept after this attempt commits (`_commit_written`)."""
    _stage(step, stage, kind)
    _bind_plan(step, step_dir, plan)
    if not 0 <= shard_index < len(plan.shards):
        raise StepFailed(f"shard {shard_index} out of range: plan has {len(plan.shards)} shard(s)")
    _require_stages(step, step_dir, plan, before=stage)
    sdir = stage_dir(step_dir, stage)
    m_uri = shard_manifest_uri(sdir, shard_index)
    existing = read_manifest(m_uri)
    if existing is not None and existing.config_hash == plan.config_hash:
        log.info("step %s stage %s shard %d: already committed, skipping", step.name, stage, shard_index)
        return sdir, m_uri, existing, existing.shard_key
    key = None
    if kind == "map":
        digest = step.map_digest(stage, StorageArtifacts(step_dir), shard_index)
        key = None if digest is None else shard_key(plan, plan.shards[shard_index], f"map:{stage}", digest)
    reused = _reuse(m_uri, existing, key, plan, sdir, f"step {step.name} stage {stage} shard {shard_index}")
    if reused is not None:
        return sdir, m_uri, reused, key
    if existing is not None and delete:
        storage.delete(m_uri)
    return sdir, m_uri, None, key


def _commit_stage_shard(step: Step[Any], plan: Plan, stage: str, shard_index: int, sdir: str, m_uri: str,
                        attempt: str, files: list[FileEntry], stats: StepStats, t0: float,
                        key: str | None = None) -> Manifest:
    stats.records_kept = sum(f.rows for f in files)
    stats.bytes_out = sum(f.bytes for f in files)
    stats.seconds = round(time.perf_counter() - t0, 3)
    stats.peak_rss_mb = peak_rss_mb()
    manifest = Manifest(step=stats.step, config_hash=plan.config_hash, shard=shard_index, attempt=attempt,
                        files=files, stats=stats, shard_key=key)
    log.info("step %s stage %s shard %d: %d in -> %d rows in %.1fs, peak %.0f MiB", step.name, stage,
             shard_index, stats.records_in, stats.records_kept, stats.seconds, stats.peak_rss_mb)
    # Map and partition tasks may both write shuffle partitions (near_dedup's candidates does): a killed
    # attempt's parts there are orphans too (found by bench/crash_anywhere.py, exhaustive variant).
    return _commit_written(m_uri, manifest, sdir, f"step {step.name} stage {stage} shard {shard_index}",
                           {"shard": shard_index, "subdirs": ("",), "shuffled": True})


class _StageWriter:
    """Writes one task's stage rows: the shard's own rows, and for a shuffle, one writer per partition."""

    def __init__(self, step: Step[Any], sdir: str, shard_index: int, attempt: str, stage: str) -> None:
        self.step, self.sdir, self.shard, self.attempt, self.stage = step, sdir, shard_index, attempt, stage
        self.writers: dict[int, PartWriter] = {}

    def write(self, out: StageRows) -> None:
        for key, table in (out.items() if isinstance(out, dict) else [(SHARD_ROWS, out)]):
            if key < SHARD_ROWS:
                raise StepFailed(f"step {self.step.name} stage {self.stage}: bad shuffle partition {key}")
            if key not in self.writers:
                cfg = self.step.config
                self.writers[key] = PartWriter(self.sdir, self.shard, self.attempt, "aux", cfg.max_part_rows,
                                               cfg.max_part_bytes,
                                               subdir="" if key == SHARD_ROWS else shuffle_dir(key))
            self.writers[key].write(table)

    def close(self) -> list[FileEntry]:
        return [f for key in sorted(self.writers) for f in self.writers[key].close()]


def run_map_stage(step: Step[Any], step_dir: str, plan: Plan, stage: str, shard_index: int) -> Manifest:
    """Run map stage `stage` on one shard: side table rows for that shard, committed like a shard."""
    step_dir = storage.validate_uri(step_dir)
    sdir, m_uri, existing, key = _open_stage_shard(step, step_dir, plan, stage, "map", shard_index)
    if existing is not None:
        return existing
    step.begin_shard(shard_index)
    artifacts = StorageArtifacts(step_dir)
    step.prepare_stage(stage, artifacts, shard_index)
    spec = plan.shards[shard_index]
    attempt = uuid.uuid4().hex[:8]
    out = _StageWriter(step, sdir, shard_index, attempt, stage)
    stats = StepStats(step=f"{step.name}:{stage}", bytes_in=spec.bytes)
    t0 = time.perf_counter()
    with _parts_freed_when_full(sdir, attempt, f"step {step.name} stage {stage} shard {shard_index}"):
        for batch in step.map_input(stage, artifacts, spec):
            stats.records_in += batch.num_rows
            out.write(step.map_stage(stage, batch, shard_index))
        if (tail := step.finish_map(stage, shard_index)) is not None:
            out.write(tail)
        stats.counters = dict(sorted(step.stage_counters(stage).items()))
        return _commit_stage_shard(step, plan, stage, shard_index, sdir, m_uri, attempt, out.close(), stats, t0,
                                   key)


def run_partition_stage(step: Step[Any], step_dir: str, plan: Plan, stage: str, slot: int) -> Manifest:
    """Run task `slot` of partition stage `stage`: the shuffle partitions assigned to it, one at a time,
    each partition's rows written before the next is read; committed like a shard."""
    step_dir = storage.validate_uri(step_dir)
    sdir, m_uri, existing, _ = _open_stage_shard(step, step_dir, plan, stage, "partition", slot)
    if existing is not None:
        return existing
    attempt = uuid.uuid4().hex[:8]
    out = _StageWriter(step, sdir, slot, attempt, stage)
    stats = StepStats(step=f"{step.name}:{stage}")
    counters: Counter[str] = Counter()
    artifacts = StorageArtifacts(step_dir)
    t0 = time.perf_counter()
    partitions = _slot_partitions(step, stage, slot)
    with _parts_freed_when_full(sdir, attempt, f"step {step.name} stage {stage} task {slot}"):
        for k in partitions:
            result = step.partition_stage(stage, artifacts, k)
            stats.records_in += result.rows_in
            out.write(result.rows)
            counters.update(result.counters)
        stats.counters = {"partitions": float(len(partitions)), **dict(sorted(counters.items()))}
        return _commit_stage_shard(step, plan, stage, slot, sdir, m_uri, attempt, out.close(), stats, t0)


def _slot_partitions(step: Step[Any], stage: str, slot: int) -> list[int]:
    return slot_partitions(slot, step.num_shards, step.stage_partitions(stage))


def run_reduce_stage(step: Step[Any], step_dir: str, plan: Plan, stage: str) -> Manifest:
    """Run reduce stage `stage` once over the earlier stages; commit its per-shard tables and summary."""
    step_dir = storage.validate_uri(step_dir)
    _stage(step, stage, "reduce")
    _bind_plan(step, step_dir, plan)
    _require_stages(step, step_dir, plan, before=stage)
    sdir = stage_dir(step_dir, stage)
    m_uri = step_manifest_uri(sdir)
    existing = read_manifest(m_uri)
    if existing is not None and existing.config_hash == plan.config_hash:
        log.info("step %s stage %s: already committed, skipping", step.name, stage)
        return existing
    prev_uri = storage.join(sdir, PREVIOUS_NAME)
    if existing is not None:
        storage.write_bytes(prev_uri, existing.to_bytes())  # before the delete: a crash between keeps it
        storage.delete(m_uri)
    previous = read_manifest(prev_uri)
    t0 = time.perf_counter()
    out = step.reduce_stage(stage, StorageArtifacts(step_dir), len(plan.shards))
    attempt = uuid.uuid4().hex[:8]
    files: list[FileEntry] = []
    with _parts_freed_when_full(sdir, attempt, f"step {step.name} stage {stage}"):
        for shard, table in sorted(out.partitions.items()):
            w = PartWriter(sdir, shard, attempt, "aux", step.config.max_part_rows, step.config.max_part_bytes)
            w.write(table)
            files.extend(w.close())
        stats = StepStats(step=f"{step.name}:{stage}", records_kept=sum(f.rows for f in files),
                          records_in=sum(f.rows for f in files), bytes_out=sum(f.bytes for f in files),
                          seconds=round(time.perf_counter() - t0, 3), peak_rss_mb=peak_rss_mb())
        manifest = Manifest(step=stats.step, config_hash=plan.config_hash, attempt=attempt, files=files,
                            stats=stats, summary=out.summary)
        log.info("step %s stage %s: %d rows over %d partition(s) in %.1fs", step.name, stage,
                 stats.records_kept, len(out.partitions), stats.seconds)
        # The new output is committed: the previous one's files and any other attempt's are garbage now.
        committed = _commit_written(m_uri, manifest, sdir, f"step {step.name} stage {stage}",
                                    {"subdirs": ("",)})
    if previous is not None:
        storage.delete(prev_uri)
    return committed


__all__ = ["SHARDS_DIR", "StepFailed", "StorageArtifacts", "load_plan", "make_plan", "read_step_table",
           "reduce_step", "run_all", "run_map_stage", "run_partition_stage", "run_reduce_stage", "run_shard"]
