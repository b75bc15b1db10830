"""Concurrency: two runs of the same step on one output, at once.

Each Phase 1 step runs its DAG tasks (plan, every map/partition stage per shard, every reduce stage, `run` per
shard, the step's reduce) in two processes at the same time on the same output folder: one in DAG order, the
other with every stage's shards in reverse, so that the two meet in the middle of each stage and race for the
same shard commits from both sides. Both must succeed, each task either committing or adopting what the other
committed, and the result must equal a run on its own: the same record ids per shard, the same stats, every
listed file present with its checksum, no part file outside a committed manifest, and a reader seeing exactly
the manifest's files (`bench.crash_anywhere.problems`).

The DAG-level races (two runs of one DAG, two `nightly_refresh` runs) run through a real scheduler in
tests/integration/test_concurrent_dag_runs.py; the dataset pointer race is in tests/test_datasets.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench._common import write_instruction_corpus
from bench.crash_anywhere import (
    PIPELINE,
    Task,
    _preload,
    plan_task,
    prepare_root,
    problems,
    step_tasks,
)

ENV = {"IIP_LOG_LEVEL": "WARNING"}


def _reversed_within_stages(tasks: list[Task]) -> list[Task]:
    """The same tasks, stage by stage in DAG order, each stage's shards from the last to the first."""
    out: list[Task] = []
    group: list[Task] = []
    for t in tasks:
        if group and t.name.rsplit(":", 1)[0] != group[-1].name.rsplit(":", 1)[0]:
            out += reversed(group)
            group = []
        group.append(t)
    return out + list(reversed(group))


def _run_tasks(tasks: list[Task]) -> int:
    """Fork a child that runs `tasks` one after another through the CLI; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        rc = 0
        try:
            os.environ.update(ENV)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the CLI's JSON lines; the manifests are checked
            from operators.cli import main

            for t in tasks:
                rc = main(t.argv)
                if rc != 0:
                    print(f"concurrent task {t.step} {t.name} exited {rc}", file=sys.stderr, flush=True)
                    break
        except BaseException:
            import traceback

            traceback.print_exc()
            rc = 70
        finally:
            os._exit(rc)
    return pid


def _both(a: list[Task], b: list[Task]) -> list[int]:
    pids = [_run_tasks(a), _run_tasks(b)]
    return [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]


@pytest.mark.timeout(600)
def test_two_runs_of_every_phase1_step_on_one_output_commit_once(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_instruction_corpus(corpus, 240, n_files=4, seed=11, malformed_rate=0.02, near_dup_rate=0.05)
    _preload(PIPELINE)
    solo, both = tmp_path / "solo", tmp_path / "both"
    for root in (solo, both):
        prepare_root(root)
    shards_raced = 0
    for node in PIPELINE:
        assert _both([plan_task(node, solo, corpus)], []) == [0, 0]
        assert _both(step_tasks(node, solo), []) == [0, 0]
        # The racing pair plans at once too (the plan is written twice, the same content).
        plan = plan_task(node, both, corpus)
        assert _both([plan], [plan]) == [0, 0], node.name
        tasks = step_tasks(node, both)
        assert _both(tasks, _reversed_within_stages(tasks)) == [0, 0], node.name
        shards_raced += sum(1 for t in tasks if t.name.startswith("run:"))
        assert problems(node.name, solo / node.name, both / node.name) == []
    assert shards_raced >= 2 * len(PIPELINE)  # every step had several shards for the two to fight over
