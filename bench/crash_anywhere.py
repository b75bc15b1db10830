"""Reliability: kill Phase 1 tasks anywhere (like `kill -9`), re-run them, and compare with an uninterrupted run.

    python bench/crash_anywhere.py [--records 600] [--kills-per-step 0] [--seed 7]

`--kills-per-step 0` (the default here) is the exhaustive variant: every fault point every task reaches,
each hit one kill (hundreds of runs; minutes). The default test (tests/reliability/test_crash_anywhere.py)
uses a seeded sample of a few kills per step from the same harness.

How: every step of Phase 1 (ingest, filter, exact_dedup, near_dedup, decontaminate, route, dsir, select)
runs as its DAG tasks (plan, each map/partition stage per shard, each reduce stage, `run` per shard, the
step's `reduce`), each task in a forked child process that runs the CLI entry point. A first, uninterrupted
pass records which fault points (`operators/core/faults.py`) each task passes through. A second pass over
a fresh root kills chosen tasks at chosen hits (`IIP_FAULT=<point>:<n>`: `os._exit(137)`, no cleanup), each
kill from the state the task started from, then retries the task as Airflow would: the retry must commit
exactly what the uninterrupted task committed (file checksums and row counts, stats). Then, per step: the
record ids of every shard manifest and the step's stats (timing and memory fields aside) must equal the
uninterrupted run's, every file the step manifest lists must exist with its checksum, a reader must see
exactly those files, and no `part-*` file may lie outside a committed manifest.
Prints LAST one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_json_line, write_instruction_corpus

# Small parts and shards so that each step has several shards and each task several part uploads.
COMMON: dict[str, Any] = {"max_part_rows": 40, "batch_rows": 64}
PIPELINE: list[tuple[str, dict[str, Any]]] = [
    ("ingest", {"source_name": "crash", "target_shard_bytes": 200_000}),
    ("filter", {"languages": [], "target_shard_bytes": 60_000}),
    ("exact_dedup", {"target_shard_bytes": 60_000}),
    ("near_dedup", {"target_shard_bytes": 60_000}),
    ("decontaminate", {"target_shard_bytes": 60_000}),
    ("route", {"target_shard_bytes": 60_000}),
    ("dsir", {"target_shard_bytes": 60_000}),
    ("select", {"budgets": {"math": 0.5, "code": 0.5, "general": 0.3}, "target_shard_bytes": 60_000}),
]
VOLATILE_STATS = ("seconds", "peak_rss_mb")  # differ run to run by nature
TRACE_ENV = "IIP_FAULT_TRACE"
FAULT_ENV = "IIP_FAULT"
COMMIT_POINTS = ("commit.before", "commit.after")


@dataclass
class Task:
    """One DAG task of a step: the CLI arguments after `python -m operators`."""

    step: str
    name: str
    argv: list[str]


@dataclass
class Figures:
    """What the faulted pass did."""

    kills: int = 0
    survived: int = 0  # kills whose retry succeeded and committed what the uninterrupted task did
    by_point: Counter[str] = field(default_factory=Counter)
    by_task_kind: Counter[str] = field(default_factory=Counter)
    temp_leftovers: int = 0


def run_task(argv: list[str], env: dict[str, str]) -> int:
    """Run the CLI in a forked child (a real process that can die at any instruction); its exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        rc = 70
        try:
            os.environ.update(env)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # the CLI's JSON result lines: not needed, the manifests are checked
            from operators.cli import main

            rc = main(argv)
        except BaseException:  # the child must never return into the parent's code
            import traceback

            traceback.print_exc()
        finally:
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _preload() -> None:
    """Import the CLI and every Phase 1 step once here, so each forked task starts warm (milliseconds)."""
    from operators.cli import main  # noqa: F401
    from operators.core.registry import step_class

    for step, _ in PIPELINE:
        step_class(step)


def step_tasks(step: str, cfg: dict[str, Any], inputs: list[str], out: str) -> list[Task]:
    """The step's tasks in DAG order (needs the plan to be committed for the per-shard ones)."""
    from operators.core import storage
    from operators.core.registry import step_class
    from operators.core.runner import load_plan

    c = ["--config", json.dumps({**COMMON, **cfg}), "--output", out]
    shards = len(load_plan(storage.validate_uri(out)).shards)
    tasks: list[Task] = []
    for st in step_class(step).stages:
        if st.kind == "reduce":
            tasks.append(Task(step, f"stage:{st.name}", ["stage", step, "--stage", st.name, *c]))
        else:
            tasks += [Task(step, f"{st.kind}:{st.name}:{k}", ["stage", step, "--stage", st.name, "--shard", str(k), *c])
                      for k in range(shards)]
    tasks += [Task(step, f"run:{k}", ["run", step, "--shard", str(k), *c]) for k in range(shards)]
    tasks.append(Task(step, "reduce", ["reduce", step, "--output", out]))
    return tasks


def plan_task(step: str, cfg: dict[str, Any], inputs: list[str], out: str) -> Task:
    c = ["--config", json.dumps({**COMMON, **cfg}), "--output", out]
    return Task(step, "plan", ["plan", step, *c, *[a for i in inputs for a in ("--input", i)]])


