"""Phase 2 end to end: `airflow dags test conversational_synthesis` on the embedded CPU model, and a
killed LLM task that resumes from its result cache without paying for the same tokens twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers  # noqa: F401  (the `llm` extra, installed by `make test`: missing is an error, not a skip)

from operators.core.registry import step_class
from operators.core.runner import read_step_table, run_all
from operators.schema import CANONICAL_SCHEMA
from tests.conftest import ROOT, dags_test, migrated_airflow

QA = [("math", "What is 15% of 80?", "15% of 80 is 12."),
      ("math", "Solve for x: 2x + 6 = 14.", "2x = 8, so x = 4."),
      ("code", "Write a Python function that checks whether a number is even.",
       "def is_even(n):\n    return n % 2 == 0"),
      ("code", "How do I reverse a string in JavaScript?", "Use s.split('').reverse().join('')."),
      ("general", "Give me three tips for better sleep.", "Keep a schedule, avoid screens late, and limit caffeine."),
      ("general", "What causes the seasons on Earth?", "The tilt of Earth's axis relative to its orbit.")]


def foundational_fixture(data_root: Path, run: str) -> str:
    """A committed foundational `select` output (the seed pool's source), made by the real select step."""
    rows = [{"id": f"f{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
             "label": None, "langdetect": "en", "source": "fixture", "reward": None, "origin": None, "domain": d}
            for i, (d, q, a) in enumerate(QA)]
    src = data_root / "fixture" / "part.parquet"
    src.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA.append(pa.field("domain", pa.string()))), src)
    out = data_root / "runs" / run / "select"
    cls = step_class("select")
    run_all(cls(cls.config_model.model_validate({})), [str(src)], str(out))
    return str(out)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    e, data = migrated_airflow(tmp_path_factory)
    foundational_fixture(data, "found")
    return e


def stats(run_root: Path, step: str) -> dict:
    return json.loads((run_root / step / "stats.json").read_text())


def test_conversational_synthesis_dag_runs_end_to_end(env: dict[str, str]) -> None:
    conf = {"foundational": "found", "run_name": "synth", "pool_budgets": {"math": 0.5, "code": 0.5, "general": 0.5},
            "seed_budget": 1, "supplement_budget": 1, "weak_threshold": 10, "max_ifd": None,
            "evolution_rounds": 1, "max_new_tokens": 20, "min_turns": 2, "max_turns": 2, "probes_per_ability": 1,
            "min_label_samples": 1}
    r = dags_test(env, "conversational_synthesis", "-c", json.dumps(conf), timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    run_root = Path(env["IIP_DATA_ROOT"]) / "runs" / "synth"
    steps = ["pool", "label", "label_vocab", "seed_score", "seed_select_r1", "evolve_r1", "respond_r1",
             "diagnose_r1", "seed_select_r2", "evolve_r2", "respond_r2", "conversational_set", "pii"]
    for step in steps:
        s = stats(run_root, step)
        assert s["records_in"] == s["records_kept"] + sum(s["dropped_by_reason"].values()), step
    assert stats(run_root, "pool")["records_kept"] == 3
    label = stats(run_root, "label")
    assert label["counters"]["llm.prompt_tokens"] > 0  # token accounting reaches the step stats
    assert stats(run_root, "seed_select_r1")["records_kept"] == 1
    assert stats(run_root, "evolve_r1")["records_in"] == 1  # seeds x rounds
    # weak_threshold 10: every judged ability is weak, so round 2 draws new seeds (never the round-1 ones).
    r1 = {x["id"] for x in read_step_table(str(run_root / "seed_select_r1")).to_pylist()}
    r2 = read_step_table(str(run_root / "seed_select_r2"))
    assert not r1 & set(r2["id"].to_pylist() if r2.num_rows else [])
    final = stats(run_root, "conversational_set")
    assert final["records_in"] == stats(run_root, "respond_r1")["records_kept"] + \
        stats(run_root, "respond_r2")["records_kept"]
    # pii runs over the synthesized set before it is validated and published: nothing dropped by default.
    assert stats(run_root, "pii")["records_kept"] == final["records_kept"]
    validation = json.loads((run_root / "pii" / "validation.json").read_text())
    assert validation["success"] is True
    assert (run_root / "export").exists()
    report = (run_root / "report.md").read_text()
    assert "Ability scores: diagnose_r1" in report and "LLM usage" in report


def test_a_killed_llm_task_resumes_from_its_cache(tmp_path: Path) -> None:
    """SIGKILL after the first paid batch, re-run, and compare with an uninterrupted run of the same job: the
    resumed run pays for exactly the requests the killed one had not paid for, and ends with the same labels."""
    rows = [{"id": f"k{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
             "label": None, "langdetect": "en", "source": "fixture", "reward": None, "origin": None}
            for i, (_, q, a) in enumerate(QA[:4])]  # two batches of two: a kill between them
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), src)
    cfg = json.dumps({"batch_rows": 2, "max_tokens": 24})

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "operators", "run", "label", "--config", cfg, "--input", str(src),
                "--output", str(out)]

    clean = tmp_path / "clean"
    r = subprocess.run(cmd(clean), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    uninterrupted = json.loads((clean / "stats.json").read_text())["counters"]
    assert uninterrupted["llm.cache_hits"] == 0 and uninterrupted["llm.backend_requests"] >= 4

    out = tmp_path / "label"
    proc = subprocess.Popen(cmd(out), cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    cache = out / "_llm_cache" / "main"
    deadline = time.time() + 600
    while time.time() < deadline and not list(cache.glob("shard-00000-*.parquet")):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # dies after paying for the first batch, before committing the shard
    proc.wait()
    assert not (out / "_MANIFEST.json").exists()
    # Every paid request is one cache row (segments are flushed per backend batch, so a kill loses none).
    paid_before = sum(pq.read_table(p).num_rows for p in cache.glob("shard-00000-*.parquet"))
    assert 2 <= paid_before < uninterrupted["llm.backend_requests"]

    r = subprocess.run(cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "stats.json").read_text())
    assert s["records_in"] == 4 == s["records_kept"] + sum(s["dropped_by_reason"].values())
    resumed = s["counters"]
    # No token paid twice: the resumed run paid for the uninterrupted run's requests less those already paid,
    # and got exactly the paid ones from the cache.
    assert resumed["llm.backend_requests"] == uninterrupted["llm.backend_requests"] - paid_before
    assert resumed["llm.cache_hits"] == paid_before
    assert resumed["llm.requests"] == uninterrupted["llm.requests"]
    # Greedy decoding on the same batches: the cached answers are the ones the model gives.
    labels = {x["id"]: x["label"] for x in read_step_table(str(out)).to_pylist()}
    assert labels == {x["id"]: x["label"] for x in read_step_table(str(clean)).to_pylist()}
