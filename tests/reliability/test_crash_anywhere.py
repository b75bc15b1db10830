"""Crash anywhere: every registered step's tasks killed (like kill -9) inside their commit windows, retried,
then compared with an uninterrupted run (bench/crash_anywhere.py is the harness; run it with no sample for
every window).

The kills use the fault hook (operators/core/faults.py, IIP_FAULT): a timed kill cannot land reliably in a
window that lasts microseconds, such as between a part's upload and the manifest that commits it.
"""

from __future__ import annotations

from pathlib import Path

from bench.crash_anywhere import GRAPHS, PHASE2, PIPELINE, run
from operators.core.registry import STEPS

ALL_WINDOWS = {"part.written", "write.temp", "commit.before", "commit.after"}


def test_the_two_graphs_cover_every_registered_step() -> None:
    assert {n.step for nodes in GRAPHS.values() for n in nodes} == set(STEPS)


def test_kills_at_seeded_windows_of_every_phase1_step_change_nothing(tmp_path: Path) -> None:
    result = run(records=200, per_step=4, seed=7, work=tmp_path)
    print(result)
    assert result["problems"] == []
    # Every planned kill really killed a task (status 137), and each killed task's retry succeeded.
    assert result["kills"] == result["kills_planned"] >= 4 * len(PIPELINE)
    assert result["crashes_survived"] == result["kills"]
    assert set(result["kills_by_step"]) == {n.name for n in PIPELINE}
    # The sample reaches every window kind and every kind of task.
    assert set(result["kills_by_point"]) == ALL_WINDOWS
    assert set(result["kills_by_task_kind"]) == {"plan", "map", "partition", "stage", "run", "reduce"}


def test_kills_at_seeded_windows_of_every_phase2_step_and_train_prep_change_nothing(tmp_path: Path) -> None:
    """Phase 2 on the packaged CPU model: LLM tasks killed mid-write, mid-commit and right after a cache
    flush; each retry must reproduce the uninterrupted output exactly."""
    result = run(records=6, per_step=1, seed=7, work=tmp_path, graph="phase2")
    print(result)
    assert result["problems"] == []
    # Not vacuous: every step (but the round-2 seed pick, which may find no weak ability) produced rows.
    assert all(n > 0 for step, n in result["rows_kept"].items() if step != "seed_select_r2"), result["rows_kept"]
    assert result["kills"] == result["kills_planned"] >= len(PHASE2)
    assert result["crashes_survived"] == result["kills"]
    assert set(result["kills_by_step"]) == {n.name for n in PHASE2}
    assert set(result["kills_by_point"]) == ALL_WINDOWS | {"llm.cache.flushed"}
    assert set(result["kills_by_task_kind"]) == {"plan", "map", "stage", "run", "reduce"}
    # A retry after a kill past a cache flush took the killed attempt's paid results from the cache.
    assert result["llm_results_reused_after_kills"] > 0
