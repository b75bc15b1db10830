"""bench/scale.py's model: fitted growth per task kind and the wave-by-wave projection (no runs: its arithmetic)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.scale import TAIL, fit, project


def _task(step: str, wave: str, per_shard: bool, driver: float, seconds: float, rss: float) -> dict[str, Any]:
    return {"step": step, "wave": wave, "per_shard": per_shard, "shard": 0, "driver": driver, "seconds": seconds,
            "cpu_seconds": seconds / 2, "rss_mb": rss, "read_mb": 1.0, "written_mb": 1.0, "storage_calls": 3}


def _measured(records: int, shards: int) -> dict[str, Any]:
    """A run whose costs follow known lines: a shard task 0.5 s + 1 ms per record, 100 MiB + 0.1 MiB per
    record; the plan constant; the export group's shard task 0.2 s + 1 ms per record over half the records;
    the tail's publish growing with the corpus (1 + 0.001 s per record)."""
    per = records / shards
    tasks = [_task("filter", "plan", False, records, 1.0, 90.0)]
    tasks += [_task("filter", "run", True, per, 0.5 + 0.001 * per, 100 + 0.1 * per) for _ in range(shards)]
    tasks += [_task("export", "shard", True, per / 2, 0.2 + 0.001 * per / 2, 150.0) for _ in range(shards)]
    tasks += [_task("tail", w, False, records, 1.0 + (0.001 * records if w == "publish" else 0), 200.0) for w in TAIL]
    return {"records": records, "shards": shards, "parallel": 2, "wall_seconds": 1.0, "tasks": tasks,
            "steps": {"filter": {"records_in": records, "shards": shards, "input_bytes": records * 100,
                                 "bytes_per_record": 100.0},
                      "export": {"records_in": records / 2, "shards": shards, "input_bytes": records * 50,
                                 "bytes_per_record": 100.0, "shards_of": "filter"}}}


def test_growth_is_fitted_per_kind_and_projected_wave_by_wave() -> None:
    small, large = _measured(2000, 4), _measured(4000, 4)
    model = fit(small, large)
    run = model[("filter", "run")]
    assert run.seconds(1000) == pytest.approx(1.5) and run.rss_mb(1000) == pytest.approx(200.0)
    assert run.grows == "with its shard"
    assert model[("filter", "plan")].grows == "constant"
    assert model[("tail", "publish")].grows == "with the corpus"

    # 10,000 records at 1,000 per shard: 10 run tasks on 4 pods = 3 rounds of (1.5 s + 10 s pod + 2 s scheduler).
    p = project(model, large, 10_000, pods=4, shard_mb=None, pod_start=10.0, sched_cost=2.0,
                records_per_shard={"filter": 1000.0})
    waves = {w["name"]: w for w in p["waves"]}
    assert waves["filter.run"]["tasks"] == 10 and waves["filter.run"]["rounds"] == 3
    assert waves["filter.run"]["seconds"] == pytest.approx(3 * 13.5)
    # The export group has one shard task per shard of the step it exports (filter's 10), each over 500 records.
    assert (waves["export.shard"]["tasks"], waves["export.shard"]["rounds"]) == (10, 3)
    assert waves["export.shard"]["task_seconds"] == pytest.approx(0.7)
    assert waves["tail.publish"]["task_seconds"] == pytest.approx(11.0)  # 1 s + 1 ms x 10,000 records
    total = 3 * 13.5 + 13.0 + 3 * 12.7 + 13.0 + (11.0 + 12.0)
    assert p["projected_wall_minutes"] == pytest.approx(round(total / 60, 2))
    assert p["tasks"] == 1 + 10 + 10 + len(TAIL)
    assert p["max_task_seconds_kind"] == "tail.publish" and p["max_task_rss_mb"] == pytest.approx(200.0)
    assert p["critical_path"][0]["name"] == "filter.run"  # the costliest wave first

    # The shard count otherwise follows --shard-mb over the step's measured bytes per record.
    q = project(model, large, 10_000, pods=4, shard_mb=200_000 / 2**20, pod_start=0.0, sched_cost=0.0)
    assert {w["name"]: w["tasks"] for w in q["waves"]}["filter.run"] == 5

    # With `shard_multiple`, 10 shards become 12 smaller ones: the same 3 rounds, each shorter.
    r = project(model, large, 10_000, pods=4, shard_mb=None, pod_start=10.0, sched_cost=2.0,
                records_per_shard={"filter": 1000.0}, shard_multiple=4)
    run_wave = {w["name"]: w for w in r["waves"]}["filter.run"]
    assert (run_wave["tasks"], run_wave["rounds"]) == (12, 3)
    assert run_wave["task_seconds"] == pytest.approx(0.5 + 0.001 * 10_000 / 12, abs=0.01)


def test_a_grouped_wave_is_projected_as_one_round_of_at_most_pods_tasks() -> None:
    """A light (grouped) wave has min(shards, pods) tasks, each doing ceil(shards / tasks) shards in turn: 10
    export shards on 4 pods are 4 tasks of 3 shards (1,500 records) in one round, not 10 tasks in 3 rounds."""
    def grouped(m: dict[str, Any]) -> dict[str, Any]:
        # As measured: 2 tasks (the measuring run's parallelism) over the 4 shards, 2 shards' records each.
        per = m["records"] / m["shards"] / 2
        tasks = [t for t in m["tasks"] if (t["step"], t["wave"]) != ("export", "shard")]
        tasks += [{**_task("export", "shard", True, 2 * per, 0.2 + 0.01 * 2 * per, 150.0), "grouped": True}
                  for _ in range(2)]
        return {**m, "tasks": tasks}

    small, large = grouped(_measured(2000, 4)), grouped(_measured(4000, 4))
    model = fit(small, large)
    assert model[("export", "shard")].grouped and not model[("filter", "run")].grouped
    p = project(model, large, 10_000, pods=4, shard_mb=None, pod_start=10.0, sched_cost=2.0,
                records_per_shard={"filter": 1000.0})
    wave = {w["name"]: w for w in p["waves"]}["export.shard"]
    assert (wave["tasks"], wave["rounds"]) == (4, 1)
    assert wave["task_seconds"] == pytest.approx(0.2 + 0.01 * 3 * 500)
    assert wave["seconds"] == pytest.approx(15.2 + 12.0)
    assert {w["name"]: w for w in p["waves"]}["filter.run"]["tasks"] == 10  # heavy: a task per shard
