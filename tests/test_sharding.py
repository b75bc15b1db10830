"""`shard_multiple`: the shard count rounded up to a multiple of the pods, so that no wave ends with a few tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators.cli import build_step
from operators.core import storage
from operators.core.runner import load_plan, make_plan, read_step_table, run_all
from operators.core.step import balanced_groups
from operators.schema import CANONICAL_SCHEMA


def test_balanced_groups_are_contiguous_full_and_even() -> None:
    rng = np.random.default_rng(2)
    for _ in range(300):
        sizes = rng.integers(1, 1000, int(rng.integers(1, 40))).tolist()
        if rng.random() < 0.2:
            sizes[int(rng.integers(0, len(sizes)))] = 50_000  # one huge file
        files = [(f"f{i}", s) for i, s in enumerate(sizes)]
        n = int(rng.integers(1, len(files) + 1))
        groups = balanced_groups(files, n)
        assert len(groups) == n and [g.index for g in groups] == list(range(n))
        assert [u for g in groups for u in g.uris] == [u for u, _ in files]  # in order, every file once
        assert all(g.uris and g.bytes == sum(sizes[int(u[1:])] for u in g.uris) for g in groups)
        assert max(g.bytes for g in groups) <= sum(sizes) / n + max(sizes)


def _corpus(folder: Path, files: int, rows: int) -> str:
    folder.mkdir()
    for f in range(files):
        recs = [{"id": f"f{f}r{i}", "conversations": [{"from": "human", "value": f"question {f} {i} about things"},
                                                       {"from": "gpt", "value": f"an answer to {f} {i}"}],
                 "label": None, "langdetect": "en", "source": "s", "reward": None, "origin": None}
                for i in range(rows)]
        pq.write_table(pa.Table.from_pylist(recs, schema=CANONICAL_SCHEMA), folder / f"p{f:02d}.parquet")
    return str(folder)


def test_shard_count_is_a_multiple_of_the_pods_and_the_output_is_the_same(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "in", files=10, rows=20)
    size = (tmp_path / "in" / "p00.parquet").stat().st_size
    counts = {}
    for per_shard, multiple in ((3, 0), (3, 1), (3, 2), (3, 3), (3, 4), (3, 8), (2, 3), (1, 4)):
        # `per_shard` files a shard: 4 shards (3), 5 (2) or 10 (1).
        base = {"languages": [], "target_shard_bytes": per_shard * size + 1}
        out = storage.validate_uri(str(tmp_path / f"out{per_shard}-{multiple}"))
        step = build_step("filter", {**base, "shard_multiple": multiple})
        counts[per_shard, multiple] = len(make_plan(step, [src], out).shards)
    # Past one round: up to the next multiple (never more shards than files); within one round: unchanged.
    assert counts == {(3, 0): 4, (3, 1): 4, (3, 2): 4, (3, 3): 6, (3, 4): 4, (3, 8): 4, (2, 3): 6, (1, 4): 10}

    kept = []
    base = {"languages": [], "target_shard_bytes": 3 * size + 1}
    for multiple in (0, 3):
        out = storage.validate_uri(str(tmp_path / f"run{multiple}"))
        run_all(build_step("filter", {**base, "shard_multiple": multiple}), [src], out)
        kept.append(sorted(read_step_table(out)["id"].to_pylist()))
        assert len(load_plan(out).shards) == (4 if multiple == 0 else 6)
    assert kept[0] == kept[1] and len(kept[0]) == 200


def test_the_dags_default_multiple_is_their_slots() -> None:
    """The selection DAGs' `shard_multiple` Param 0 renders as the DAG's max_active_tasks (the `slots` task's G)."""
    from airflow.sdk import DAG

    from operators.orchestration.params import sharding_config

    template = sharding_config()["shard_multiple"]
    with DAG("sharding_template", schedule=None, max_active_tasks=64) as dag:
        env = dag.get_template_env()
        assert env.from_string(template).render(params={"shard_multiple": 0}, dag=dag) == "64"
        assert env.from_string(template).render(params={"shard_multiple": 8}, dag=dag) == "8"
