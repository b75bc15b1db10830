"""Budgets: the exact global top-k across shards equals a single-machine top-k; caps, fractions, replay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from operators.cli import build_step
from operators.core import storage
from operators.core.runner import read_step_table, run_all
from operators.schema import CANONICAL_SCHEMA
from operators.steps.select.step import SelectConfig

SCHEMA = CANONICAL_SCHEMA.append(pa.field("domain", pa.string())).append(pa.field("dsir_key", pa.float64()))


def make(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    domains = rng.choice(["math", "code", "general"], n)
    sources = rng.choice(["a", "b", "c"], n)
    return [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}],
             "label": None, "langdetect": "en", "source": str(sources[i]), "reward": None, "origin": None,
             "domain": str(domains[i]), "dsir_key": float(rng.normal())} for i in range(n)]


def write(d: Path, rows: list[dict[str, Any]], shards: int) -> str:
    d.mkdir()
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s::shards], schema=SCHEMA), d / f"p{s}.parquet")
    return str(d)


def expected(rows: list[dict[str, Any]], budgets: dict[str, float], caps: dict[str, int]) -> set[str]:
    """Single-machine reference: caps by key within source, then budgets by key within domain."""
    ok = []
    for src in {r["source"] for r in rows}:
        mine = sorted((r for r in rows if r["source"] == src), key=lambda r: -r["dsir_key"])
        ok += mine[: caps.get(src, len(mine))]
    out: set[str] = set()
    for d in {r["domain"] for r in ok}:
        mine = sorted((r for r in ok if r["domain"] == d), key=lambda r: -r["dsir_key"])
        b = budgets.get(d, 1.0)
        k = int(b * len(mine)) if b <= 1 else int(b)
        out |= {r["id"] for r in mine[:k]}
    return out


@pytest.mark.parametrize("caps", [{}, {"a": 150}])
def test_sharded_selection_equals_single_machine_top_k(tmp_path: Path, caps: dict[str, int]) -> None:
    rows = make(3000, np.random.default_rng(1))
    budgets = {"math": 200, "code": 0.25}
    src = write(tmp_path / "in", rows, shards=5)
    out = storage.validate_uri(str(tmp_path / "out"))
    cfg = {"budgets": budgets, "source_caps": caps, "target_shard_bytes": 1}
    m = run_all(build_step("select", cfg), [src], out)
    assert m.stats.shards == 5
    kept = read_step_table(out)
    assert set(kept["id"].to_pylist()) == expected(rows, budgets, caps)
    assert m.stats.records_in == 3000 and m.stats.records_kept == kept.num_rows
    dropped = read_step_table(out, "dropped")
    reasons = set(dropped["reason"].to_pylist())
    assert reasons == ({"over_budget", "source_cap"} if caps else {"over_budget"})
    # Replay: ~16% of the selection in every domain, only among selected records.
    for d in ("math", "code", "general"):
        sel = kept.filter(pa.compute.equal(kept["domain"], d))
        n_replay = sum(sel["replay"].to_pylist())
        assert n_replay == round(0.16 * sel.num_rows)
    assert m.stats.counters["decide.selected"] == kept.num_rows


def test_without_keys_selection_is_a_deterministic_hash_sample(tmp_path: Path) -> None:
    rows = make(500, np.random.default_rng(2))
    for r in rows:
        del r["dsir_key"]
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA.append(pa.field("domain", pa.string()))),
                   d / "p.parquet")
    outs = []
    for name in ("o1", "o2"):
        out = storage.validate_uri(str(tmp_path / name))
        run_all(build_step("select", {"budgets": {"general": 0.5}}), [str(d)], out)
        outs.append(read_step_table(out))
    a, b = outs
    assert a["id"].to_pylist() == b["id"].to_pylist()
    n_general = sum(r["domain"] == "general" for r in rows)
    assert sum(1 for x in a["domain"].to_pylist() if x == "general") == n_general // 2


def test_budget_validation() -> None:
    with pytest.raises(ValidationError, match="whole count"):
        SelectConfig(budgets={"math": 2.5})
    with pytest.raises(ValidationError):
        SelectConfig(budgets={"math": 0})
