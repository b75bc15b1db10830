"""nightly_refresh: the diff finds exactly the new raw files, the DAG parses, and a night runs end to end."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from operators.core import storage
from operators.core.manifest import read_manifest, step_manifest_uri
from operators.core.registry import FOUNDATIONAL_STEPS
from operators.core.runner import make_plan
from operators.core.step import Plan, ShardSpec
from operators.orchestration.refresh import (
    committed_ingests,
    ingested_files,
    new_raw_files,
    night_dir,
    plan_night,
    selection_inputs,
)
from tests.conftest import ROOT, airflow, dag_info, dags_test, migrated_airflow, run_cli, three_domain_conversations


def _plan(*shards: list[str]) -> Plan:
    return Plan(step="ingest", config_hash="h", config={}, inputs=["x"],
                shards=[ShardSpec(index=i, uris=u, bytes=1) for i, u in enumerate(shards)])


def test_diff_is_exactly_the_files_no_plan_read() -> None:
    done = ingested_files([_plan(["s3://r/a.jsonl", "s3://r/b.jsonl"], ["s3://r/c.jsonl"]), _plan(["s3://r/d.jsonl"])])
    assert done == {"s3://r/a.jsonl", "s3://r/b.jsonl", "s3://r/c.jsonl", "s3://r/d.jsonl"}
    listing = ["s3://r/e.jsonl", "s3://r/a.jsonl", "s3://r/d.jsonl", "s3://r/f.parquet", "s3://r/e.jsonl"]
    assert new_raw_files(listing, done) == ["s3://r/e.jsonl", "s3://r/f.parquet"]
    assert new_raw_files(listing[1:3], done) == []
    assert new_raw_files(listing, []) == ["s3://r/a.jsonl", "s3://r/d.jsonl", "s3://r/e.jsonl", "s3://r/f.parquet"]


def _conversations(prefix: str, n: int) -> str:
    return "\n".join(three_domain_conversations(n, prefix)) + "\n"


def _first_night(raw: Path, root: Path) -> str:
    """Raw files a.jsonl and b.jsonl ingested on 2026-01-01 (committed), as the DAG would have."""
    raw.mkdir()
    (raw / "a.jsonl").write_text(_conversations("a", 30))
    (raw / "b.jsonl").write_text(_conversations("b", 24))
    (raw / "_tmp").mkdir()  # an uploader's scratch folder: never ingested
    (raw / "_tmp" / "x.jsonl").write_text(_conversations("x", 3))
    (raw / "notes.txt").write_text("not a corpus file")
    out = night_dir("tiny", "2026-01-01", storage.validate_uri(str(root)))
    r = run_cli("run", "ingest", "--config", '{"source_name": "tiny"}', "--input", str(raw), "--output", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_plan_night_finds_only_new_files_and_ignores_failed_nights(tmp_path: Path) -> None:
    root = storage.validate_uri(str(tmp_path / "data"))
    raw = tmp_path / "raw"
    first = _first_night(raw, tmp_path / "data")
    sources = [{"name": "tiny", "uri": str(raw)}]
    assert plan_night(sources, "2026-01-02", root) == []  # nothing new
    (raw / "c.jsonl").write_text(_conversations("c", 9))
    (raw / "sub").mkdir()
    (raw / "sub" / "d.jsonl.gz").write_bytes(b"")
    want = [storage.validate_uri(str(raw / "c.jsonl")), storage.validate_uri(str(raw / "sub" / "d.jsonl.gz"))]
    tasks = plan_night(sources, "2026-01-02", root)
    assert tasks == [{"config": {"source_name": "tiny"}, "inputs": want,
                      "output_uri": night_dir("tiny", "2026-01-02", root)}]
    # A night that planned but never committed read nothing: its files stay new.
    from operators.cli import build_step

    make_plan(build_step("ingest", {"source_name": "tiny"}), want, tasks[0]["output_uri"])
    assert plan_night(sources, "2026-01-03", root)[0]["inputs"] == want
    assert committed_ingests("tiny", root) == [first]
    assert selection_inputs(sources, root) == [first]
    with pytest.raises(ValueError, match="no committed ingest"):
        selection_inputs([{"name": "other", "uri": str(raw)}], root)


def test_a_night_without_sources_fails_saying_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no sources"):
        plan_night([], "2026-01-02", storage.validate_uri(str(tmp_path)))


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return migrated_airflow(tmp_path_factory)[0]


def test_nightly_refresh_dag_parses(airflow_home: dict[str, str]) -> None:
    info = dag_info(airflow_home, "nightly_refresh")
    assert info["errors"] == {}
    assert info["schedule"] == "@daily" and info["catchup"] is False
    assert info["max_active_runs"] == 1  # a second night waits queued until the first has finished
    assert {"find_new", "ingest", "inputs", "filter.plan", "near_dedup.pairs", "select.run", "export.plan",
            "export.shard", "export.commit", "report"} <= set(info["tasks"])
    assert {"sources", "run_name", "budgets"} <= set(info["params"])


def test_nights_ingest_only_new_files_and_redo_only_new_shards(airflow_home: dict[str, str],
                                                                 tmp_path: Path) -> None:
    data = Path(airflow_home["IIP_DATA_ROOT"])
    raw = tmp_path / "raw"
    first = _first_night(raw, data)
    (raw / "c.jsonl").write_text(_conversations("c", 12) + _conversations("a", 3))  # 3 repeat a.jsonl
    conf = {"sources": [{"name": "tiny", "uri": str(raw)}], "run_name": "n1",
            "budgets": {"math": 1.0, "code": 1.0, "general": 1.0}}
    t0 = time.perf_counter()
    r = dags_test(airflow_home, "nightly_refresh", "2026-01-02", "-c", json.dumps(conf))
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    tonight = night_dir("tiny", "2026-01-02", storage.validate_uri(str(data)))
    m = read_manifest(step_manifest_uri(tonight))
    assert m is not None and m.stats.records_in == 15  # only c.jsonl was ingested tonight
    first_m = read_manifest(step_manifest_uri(first))
    assert first_m is not None and first_m.stats.records_in == 54
    stats = json.loads((data / "runs" / "n1" / "filter" / "stats.json").read_text())
    assert stats["records_in"] == 54 + 15  # the selection read both nights
    exact = json.loads((data / "runs" / "n1" / "exact_dedup" / "stats.json").read_text())
    assert exact["dropped_by_reason"] == {"exact_duplicate": 3}
    print(f"nightly dags test: {time.perf_counter() - t0:.1f}s")

    # The next night finds no new file: nothing is ingested, and every Phase 1 step, stage and shard finds its
    # manifest committed under the same config hash and skips (a recomputed one would commit a new attempt).
    before = _committed_state(data)
    assert len(before) > 40 and any("/_stages/" in k for k in before)
    t0 = time.perf_counter()
    r = dags_test(airflow_home, "nightly_refresh", "2026-01-03", "-c", json.dumps(conf))
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    print(f"nightly dags test, night without new files: {time.perf_counter() - t0:.1f}s")
    assert not Path(night_dir("tiny", "2026-01-03", str(data))).exists()
    assert _committed_state(data) == before
    # It cost each step its plan (which commits the step before it): the plans found the steps committed, so the
    # stage and shard tasks mapped over nothing and never started; the export's plan found it committed for this
    # very step output, so no export shard task ran (no validation, no export written again) and its commit found
    # `_EXPORT.json`.
    log = r.stdout + r.stderr
    assert [s for s in PHASE1 if f"step {s}: already committed under this plan" in log] == list(PHASE1)
    assert not re.search(r"shard \d+: already committed|stage \w+: already committed", log)
    assert re.search(r"tail of \S+/select: already committed for this commit", log)
    assert "validation failed" not in log and "tail shard" not in log
    from operators.datasets.versions import read_latest, versions

    assert versions(str(data), "foundational") == [1]  # and its publish skipped: LATEST already is this output
    assert "unchanged: LATEST already is this output" in r.stdout + r.stderr

    # A night with one new file: the old shard of every step is reused by its content key (no churn: the
    # repeats of c's records lose to the published run's copies; freeze: the models and decisions stay), only
    # the new shard does work, and the night publishes the next version.
    (raw / "d.jsonl").write_text(_conversations("d", 6) + _conversations("c", 2))
    r = dags_test(airflow_home, "nightly_refresh", "2026-01-04", "-c", json.dumps(conf))
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    for step in PHASE1:
        shards = [read_manifest(str(f)) for f in sorted((data / "runs" / "n1" / step / "_shards").glob("*.json"))]
        assert [m is not None and m.reused_from is not None for m in shards] == [True, False], step
    exact = json.loads((data / "runs" / "n1" / "exact_dedup" / "stats.json").read_text())
    assert exact["dropped_by_reason"] == {"exact_duplicate": 3 + 2}
    # 01-02 published v1; 01-03 changed nothing, so its publish skipped (no version, no asset event); 01-04: v2.
    assert read_latest(str(data), "foundational")[0] == 2


PHASE1 = FOUNDATIONAL_STEPS


def _committed_state(data: Path) -> dict[str, tuple[bytes, int] | bytes]:
    """Every manifest (step, stage, shard) and stats file of the Phase 1 steps and of the ingests, by path, with
    every part file's modification time: what a re-run that recomputed anything would change."""
    dirs = [data / "runs" / "n1" / s for s in PHASE1] + sorted((data / "sources" / "tiny").glob("*/ingest"))
    state: dict[str, tuple[bytes, int] | bytes] = {}
    for d in dirs:
        assert (d / "_MANIFEST.json").is_file(), d
        for p in d.rglob("*"):
            if p.name.endswith(".json") and p.name != "_plan.json":  # the plan is re-written, same content
                state[str(p.relative_to(data))] = p.read_bytes()
            elif p.suffix == ".parquet":
                state[str(p.relative_to(data))] = (b"", p.stat().st_mtime_ns)
    return state


