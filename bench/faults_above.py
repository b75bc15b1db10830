"""Faults above the step: the scheduler, a worker or the metadata database fails in the middle of a
`foundational_selection` run through a real Airflow (api-server, scheduler, dag-processor, PostgreSQL,
LocalExecutor), and the run must still end right with nothing lost.

    python bench/faults_above.py [--scenario scheduler-kill|worker-loss|db-restart|all] [--records 90]

First an uninterrupted baseline run. Then, per scenario, a run of the same source and config into its own run
folder, faulted once a shard or stage task (a mapped one) of `near_dedup` or a later step is running: the
middle of the mapped waves:

- scheduler-kill: SIGKILL the scheduler's process group (with LocalExecutor that is its workers and their
  running tasks too, as when the scheduler's pod is OOM-killed), then start a new scheduler;
- worker-loss: SIGKILL the running task's whole process tree (its supervisor, the task runner and the step
  process), as a node loss does: its heartbeat stops, and the scheduler must find it and retry it;
- db-restart: stop PostgreSQL, wait 10 s, start it again.

An Airflow component that exits is started again, as Kubernetes restarts a pod (and counted). A run that
fails is triggered once more (it must then complete). Checks, per scenario: every step folder verifies
(listed files and checksums, no part outside a manifest), the ledger holds from step to step, each step's
kept record ids and stats equal the baseline's ("records lost: 0"), and exactly one new dataset version.
Prints a row per scenario with the recovery time (fault to run end, less the baseline's remaining time) and,
last, one JSON line.

Heartbeat settings are shortened so a lost task is detected in about 30 s instead of Airflow's default 300 s
(`--heartbeat-timeout`); recovery from a lost worker scales with it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import descendants, print_json_line, print_machine_load, process_table
from operators.core import storage
from operators.core.verify import verify_chain
from operators.datasets import versions as dv
from operators.orchestration.dag_builder import FOUNDATIONAL_STEPS
from tests.conftest import run_cli, three_domain_conversations
from tests.integration.harness import (
    FINISHED,
    Airflow,
    Api,
    fresh_database,
    run_state,
    running_airflow,
    task_instances,
    trigger,
    unpause,
)

DAG = "foundational_selection"
SCENARIOS = ("scheduler-kill", "worker-loss", "db-restart")
# Fault once a shard or stage task (a mapped one: the middle of the waves) of one of these groups is running.
FAULT_GROUPS = tuple(f"{s}." for s in FOUNDATIONAL_STEPS[FOUNDATIONAL_STEPS.index("near_dedup"):])
RUN_TIMEOUT_S = 1200.0
VOLATILE = ("seconds", "peak_rss_mb")


def _ingest(tmp: Path, data: Path, records: int) -> None:
    raw = tmp / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text("\n".join(three_domain_conversations(records, "a")) + "\n")
    r = run_cli("run", "ingest", "--config", '{"source_name": "faults"}', "--input", str(raw),
                "--output", str(data / "sources" / "faults" / "ingest"))
    if r.returncode != 0:
        raise SystemExit(f"ingest failed:\n{r.stderr[-3000:]}")


def _conf(run_name: str) -> dict[str, Any]:
    return {"sources": ["faults"], "run_name": run_name, "budgets": {"math": 1.0, "code": 1.0, "general": 1.0},
            "target_shard_mb": 1}


def _running(api: Api, run_id: str) -> dict[str, Any] | None:
    """A running mapped task instance of `run_id` in one of FAULT_GROUPS, or None."""
    for t in task_instances(api, DAG, run_id):
        if t["state"] == "running" and t["map_index"] >= 0 and t["task_id"].startswith(FAULT_GROUPS):
            return t
    return None


def _restart_dead(af: Airflow, restarts: dict[str, int]) -> None:
    """Start again every Airflow component that exited (what a pod's restart policy does)."""
    for name, p in list(af.procs.items()):
        if p.poll() is not None:
            af.log_path(name).rename(af.home / f"{name}.{restarts.get(name, 0)}.out")
            restarts[name] = restarts.get(name, 0) + 1
            print(f"  {name} exited ({p.returncode}); starting it again", flush=True)
            af.start(name, *_ARGS[name](af))


_ARGS = {
    "scheduler": lambda af: ["scheduler"],
    "dag-processor": lambda af: ["dag-processor"],
    "api-server": lambda af: ["api-server", "--host", "127.0.0.1", "--port", af.api_url.rsplit(":", 1)[1],
                              "--workers", "1"],
}


def _wait(api: Api, af: Airflow, run_id: str, restarts: dict[str, int], timeout: float = RUN_TIMEOUT_S
          ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _restart_dead(af, restarts)
        try:
            state = run_state(api, DAG, run_id)
        except Exception as e:  # the api-server or its database may be down for a while
            print(f"  api: {str(e)[:120]}", flush=True)
            time.sleep(2)
            continue
        if state["state"] in FINISHED:
            return state
        time.sleep(1)
    raise SystemExit(f"{run_id} did not finish in {timeout:.0f} s\n{af.diagnostics(DAG)}")


def _task_processes(ti_id: str) -> set[int]:
    """The processes running task instance `ti_id`: its LocalExecutor worker (which names the workload it
    supervises in its title) and everything below it."""
    table = process_table()
    return descendants(table, {pid for pid, (_, cmd) in table.items() if ti_id in cmd})


def _postgres(action: str) -> None:
    cluster = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True,
                             check=True).stdout.split()
    cmd = ["pg_ctlcluster", cluster[0], cluster[1], action] + (["-m", "fast"] if action == "stop" else [])
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True)


