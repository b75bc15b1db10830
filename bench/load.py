"""Load: `foundational_selection` over N records through a real scheduler, then the same run again.

    python bench/load.py --records 1000000 [--shards 40] [--parallelism 4] [--work DIR] [--keep]

What it does:
1. writes an N-record synthetic corpus (bench._common.write_instruction_corpus: four formats, malformed lines,
   near duplicates) and ingests it with the CLI (timed apart: the load run starts from an ingested source);
2. starts Airflow as it runs in production, minus Kubernetes: api-server, scheduler and dag-processor as
   separate processes, PostgreSQL metadata (a fresh database, like tests/integration), LocalExecutor with
   `--parallelism` worker slots;
3. triggers `foundational_selection` with a shard size that gives every step about `--shards` mapped shards,
   waits, and checks that every task succeeded, that every step folder verifies (listed files and checksums,
   no stray parts) and that the ledger holds from step to step (operators.core.verify.verify_chain);
4. triggers the same run again: every task must succeed without recomputing anything (the committed
   manifests stay byte for byte the same), so its wall time is the scheduler's cost of a no-op run;
5. prints the figures: wall time of both runs, task instances, shards per step, the step processes' peak
   RSS per step (the largest of its shard, stage and reduce manifests), task durations, queue latency
   (queued -> started), and the scheduler's overhead per task (the second run's wall time x parallelism over
   its task count, and its median task duration: a task that does nothing). The last line is JSON.

Needs PostgreSQL (scripts/start-postgres.sh). Takes about an hour at 1M records on two cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_json_line, print_machine_load, scratch_dir, write_instruction_corpus
from operators.core.registry import FOUNDATIONAL_STEPS as STEPS

DAG = "foundational_selection"


def committed_state(run: Path) -> dict[str, bytes]:
    """Every manifest and stats file of the run's steps, by path: what a run that recomputed anything changes."""
    return {str(p.relative_to(run)): p.read_bytes() for step in STEPS for p in (run / step).rglob("*.json")
            if p.name != "_plan.json"}


def step_figures(run: Path) -> dict[str, dict[str, Any]]:
    """Per step: shards, records in/kept, and the peak RSS any of its task processes reported."""
    out: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        stats = json.loads((run / step / "stats.json").read_text())
        rss = [json.loads(p.read_text()).get("stats", {}).get("peak_rss_mb") or 0.0
               for p in (run / step).rglob("*.json") if p.name != "_plan.json" and p.name != "stats.json"]
        out[step] = {"shards": stats["shards"], "records_in": stats["records_in"],
                     "records_kept": stats["records_kept"], "peak_rss_mb": round(max(rss, default=0.0), 1)}
    return out


def task_figures(tis: list[dict[str, Any]], wall_s: float, parallelism: int) -> dict[str, Any]:
    """Counts, durations and queue latency of a run's task instances."""
    from tests.integration.harness import parse_time

    durations = [float(t["duration"]) for t in tis if t.get("duration") is not None]
    waits = []
    for t in tis:
        queued, started = parse_time(t.get("queued_when")), parse_time(t.get("start_date"))
        if queued and started:
            waits.append((started - queued).total_seconds())
    states: dict[str, int] = {}
    for t in tis:
        states[t["state"]] = states.get(t["state"], 0) + 1
    return {"tasks": len(tis), "states": states, "wall_s": round(wall_s, 1),
            "task_s_median": round(statistics.median(durations), 2) if durations else None,
            "task_s_max": round(max(durations), 1) if durations else None,
            "task_s_sum": round(sum(durations), 1),
            "queue_latency_s_median": round(statistics.median(waits), 2) if waits else None,
            "slot_s_per_task": round(wall_s * parallelism / max(len(tis), 1), 2)}