def test_dag_file_is_pure_wiring() -> None:
    """No logic in the DAG file: no branches, loops or comprehensions anywhere, and each task body is a docstring
    and one `return` of a call into operators.orchestration."""
    import ast

    tree = ast.parse((ROOT / "dags" / "nightly_refresh.py").read_text())
    logic = (ast.If, ast.IfExp, ast.For, ast.While, ast.Try, ast.With, ast.ListComp, ast.SetComp, ast.DictComp,
             ast.GeneratorExp, ast.Lambda)
    found = [f"{type(n).__name__} at line {n.lineno}" for n in ast.walk(tree) if isinstance(n, logic)]
    assert not found, found
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith("operators.orchestration") for a in n.names}
    dag_fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    tasks = [n for n in dag_fn.body if isinstance(n, ast.FunctionDef)]
    assert len(tasks) == 2, [t.name for t in tasks]
    for fn in tasks:
        has_doc = isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant)
        body = fn.body[1:] if has_doc else fn.body
        assert len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Call), fn.name
        callee = body[0].value.func
        assert isinstance(callee, ast.Name) and callee.id in imported, fn.name


def test_airflow_date_backfill_creates_one_night_per_logical_date(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`airflow backfill create` over two dates queues two nightly_refresh runs, one per logical date, with the
    form's conf; the scheduler then runs them in date order (each night ingests what no earlier night read).
    Running them needs a scheduler: this checks what a user's command creates."""
    env, data = migrated_airflow(tmp_path_factory)
    assert airflow(env, "dags", "reserialize").returncode == 0
    conf = {"sources": [{"name": "tiny", "uri": str(data / "raw")}], "run_name": "backfilled"}
    r = airflow(env, "backfill", "create", "--dag-id", "nightly_refresh", "--from-date", "2026-02-01",
                "--to-date", "2026-02-02", "--dag-run-conf", json.dumps(conf))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    r = airflow(env, "dags", "list-runs", "nightly_refresh", "-o", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("[")))  # after warnings
    assert sorted((x["run_id"], x["logical_date"][:10], x["state"]) for x in runs) == [
        ("backfill__2026-02-01T00:00:00+00:00", "2026-02-01", "queued"),
        ("backfill__2026-02-02T00:00:00+00:00", "2026-02-02", "queued")]