def fault(name: str, af: Airflow, api: Api, run_id: str) -> dict[str, Any]:
    """Wait for a running task of the faulted group, inject the fault; what was done."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    ti = None
    while ti is None and time.monotonic() < deadline:
        ti = _running(api, run_id)
        if ti is None and run_state(api, DAG, run_id)["state"] in FINISHED:
            break
        time.sleep(0.2)
    if ti is None:
        raise SystemExit(f"{run_id}: no mapped task of {', '.join(FAULT_GROUPS)} was seen running")
    what: dict[str, Any] = {"task": f"{ti['task_id']}[{ti['map_index']}]"}
    if name == "scheduler-kill":
        os.killpg(af.procs["scheduler"].pid, signal.SIGKILL)
        af.procs["scheduler"].wait()
        what["killed"] = "scheduler process group"
    elif name == "worker-loss":
        pids = _task_processes(ti["id"])
        if not pids:
            raise SystemExit(f"no process found for task instance {ti['id']}")
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        what["killed"] = f"{len(pids)} processes of the task"
    elif name == "db-restart":
        _postgres("stop")
        time.sleep(10)
        _postgres("start")
        what["database"] = "stopped 10 s"
    return what


def outputs(data: Path, run: str) -> dict[str, Any]:
    """Per step: problems found by verify, kept ids (sorted), stats less timings."""
    import pyarrow.parquet as pq

    root = data / "runs" / run
    checks, chain = verify_chain([str(root / s) for s in FOUNDATIONAL_STEPS])
    out: dict[str, Any] = {"problems": [p for c in checks for p in c.problems] + [str(c) for c in chain]}
    for s in FOUNDATIONAL_STEPS:
        stats = json.loads((root / s / "stats.json").read_text())
        m = json.loads((root / s / "_MANIFEST.json").read_text())
        ids = sorted(i for f in m["files"] if f["kind"] == "data"
                     for i in pq.read_table(root / s / f["path"], columns=["id"]).column("id").to_pylist())
        out[s] = {"ids": ids, "stats": {k: v for k, v in stats.items() if k not in VOLATILE}}
    return out


def scenario(name: str, af: Airflow, api: Api, data: Path, base: dict[str, Any], base_s: float) -> dict[str, Any]:
    root = storage.validate_uri(str(data))
    versions_before = dv.versions(root, "foundational")
    restarts: dict[str, int] = {}
    t0 = time.monotonic()
    run_id = trigger(api, DAG, _conf(name), run_id=f"{name}_1")["dag_run_id"]
    what = fault(name, af, api, run_id)
    t_fault = time.monotonic()
    done = _wait(api, af, run_id, restarts)
    attempts = [done["state"]]
    if done["state"] != "success":  # fail clearly, then a re-trigger completes it
        run_id = trigger(api, DAG, _conf(name), run_id=f"{name}_2")["dag_run_id"]
        done = _wait(api, af, run_id, restarts)
        attempts.append(done["state"])
    end = time.monotonic()
    got: dict[str, Any] = outputs(data, name) if done["state"] == "success" else {"problems": ["run failed"]}
    lost = {s: len(set(base[s]["ids"]) - set(got.get(s, {}).get("ids", []))) for s in FOUNDATIONAL_STEPS}
    differ = [s for s in FOUNDATIONAL_STEPS if s in got and got[s] != base[s]]
    new_versions = len(dv.versions(root, "foundational")) - len(versions_before)
    retried = [f"{t['task_id']}[{t['map_index']}]" for t in task_instances(api, DAG, run_id)
               if (t["try_number"] or 0) > 1]
    return {"scenario": name, **what, "runs": attempts, "retried_tasks": retried, "restarted": restarts,
            "run_s": round(end - t0, 1), "baseline_s": round(base_s, 1),
            "recovery_s": round(max(0.0, (end - t0) - base_s), 1), "fault_to_end_s": round(end - t_fault, 1),
            "records_lost": sum(lost.values()), "steps_differing": differ, "new_versions": new_versions,
            "problems": got["problems"], "ok": done["state"] == "success" and not got["problems"] and not differ
            and new_versions == 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    ap.add_argument("--records", type=int, default=90)
    ap.add_argument("--heartbeat-timeout", type=int, default=30)
    args = ap.parse_args()
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    extra = {"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(args.heartbeat_timeout),
             "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
             "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
             "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "15"}
    print_machine_load()
    rows = []
    with tempfile.TemporaryDirectory(prefix="faults-above-") as t:
        tmp = Path(t)
        data = tmp / "data"
        with fresh_database() as url, running_airflow(tmp / "airflow", url, str(data), parallelism=4,
                                                      extra_env=extra) as af:
            api = Api(af.api_url, af.home)
            _ingest(tmp, data, args.records)
            unpause(api, af, DAG)
            t0 = time.monotonic()
            base_run = trigger(api, DAG, _conf("baseline"), run_id="baseline")["dag_run_id"]
            if _wait(api, af, base_run, {})["state"] != "success":
                raise SystemExit(f"the baseline run failed\n{af.diagnostics(DAG)}")
            base_s = time.monotonic() - t0
            base = outputs(data, "baseline")
            if base["problems"]:
                raise SystemExit(f"the baseline does not verify: {base['problems']}")
            print(f"baseline: {base_s:.1f} s, {len(base['select']['ids'])} records selected", flush=True)
            for name in names:
                row = scenario(name, af, api, data, base, base_s)
                rows.append(row)
                print(f"{name}: {'ok' if row['ok'] else 'NOT OK'}; runs {row['runs']}; retried "
                      f"{row['retried_tasks']}; restarted {row['restarted']}; recovery {row['recovery_s']} s "
                      f"(run {row['run_s']} s vs {row['baseline_s']} s); records lost {row['records_lost']}; "
                      f"problems {row['problems'][:3]}", flush=True)
    print_json_line({"scenarios": rows, "all_ok": all(r["ok"] for r in rows)})
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