def _traced(task: Task, trace_dir: Path, env: dict[str, str]) -> Counter[str]:
    trace = trace_dir / f"{task.step}.{task.name.replace(':', '_')}.trace"
    trace.unlink(missing_ok=True)
    rc = run_task(task.argv, {**env, TRACE_ENV: str(trace)})
    if rc != 0:
        raise RuntimeError(f"uninterrupted task {task.step} {task.name} failed with status {rc}")
    return Counter(trace.read_text().split()) if trace.exists() else Counter()


def baseline(corpus: Path, root: Path, trace_dir: Path, env: dict[str, str]) -> dict[tuple[str, str], Counter[str]]:
    """Run the pipeline uninterrupted under `root`; the fault points each task passes, with hit counts."""
    hits: dict[tuple[str, str], Counter[str]] = {}
    prev = str(corpus)
    for step, cfg in PIPELINE:
        out = str(root / step)
        t = plan_task(step, cfg, [prev], out)
        hits[(step, t.name)] = _traced(t, trace_dir, env)
        for t in step_tasks(step, cfg, [prev], out):
            hits[(step, t.name)] = _traced(t, trace_dir, env)
        prev = out
    return hits


def choose_kills(hits: dict[tuple[str, str], Counter[str]], per_step: int, seed: int
                 ) -> dict[tuple[str, str], list[tuple[str, int]]]:
    """(step, task) -> kills [(point, n)], each to be applied in its own attempt of that task.

    `per_step` 0: every hit of every point (exhaustive). Else a seeded sample of `per_step` kills per step,
    at least one during a part upload and one during a commit where the step has them."""
    kills: dict[tuple[str, str], list[tuple[str, int]]] = {}
    steps = list(dict.fromkeys(s for s, _ in hits))
    for step in steps:
        windows = [(task, p, n) for (s, task), c in hits.items() if s == step
                   for p, count in sorted(c.items()) for n in range(1, count + 1)]
        if per_step:
            rng = random.Random(f"{seed}:{step}")
            picked = []
            for want in (("part.written",), COMMIT_POINTS):
                pool = [w for w in windows if w[1] in want]
                if pool:
                    picked.append(rng.choice(pool))
            # ... and one in every kind of task the step has (plan, map, partition, reduce stage, run, reduce).
            for kind in sorted({_kind(w[0]) for w in windows}):
                if not any(_kind(w[0]) == kind for w in picked):
                    picked.append(rng.choice([w for w in windows if _kind(w[0]) == kind]))
            rest = [w for w in windows if w not in picked]
            picked += rng.sample(rest, min(len(rest), max(0, per_step - len(picked))))
            windows = picked
        for task, p, n in windows:
            kills.setdefault((step, task), []).append((p, n))
    return kills


def _kind(task_name: str) -> str:
    """plan, map, partition, stage (a reduce stage), run or reduce."""
    return task_name.split(":")[0]


def _task_output(task: Task, step_dir: Path) -> Path:
    """The file a task commits: its plan, its stage or shard manifest, or the step manifest."""
    kind, *rest = task.name.split(":")
    if kind == "plan":
        return step_dir / "_plan.json"
    if kind in ("map", "partition"):
        return step_dir / "_stages" / rest[0] / "_shards" / f"{int(rest[1]):05d}.json"
    if kind == "stage":
        return step_dir / "_stages" / rest[0] / "_MANIFEST.json"
    if kind == "run":
        return step_dir / "_shards" / f"{int(rest[0]):05d}.json"
    return step_dir / "_MANIFEST.json"


def _committed(path: Path) -> Any:
    """What a task committed, less what differs by nature (attempt ids in names, timing, memory, roots)."""
    doc = json.loads(path.read_text())
    if path.name == "_plan.json":
        return [(s["index"], len(s["uris"]), s["bytes"]) for s in doc["shards"]]
    stats = {k: v for k, v in doc["stats"].items() if k not in VOLATILE_STATS}
    return [sorted((f["kind"], f["rows"], f["sha256"]) for f in doc["files"]), stats, doc.get("summary")]


def _killed_then_retried(task: Task, step_dir: Path, kills: list[tuple[str, int]], env: dict[str, str],
                         figures: Figures, clean_dir: Path | None) -> None:
    """Each chosen window: from the state before the task, kill an attempt there (status 137 expected), then
    retry; the retry must succeed and commit what the uninterrupted task committed."""
    snap = step_dir.with_name(f".before-{step_dir.name}")
    shutil.rmtree(snap, ignore_errors=True)
    if kills and step_dir.exists():
        shutil.copytree(step_dir, snap, symlinks=True)
    for k, (p, n) in enumerate(kills):
        if k:  # every kill starts from the state the task started from
            shutil.rmtree(step_dir, ignore_errors=True)
            if snap.exists():
                shutil.copytree(snap, step_dir, symlinks=True)
        rc = run_task(task.argv, {**env, FAULT_ENV: f"{p}:{n}"})
        if rc != 137:
            raise RuntimeError(f"{task.step} {task.name}: the attempt to kill at {p}:{n} exited {rc}, not 137")
        figures.kills += 1
        figures.by_point[p] += 1
        figures.by_task_kind[_kind(task.name)] += 1
        _retry(task, step_dir, env, clean_dir, f"after a kill at {p}:{n}")
        figures.survived += 1
    if not kills:
        _retry(task, step_dir, env, None, "uninterrupted")
    shutil.rmtree(snap, ignore_errors=True)


