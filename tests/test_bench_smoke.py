"""Smoke test of the ingest benchmark: it runs end to end on a small corpus and reports its JSON line.

No timing assertions: only that the benchmark works, keeps the ledger and reports the keys its
readers (Makefile, CI, the README's numbers) rely on.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

from operators.core.registry import FOUNDATIONAL_STEPS
from tests.conftest import ROOT

REQUIRED_KEYS = {"records", "records_per_s", "floor_records_per_s", "floor_ratio", "peak_rss_mb",
                 "floor_peak_rss_mb", "kept", "dropped", "seconds"}


def test_bench_ingest_small_run() -> None:
    """`bench/ingest.py --records 2000 --repeats 2` ends with a JSON line whose ledger and rates are sane, and
    reports both interleaved rounds."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ingest.py"), "--records", "2000",
                           "--repeats", "2"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) > 1, "expected human-readable lines before the JSON line"
    result = json.loads(lines[-1])
    missing = REQUIRED_KEYS - set(result)
    assert not missing, f"missing keys: {sorted(missing)}"
    assert result["records"] == 2000
    assert result["kept"] + result["dropped"] == 2000
    assert result["kept"] > 0 and result["dropped"] > 0  # ~1% malformed lines are planted
    assert sum(result["dropped_by_reason"].values()) == result["dropped"]
    for key in ("records_per_s", "floor_records_per_s", "floor_ratio", "peak_rss_mb", "floor_peak_rss_mb",
                "seconds"):
        assert result[key] > 0, f"{key} = {result[key]}"
    assert len(result["floor_ratio_rounds"]["runs"]) == 2 and result["load"]["cpus"] >= 1


def test_bench_phase1_small_run() -> None:
    """`bench/phase1.py --records 700` runs every Phase 1 step as its DAG tasks over several shards and reports
    per-step figures with the task that peaked."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "phase1.py"), "--records", "700",
                           "--shard-mb", "0.25"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.strip()][-1])
    assert {"records", "seconds", "records_per_s", "peak_rss_mb"} <= set(result)
    steps = result["steps"]
    names = ["ingest", *FOUNDATIONAL_STEPS]
    assert set(steps) == set(names)
    for a, b in itertools.pairwise(names):  # each step reads what the previous one kept
        assert steps[b]["records_in"] == steps[a]["records_kept"]
    assert steps["ingest"]["records_in"] == 700
    assert steps["near_dedup"]["shards"] >= 2
    assert steps["near_dedup"]["peak_task"] in ("plan", "signatures", "candidates", "gather", "pairs", "resolve",
                                                "run", "reduce")


def test_bench_report_small_run() -> None:
    """`bench/report.py --records 2000` builds a run, reports it as the report task does, and says what it cost."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--records", "2000"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(proc.stdout.strip().splitlines()[-1])["runs"]
    assert run["records"] == 2000
    for key in ("report_seconds", "report_peak_rss_mb", "html_bytes", "json_bytes", "pages_bytes"):
        assert run[key] > 0, f"{key} = {run[key]}"


def test_bench_refresh_small_run() -> None:
    """`bench/refresh.py --records 2000` builds, runs a 1% night, a full recompute and an unchanged night: the
    night reuses old shards, equals the recompute where the rules define it, and the unchanged night does no
    step work."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "refresh.py"), "--records", "2000",
                           "--shard-mb", "0.25"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.strip()][-1])
    assert result["same_as_full"] is True and result["previous_selection_kept"] is True
    assert result["unchanged_night_step_seconds"] == 0.0
    assert 0 < result["incremental_cpu_ratio"] < 1
    steps = result["steps"]
    assert all(steps[s]["night_shards_reused"] >= 1 for s in ("filter", "exact_dedup", "near_dedup", "select"))


def test_bench_pii_quick_run_meets_its_goals() -> None:
    """`bench/pii.py --quick --no-peers` on a seed the detector was not tuned on: every planted type is found
    (the default action leaves none in the output) and the look-alikes stay intact."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "pii.py"), "--quick", "--no-peers", "--seed", "3"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["planted"]) == {"email", "phone", "ip_address", "credit_card", "iban", "us_ssn", "secret"}
    assert all(n > 0 for n in result["planted"].values())
    assert min(result["recall"]["ours"].values()) >= 0.97, result["recall"]["ours"]
    assert result["decoys_intact"]["ours"] >= 0.99
    assert result["records_per_s"]["ours"] > 0
