"""The step runner: ledger, bounded parts, manifests with checksums, skip when done, redo when stale."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pydantic import Field

from operators.core import runner as runner_mod
from operators.core import storage
from operators.core.manifest import read_manifest, shard_manifest_uri, step_manifest_uri
from operators.core.runner import (
    StepFailed,
    make_plan,
    read_step_table,
    reduce_step,
    run_all,
    run_shard,
    shards_to_run,
)
from operators.core.stats import LedgerError, StepStats, merge
from operators.core.step import BatchResult, Step, StepConfig, dropped_table


class ModConfig(StepConfig):
    modulus: int = Field(2, ge=1)


class KeepMultiples(Step[ModConfig]):
    """Keeps x divisible by `modulus`, drops the rest with reason 'not_multiple'."""

    name: ClassVar[str] = "keep_multiples"
    config_model: ClassVar[type[StepConfig]] = ModConfig

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        t = pa.Table.from_batches([batch])
        m = self.config.modulus
        keep = pc.equal(pc.subtract(t["x"], pc.multiply(pc.divide(t["x"], m), m)), 0)  # integer division
        drop = t.filter(pc.invert(keep))
        return BatchResult(kept=t.filter(keep),
                           dropped=dropped_table(drop, ["not_multiple"] * drop.num_rows, [""] * drop.num_rows))


class LosesRecords(KeepMultiples):
    name: ClassVar[str] = "loses_records"

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        res = super().transform(batch)
        return BatchResult(kept=res.kept.slice(1), dropped=res.dropped)  # silently loses one record


def write_inputs(root: Path, files: int, rows: int) -> str:
    d = root / "in"
    d.mkdir()
    for i in range(files):
        pq.write_table(pa.table({"x": list(range(i * rows, (i + 1) * rows))}), d / f"f{i}.parquet")
    return str(d)


def file_sha(step_dir: str, rel: str) -> str:
    return hashlib.sha256(storage.read_bytes(storage.join(step_dir, rel))).hexdigest()


def test_run_all_keeps_ledger_and_checksums(tmp_path: Path) -> None:
    src = write_inputs(tmp_path, files=3, rows=1000)
    out = storage.validate_uri(str(tmp_path / "out"))
    step = KeepMultiples(ModConfig(modulus=3, max_part_rows=200, target_shard_bytes=1))
    m = run_all(step, [src], out)
    assert m.stats.shards == 3
    assert m.stats.records_in == 3000
    assert m.stats.records_kept == 1000  # multiples of 3 in [0, 3000)
    assert m.stats.dropped_by_reason == {"not_multiple": 2000}
    kept = read_step_table(out)
    assert sorted(kept["x"].to_pylist()) == list(range(0, 3000, 3))
    dropped = read_step_table(out, "dropped")
    assert set(dropped["reason"].to_pylist()) == {"not_multiple"} and dropped.num_rows == 2000
    assert all(f.rows <= 200 for f in m.files)  # parts are bounded
    for f in m.files:
        assert f.sha256 == file_sha(out, f.path)
        with storage.open_input(storage.join(out, f.path)) as fh:
            assert pq.ParquetFile(fh).metadata.num_rows == f.rows
    stats = StepStats.model_validate_json(storage.read_bytes(storage.join(out, "stats.json")))
    assert stats == m.stats


def test_rerun_same_config_is_skipped_and_changed_config_recomputes(tmp_path: Path) -> None:
    src = write_inputs(tmp_path, files=2, rows=100)
    out = storage.validate_uri(str(tmp_path / "out"))
    first = run_all(KeepMultiples(ModConfig(modulus=2, target_shard_bytes=1)), [src], out)
    again = run_all(KeepMultiples(ModConfig(modulus=2, target_shard_bytes=1)), [src], out)
    assert again.created_at == first.created_at and again.files == first.files  # nothing recomputed
    changed = run_all(KeepMultiples(ModConfig(modulus=5, target_shard_bytes=1)), [src], out)
    assert changed.config_hash != first.config_hash
    assert changed.stats.records_kept == 40
    # Files of the stale output are gone; only the new manifest's files remain.
    on_disk = {u[len(out) + 1:] for u in storage.list_files(out) if u.rsplit("/", 1)[1].startswith("part-")}
    assert on_disk == {f.path for f in changed.files}


def test_a_plan_over_a_committed_step_leaves_no_shard_to_run(tmp_path: Path) -> None:
    """The plan's to-run list, which the DAG maps shard and stage tasks over: every shard until the step is
    committed under this plan; none once it is; every shard again for new input files or a new config."""
    src = write_inputs(tmp_path, files=2, rows=100)
    out = storage.validate_uri(str(tmp_path / "out"))

    def to_run(modulus: int) -> list[int]:
        step = KeepMultiples(ModConfig(modulus=modulus, target_shard_bytes=1))
        return shards_to_run(make_plan(step, [src], out), out)

    assert to_run(2) == [0, 1]  # planned, nothing committed
    run_shard(KeepMultiples(ModConfig(modulus=2, target_shard_bytes=1)), out, runner_mod.load_plan(out), 0)
    assert to_run(2) == [0, 1]  # one shard committed, the step not yet
    run_all(KeepMultiples(ModConfig(modulus=2, target_shard_bytes=1)), [src], out)
    assert to_run(2) == []
    assert to_run(3) == [0, 1]  # another config
    run_all(KeepMultiples(ModConfig(modulus=2, target_shard_bytes=1)), [src], out)
    pq.write_table(pa.table({"x": [7]}), Path(src) / "f9.parquet")
    assert to_run(2) == [0, 1, 2]  # a new input file


def test_ledger_violation_fails_loudly_and_commits_nothing(tmp_path: Path) -> None:
    src = write_inputs(tmp_path, files=1, rows=50)
    out = storage.validate_uri(str(tmp_path / "out"))
    with pytest.raises(LedgerError, match="came out as"):
        run_all(LosesRecords(ModConfig()), [src], out)
    assert read_manifest(shard_manifest_uri(out, 0)) is None
    assert read_manifest(step_manifest_uri(out)) is None


def test_restart_cleans_uncommitted_attempt(tmp_path: Path) -> None:
    src = write_inputs(tmp_path, files=1, rows=100)
    out = storage.validate_uri(str(tmp_path / "out"))
    step = KeepMultiples(ModConfig())
    plan = make_plan(step, [src], out)
    # A crashed attempt left a partial part file and no manifest.
    orphan = storage.join(out, "part-00000-00000-deadbeef.parquet")
    storage.write_bytes(orphan, b"partial garbage")
    m = run_shard(step, out, plan, 0)
    assert not storage.exists(orphan)
    assert all("deadbeef" not in f.path for f in m.files)
    assert reduce_step(step.name, out).stats.records_kept == 50


def test_reduce_refuses_missing_shards_and_wrong_config(tmp_path: Path) -> None:
    src = write_inputs(tmp_path, files=2, rows=10)
    out = storage.validate_uri(str(tmp_path / "out"))
    step = KeepMultiples(ModConfig(target_shard_bytes=1))
    plan = make_plan(step, [src], out)
    run_shard(step, out, plan, 0)
    with pytest.raises(StepFailed, match=r"shard\(s\) \[1\] not committed"):
        reduce_step(step.name, out)
    with pytest.raises(StepFailed, match="config differs"):
        run_shard(KeepMultiples(ModConfig(modulus=7, target_shard_bytes=1)), out, plan, 1)
    with pytest.raises(StepFailed, match="out of range"):
        run_shard(step, out, plan, 5)


def test_sharded_and_single_shard_outputs_agree(tmp_path: Path) -> None:
    src = write_inputs(tmp_path, files=4, rows=250)
    many = run_all(KeepMultiples(ModConfig(target_shard_bytes=1)), [src], str(tmp_path / "many"))
    one = run_all(KeepMultiples(ModConfig()), [src], str(tmp_path / "one"))
    assert many.stats.shards == 4 and one.stats.shards == 1
    a = sorted(read_step_table(storage.validate_uri(str(tmp_path / "many")))["x"].to_pylist())
    b = sorted(read_step_table(storage.validate_uri(str(tmp_path / "one")))["x"].to_pylist())
    assert a == b and len(a) == 500


def test_merge_is_additive_and_checks_step() -> None:
    a = StepStats(step="s", records_in=10, records_kept=7, dropped_by_reason={"x": 3}, seconds=1, peak_rss_mb=5)
    b = StepStats(step="s", records_in=5, records_kept=1, dropped_by_reason={"x": 1, "y": 3}, seconds=2,
                  peak_rss_mb=9)
    m = merge([a, b])
    assert (m.records_in, m.records_kept, m.dropped_by_reason, m.seconds, m.peak_rss_mb, m.shards) == (
        15, 8, {"x": 4, "y": 3}, 3, 9, 2)
    m.check_ledger()
    with pytest.raises(ValueError):
        merge([a, StepStats(step="other")])
    with pytest.raises(LedgerError):
        StepStats(step="s", records_in=3, records_kept=1).check_ledger()
    assert json.loads(m.model_dump_json())["dropped_by_reason"] == {"x": 4, "y": 3}


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_two_writers_of_one_shard_exactly_one_commits(where: str, tmp_path: Path, request: pytest.FixtureRequest,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two attempts of one shard race for real: both are held at barriers until both have found the shard
    uncommitted and are about to write, and again until both have written their parts and reached the commit,
    then commit at once. Exactly one commit succeeds; the loser deletes its own parts and adopts the winner's
    manifest, and the winner's sweep leaves exactly its own parts."""
    import threading

    src = write_inputs(tmp_path, files=1, rows=5000)
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        for p in Path(src).iterdir():
            storage.write_bytes(f"{bucket}/in/{p.name}", p.read_bytes())
        src, out = f"{bucket}/in", f"{bucket}/out"
    else:
        out = storage.validate_uri(str(tmp_path / "out"))
    plan = make_plan(KeepMultiples(ModConfig(max_part_rows=500)), [src], out)

    # Synchronization points around the real functions (which still do all the work): the race is certain,
    # not left to thread scheduling.
    started, committing = threading.Barrier(2, timeout=120), threading.Barrier(2, timeout=120)
    real_open, real_commit = runner_mod._run_open_shard, storage.commit_if_absent
    won: list[bool] = []

    def wait_then_write(*args: Any, **kw: Any) -> Any:
        started.wait()  # both attempts have checked the shard: neither found it committed
        return real_open(*args, **kw)

    def commit_together(uri: str, data: bytes) -> bool:
        committing.wait()  # both attempts have written every part and now commit at the same moment
        ok = real_commit(uri, data)
        won.append(ok)
        return ok

    monkeypatch.setattr(runner_mod, "_run_open_shard", wait_then_write)
    monkeypatch.setattr(storage, "commit_if_absent", commit_together)
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            results[i] = run_shard(KeepMultiples(ModConfig(max_part_rows=500)), out, plan, 0)
        except BaseException as e:  # surfaced below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(won) == [False, True]  # both reached the commit; exactly one won
    # Both writers report the same committed attempt: one won, the other adopted the winner's output.
    assert results[0].attempt == results[1].attempt
    committed = read_manifest(shard_manifest_uri(out, 0))
    assert committed is not None and committed.attempt == results[0].attempt
    parts = {u[len(out) + 1:] for u in storage.list_files(out) if u.rsplit("/", 1)[1].startswith("part-")}
    assert parts == {f.path for f in committed.files}  # the loser removed its own parts at once
    monkeypatch.undo()
    final = reduce_step("keep_multiples", out)
    assert final.stats.records_kept == 2500
    parts = {u[len(out) + 1:] for u in storage.list_files(out) if u.rsplit("/", 1)[1].startswith("part-")}
    assert parts == {f.path for f in final.files}  # the loser's files are gone
    assert sorted(read_step_table(out)["x"].to_pylist()) == list(range(0, 5000, 2))


def test_reduce_uncommits_a_shard_whose_files_vanished(tmp_path: Path) -> None:
    src = write_inputs(tmp_path, files=2, rows=100)
    out = storage.validate_uri(str(tmp_path / "out"))
    step = KeepMultiples(ModConfig(target_shard_bytes=1))
    plan = make_plan(step, [src], out)
    m0 = run_shard(step, out, plan, 0)
    run_shard(step, out, plan, 1)
    storage.delete(storage.join(out, m0.data_files()[0].path))  # storage lost a committed file
    with pytest.raises(StepFailed, match=r"shard\(s\) \[0\]"):
        reduce_step(step.name, out)
    assert read_manifest(shard_manifest_uri(out, 0)) is None  # uncommitted, so a re-run repairs it
    run_shard(step, out, plan, 0)
    assert reduce_step(step.name, out).stats.records_kept == 100