def _retry(task: Task, step_dir: Path, env: dict[str, str], clean_dir: Path | None, what: str) -> None:
    rc = run_task(task.argv, env)
    if rc != 0:
        raise RuntimeError(f"{task.step} {task.name}: retry {what} failed with status {rc}")
    if clean_dir is not None:
        got, want = _committed(_task_output(task, step_dir)), _committed(_task_output(task, clean_dir))
        if got != want:
            raise RuntimeError(f"{task.step} {task.name}: retry {what} committed {got}, uninterrupted {want}")


def faulted(corpus: Path, root: Path, kills: dict[tuple[str, str], list[tuple[str, int]]], env: dict[str, str],
            figures: Figures, clean: Path) -> None:
    """Run the pipeline under `root`, killing the chosen tasks at the chosen windows and retrying them."""
    prev = str(corpus)
    for step, cfg in PIPELINE:
        out = str(root / step)
        t = plan_task(step, cfg, [prev], out)
        _killed_then_retried(t, root / step, kills.get((step, t.name), []), env, figures, clean / step)
        for task in step_tasks(step, cfg, [prev], out):
            _killed_then_retried(task, root / step, kills.get((step, task.name), []), env, figures, clean / step)
        prev = out


def _shard_ids(step_dir: Path) -> dict[int, list[str]]:
    """Record ids of each shard's committed data files, in file order."""
    import pyarrow.parquet as pq

    from operators.core.manifest import read_manifest, shard_manifest_uri
    from operators.core.runner import load_plan

    uri = f"file://{step_dir}"
    out: dict[int, list[str]] = {}
    for spec in load_plan(uri).shards:
        m = read_manifest(shard_manifest_uri(uri, spec.index))
        assert m is not None, f"{step_dir}: shard {spec.index} not committed"
        ids: list[str] = []
        for f in m.data_files():
            ids += pq.read_table(step_dir / f.path, columns=["id"]).column("id").to_pylist()
        out[spec.index] = ids
    return out


def _stats(step_dir: Path) -> dict[str, Any]:
    stats = json.loads((step_dir / "stats.json").read_text())
    return {k: v for k, v in stats.items() if k not in VOLATILE_STATS}


def problems(step: str, clean: Path, hurt: Path) -> list[str]:
    """Differences of the faulted step output from the clean one, and files a reader could trip on
    (`operators.core.verify`: listed files and checksums, part files outside every manifest, a folder reader)."""
    from operators.core.verify import verify_step

    out: list[str] = []
    if _shard_ids(clean) != _shard_ids(hurt):
        out.append(f"{step}: record ids per shard differ")
    if _stats(clean) != _stats(hurt):
        out.append(f"{step}: stats differ: {_stats(clean)} vs {_stats(hurt)}")
    return out + [f"{step}: {p}" for p in verify_step(f"file://{hurt}").problems]


def run(records: int, per_step: int, seed: int, work: Path) -> dict[str, Any]:
    """The whole experiment under `work`; figures, with `problems` empty when every crash was survived."""
    corpus = work / "corpus"
    write_instruction_corpus(corpus, records, n_files=4, seed=seed, malformed_rate=0.02, near_dup_rate=0.05)
    env = {"IIP_LOG_LEVEL": "WARNING"}
    _preload()
    (work / "traces").mkdir()
    hits = baseline(corpus, work / "clean", work / "traces", env)
    kills = choose_kills(hits, per_step, seed)
    figures = Figures()
    faulted(corpus, work / "hurt", kills, env, figures, work / "clean")
    found = [p for step, _ in PIPELINE for p in problems(step, work / "clean" / step, work / "hurt" / step)]
    figures.temp_leftovers = len(list((work / "hurt").rglob("*.tmp-*")))
    windows = sum(sum(c.values()) for c in hits.values())
    return {"records": records, "steps": [s for s, _ in PIPELINE], "tasks": len(hits), "fault_windows": windows,
            "kills_planned": sum(len(v) for v in kills.values()), "kills": figures.kills,
            "crashes_survived": figures.survived,
            "kills_by_point": dict(figures.by_point), "kills_by_task_kind": dict(figures.by_task_kind),
            "temp_files_left": figures.temp_leftovers, "problems": found}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=600)
    ap.add_argument("--kills-per-step", type=int, default=0, help="0: every window (exhaustive)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="crash-") as d:
        result = run(args.records, args.kills_per_step, args.seed, Path(d))
    for p in result["problems"]:
        print("PROBLEM:", p)
    print_json_line(result)
    sys.exit(1 if result["problems"] else 0)


if __name__ == "__main__":
    main()
