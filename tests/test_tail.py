"""The tail spread over shard tasks (operators/tail.py): each shard task a process of its own, the commit's
run-wide checks, and publish copying the committed export instead of writing the data again."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.cli import build_step
from operators.core import storage
from operators.core.manifest import read_manifest, step_manifest_uri
from operators.core.runner import read_step_table, run_all
from operators.datasets import versions as dv
from operators.export import ExportError
from operators.tail import export_step, tail_commit, tail_shard, tail_shards, tail_to_run
from operators.validate import ValidationFailed
from tests.conftest import run_cli
from tests.test_exports_consumers import SCHEMA, pool

LABEL = {"ability_en": ["t"], "ability_zh": ["t"], "cate_ability_en": ["math"], "cate_ability_zh": ["数学"]}


def _step(tmp: Path, rows: list[dict[str, Any]], name: str = "select") -> str:
    """A committed select over `rows` in four shards (one per input file), each written in parts of 3 rows."""
    raw = tmp / f"raw-{name}"
    raw.mkdir()
    for f in range(4):
        pq.write_table(pa.Table.from_pylist(rows[f::4], schema=SCHEMA), raw / f"p{f}.parquet")
    out = storage.validate_uri(str(tmp / "run" / name))
    run_all(build_step("select", {"budgets": {}, "target_shard_bytes": 1, "replay_fraction": 0.25,
                                  "max_part_rows": 3}), [str(raw)], out)
    return out


def _labelled(n: int) -> list[dict[str, Any]]:
    return [{**r, "label": LABEL} for r in pool(n)]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but the tail's bookkeeping, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not str(p.relative_to(folder)).startswith("_")}


def test_shard_tasks_as_processes_equal_the_tail_in_one_process(tmp_path: Path) -> None:
    sel = _step(tmp_path, _labelled(40))
    run = sel.rsplit("/", 1)[0]
    shards = tail_shards(sel)
    assert len(shards) == 4  # one shard task per select shard, each exporting several parts
    out = tmp_path / "export-tasks"
    args = ["--input", sel, "--output", str(out), "--validate", "--run", run, "--name", "demo"]
    r = run_cli("export", "--plan", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"shards": shards}
    commit_early = run_cli("export", "--commit", *args)  # a commit before the shard tasks names what is missing
    assert commit_early.returncode == 2 and "tail shard 0 of" in commit_early.stderr
    for k in reversed(shards):  # any order
        r = run_cli("export", "--shard", str(k), *args)
        assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("export", "--commit", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    # Nothing left to run once committed: a night with nothing new maps no shard task.
    assert json.loads(run_cli("export", "--plan", *args).stdout.strip().splitlines()[-1]) == {"shards": []}

    whole = tmp_path / "export-whole"
    export_step(sel, str(whole), name="demo", run_root=run, validate=True)
    assert _files(out) == _files(whole)

    # What the export holds is the committed step: every record once in `train`, the replay flags in `replay`.
    table = read_step_table(sel)
    train = pq.read_table(out / "parquet" / "train")
    assert sorted(train["id"].to_pylist()) == sorted(table["id"].to_pylist())
    replay = pq.read_table(out / "hf" / "data", filters=None).num_rows  # train + replay files of the HF layout
    assert replay == table.num_rows + sum(table["replay"].to_pylist())
    lines = [json.loads(x) for f in sorted((out / "sharegpt").glob("train-*.jsonl"))
             for x in f.read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(table["id"].to_pylist())
    summary = json.loads((out / "_EXPORT.json").read_text())
    assert summary["counts"] == {"train": table.num_rows, "replay": sum(table["replay"].to_pylist())}
    assert summary["shards"] == len(shards) and summary["validated"]
    report = json.loads((tmp_path / "run" / "select" / "validation.json").read_text())
    assert report["success"] and report["records"] == table.num_rows
    m = read_manifest(step_manifest_uri(sel))
    assert m is not None and len(report["parts"]) == len(m.data_files())


def test_an_id_repeated_across_shard_tasks_fails_the_commit(tmp_path: Path) -> None:
    rows = _labelled(12)
    rows[11]["id"] = rows[0]["id"]  # two parts, far apart: no single shard task sees both
    sel = _step(tmp_path, rows)
    shards = tail_shards(sel)
    assert len(shards) > 1
    out = str(tmp_path / "export")
    for k in shards:
        tail_shard(sel, out, k)  # each shard's own parts are fine
    with pytest.raises(ValidationFailed, match="ids unique across all parts"):
        tail_commit(sel, out)
    assert not (tmp_path / "export" / "_EXPORT.json").exists()  # not committed
    report = json.loads((tmp_path / "run" / "select" / "validation.json").read_text())
    assert not report["success"]
    [unique] = [e for e in report["expectations"] if e["expectation"] == "ids unique across all parts"]
    assert unique["unexpected_count"] == 1


def test_a_part_that_breaks_the_suite_fails_the_commit_naming_it(tmp_path: Path) -> None:
    sel = _step(tmp_path, pool(12))  # pool() leaves every 7th record without a label
    with pytest.raises(ValidationFailed, match="has_label"):
        export_step(sel, str(tmp_path / "export"), validate=True)
    assert not (tmp_path / "export" / "_EXPORT.json").exists()


def test_a_re_export_of_another_commit_removes_what_no_shard_wrote(tmp_path: Path) -> None:
    big = _step(tmp_path, _labelled(30), "big")
    small = _step(tmp_path, _labelled(6), "small")
    out = tmp_path / "export"
    export_step(big, str(out))
    before = set(_files(out))
    summary = export_step(small, str(out))
    after = set(_files(out))
    assert summary["stale_removed"] > 0 and len(after) < len(before)
    assert pq.read_table(out / "parquet" / "train").num_rows == read_step_table(small).num_rows
    # The shard summaries of the other commit are not taken for this one: a shard task of `big` must run again.
    assert tail_to_run(big, str(out), validate=False) == tail_shards(big)
    with pytest.raises(ExportError, match="has not run for this commit"):
        tail_commit(big, str(out), validate=False)


def test_publish_copies_the_committed_export(tmp_path: Path) -> None:
    """The version made from the run's export holds exactly what a publish that writes everything itself holds;
    on a local disk its data files are hard links to the export's (no byte copied)."""
    sel = _step(tmp_path, _labelled(30))
    run = sel.rsplit("/", 1)[0]
    export_dir = str(tmp_path / "run" / "export")
    export_step(sel, export_dir, name="found", run_root=run, validate=True)
    cfg = dv.PublishConfig(name="found")
    copied = dv.build_version(str(tmp_path / "a"), "found", sel, run, export_dir=export_dir)
    written = dv.build_version(str(tmp_path / "b"), "found", sel, run)
    va, vb = Path(copied.manifest["uri"].removeprefix("file://")), Path(written.manifest["uri"].removeprefix("file://"))
    data_a, data_b = _files(va / "hf" / "data"), _files(vb / "hf" / "data")
    assert data_a == data_b and data_a
    assert _files(va / "ids") == _files(vb / "ids")
    for key in ("counts", "id_buckets", "dedup_survivors"):
        assert copied.manifest[key] == written.manifest[key], key
    some = next(iter(data_a))
    exported = tmp_path / "run" / "export" / "hf" / "data" / some
    assert os.stat(va / "hf" / "data" / some).st_ino == os.stat(exported).st_ino
    assert not any("_tail" in p.parts or p.name == "_EXPORT.json" for p in vb.rglob("*") if p.is_file())
    # The CLI's publish finds the run's export by itself.
    r = run_cli("datasets", "publish", "found", "--input", sel, "--run", run, "--root", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr[-2000:]
    vc = tmp_path / "c" / "datasets" / "found" / "v0001"
    assert os.stat(vc / "hf" / "data" / some).st_ino == os.stat(va / "hf" / "data" / some).st_ino
    assert dv.publish(str(tmp_path / "c"), cfg, sel, run, export_dir=export_dir)["unchanged"]


def test_dedup_survivors_per_part_reach_the_no_churn_rule(tmp_path: Path) -> None:
    """The run's dedup steps' kept ids, indexed per part by the shard tasks, are what a later run's dedup
    protects (`published_id_hashes` with the step)."""
    rows = _labelled(20)
    sel = _step(tmp_path, rows)
    run = sel.rsplit("/", 1)[0]
    dedup = _step(tmp_path, rows[:15], "exact_dedup")  # stands in for the run's exact_dedup output
    assert dedup == f"{run}/exact_dedup"
    root = str(tmp_path / "data")
    dv.publish(root, dv.PublishConfig(name="found"), sel, run)
    _, protected = dv.published_id_hashes(storage.join(storage.validate_uri(root), "datasets", "found"),
                                          "exact_dedup")
    kept = set(read_step_table(dedup)["id"].to_pylist()) | set(read_step_table(sel)["id"].to_pylist())
    assert set(protected.tolist()) == set(dv.id_hash(sorted(kept)).to_pylist())
    assert dv.show(root, "found")["dedup_survivors"] == {"exact_dedup": read_step_table(dedup).num_rows}


def test_on_s3_the_version_is_a_server_side_copy_of_the_export(tmp_path: Path, s3_bucket: str) -> None:
    """The same tail and publish on the loopback S3 server: the version's objects equal the export's."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = _labelled(16)
    for f in range(2):
        pq.write_table(pa.Table.from_pylist(rows[f::2], schema=SCHEMA), raw / f"p{f}.parquet")
    run = f"{s3_bucket}/run"
    sel = f"{run}/select"
    run_all(build_step("select", {"budgets": {}, "target_shard_bytes": 1, "max_part_rows": 3}), [str(raw)], sel)
    export_step(sel, f"{run}/export", name="found", run_root=run, validate=True)
    draft = dv.build_version(s3_bucket, "found", sel, run, export_dir=f"{run}/export")
    vdir = draft.manifest["uri"]
    copied = storage.list_files(storage.join(vdir, "hf", "data"))
    assert copied and len(copied) == len(storage.list_files(f"{run}/export/hf/data"))
    for u in copied:
        assert storage.read_bytes(u) == storage.read_bytes(f"{run}/export/hf/data/{u.rsplit('/', 1)[1]}")
    assert draft.manifest["counts"]["splits"]["train"] == read_step_table(sel).num_rows


def test_the_tail_plan_commits_the_step_it_exports_when_asked(tmp_path: Path) -> None:
    """`export --plan --after select`: a DAG whose chain ends in select has no reduce task for it; the export's
    plan commits it (from its committed shards) before listing the shard tasks. `--after` is for the plan only."""
    sel = _step(tmp_path, _labelled(12))
    committed = read_manifest(step_manifest_uri(sel))
    assert committed is not None
    storage.delete(step_manifest_uri(sel))  # as the chain leaves it: every shard committed, the step not
    args = ["--input", sel, "--output", str(tmp_path / "export"), "--validate", "--name", "demo"]
    assert run_cli("export", "--shard", "0", "--after", "select", *args).returncode == 2
    assert read_manifest(step_manifest_uri(sel)) is None
    r = run_cli("export", "--plan", "--after", "select", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"shards": tail_shards(sel)}
    again = read_manifest(step_manifest_uri(sel))
    assert again is not None and again.config_hash == committed.config_hash
    assert [f.path for f in again.files] == [f.path for f in committed.files]
