"""Scale model of Phase 1: measure every task at two sizes, fit each task kind's growth, project N records on P pods.

    python bench/scale.py                       # measure 1M and 2M records, project 116M on 64 pods
    python bench/scale.py --quick               # 20k and 40k records, 1.5 min: checks the machinery; its
                                                # projection extrapolates 3000x and is not a figure
    python bench/scale.py --project 116000000 --pods 64 [--shard-mb 256] [--pod-start 10] [--sched-cost 2.2]
    python bench/scale.py --check 4000000       # also run 4M for real and compare it with its projection
    python bench/scale.py --from-json FILE      # re-project from a saved measurement (no new runs)

1. **Measure.** At each size it writes a synthetic corpus (bench._common: four formats, malformed lines, near
   duplicates), ingests it (setup, not Phase 1), and runs `foundational_selection`'s Phase 1 the way the DAG
   runs it (operators/orchestration/chain.py): per step `plan` (committing the step before it), its stage tasks
   (map and partition stages once per shard, reduce stages once) and `run` per shard, where each shard task goes
   on to the next steps' record-local work on its shard (fused; `--unfused` measures without) and a wave whose
   every shard the fused tasks did maps no task (projected at one scheduler cost); a stage-less step those tasks
   always run has no tasks (the next plan commits it: `--through`); then the tail: the export group (its plan,
   which commits select, a shard task per select shard that
   validates and exports its parts, the commit), publish and report. Every task is its own
   `python -m operators` process (through bench._task_probe), `--parallel` at a time, so each task's wall
   time, CPU seconds, peak RSS, bytes read and written, and storage calls are its own. Both sizes use the
   same number of shards, so the records per shard-task double with the corpus.
2. **Fit.** A task kind is (step, wave). Its driver is the records it handles: a per-shard task (map,
   partition, run) handles its shard's share of the step's input, a whole-step task (plan, reduce stages,
   the tail) the whole input. Each kind's mean task seconds (the larger of wall and CPU: a
   pod has one core), slowest task seconds and largest peak RSS are fitted as `a + b * driver` through the two
   sizes, `b >= 0`. A kind is "constant" when its cost moved less than 15% (or 0.5 s and 16 MiB) while its
   driver doubled; else it grows "with its shard" (a per-shard task: bounded by the shard size) or "with the
   corpus" (unbounded).
3. **Project.** For N records on P pods: each step's input is N times the measured share that reached it;
   its shard count is that input over the records a `--shard-mb` shard holds (measured bytes per record of
   that step's input). Waves follow the DAG: a wave of T tasks runs in ceil(T / P) rounds, each task paying
   its fitted seconds plus `--pod-start` plus `--sched-cost` (the scheduler's cost of one task: 3.1 s
   median no-op task measured by bench/load.py, less the 0.9 s process start already in every measured
   task; docs/reliability.md#load). A light (grouped) wave has min(shards, P) tasks in one round, each
   handling ceil(shards / tasks) shards in turn (measured the same way: `--parallel` tasks with `--of`,
   docs/architecture.md#grouped-waves). The critical path is the waves in order; nothing in Phase 1 runs two
   waves at once.
4. **Check** (`--check N`): run N for real with the larger size's records per shard, project N with the
   measured run's own settings (P = `--parallel`, no pod start, no scheduler), and print the error.

Prints per-kind costs and growth, then the projection: wall time, task count, the largest task (seconds and
peak RSS) and the five waves that cost the most. The last line is JSON with projected_wall_minutes, tasks,
max_task_rss_mb, max_task_seconds and critical_path (plus the check's error when run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import median
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    last_json_line,
    print_json_line,
    print_machine_load,
    run_child,
    run_children,
    scratch_dir,
    write_instruction_corpus,
)
from bench.phase1 import STEPS  # the same Phase 1 configs as the per-step benchmark

TAIL = ("publish", "report")  # whole-run tasks after the export group
TAIL_TRIES = 3
FLAT = 0.15  # a kind whose cost moves less than this while its driver doubles is "constant"


@dataclass
class Task:
    """What one measured task cost."""

    step: str
    wave: str
    per_shard: bool
    shard: int
    driver: float  # records it handles (its shard's share, or the step's whole input)
    seconds: float
    cpu_seconds: float
    rss_mb: float
    read_mb: float
    written_mb: float
    storage_calls: int
    grouped: bool = False  # a light wave's task: several shards in turn (`--of`), `driver` counts them all
    records: int = 0  # a shard task's own shard's records, when its summary says (0: not known)


# ----------------------------------------------------------------------------------------------------
# 1. Measure


def _kept_bytes(step_dir: Path) -> int:
    """Bytes of a step's kept parts: what the next step reads and plans its shards by. Not its dropped parts,
    nor its stages' side tables (dedup hash rows and signatures would make a step after them look 4x bigger
    per record, and so project 4x its real shard count)."""
    return sum(p.stat().st_size for p in step_dir.glob("part-*.parquet"))


def _run_wave(step: str, wave: str, cmds: list[list[str]], per_shard: bool, driver: float | list[float],
              parallel: int, probe_dir: Path, grouped: bool = False) -> tuple[float, list[Task], list[str]]:
    """Run one wave's tasks through the probe; its wall seconds, its tasks' costs, their stdouts (`driver`: the
    records each task handles, one figure for all or one per task)."""
    drivers = driver if isinstance(driver, list) else [driver] * len(cmds)
    results = [probe_dir / f"{step}.{wave}.{k}.json" for k in range(len(cmds))]
    wall, done = run_children([[sys.executable, "-m", "bench._task_probe", str(r), *c]
                               for r, c in zip(results, cmds, strict=True)], parallel=parallel)
    tasks = []
    for k, (res, path) in enumerate(zip(done, results, strict=True)):
        res.check(f"{step} {wave}")
        probe = json.loads(path.read_text())
        tasks.append(Task(step, wave, per_shard, k, drivers[k], res.seconds, res.cpu_seconds, res.peak_rss_mb,
                          round(probe["read_bytes"] / 2**20, 2), round(probe["written_bytes"] / 2**20, 2),
                          int(probe["storage_calls"]), grouped))
    return wall, tasks, [r.stdout for r in done]


def measure(records: int, shards: int, parallel: int, work: Path, seed: int = 1234, fuse: bool = True
            ) -> dict[str, Any]:
    """Phase 1 over `records` synthetic records in about `shards` shards per step, task by task (`fuse`: with the
    DAG's fused shard tasks)."""
    from operators.core.registry import step_class
    from operators.orchestration.chain import chain_steps
    from operators.orchestration.step_command import step_arguments

    raw, run, root = work / "raw", work / "run", work / "data"
    write_instruction_corpus(raw, records, n_files=2 * shards, seed=seed, near_dup_rate=0.05)
    raw_bytes = sum(p.stat().st_size for p in raw.iterdir())
    ingest = {"source_name": "bench", "target_shard_bytes": raw_bytes // shards + 1}
    run_child([sys.executable, "-m", "operators", "run", "ingest", "--config", json.dumps(ingest),
               "--input", str(raw), "--output", str(run / "ingest")]).check("ingest")
    shard_bytes = _kept_bytes(run / "ingest") // shards + 1
    probe_dir = work / "probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    prev = run / "ingest"
    tasks: list[Task] = []
    waves: list[dict[str, Any]] = []
    steps: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {step: dict(extra) for step, extra in STEPS}
    configs["select"]["dsir_dir"] = str(run / "dsir")
    # The shuffles at the projected scale: there, the default of about one partition per shard (a power of two)
    # is past its floor of 64, so a partition task holds about a shard's rows whatever the corpus. Here, with
    # 8-24 shards, the floor would put 1/64 of a growing corpus in each partition: a growth 116M never sees.
    for step, field in (("exact_dedup", "partitions"), ("near_dedup", "band_partitions")):
        configs[step][field] = 1 << (2 * shards - 1).bit_length()
    # As the DAG's chain runs it (operators/orchestration/chain.py): each plan commits the step before it and plans
    # aligned to it; shard tasks go on to the next steps' record-local work, which then has no tasks of its own.
    links = chain_steps([step for step, _ in STEPS], configs=configs, inputs=[str(prev)], run=str(run),
                        common={"target_shard_bytes": shard_bytes}, fuse=fuse)
    for link in links:
        # Its input: the step before it, committed by this plan (with any stage-less steps between, which have
        # no tasks: `ChainLink.through`).
        step, out, prev = link.step, Path(link.output), Path(link.inputs[0])
        args: dict[str, Any] = {"config": link.config, "inputs": link.inputs, "output": link.output}
        plan_wall, plan_tasks, plan_out = _run_wave(step, "plan", [step_arguments(
            "plan", step, after=link.after, fold_head=link.fold_head, through=link.through, **args)], False, 0.0,
            parallel, probe_dir)
        # The upstream's stats exist once this plan has committed it.
        records_in = int(json.loads((prev / "stats.json").read_text())["records_kept"])
        input_bytes = _kept_bytes(prev)
        plan_tasks = [replace(t, driver=records_in) for t in plan_tasks]
        planned = last_json_line(plan_out[0])
        n_shards, to_run = len(planned["shards"]), planned["to_run"]
        per_task = records_in / n_shards
        waves.append({"step": step, "wave": "plan", "tasks": 1, "seconds": plan_wall})
        tasks += plan_tasks
        cls = step_class(step)
        stages = {st.name: st for st in cls.stages}
        later: list[tuple[str, list[list[str]], bool, list[float] | None]] = []
        for name in link.stage_tasks():
            if stages[name].kind == "reduce":
                later.append((name, [step_arguments("stage", step, stage=name, **args)], False, None))
            else:
                later.append((name, *_shard_wave(stages[name].grouped, to_run, parallel, per_task, action="stage",
                                                 step=step, stage=name, **args)))
        later.append(("run", *_shard_wave(link.grouped_run(), to_run, parallel, per_task,
                                          action="run", step=step, then=link.then, **args)))
        empty = 0
        for wave, cmds, mapped, grouped in later:
            if not cmds:  # every shard's work was done by the upstream's fused tasks: the wave maps no task
                empty += 1
                continue
            wall, done, outs = _run_wave(step, wave, cmds, mapped, grouped or (per_task if mapped else records_in),
                                         parallel, probe_dir, grouped is not None)
            if wave == "run" and mapped and grouped is None:
                # A shard task's own records: this corpus's shards are uneven (files grouped by bytes), the
                # projected run's are not (regrouped to equal bytes), so its slowest task is fitted per record.
                done = [replace(t, records=int(last_json_line(o)["records_in"]))
                        for t, o in zip(done, outs, strict=True)]
            waves.append({"step": step, "wave": wave, "tasks": len(cmds), "seconds": wall})
            tasks += done
        steps[step] = {"records_in": records_in, "shards": n_shards, "input_bytes": input_bytes,
                       "bytes_per_record": input_bytes / max(records_in, 1), "empty_waves": empty,
                       **({"aligned_to": links[0].step} if link.after else {})}
        prev = out
    # The tail's export group as the DAG runs it: its plan (which commits the chain's last step, select), a shard
    # task per select shard, the commit.
    targs: dict[str, Any] = {"config": {"validate": True, "run": str(run), "name": "foundational"},
                             "inputs": [str(prev)], "output": str(run / "export")}
    plan_wall, plan_tasks, plan_out = _run_wave("export", "plan", [step_arguments(
        "tail_plan", "select", after="select", **targs)], False, 0.0, parallel, probe_dir)
    selected = int(json.loads((prev / "stats.json").read_text())["records_kept"])
    plan_tasks = [replace(t, driver=selected) for t in plan_tasks]
    n_tail = len(last_json_line(plan_out[0])["shards"])
    waves.append({"step": "export", "wave": "plan", "tasks": 1, "seconds": plan_wall})
    tasks += plan_tasks
    for wave, cmds, mapped, grouped in (
            ("shard", *_shard_wave(True, list(range(n_tail)), parallel, selected / n_tail, action="tail_shard",
                                   step="select", **targs)),
            ("commit", [step_arguments("tail_commit", "select", **targs)], False, None)):
        wall, done, _ = _run_wave("export", wave, cmds, mapped, grouped or selected, parallel, probe_dir,
                                  grouped is not None)
        waves.append({"step": "export", "wave": wave, "tasks": len(cmds), "seconds": wall})
        tasks += done
    select_bytes = _kept_bytes(prev)
    steps["export"] = {"records_in": selected, "shards": n_tail, "input_bytes": select_bytes,
                       "bytes_per_record": select_bytes / max(selected, 1), "shards_of": "select"}
    def tail_cmd(wave: str, k: int) -> list[str]:
        if wave == "report":
            return step_arguments("report", "report", output=str(run))
        # Each try publishes into its own data root: a second publish of one output would be skipped.
        return step_arguments("publish", "foundational", inputs=[str(prev)], output=str(run), config={"keep": 3},
                              index=str(root / f"try{k}"))

    for wave in TAIL:
        # One task each on the critical path, a second or two, projected 100x: the median of three tries, so
        # one slow try does not become minutes.
        tries = [_run_wave("tail", wave, [tail_cmd(wave, k)], False, records, parallel, probe_dir)
                 for k in range(TAIL_TRIES)]
        # Each figure's own median: the try with the median CPU time may have had the largest peak RSS (publish
        # varied by 45 MiB between tries, enough to be fitted as growing with the corpus).
        wall = median(t[0] for t in tries)
        one = [t[1][0] for t in tries]
        done = [replace(one[0], **{f: median(getattr(t, f) for t in one) for f in (
            "seconds", "cpu_seconds", "rss_mb", "read_mb", "written_mb")})]
        waves.append({"step": "tail", "wave": wave, "tasks": 1, "seconds": wall})
        tasks += done
    return {"records": records, "shards": shards, "parallel": parallel, "selected": selected,
            "wall_seconds": round(sum(w["seconds"] for w in waves), 2), "steps": steps, "waves": waves,
            "tasks": [asdict(t) for t in tasks]}


def _shard_wave(grouped: bool, shards: list[int], parallel: int, per_shard: float, **kwargs: Any
                ) -> tuple[list[list[str]], bool, list[float] | None]:
    """A per-shard wave's commands as the DAG maps it: a task per shard, or, `grouped` (a light wave), the
    shard list zipped with `parallel` slots, task j doing every G-th shard (`--of`); with each grouped task's
    driver (its shards' records), or None."""
    from operators.core.step import slot_members
    from operators.orchestration.step_command import step_arguments

    if not grouped:
        return [step_arguments(shard=k, **kwargs) for k in shards], True, None
    tasks = shards[:parallel]
    drivers = [per_shard * len(slot_members(j, parallel, len(shards))) for j in tasks]
    return [step_arguments(shard=j, of=parallel, **kwargs) for j in tasks], True, drivers


# ----------------------------------------------------------------------------------------------------
# 2. Fit


@dataclass
class Growth:
    """One task kind's fitted cost: `a + b * driver` for mean seconds, largest seconds and peak RSS."""

    step: str
    wave: str
    per_shard: bool
    seconds_a: float
    seconds_b: float
    max_a: float
    max_b: float
    rss_a: float
    rss_b: float
    grows: str  # "constant", "with its shard" (bounded by the shard size) or "with the corpus"
    measured: list[dict[str, float]]
    grouped: bool = False  # a light wave: min(shards, pods) tasks, each doing ceil(shards / tasks) shards

    def seconds(self, driver: float) -> float:
        """Projected seconds of the mean task handling `driver` records."""
        return self.seconds_a + self.seconds_b * driver

    def max_seconds(self, driver: float) -> float:
        """Projected seconds of the slowest task handling `driver` records."""
        return self.max_a + self.max_b * driver

    def rss_mb(self, driver: float) -> float:
        """Projected peak RSS of one task handling `driver` records."""
        return self.rss_a + self.rss_b * driver


def _line(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """(a, b) of the line through two points, with b >= 0 and a >= 0 (a mean when the drivers are equal)."""
    if abs(x2 - x1) < 1e-9:
        return (y1 + y2) / 2, 0.0
    b = max(0.0, (y2 - y1) / (x2 - x1))
    a = max(0.0, y2 - b * x2)
    return a, b


def _kind_summary(tasks: list[dict[str, Any]]) -> dict[str, float]:
    """One kind's tasks at one size: the driver, the mean task's seconds (what a wave of them costs), and the
    largest task's seconds and RSS (what sizes a pod). A shard task that knows its own records (`records`) has
    its seconds scaled to the wave's mean driver for the largest: the projected run's shards hold equal bytes,
    so a task that was slow here only because its shard was big is not the projection's largest."""
    core = [max(t["seconds"], t["cpu_seconds"]) for t in tasks]
    driver = max(t["driver"] for t in tasks)
    scaled = [c * driver / t["records"] if t.get("records") else c for c, t in zip(core, tasks, strict=True)]
    return {"driver": driver, "seconds": sum(core) / len(core), "max_seconds": max(scaled),
            "rss_mb": max(t["rss_mb"] for t in tasks), "tasks": len(tasks),
            "read_mb": max(t["read_mb"] for t in tasks), "written_mb": max(t["written_mb"] for t in tasks),
            "storage_calls": max(t["storage_calls"] for t in tasks)}


def fit(small: dict[str, Any], large: dict[str, Any]) -> dict[tuple[str, str], Growth]:
    """Each task kind's growth between two measured sizes."""
    def kinds(m: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for t in m["tasks"]:
            out.setdefault((t["step"], t["wave"]), []).append(t)
        return out

    k1, k2 = kinds(small), kinds(large)
    model: dict[tuple[str, str], Growth] = {}
    for key, tasks2 in k2.items():
        s1, s2 = _kind_summary(k1[key]), _kind_summary(tasks2)
        sa, sb = _line(s1["driver"], s1["seconds"], s2["driver"], s2["seconds"])
        ma, mb = _line(s1["driver"], s1["max_seconds"], s2["driver"], s2["max_seconds"])
        ra, rb = _line(s1["driver"], s1["rss_mb"], s2["driver"], s2["rss_mb"])
        # Relative and absolute: half a second or 16 MiB of noise on a 0.4 s task is not growth.
        moved = max(abs(s2["seconds"] - s1["seconds"]) / max(s1["seconds"], 1e-9)
                    if abs(s2["seconds"] - s1["seconds"]) > 0.5 else 0.0,
                    abs(s2["rss_mb"] - s1["rss_mb"]) / max(s1["rss_mb"], 1e-9)
                    if abs(s2["rss_mb"] - s1["rss_mb"]) > 16 else 0.0)
        per_shard = bool(tasks2[0]["per_shard"])
        grows = "constant" if moved < FLAT else "with its shard" if per_shard else "with the corpus"
        if grows == "constant":
            # Within noise: the larger measured value, not a slope through noise (16 MiB between two sizes
            # would project as gigabytes at 116M). A check run refits kinds that do grow (`refit_grown`).
            sa, sb = max(s1["seconds"], s2["seconds"]), 0.0
            ma, mb = max(s1["max_seconds"], s2["max_seconds"]), 0.0
            ra, rb = max(s1["rss_mb"], s2["rss_mb"]), 0.0
        model[key] = Growth(key[0], key[1], per_shard, sa, sb, ma, mb, ra, rb, grows, [s1, s2],
                            bool(tasks2[0].get("grouped", False)))
    return model


def refit_grown(model: dict[tuple[str, str], Growth], big: dict[tuple[str, str], Growth]
                ) -> tuple[dict[tuple[str, str], Growth], list[str]]:
    """`model` with whole-step kinds refitted on the large size and the check (`big`, fitted on those two), where
    the larger pair says more: a kind whose peak RSS grew past `FLAT` there (it looked constant between the two
    small sizes; now its growth shows), and a kind that grew with the corpus between the small sizes but is
    constant between the larger ones (a capped cost, such as the report's sample of at most 200k selected
    records, which the smaller sizes had not filled). Per-shard kinds stay: the check keeps their shard size, so
    it says nothing about their slope."""
    out = dict(model)
    refitted = []
    for key, g in big.items():
        if g.per_shard or key not in model:
            continue
        rise = g.measured[1]["rss_mb"] / max(g.measured[0]["rss_mb"], 1e-9) - 1
        if rise > FLAT:
            out[key] = replace(g, grows="with the corpus")
        elif model[key].grows == "with the corpus" and g.grows == "constant":
            out[key] = g
        else:
            continue
        refitted.append(f"{key[0]}.{key[1]}")
    return out, refitted


# ----------------------------------------------------------------------------------------------------
# 3. Project


def project(model: dict[tuple[str, str], Growth], large: dict[str, Any], records: int, pods: int,
            shard_mb: float | None, pod_start: float, sched_cost: float,
            records_per_shard: dict[str, float] | None = None, shard_multiple: int = 0) -> dict[str, Any]:
    """Projected Phase 1 over `records` on `pods` one-core pods, wave by wave in the DAG's order.

    A step's shard count is its input over the records one shard holds: `shard_mb` of the step's measured
    bytes per record, or `records_per_shard[step]` when given (the check's measured-like setting); rounded up
    to a multiple of `shard_multiple` when set and more than one round (the step config's `shard_multiple`, which
    the DAGs set to their slots: smaller shards, full waves)."""
    waves: list[dict[str, Any]] = []
    max_rss = (0.0, "")
    max_sec = (0.0, "")
    tasks = 0
    shard_counts: dict[str, int] = {}
    for step, st in large["steps"].items():
        records_in = records * st["records_in"] / large["records"]
        per_shard = (records_per_shard[step] if records_per_shard and step in records_per_shard
                     else (shard_mb or 256) * 2**20 / max(st["bytes_per_record"], 1e-9))
        shards = max(1, math.ceil(records_in / max(per_shard, 1.0)))
        if shard_multiple > 1 and shards > shard_multiple:  # as Step.group_shards: past one round only
            shards = math.ceil(shards / shard_multiple) * shard_multiple
        if st.get("shards_of"):  # the export group has a task per shard of the step it exports
            shards = shard_counts[st["shards_of"]]
        elif st.get("aligned_to"):  # planned aligned to the chain: the head's shard count
            shards = shard_counts[st["aligned_to"]]
        shard_counts[step] = shards
        for k in range(st.get("empty_waves", 0)):  # a mapped task over no shard: the scheduler skips it, no pod
            waves.append({"name": f"{step}.skipped{k}", "tasks": 0, "rounds": 0, "task_seconds": 0.0,
                          "max_task_seconds": 0.0, "task_rss_mb": 0.0, "seconds": sched_cost})
        for (s, wave), g in model.items():
            if s != step:
                continue
            n = (min(shards, pods) if g.grouped else shards) if g.per_shard else 1
            # A grouped task handles ceil(shards / n) shards in turn; any other per-shard task one.
            driver = math.ceil(shards / n) * records_in / shards if g.per_shard else records_in
            waves.append(_wave(step, wave, n, g, driver, pods, pod_start, sched_cost))
    for wave in TAIL:
        waves.append(_wave("tail", wave, 1, model[("tail", wave)], records, pods, pod_start, sched_cost))
    for w in waves:
        tasks += w["tasks"]
        max_rss = max(max_rss, (w["task_rss_mb"], w["name"]))
        max_sec = max(max_sec, (w["max_task_seconds"], w["name"]))
    wall = sum(w["seconds"] for w in waves)
    top = sorted(waves, key=lambda w: -w["seconds"])[:5]
    return {"records": records, "pods": pods, "projected_wall_minutes": round(wall / 60, 2), "tasks": tasks,
            "max_task_rss_mb": round(max_rss[0], 1), "max_task_rss_kind": max_rss[1],
            "max_task_seconds": round(max_sec[0], 1), "max_task_seconds_kind": max_sec[1],
            "critical_path": [{k: w[k] for k in ("name", "tasks", "rounds", "task_seconds", "seconds")} for w in top],
            "waves": waves}


def _wave(step: str, wave: str, tasks: int, g: Growth, driver: float, pods: int, pod_start: float,
          sched_cost: float) -> dict[str, Any]:
    """One wave of `tasks` equal tasks on `pods` pods: ceil(tasks / pods) rounds of the mean task, each task
    paying the pod start and the scheduler's cost."""
    rounds = math.ceil(tasks / max(pods, 1))
    seconds = g.seconds(driver)
    return {"name": f"{step}.{wave}", "tasks": tasks, "rounds": rounds, "task_seconds": round(seconds, 2),
            "max_task_seconds": round(g.max_seconds(driver), 2), "task_rss_mb": round(g.rss_mb(driver), 1),
            "seconds": round(rounds * (seconds + pod_start + sched_cost), 2)}


# ----------------------------------------------------------------------------------------------------
# Output


def print_model(model: dict[tuple[str, str], Growth], sizes: tuple[int, int]) -> None:
    """Per task kind: the largest task's seconds and RSS at both sizes, storage calls and the fitted growth."""
    print(f"\n{'task kind':28s} {'tasks':>9s} {'s/task':>13s} {'RSS MiB':>11s} {'read MiB':>9s} {'calls':>6s}  "
          f"growth ({sizes[0]:,} -> {sizes[1]:,} records)")
    for (step, wave), g in model.items():
        m1, m2 = g.measured
        print(f"{step + '.' + wave:28s} {m1['tasks']:4.0f}->{m2['tasks']:<4.0f} "
              f"{m1['seconds']:6.1f}->{m2['seconds']:<6.1f} {m1['rss_mb']:5.0f}->{m2['rss_mb']:<5.0f} "
              f"{m2['read_mb']:9.0f} {m2['storage_calls']:6.0f}  {g.grows}"
              f" ({g.seconds_b * 1e6:.1f} us, {g.rss_b * 1e3:.3f} KiB per record)")


def print_projection(p: dict[str, Any], label: str) -> None:
    """The projection's headline and its five most expensive waves."""
    print(f"\n{label}: {p['records']:,} records on {p['pods']} pods: {p['projected_wall_minutes']:.1f} min, "
          f"{p['tasks']:,} tasks; largest task {p['max_task_seconds']:.0f} s ({p['max_task_seconds_kind']}), "
          f"{p['max_task_rss_mb']:.0f} MiB ({p['max_task_rss_kind']})")
    for w in p["critical_path"]:
        print(f"  {w['name']:26s} {w['tasks']:5d} tasks in {w['rounds']:3d} rounds of {w['task_seconds']:7.1f} s"
              f" = {w['seconds'] / 60:6.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 1M and 2M, not smaller: below about 1M records the selection is under the report's 200k-record sample,
    # so publish and report still grow there and would be projected as growing to 116M.
    ap.add_argument("--sizes", default="1000000,2000000", help="the two measured sizes (records)")
    ap.add_argument("--shards", type=int, default=8, help="shards per step at both measured sizes")
    ap.add_argument("--quick", action="store_true", help="measure 20k and 40k records in 4 shards")
    ap.add_argument("--parallel", type=int, default=2, help="tasks of one wave run at once while measuring")
    ap.add_argument("--project", type=int, default=116_000_000, help="records to project")
    ap.add_argument("--pods", type=int, default=64)
    ap.add_argument("--shard-mb", type=float, default=256.0, help="target shard size of the projected run")
    ap.add_argument("--pod-start", type=float, default=10.0, help="seconds from a task's start to its process")
    ap.add_argument("--sched-cost", type=float, default=2.2, help="scheduler seconds per task (bench/load.py)")
    ap.add_argument("--shard-multiple", type=int, default=None,
                    help="round a step's shard count past one round up to a multiple of this (the steps' "
                    "`shard_multiple`); default: --pods, as the DAGs set it to their slots; 0: off")
    ap.add_argument("--check", type=int, default=0, help="also run this many records and compare")
    ap.add_argument("--from-json", default=None, help="a saved measurement (--save) to project from")
    ap.add_argument("--save", default=None, help="write the measurements to this JSON file")
    ap.add_argument("--unfused", action="store_true", help="measure without fused shard tasks (every step's "
                    "record-local work in its own tasks)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.shard_multiple is None:
        args.shard_multiple = args.pods
    print_machine_load()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        small, large, checked = saved["small"], saved["large"], saved.get("check")
    else:
        sizes = (20_000, 40_000) if args.quick else tuple(int(s) for s in args.sizes.split(","))
        shards = 4 if args.quick else args.shards
        checked = None
        with scratch_dir("iip-scale-", args.keep) as tmp:
            runs = []
            for n in sizes:
                runs.append(measure(n, shards, args.parallel, Path(tempfile.mkdtemp(dir=tmp)), fuse=not args.unfused))
                print(f"measured {n:,} records: {runs[-1]['wall_seconds']:.0f} s, {len(runs[-1]['tasks'])} tasks",
                      flush=True)
            small, large = runs
            if args.check:
                factor = args.check / large["records"]
                checked = measure(args.check, max(1, round(shards * factor)), args.parallel,
                                  Path(tempfile.mkdtemp(dir=tmp)), fuse=not args.unfused)
                print(f"measured {args.check:,} records: {checked['wall_seconds']:.0f} s", flush=True)
        if args.save:
            Path(args.save).write_text(json.dumps({"small": small, "large": large, "check": checked}))
    model = fit(small, large)
    print_model(model, (small["records"], large["records"]))
    result = project(model, large, args.project, args.pods, args.shard_mb, args.pod_start, args.sched_cost,
                     shard_multiple=args.shard_multiple)
    print_projection(result, "projected")
    out = {k: v for k, v in result.items() if k != "waves"}
    out["measured"] = {"sizes": [small["records"], large["records"]], "shards": large["shards"],
                       "wall_seconds": [small["wall_seconds"], large["wall_seconds"]]}
    out["growth"] = {f"{g.step}.{g.wave}": g.grows for g in model.values()}
    if checked:
        per_shard = {s: st["records_in"] / st["shards"] for s, st in large["steps"].items()}
        guess = project(model, large, checked["records"], checked["parallel"], None, 0.0, 0.0, per_shard)
        error = (guess["projected_wall_minutes"] * 60 - checked["wall_seconds"]) / checked["wall_seconds"]
        print_projection(guess, f"check, projected from {small['records']:,} and {large['records']:,}")
        print(f"check, measured: {checked['wall_seconds'] / 60:.1f} min; projection error {error:+.1%}")
        big = fit(large, checked)
        rss_growth = {k: round(g.measured[1]["rss_mb"] / max(g.measured[0]["rss_mb"], 1e-9) - 1, 3)
                      for k, g in ((f"{g.step}.{g.wave}", g) for g in big.values())}
        grew = {k: v for k, v in rss_growth.items() if v > FLAT}
        print(f"peak RSS per task kind, {large['records']:,} -> {checked['records']:,} at equal shard size: "
              f"{len(rss_growth) - len(grew)} of {len(rss_growth)} kinds within {FLAT:.0%}; grew: {grew}")
        refitted, grown = refit_grown(model, big)
        again = project(refitted, large, args.project, args.pods, args.shard_mb, args.pod_start, args.sched_cost,
                        shard_multiple=args.shard_multiple)
        print_projection(again, f"projected again, whole-step kinds refitted on the two larger sizes where they "
                                f"grew there or stopped growing ({', '.join(grown) or 'none'})")
        out["check"] = {"records": checked["records"], "measured_wall_minutes": round(checked["wall_seconds"] / 60, 2),
                        "projected_wall_minutes": guess["projected_wall_minutes"], "error": round(error, 3),
                        "rss_growth_vs_large": rss_growth, "refitted": grown,
                        "projection_refitted": {k: again[k] for k in (
                            "projected_wall_minutes", "tasks", "max_task_rss_mb", "max_task_rss_kind",
                            "max_task_seconds", "max_task_seconds_kind")}}
    print_json_line(out)


if __name__ == "__main__":
    main()
