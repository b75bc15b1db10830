"""Memory of one executor slot: what a running task costs the scheduler pod under the LocalExecutor, without
the step (in kubernetes mode the step runs in its own pod; here, in local mode, its process is left out).

    python bench/task_slot_memory.py [--records 300] [--parallelism 4]

Runs `foundational_selection` through a real Airflow (api-server, scheduler, dag-processor, PostgreSQL,
LocalExecutor) and samples, every 0.2 s, the scheduler, its executor workers, and below each busy worker its
task process and what that started, except the step (`python -m operators`, which in kubernetes mode runs in
its own pod). Proportional set size (PSS) is used, so pages the forked processes share are counted once.
Prints the scheduler's own PSS and the most a running task cost (its worker plus its task process); the last
line is JSON. This sizes `scheduler.resources` in
helm/airflow-values.yaml (docs/kubernetes.md#a-64-pod-run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import descendants, print_json_line, print_machine_load, process_table
from tests.conftest import run_cli, three_domain_conversations
from tests.integration.harness import (
    Airflow,
    Api,
    fresh_database,
    run_state,
    running_airflow,
    trigger,
    unpause,
)

DAG = "foundational_selection"


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Samples the scheduler, its executor workers and their task processes until stopped."""

    def __init__(self, af: Airflow) -> None:
        super().__init__(daemon=True)
        self.scheduler = af.procs["scheduler"].pid
        self.stop = threading.Event()
        self.samples: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            procs = process_table()
            workers = [p for p, (ppid, cmd) in procs.items() if ppid == self.scheduler and "LocalExecutor" in cmd]
            busy = [p for p in workers if "<idle>" not in procs[p][1]]
            # Below a busy worker: its task process and whatever that started, except the step (`python -m
            # operators`, which in kubernetes mode runs in its pod) and what the step started.
            below = descendants(procs, {p for p, (ppid, _) in procs.items() if ppid in busy},
                                skip=lambda cmd: "-m operators" in cmd)
            self.samples.append({"t": time.monotonic(), "scheduler_kib": _pss_kib(self.scheduler),
                                 "workers": len(workers), "running_tasks": len(busy),
                                 "executor_kib": sum(_pss_kib(p) for p in [*workers, *below]),
                                 "busy_slots_kib": sum(_pss_kib(p) for p in [*busy, *below])})
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--parallelism", type=int, default=4)
    args = ap.parse_args()
    print_machine_load()
    with tempfile.TemporaryDirectory(prefix="slot-memory-") as t:
        tmp = Path(t)
        data = tmp / "data"
        raw = tmp / "raw"
        raw.mkdir()
        (raw / "a.jsonl").write_text("\n".join(three_domain_conversations(args.records, "a")) + "\n")
        r = run_cli("run", "ingest", "--config", '{"source_name": "slots", "max_part_rows": 50}',
                    "--input", str(raw), "--output", str(data / "sources" / "slots" / "ingest"))
        if r.returncode != 0:
            raise SystemExit(f"ingest failed:\n{r.stderr[-3000:]}")
        with fresh_database() as url, running_airflow(tmp / "airflow", url, str(data),
                                                      parallelism=args.parallelism) as af:
            api = Api(af.api_url, af.home)
            unpause(api, af, DAG)
            sampler = Sampler(af)
            sampler.start()
            run_id = trigger(api, DAG, {"sources": ["slots"], "run_name": "slots", "target_shard_mb": 1,
                                        "budgets": {"math": 1.0, "code": 1.0, "general": 1.0}})["dag_run_id"]
            state = "queued"
            while state not in ("success", "failed"):
                time.sleep(1)
                state = run_state(api, DAG, run_id)["state"]
            sampler.stop.set()
            sampler.join()
    # A busy slot is a worker process and its task process (with anything the task started but the step).
    busy = [s for s in sampler.samples if s["running_tasks"]]
    if not busy:
        raise SystemExit("no running task was ever sampled")
    peak = max(busy, key=lambda s: s["busy_slots_kib"])
    per_task = max(s["busy_slots_kib"] / s["running_tasks"] for s in busy)
    result = {"run_state": state, "samples": len(sampler.samples),
              "scheduler_mib": round(max(s["scheduler_kib"] for s in sampler.samples) / 1024, 1),
              "executor_peak_mib": round(max(s["executor_kib"] for s in sampler.samples) / 1024, 1),
              "busy_slots_peak_mib": round(peak["busy_slots_kib"] / 1024, 1),
              "running_tasks_at_peak": peak["running_tasks"], "workers_at_peak": peak["workers"],
              "mib_per_running_task": round(per_task / 1024, 1),
              "max_running_tasks": max(s["running_tasks"] for s in sampler.samples)}
    print(f"run {state}; scheduler {result['scheduler_mib']} MiB PSS; busy slots (worker + task process, no "
          f"step) {result['busy_slots_peak_mib']} MiB with {peak['running_tasks']} tasks running; at most "
          f"{result['mib_per_running_task']} MiB per running task; all executor processes at most "
          f"{result['executor_peak_mib']} MiB")
    print_json_line(result)


if __name__ == "__main__":
    main()
