"""Reliability: kill every step's tasks anywhere (like `kill -9`), re-run them, and compare with an
uninterrupted run.

    python bench/crash_anywhere.py [--graph phase1|phase2] [--records N] [--kills-per-step 0] [--seed 7]

`--kills-per-step 0` (the default here) is the exhaustive variant: every fault point every task reaches,
each hit one kill (hundreds of runs; minutes for phase1, about an hour for phase2). The default tests
(tests/reliability/test_crash_anywhere.py) use a seeded sample of a few kills per step from the same harness.

Graphs: `phase1` is ingest, filter, exact_dedup, near_dedup, decontaminate, route, dsir and select over a
generated raw corpus. `phase2` is every Phase 2 step as `conversational_synthesis` wires them (pool, label,
label_vocab, seed_score, seed_select for both rounds, evolve, respond, diagnose, conversational_set) and
`train_prep`, over a small foundational set, on the packaged CPU model. Together they cover every
registered step.

How: every step runs as its DAG tasks (plan, each map/partition stage per shard, each reduce stage, `run`
per shard, the step's `reduce`), each task in a forked child process that runs the CLI entry point. A first,
uninterrupted pass records which fault points (`operators/core/faults.py`) each task passes through. A
second pass over a fresh root kills chosen tasks at chosen hits (`IIP_FAULT=<point>:<n>`: `os._exit(137)`,
no cleanup), each kill from the state the task started from, then retries the task as Airflow would: the
retry must commit exactly what the uninterrupted task committed (file checksums and row counts, stats).
Then, per step: the record ids of every shard manifest and the step's stats (timing and memory fields, and
what the LLM was paid, aside) must equal the uninterrupted run's, every file the step manifest lists must
exist with its checksum, a reader must see exactly those files, and no `part-*` file may lie outside a
committed manifest. LLM steps also die right after a result-cache flush (`llm.cache.flushed`): their
retries reuse what the killed attempt paid for (`llm_results_reused_after_kills`).
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_json_line, write_instruction_corpus

# Small parts and shards so that each step has several shards and each task several part uploads.
COMMON: dict[str, Any] = {"max_part_rows": 40, "batch_rows": 64}
CORPUS = ""  # a node input that names the corpus the harness writes


@dataclass(frozen=True)
class Node:
    """One step of the graph under test: its output folder `name` under the run root, and its inputs
    (other nodes' names, or CORPUS)."""

    name: str
    step: str
    cfg: dict[str, Any]
    inputs: tuple[str, ...]


def chain(steps: list[tuple[str, dict[str, Any]]]) -> list[Node]:
    """Steps that each read the one before (the first reads the corpus)."""
    return [Node(step, step, {**COMMON, **cfg}, (steps[i - 1][0],) if i else (CORPUS,))
            for i, (step, cfg) in enumerate(steps)]


# The paraphrase step's evaluation set, written into each run root by `prepare_root`: 16 questions from the
# corpus's own text pool embed in a second, where HumanEval's 164 prompts took 10 s per run root.
BENCHMARK = "_benchmark.jsonl"
SHORT_EMBED = {"max_tokens": 32}


def prepare_root(root: Path, seed: int = 7) -> None:
    """Write what the graph's configs name inside a run root (the paraphrase step's benchmark)."""
    from bench._common import TextPool

    rng, pool = random.Random(seed), TextPool(seed, sentences_per_lang=200)
    root.mkdir(parents=True, exist_ok=True)
    (root / BENCHMARK).write_text("".join(json.dumps({"prompt": pool.text(rng, "en", 160, question=True)}) + "\n"
                                          for _ in range(16)))


PIPELINE: list[Node] = chain([
    ("ingest", {"source_name": "crash", "target_shard_bytes": 200_000}),
    ("filter", {"languages": [], "target_shard_bytes": 60_000}),
    ("pii", {"target_shard_bytes": 60_000}),
    ("exact_dedup", {"target_shard_bytes": 60_000}),
    ("near_dedup", {"target_shard_bytes": 60_000}),
    # The encoder reads 32 tokens here (128 by default): the commit windows are the same, the forward passes
    # a quarter (embedding was 45 of the test's 85 s).
    ("semantic_dedup", {"target_shard_bytes": 60_000, "threshold": 0.9, "embed": SHORT_EMBED}),
    ("decontaminate", {"target_shard_bytes": 60_000}),
    ("decontaminate_paraphrase", {"target_shard_bytes": 60_000, "threshold": 0.6, "embed": SHORT_EMBED, "benchmarks": [
        {"name": "mini", "uri": f"{{root}}/{BENCHMARK}", "format": "jsonl:prompt"}]}),
    ("route", {"target_shard_bytes": 60_000}),
    ("dsir", {"target_shard_bytes": 60_000}),
    ("select", {"budgets": {"math": 0.5, "code": 0.5, "general": 0.3}, "target_shard_bytes": 60_000}),
])

# Phase 2 and train_prep over a small foundational set, as `conversational_synthesis` and
# `two_stage_finetune` wire them, on the packaged CPU model. One request per backend call
# (`batch_size` 1): a batch pads its rows to one length, which moves the logits by rounding, so a retry
# that finds half its batch cached would generate from a differently padded batch. Unbatched, greedy
# decoding is deterministic, and a retry must reproduce the uninterrupted output exactly.
# Two records per transform batch: every batch flushes the LLM result cache, so a task passes several
# `llm.cache.flushed` windows (paid for, cached, not committed).
_LLM = {"llm": {"batch_size": 1}, "max_tokens": 8, "batch_rows": 2, "max_part_rows": 2}
_SMALL = {"max_part_rows": 2, "batch_rows": 2, "target_shard_bytes": 1_500}
_SEEDS = {**_SMALL, "max_ifd": None}
PHASE2: list[Node] = [
    Node("pool", "select", {**_SMALL, "budgets": {"math": 0.75, "code": 0.75, "general": 0.75},
                            "replay_fraction": 0.0}, (CORPUS,)),
    Node("label", "label", {**_LLM, "target_shard_bytes": 1_500}, ("pool",)),
    Node("label_vocab", "label_vocab", _SMALL, ("label",)),
    Node("seed_score", "seed_score", {**_LLM, "target_shard_bytes": 1_500}, ("label_vocab",)),
    Node("seed_select_r1", "seed_select", {**_SEEDS, "budget": 2, "round": 1}, ("seed_score",)),
    Node("evolve_r1", "evolve", {**_LLM, "rounds": 1}, ("seed_select_r1",)),
    Node("respond_r1", "respond", {**_LLM, "min_turns": 2, "max_turns": 2}, ("evolve_r1",)),
    Node("diagnose_r1", "diagnose", {**_LLM, "candidates": {"smollm2": {"batch_size": 1}},
                                     "probes_per_ability": 1, "round": 1, "min_label_samples": 1}, ("label_vocab",)),
    Node("seed_select_r2", "seed_select", {**_SEEDS, "budget": 1, "round": 2, "weak_threshold": 10,
                                           "diagnosis_dir": "{root}/diagnose_r1",
                                           "exclude_dirs": ["{root}/seed_select_r1"]}, ("seed_score",)),
    Node("conversational_set", "conversational_set", _SMALL, ("respond_r1",)),
    Node("train_prep", "train_prep", {**_SMALL, "max_seq_len": 512, "heldout_fraction": 0.0},
         ("conversational_set",)),
]
GRAPHS = {"phase1": PIPELINE, "phase2": PHASE2}
VOLATILE_STATS = ("seconds", "peak_rss_mb")  # differ run to run by nature
# Work a retry may skip by design: what the LLM was paid for and the vectors the encoder computed (a retry
# finds what its killed attempt cached), a dedup partition's index rows reused or linked and a fit's
# centroids (a retry finds what its killed attempt committed). The outputs must still be equal.
SKIPPABLE_WORK = ("cache_hits", "backend_requests", "prompt_tokens", "completion_tokens", "scored_tokens",
                  "cost_usd", "index_rows_reused", "index_rows_linked", "embedded", "centroids_reused")
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
    by_step: Counter[str] = field(default_factory=Counter)
    by_task_kind: Counter[str] = field(default_factory=Counter)
    temp_leftovers: int = 0


def _one_torch_thread() -> None:
    """In a forked child: one intra-op torch thread.

    A parent that has run a torch operation (an earlier test in the same pytest worker) owns an OpenMP
    thread pool that fork does not copy; the child's first parallel region then waits for those threads
    for ever (seen in CI: the concurrency test hung 600 s once the encoder steps joined PIPELINE). One
    thread runs every region inline. Tasks are single-core pods in production anyway."""
    sys.modules["torch"].set_num_threads(1)


_FORK_HOOKED = False


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


def _preload(nodes: list[Node]) -> None:
    """Import the CLI and every step once here, so each forked task starts warm (milliseconds).

    With LLM or encoder steps in the graph, torch and transformers' model code are imported here too: they
    are most of such a task's start (~3 s of ~4 s), and a forked child shares them; so is the default
    encoder, loaded (1.5 s per task otherwise). A torch that has run an operation has started thread pools
    a fork does not carry over: a fork hook runs every child on one thread (`_one_torch_thread`)."""
    from operators.cli import main  # noqa: F401
    from operators.core.registry import step_class
    from operators.core.startup import skip_pandas_probe

    skip_pandas_probe()
    models = encoders = False
    for n in nodes:
        fields = step_class(n.step).config_model.model_fields
        models |= "llm" in fields or "embed" in fields  # an LLM or an encoder: torch and transformers
        encoders |= "embed" in fields
    if models:
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        global _FORK_HOOKED
        if not _FORK_HOOKED:  # every fork from here on, by any harness that preloaded (crash, concurrency)
            os.register_at_fork(after_in_child=_one_torch_thread)
            _FORK_HOOKED = True
    if encoders:  # the encoder's weights, shared by every forked task (safe: the fork hook above)
        from operators.llm.embed import EmbedConfig, load_embedder

        load_embedder(EmbedConfig(**SHORT_EMBED))


def _cli_config(node: Node, root: Path) -> list[str]:
    """`--config` (with `{root}` in paths made the run root) and `--output` of the node's tasks."""
    return ["--config", json.dumps(node.cfg).replace("{root}", str(root)), "--output", str(root / node.name)]


def step_tasks(node: Node, root: Path) -> list[Task]:
    """The step's tasks in DAG order (needs the plan to be committed for the per-shard ones)."""
    from operators.core import storage
    from operators.core.registry import step_class
    from operators.core.runner import load_plan

    c = _cli_config(node, root)
    shards = len(load_plan(storage.validate_uri(str(root / node.name))).shards)
    tasks: list[Task] = []
    for st in step_class(node.step).stages:
        if st.kind == "reduce":
            tasks.append(Task(node.name, f"stage:{st.name}", ["stage", node.step, "--stage", st.name, *c]))
        else:
            tasks += [Task(node.name, f"{st.kind}:{st.name}:{k}",
                           ["stage", node.step, "--stage", st.name, "--shard", str(k), *c]) for k in range(shards)]
    tasks += [Task(node.name, f"run:{k}", ["run", node.step, "--shard", str(k), *c]) for k in range(shards)]
    tasks.append(Task(node.name, "reduce", ["reduce", node.step, "--output", str(root / node.name)]))
    return tasks


def plan_task(node: Node, root: Path, corpus: Path) -> Task:
    inputs = [str(corpus) if i == CORPUS else str(root / i) for i in node.inputs]
    return Task(node.name, "plan", ["plan", node.step, *_cli_config(node, root),
                                    *[a for i in inputs for a in ("--input", i)]])


def dag_tasks(node: Node, root: Path, corpus: Path) -> Iterator[Task]:
    """The node's tasks in DAG order: its plan, then (once the caller has run the plan) the rest."""
    yield plan_task(node, root, corpus)
    yield from step_tasks(node, root)


def _traced(task: Task, trace_dir: Path, env: dict[str, str]) -> Counter[str]:
    trace = trace_dir / f"{task.step}.{task.name.replace(':', '_')}.trace"
    trace.unlink(missing_ok=True)
    rc = run_task(task.argv, {**env, TRACE_ENV: str(trace)})
    if rc != 0:
        raise RuntimeError(f"uninterrupted task {task.step} {task.name} failed with status {rc}")
    return Counter(trace.read_text().split()) if trace.exists() else Counter()


def baseline(nodes: list[Node], corpus: Path, root: Path, trace_dir: Path, env: dict[str, str]
             ) -> dict[tuple[str, str], Counter[str]]:
    """Run the graph uninterrupted under `root`; the fault points each task passes, with hit counts."""
    hits: dict[tuple[str, str], Counter[str]] = {}
    for node in nodes:
        for t in dag_tasks(node, root, corpus):
            hits[(node.name, t.name)] = _traced(t, trace_dir, env)
    return hits


def choose_kills(hits: dict[tuple[str, str], Counter[str]], per_step: int, seed: int
                 ) -> dict[tuple[str, str], list[tuple[str, int]]]:
    """(step, task) -> kills [(point, n)], each to be applied in its own attempt of that task.

    `per_step` 0: every hit of every point (exhaustive). Else a seeded sample of `per_step` kills per step,
    at least one during a part upload, one during a commit and one after an LLM cache flush where the step
    has them, and one in every kind of task it has."""
    kills: dict[tuple[str, str], list[tuple[str, int]]] = {}
    steps = list(dict.fromkeys(s for s, _ in hits))
    for step in steps:
        windows = [(task, p, n) for (s, task), c in hits.items() if s == step
                   for p, count in sorted(c.items()) for n in range(1, count + 1)]
        if per_step:
            rng = random.Random(f"{seed}:{step}")
            picked = []
            for want in (("part.written",), COMMIT_POINTS, ("llm.cache.flushed",)):
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
    files = sorted((f["kind"], f["rows"], f["sha256"]) for f in doc["files"] if not _is_cache(f["path"]))
    return [files, _comparable(doc["stats"]), doc.get("summary")]


def _is_cache(path: str) -> bool:
    """An LLM result cache segment: named by attempt, and a retry writes only what its killed attempt did not."""
    from operators.steps.synth.base import CACHE_DIR

    return path.startswith(CACHE_DIR + "/") or f"/{CACHE_DIR}/" in path


def _comparable(stats: dict[str, Any]) -> dict[str, Any]:
    """Stats less timing, memory and work a retry may skip (`SKIPPABLE_WORK`)."""
    out = {k: v for k, v in stats.items() if k not in VOLATILE_STATS}
    if isinstance(out.get("counters"), dict):
        out["counters"] = {k: v for k, v in out["counters"].items() if not k.endswith(SKIPPABLE_WORK)}
    return out


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
        figures.by_step[task.step] += 1
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


def faulted(nodes: list[Node], corpus: Path, root: Path, kills: dict[tuple[str, str], list[tuple[str, int]]],
            env: dict[str, str], figures: Figures, clean: Path) -> None:
    """Run the graph under `root`, killing the chosen tasks at the chosen windows and retrying them."""
    for node in nodes:
        for task in dag_tasks(node, root, corpus):
            _killed_then_retried(task, root / node.name, kills.get((node.name, task.name), []), env, figures,
                                 clean / node.name)


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


def _step_stats(step_dir: Path) -> dict[str, Any]:
    return dict(json.loads((step_dir / "stats.json").read_text()))


def _stats(step_dir: Path) -> dict[str, Any]:
    return _comparable(_step_stats(step_dir))


def _rows_kept(step_dir: Path) -> int:
    return int(_step_stats(step_dir)["records_kept"])


def _cache_hits(step_dir: Path) -> int:
    """LLM results the step's committed shards took from the cache instead of paying for them."""
    counters = _step_stats(step_dir).get("counters", {})
    return int(sum(v for k, v in counters.items() if k.endswith("cache_hits")))


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


def write_foundational(directory: Path, records: int, seed: int) -> Path:
    """A small foundational set (canonical schema plus `domain`): Phase 2's input, as `select` leaves it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.schema import CANONICAL_SCHEMA

    rng = random.Random(seed)
    rows = []
    for i in range(records):
        a, b = rng.randint(2, 60), rng.randint(10, 400)
        domain, q, ans = [
            ("math", f"What is {a}% of {b}?", f"{a}% of {b} is {a * b / 100:g}."),
            ("code", f"Write a Python function that adds {a} to a number.", f"def add(n):\n    return n + {a}"),
            ("general", f"Give me {a % 5 + 2} tips for a {rng.choice(['calm', 'busy', 'long'])} day.",
             "Plan ahead, take breaks, and drink water."),
        ][i % 3]
        rows.append({"id": f"f{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": ans}],
                     "label": None, "langdetect": "en", "source": "crash", "reward": None, "origin": None,
                     "domain": domain})
    directory.mkdir(parents=True)
    path = directory / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA.append(pa.field("domain", pa.string()))), path)
    return path


def run(records: int, per_step: int, seed: int, work: Path, graph: str = "phase1") -> dict[str, Any]:
    """The whole experiment under `work`; figures, with `problems` empty when every crash was survived.

    `graph` phase1: Phase 1 over a generated raw corpus of `records` conversations. phase2: Phase 2 and
    train_prep over a foundational set of `records` rows, on the packaged CPU model."""
    nodes = GRAPHS[graph]
    if graph == "phase1":
        corpus = work / "corpus"
        write_instruction_corpus(corpus, records, n_files=4, seed=seed, malformed_rate=0.02, near_dup_rate=0.05)
    else:
        corpus = write_foundational(work / "corpus", records, seed)
    env = {"IIP_LOG_LEVEL": "WARNING", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    _preload(nodes)
    (work / "traces").mkdir()
    for root in (work / "clean", work / "hurt"):
        prepare_root(root, seed)
    hits = baseline(nodes, corpus, work / "clean", work / "traces", env)
    kills = choose_kills(hits, per_step, seed)
    figures = Figures()
    faulted(nodes, corpus, work / "hurt", kills, env, figures, work / "clean")
    found = [p for n in nodes for p in problems(n.name, work / "clean" / n.name, work / "hurt" / n.name)]
    figures.temp_leftovers = len(list((work / "hurt").rglob("*.tmp-*")))
    windows = sum(sum(c.values()) for c in hits.values())
    rows = {n.name: _rows_kept(work / "clean" / n.name) for n in nodes}
    cache_hits = sum(_cache_hits(work / "hurt" / n.name) - _cache_hits(work / "clean" / n.name) for n in nodes)
    return {"graph": graph, "records": records, "steps": [n.name for n in nodes], "rows_kept": rows,
            "llm_results_reused_after_kills": cache_hits, "tasks": len(hits),
            "fault_windows": windows, "kills_planned": sum(len(v) for v in kills.values()), "kills": figures.kills,
            "crashes_survived": figures.survived, "kills_by_step": dict(figures.by_step),
            "kills_by_point": dict(figures.by_point), "kills_by_task_kind": dict(figures.by_task_kind),
            "temp_files_left": figures.temp_leftovers, "problems": found}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=None, help="default: 600 (phase1), 9 (phase2)")
    ap.add_argument("--kills-per-step", type=int, default=0, help="0: every window (exhaustive)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--graph", choices=sorted(GRAPHS), default="phase1",
                    help="phase1: ingest..select; phase2: pool..conversational_set and train_prep (CPU model)")
    args = ap.parse_args()
    records = args.records if args.records is not None else (600 if args.graph == "phase1" else 9)
    with tempfile.TemporaryDirectory(prefix="crash-") as d:
        result = run(records, args.kills_per_step, args.seed, Path(d), args.graph)
    for p in result["problems"]:
        print("PROBLEM:", p)
    print_json_line(result)
    sys.exit(1 if result["problems"] else 0)


if __name__ == "__main__":
    main()
