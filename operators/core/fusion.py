"""Fused shard tasks: after a step's shard, run the next steps' record-local work on the same shard, in the
same task (datatrove-style), before those steps are planned.

In a chain each step is planned aligned to its upstream (`make_plan(aligned=True)`): its shard k is exactly
what the upstream's shard k kept. So once shard k of a step is committed, shard k of the next step is known,
and its *head* can run at once:

- a step without stages: its record transform (`pii`, `decontaminate`, `route`);
- a step whose first stage is a map stage: that stage (`exact_dedup`'s keys, `near_dedup`'s signatures,
  `dsir`'s counts, `select`'s candidates); its later stages read every shard, so the fused work stops there.

The fused task commits that head's output under a provisional plan (config hash `PREPARED` + a digest of the
step's config and the shard's input files), with the content key the real plan will compute (`shard_key`:
the step's code and config, the shard's files, the work). When the step is planned, its plan commits every
prepared shard whose key matches under its own config hash (`runner.adopt_shard`) and maps its head's tasks
only over the rest: a wave of pod starts, and a write and a read of every record, fewer per fused step. The
outputs, stats and ledger are the ones the step's own tasks would write: the same transform over the same
files, committed by the same code (tests/test_fusion.py checks them against an unfused chain).

A step that is off is skipped (its plan passes the input on); a step the DAG runs elsewhere (another pod
profile) ends the fused work, as does a head whose content key the step cannot state.

A stage-less step whose every shard the upstream's shard tasks always prepare (`pii` after `filter`) needs no
task at all: the next step's plan commits it on its way (`plan --through`, `commit_through`), as it commits the
upstream (`plan --after`). Its plan task would have been a pod start to adopt what was prepared and its shard
wave an empty map.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from operators.core import storage
from operators.core.manifest import Manifest, clear_off, read_manifest, shard_manifest_uri, write_off
from operators.core.runner import (
    PREPARED,
    StorageArtifacts,
    adopt_shard,
    make_plan,
    reduce_step,
    run_map_stage,
    run_reduce_stage,
    run_shard,
    shards_to_run,
    step_identity,
)
from operators.core.step import Plan, ShardSpec, Step

log = logging.getLogger("operators.fusion")


class Then(BaseModel):
    """A step whose head a fused task runs after the task's own shard: its name, config and output folder.
    `stop_if_on`: the DAG runs this step elsewhere when it is on (another pod profile); when it is off it is
    skipped like any step that is off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str
    config: dict[str, Any] = {}
    output: str
    stop_if_on: bool = False


class Through(Then):
    """A stage-less step a plan commits before planning its own (`plan --through`): as a `Then`, plus the
    folder it reads (the upstream's output, or the previous such step's)."""

    input: str


def head(step: type[Step[Any]]) -> str | None:
    """The work of `step` that reads only one shard's records: "run" (no stages), the name of its first stage
    when that is a map stage, or None (it starts with a global stage)."""
    if not step.stages:
        return "run"
    first = step.stages[0]
    return first.name if first.kind == "map" else None


def light_head(step: type[Step[Any]]) -> bool:
    """Whether `step`'s head is light work (seconds per shard at any corpus size): a `grouped_run` for a step
    without stages, a `grouped` map stage otherwise."""
    work = head(step)
    if work == "run":
        return step.grouped_run
    return any(st.grouped for st in step.stages if st.name == work)


def grouped_run(step: type[Step[Any]], then: Sequence[type[Step[Any]]]) -> bool:
    """Whether the shard tasks of `step`'s run form a grouped wave (at most one task per slot, each doing several
    shards in turn): its run is light, and so is every head its tasks go on to (`then`). A light fused wave is
    one round instead of several, each of which pays a pod start."""
    return step.grouped_run and all(light_head(t) for t in then)


def folded_stages(step: type[Step[Any]]) -> list[str]:
    """The stages a folded plan (`plan --after --fold-head`) runs itself, so the DAG has no task for them: the
    step's map head, which the upstream's shard tasks prepare, and the reduce stage right after it when there is
    one (`dsir`'s fit, `select`'s cutoffs: a constant-cost task that would otherwise pay a pod start of its own
    only to read what the plan just committed)."""
    work = head(step)
    if work is None or work == "run":
        return []
    stages = [work]
    if len(step.stages) > 1 and step.stages[1].kind == "reduce":
        stages.append(step.stages[1].name)
    return stages


def aligned_spec(upstream_dir: str, shard: int) -> ShardSpec:
    """Shard `shard` of a step planned aligned to `upstream_dir`: the data parts the upstream's committed shard
    `shard` wrote, in order (what `aligned_groups` makes of the upstream's whole output)."""
    upstream_dir = storage.validate_uri(upstream_dir)  # as the plan names its input files: the keys must agree
    m = read_manifest(shard_manifest_uri(upstream_dir, shard))
    if m is None:
        raise ValueError(f"shard {shard} of {upstream_dir} is not committed")
    files = m.data_files()
    return ShardSpec(index=shard, uris=[storage.join(upstream_dir, f.path) for f in files],
                     bytes=sum(f.bytes for f in files))


