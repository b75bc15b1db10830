"""Memory of one executor slot: what a running task costs the scheduler pod under the LocalExecutor, without
the step (in kubernetes mode the step runs in its own pod; here, in local mode, its process is left out).

    python bench/task_slot_memory.py [--records 300] [--parallelism 4]

Runs `foundational_selection` through a real Airflow (api-server, scheduler, dag-processor, PostgreSQL,
LocalExecutor) and samples, every 0.2 s, every process of the scheduler's process group: the scheduler itself,
its executor workers and their task processes, and the step processes (`python -m operators`), which are
counted apart. Proportional set size (PSS) is used, so pages the forked processes share are counted once.
Prints the scheduler's own PSS, the executor's PSS at its peak with the number of tasks running then, and so
the cost per running task; the last line is JSON. This sizes `scheduler.resources` in
helm/airflow-values.yaml (docs/kubernetes.md#a-64-pod-run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_json_line, print_machine_load
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


def _group(pgid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process in process group `pgid`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) != pgid:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ProcessLookupError):
            continue
        out.append((int(d.name), cmd))
    return out


class Sampler(threading.Thread):
    """Samples the scheduler's process group until stopped."""

    def __init__(self, af: Airflow) -> None:
        super().__init__(daemon=True)
        self.pgid = af.procs["scheduler"].pid
        self.stop = threading.Event()
        self.samples: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            procs = _group(self.pgid)
            step = [p for p, cmd in procs if "-m operators" in cmd]
            below_step = set()
            for p in step:  # an LLM or dedup step may start helpers of its own: not the executor's either
                below_step |= {q for q, _ in procs if _ppid(q) == p}
            executor = [p for p, _ in procs if p != self.pgid and p not in step and p not in below_step]
            tasks = [p for p in executor if _ppid(p) in executor]  # a task process is a child of a worker
            self.samples.append({"t": time.monotonic(), "scheduler_kib": _pss_kib(self.pgid),
                                 "executor_kib": sum(_pss_kib(p) for p in executor), "workers": len(executor)
                                 - len(tasks), "running_tasks": len(tasks), "step_processes": len(step)})
            time.sleep(0.2)


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


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
    # A slot is a worker process and, while busy, its task process: the cost per running task is read where
    # every worker had a task, so that no idle worker is counted against the tasks.
    busy = [s for s in sampler.samples if s["running_tasks"] and s["running_tasks"] >= s["workers"]]
    if not busy:
        raise SystemExit("no sample had every executor worker running a task")
    peak = max(busy, key=lambda s: s["executor_kib"])
    per_task = max(s["executor_kib"] / s["running_tasks"] for s in busy)
    result = {"run_state": state, "samples": len(sampler.samples),
              "scheduler_mib": round(max(s["scheduler_kib"] for s in sampler.samples) / 1024, 1),
              "executor_peak_mib": round(peak["executor_kib"] / 1024, 1),
              "running_tasks_at_peak": peak["running_tasks"], "workers_at_peak": peak["workers"],
              "mib_per_running_task": round(per_task / 1024, 1),
              "max_running_tasks": max(s["running_tasks"] for s in sampler.samples)}
    print(f"run {state}; scheduler {result['scheduler_mib']} MiB PSS; executor (workers + task processes, no "
          f"step) {result['executor_peak_mib']} MiB with {peak['running_tasks']} tasks running: "
          f"{result['mib_per_running_task']} MiB per running task")
    print_json_line(result)


if __name__ == "__main__":
    main()
