"""Benchmark: Phase 1 end to end (ingest + every selection step), seconds, records/s and peak RSS per task.

    python bench/phase1.py [--records 100000] [--shard-mb 64] [--parallel 2] [--whole-steps] [--keep]

By default every step runs the way the DAG runs it: `plan`, then each map and partition stage as one CLI
child process per shard (`python -m operators stage ... --shard K`, up to --parallel at a time), each
reduce stage once, `run --shard K` per shard, and the step's `reduce`; exactly the tasks a local
StepOperator or a Kubernetes pod runs. A step's peak RSS is then the largest of its tasks', which is what
sizes a pod; the table also names the task that peaked. --whole-steps instead runs each step as one
`run` process (all tasks in one interpreter). Run it at two sizes (e.g. 100k and 1M) with the same
--shard-mb: seconds should grow linearly and the peak per task should stay bounded by the shard size,
not the corpus size (the dedup resolves hold a few hundred bytes per duplicate, select holds a few per candidate).
There is no peer for the whole pipeline; the per-step peers are in bench/dsir.py, bench/dedup.py and
bench/ingest.py. Prints a table, then LAST one JSON line: records, seconds, records_per_s, peak_rss_mb,
steps{...}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    last_json_line,
    print_json_line,
    rate,
    run_child,
    run_children,
    scratch_dir,
    write_instruction_corpus,
)

STEPS: list[tuple[str, dict[str, object]]] = [
    ("filter", {"languages": []}),
    ("pii", {}),
    ("exact_dedup", {}),
    ("near_dedup", {}),
    ("decontaminate", {}),
    ("route", {}),
    ("dsir", {}),
    ("select", {"budgets": {"math": 0.5, "code": 0.5, "general": 0.3}}),
]


def _step_tasks(step: str, cfg: str, prev: str, out: str) -> list[tuple[str, list[str], bool]]:
    """The step's task waves in order, as the DAG runs them: (wave name, command, once per shard?)."""
    from operators.core.registry import step_class

    base = [sys.executable, "-m", "operators"]
    waves = [("plan", [*base, "plan", step, "--config", cfg, "--input", prev, "--output", out], False)]
    for st in step_class(step).stages:
        waves.append((st.name, [*base, "stage", step, "--stage", st.name, "--config", cfg, "--output", out],
                      st.kind != "reduce"))
    waves.append(("run", [*base, "run", step, "--config", cfg, "--output", out], True))
    waves.append(("reduce", [*base, "reduce", step, "--output", out], False))
    return waves


def run_step_as_tasks(step: str, cfg: str, prev: str, out: str, parallel: int) -> dict[str, Any]:
    """Run one step as its DAG tasks; wall seconds, CPU seconds, the largest task peak RSS and its task."""
    seconds = cpu = 0.0
    shards = 1
    wave_peaks: dict[str, float] = {}
    for wave, cmd, per_shard in _step_tasks(step, cfg, prev, out):
        cmds = [[*cmd, "--shard", str(k)] for k in range(shards)] if per_shard else [cmd]
        wall, results = run_children(cmds, parallel=parallel)
        for r in results:
            r.check(f"{step} {wave}")
            cpu += r.cpu_seconds
        wave_peaks[wave] = max(r.peak_rss_mb for r in results)
        seconds += wall
        if wave == "plan":
            shards = len(last_json_line(results[0].stdout)["shards"])
    peak_task = max(wave_peaks, key=lambda w: wave_peaks[w])
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_mb": wave_peaks[peak_task],
            "peak_task": peak_task, "shards": shards, "task_peaks_mb": wave_peaks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--shard-mb", type=float, default=64.0, help="target shard size of every step (MiB)")
    ap.add_argument("--parallel", type=int, default=2, help="tasks of one wave run at once")
    ap.add_argument("--whole-steps", action="store_true", help="each step as one `run` process")
    ap.add_argument("--near-dup-rate", type=float, default=0.05,
                    help="share of records that are near-duplicates of the record before them")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    with scratch_dir("iip-phase1-", args.keep) as tmp:
        corpus = write_instruction_corpus(tmp / "raw", args.records, seed=args.seed, near_dup_rate=args.near_dup_rate)
        print(f"corpus: {args.records} records in {len(corpus.files)} files under {tmp / 'raw'}")
        results: dict[str, dict[str, Any]] = {}
        prev = str(tmp / "raw")
        chain: list[tuple[str, dict[str, object]]] = [("ingest", {"source_name": "bench"}), *STEPS]
        shard_bytes = int(args.shard_mb * 2**20)
        for step, cfg in chain:
            out = str(tmp / "run" / step)
            cfg = {**cfg, "target_shard_bytes": shard_bytes}
            if step == "select":
                cfg = {**cfg, "dsir_dir": f"file://{tmp / 'run' / 'dsir'}"}
            if args.whole_steps:
                res = run_child([sys.executable, "-m", "operators", "run", step, "--config", json.dumps(cfg),
                                 "--input", prev, "--output", out]).check(step)
                measured: dict[str, Any] = {"seconds": res.seconds, "cpu_seconds": res.cpu_seconds,
                                                    "peak_rss_mb": res.peak_rss_mb, "peak_task": "run"}
            else:
                measured = run_step_as_tasks(step, json.dumps(cfg), prev, out, args.parallel)
            stats = json.loads((Path(out) / "stats.json").read_text())
            results[step] = {**measured, "records_in": stats["records_in"], "records_kept": stats["records_kept"],
                             "records_per_s": rate(stats["records_in"], float(measured["seconds"]))}
            print(f"{step:14s} in {stats['records_in']:9d}  kept {stats['records_kept']:9d}  "
                  f"{float(measured['seconds']):8.1f} s  {results[step]['records_per_s']:9.0f} rec/s  "
                  f"{float(measured['peak_rss_mb']):7.0f} MiB (peak task: {measured['peak_task']})", flush=True)
            prev = out
        seconds = round(sum(float(r["seconds"]) for r in results.values()), 2)
        print_json_line({"records": args.records, "seconds": seconds, "records_per_s": rate(args.records, seconds),
                         "peak_rss_mb": max(float(r["peak_rss_mb"]) for r in results.values()),
                         "shard_mb": args.shard_mb, "mode": "whole-steps" if args.whole_steps else "tasks",
                         "steps": results})


if __name__ == "__main__":
    main()