def run(records: int, shards: int, parallelism: int, work: Path) -> dict[str, Any]:
    from operators.core.verify import verify_chain
    from tests.conftest import run_cli
    from tests.integration.harness import (
        Api,
        fresh_database,
        not_succeeded,
        running_airflow,
        task_instances,
        trigger,
        unpause,
        wait_for_runs,
    )

    data, raw = work / "data", work / "raw"
    t0 = time.perf_counter()
    write_instruction_corpus(raw, records, n_files=max(8, records // 25_000), seed=7, malformed_rate=0.01,
                             near_dup_rate=0.03)
    corpus_s = time.perf_counter() - t0
    print(f"corpus: {records:,} records in {corpus_s:.1f}s", flush=True)
    ingest_dir = data / "sources" / "load" / "ingest"
    t0 = time.perf_counter()
    # Parts of about N / (shards + 2) rows: each becomes one shard of every later step (see target_shard_mb).
    aim = shards + 2
    config = json.dumps({"source_name": "load", "target_shard_bytes": 64 << 20,
                         "max_part_rows": -(-records // aim)})
    r = run_cli("run", "ingest", "--config", config, "--input", str(raw), "--output", str(ingest_dir),
                timeout=6 * 3600)
    if r.returncode != 0:
        raise SystemExit(f"ingest failed:\n{r.stderr[-3000:]}")
    ingest_s = time.perf_counter() - t0
    ingested = json.loads((ingest_dir / "stats.json").read_text())
    data_bytes = sum(p.stat().st_size for p in ingest_dir.glob("part-*.parquet"))
    # A shard of about one ingest part: each part is planned as its own shard by every step (a step writes one
    # file per shard and part), and later steps keep that count as they read a little less each.
    shard_mb = data_bytes / aim / 2**20
    print(f"ingest: {ingested['records_kept']:,} kept in {ingest_s:.1f}s, {data_bytes / 2**20:.0f} MiB "
          f"-> target_shard_mb {shard_mb:.3f}", flush=True)

    conf = {"sources": ["load"], "run_name": "load", "target_shard_mb": shard_mb,
            "budgets": {"math": 0.5, "code": 0.5, "general": 0.5}}
    result: dict[str, Any] = {"records": records, "parallelism": parallelism, "corpus_s": round(corpus_s, 1),
                              "ingest_s": round(ingest_s, 1), "ingest_kept": ingested["records_kept"]}
    try:
        db = fresh_database()
        url = db.__enter__()
    except Exception as e:  # PostgresUnavailable, or asyncpg missing
        raise SystemExit(str(e)) from None
    try:
        with running_airflow(work / "airflow", url, str(data), parallelism=parallelism) as af:
            api = Api(af.api_url, af.home)
            unpause(api, af, DAG)
            for attempt in ("first", "second"):
                before = committed_state(data / "runs" / "load") if attempt == "second" else {}
                t0 = time.perf_counter()
                run_id = trigger(api, DAG, conf, run_id=f"load_{attempt}")["dag_run_id"]
                done = wait_for_runs(api, af, DAG, [run_id], timeout=12 * 3600, poll=10)[run_id]
                wall = time.perf_counter() - t0
                tis = task_instances(api, DAG, run_id)
                figures = task_figures(tis, wall, parallelism)
                figures["state"] = done["state"]
                figures["not_succeeded"] = not_succeeded(tis)[:20]
                print(f"{attempt} run: {done['state']} in {wall:.0f}s, {figures}", flush=True)
                result[f"{attempt}_run"] = figures
                if done["state"] != "success":
                    result["diagnostics"] = af.diagnostics(DAG, {t for t, _, _ in not_succeeded(tis)})[-4000:]
                    return result
                if attempt == "second":
                    after = committed_state(data / "runs" / "load")
                    result["second_run_recomputed"] = sorted(k for k in after if before.get(k) != after[k])[:20]
        t0 = time.perf_counter()
        checks, chain = verify_chain([str(data / "runs" / "load" / s) for s in STEPS])
        result["verify_s"] = round(time.perf_counter() - t0, 1)
        result["verify_problems"] = [p for c in checks for p in c.problems][:20] + chain
        result["files_verified"] = sum(c.files_checked for c in checks)
        result["steps"] = step_figures(data / "runs" / "load")
        result["min_shards_per_step"] = min(s["shards"] for s in result["steps"].values())
        result["peak_rss_mb"] = max(s["peak_rss_mb"] for s in result["steps"].values())
        first, second = result["first_run"], result["second_run"]
        result["scheduler_overhead_s_per_task"] = second["task_s_median"]
        result["ok"] = (first["state"] == second["state"] == "success" and not result["verify_problems"]
                        and not result["second_run_recomputed"])
    finally:
        db.__exit__(None, None, None)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=40, help="mapped shards per step to aim for (>= 32 wanted)")
    ap.add_argument("--parallelism", type=int, default=4, help="LocalExecutor worker slots")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp work folder")
    args = ap.parse_args()
    load = print_machine_load()
    t0 = time.perf_counter()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args.records, args.shards, args.parallelism, args.work)
    else:
        with scratch_dir("iip-load-", keep=args.keep) as work:
            result = run(args.records, args.shards, args.parallelism, work)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["load"] = load
    print_json_line(result)
    if not result.get("ok"):
        sys.exit(1)


if __name__ == "__main__":
    main()