def provisional_plan(step: Step[Any], upstream_dir: str, shard: int, num_shards: int) -> Plan:
    """The plan a fused task runs shard `shard` of `step` under, before the step is planned: the real plan's
    config and shard count, this shard's aligned files, and a `PREPARED` config hash of both (a retry of the
    task finds its commit; another input or config does not)."""
    cfg, base = step_identity(step)
    spec = aligned_spec(upstream_dir, shard)
    digest = hashlib.sha256("\n".join([base, str(num_shards), str(spec.bytes), *spec.uris]).encode()).hexdigest()
    shards = [spec if k == shard else ShardSpec(index=k, uris=[], bytes=0) for k in range(num_shards)]
    return Plan(step=step.name, config_hash=PREPARED + digest[:24], config=cfg, inputs=[upstream_dir],
                shards=shards, base_hash=base)


def prepare_head(step: Step[Any], step_dir: str, upstream_dir: str, shard: int, num_shards: int) -> Manifest | None:
    """Run `step`'s head on shard `shard` under its provisional plan and commit it there; None when it cannot
    be prepared (no record-local head, or no content key to adopt it by)."""
    work = head(type(step))
    if work is None:
        return None
    step_dir = storage.validate_uri(step_dir)
    plan = provisional_plan(step, upstream_dir, shard, num_shards)
    step.num_shards = num_shards
    artifacts = StorageArtifacts(step_dir)
    digest = step.transform_digest(artifacts, shard) if work == "run" else step.map_digest(work, artifacts, shard)
    if digest is None:
        log.info("step %s: its %s cannot be keyed, so its own tasks run it", step.name, work)
        return None
    if work == "run":
        return run_shard(step, step_dir, plan, shard)
    return run_map_stage(step, step_dir, plan, work, shard)


def run_then(steps: list[tuple[Then, Step[Any]]], upstream_dir: str, shard: int, num_shards: int
             ) -> list[dict[str, Any]]:
    """After shard `shard` of the step at `upstream_dir` (planned in `num_shards` shards, as is every aligned step
    after it) committed: prepare the heads of `steps` (the chain's next steps, in order) on that shard, until one
    has global work next. What each did, for the task's summary."""
    done: list[dict[str, Any]] = []
    for then, step in steps:
        if step.is_off():  # its plan will pass `upstream_dir` on: the next step reads that
            done.append({"step": then.step, "off": True})
            continue
        if then.stop_if_on:
            break
        m = prepare_head(step, then.output, upstream_dir, shard, num_shards)
        if m is None:
            break
        work = head(type(step))
        done.append({"step": then.step, "work": work, "records_in": m.stats.records_in,
                     "records_kept": m.stats.records_kept})
        log.info("step %s shard %d: %s prepared (%d in, %d out)", then.step, shard, work, m.stats.records_in,
                 m.stats.records_kept)
        if work != "run":  # its next stage reads every shard
            break
        upstream_dir = then.output
    return done


def adopt_heads(step: Step[Any], step_dir: str, plan: Plan, shards: list[int], fold_head: bool = False,
                threads: int = 8) -> tuple[list[int], int]:
    """At the plan of a step in a chain: commit under `plan` the head of every shard in `shards` that a fused
    task prepared (`runner.adopt_shard`; manifest reads and writes only, `threads` at a time: at 116M records a
    plan adopts a few hundred shards on S3). Returns the shards the step's tasks map over (for a step without
    stages, those whose transform still has to run) and how many heads were committed without running.

    `fold_head`: the DAG has no task for this step's first map stage (the upstream's shard tasks prepare it), so
    the plan runs what was not prepared itself (a cleared or failed fused task; slow, and logged), and then the
    reduce stage after it (`folded_stages`), unless the step is up to date (`shards` empty)."""
    from concurrent.futures import ThreadPoolExecutor

    work = head(type(step))
    if work is None or not shards:
        return list(shards), 0
    stage = None if work == "run" else work
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        adopted = list(pool.map(lambda k: adopt_shard(step, step_dir, plan, k, stage), shards))
    pending = [k for k, ok in zip(shards, adopted, strict=True) if not ok]
    log.info("step %s: %d of %d shard(s) of its %s prepared by the upstream's shard tasks", step.name,
             len(shards) - len(pending), len(shards), work)
    if fold_head and stage is not None and pending:
        log.warning("step %s: %d shard(s) of stage %s were not prepared upstream; running them in this task",
                    step.name, len(pending), stage)
        for k in pending:
            run_map_stage(step, step_dir, plan, stage, k)
    if fold_head:
        for later in folded_stages(type(step))[1:]:
            run_reduce_stage(step, step_dir, plan, later)
    return (pending if stage is None else list(shards)), len(shards) - len(pending)


def commit_through(step: Step[Any], piece: Through) -> dict[str, Any]:
    """At the plan of the step after it (`plan --through`): plan stage-less `step` aligned to its input, commit
    every shard the upstream's fused tasks prepared, run the rest here (a cleared or failed fused task, or a
    changed config of this step alone: slow, and logged), and commit the step. Its summary, with how many shards
    were `prepared` upstream and how many `ran_here`."""
    if step.is_off():
        write_off(piece.output, [piece.input])
        return {"step": step.name, "output": piece.output, "off": True}
    clear_off(piece.output)
    plan = make_plan(step, [piece.input], piece.output, aligned=True)
    pending, prepared = adopt_heads(step, piece.output, plan, shards_to_run(plan, piece.output))
    if pending:
        log.warning("step %s: %d shard(s) were not prepared upstream; running them in this task", step.name,
                    len(pending))
        for k in pending:
            run_shard(step, piece.output, plan, k)
    m = reduce_step(step.name, piece.output)
    return {"step": step.name, "output": piece.output, "prepared": prepared, "ran_here": len(pending),
            **m.stats.model_dump(mode="json")}
