"""The bounded selection (histograms, cutoffs, open records) decides exactly what the one-table `decide` decides.

`decide` over a table of every candidate is the reference: it is the selection's definition (caps by key within
source, budgets by key within domain, ties to the earlier candidate, a stratified replay share). The step's
stages never build that table; these tests build it beside them and compare every record's fate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.cli import build_step
from operators.core import storage
from operators.core.manifest import read_manifest, stage_dir, step_manifest_uri
from operators.core.runner import load_plan, read_step_table, run_all
from operators.schema import CANONICAL_SCHEMA
from operators.steps.select import cutoffs
from operators.steps.select.step import decide, hash_unit

SCHEMA = CANONICAL_SCHEMA.append(pa.field("domain", pa.string())).append(pa.field("dsir_key", pa.float64()))


def _rows(n: int, keys: np.ndarray, rng: np.random.Generator) -> list[dict[str, Any]]:
    domains = rng.choice(["math", "code", "general", "chat"], n, p=[0.3, 0.3, 0.3, 0.1])
    sources = rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])
    return [{"id": f"r{i:05d}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}],
             "label": None, "langdetect": "en", "source": str(sources[i]), "reward": None, "origin": None,
             "domain": str(domains[i]), "dsir_key": float(keys[i])} for i in range(n)]


def _reference(out: str, budgets: dict[str, float], caps: dict[str, int], replay_fraction: float,
               key_column: bool) -> dict[str, tuple[bool, bool, bool]]:
    """Per id: (passed its cap, selected, replay) by `decide` over every candidate, in the plan's shard order."""
    tables = []
    for spec in load_plan(out).shards:
        for uri in spec.uris:
            t = pq.read_table(storage.open_input(uri))
            ids = t["id"].to_pylist()
            key = t["dsir_key"].to_numpy() if key_column else hash_unit(ids, 0, "key")
            tables.append(pa.table({"id": t["id"], "domain": t["domain"], "source": t["source"], "key": key,
                                    "replay_key": hash_unit(ids, 0, "replay")}))
    c = pa.concat_tables(tables)
    flags = decide(c, budgets, caps, replay_fraction)
    return {i: (bool(p), bool(s), bool(r)) for i, p, s, r in
            zip(c["id"].to_pylist(), flags["passed_cap"], flags["selected"], flags["replay"], strict=True)}


KEYS = {
    "spread": lambda rng, n: rng.normal(size=n) * 3,
    "ties": lambda rng, n: np.round(rng.normal(size=n) * 2) / 2,  # a handful of values: ties across shards
    "extremes": lambda rng, n: np.where(rng.random(n) < 0.05, rng.choice([np.inf, -np.inf, np.nan, 0.0, -0.0], n),
                                        rng.normal(size=n)),
}


@pytest.mark.parametrize(("keys", "caps"), [
    ("spread", {}), ("spread", {"a": 700, "c": 5000}), ("ties", {"a": 700, "b": 0}), ("extremes", {"b": 300}),
    (None, {"a": 900}),  # no key column: the keys are hashes of the ids
])
def test_bounded_selection_equals_one_table_decide(tmp_path: Path, keys: str | None, caps: dict[str, int]) -> None:
    n, shards = 4000, 12
    rng = np.random.default_rng(7)
    rows = _rows(n, KEYS[keys](rng, n) if keys else np.zeros(n), rng)
    src = tmp_path / "in"
    src.mkdir()
    for s in range(shards):
        t = pa.Table.from_pylist(rows[s::shards], schema=SCHEMA)
        pq.write_table(t if keys else t.drop_columns(["dsir_key"]), src / f"p{s:02d}.parquet")
    budgets = {"math": 0.3, "code": 250}  # a fraction, a count; "general" and "chat" keep all that passed
    out = storage.validate_uri(str(tmp_path / "out"))
    cfg = {"budgets": budgets, "source_caps": caps, "replay_fraction": 0.16, "target_shard_bytes": 1}
    m = run_all(build_step("select", cfg), [str(src)], out)
    assert len(load_plan(out).shards) == shards

    want = _reference(out, budgets, caps, 0.16, keys is not None)
    kept = read_step_table(out)
    dropped = read_step_table(out, kind="dropped")
    assert kept.num_rows + dropped.num_rows == n  # the ledger
    assert set(kept["id"].to_pylist()) == {i for i, (_, s, _) in want.items() if s}
    assert {i for i, r in zip(kept["id"].to_pylist(), kept["replay"].to_pylist(), strict=True) if r} == \
        {i for i, (_, _, r) in want.items() if r}
    reasons = dict(zip(dropped["id"].to_pylist(), dropped["reason"].to_pylist(), strict=True))
    assert reasons == {i: "over_budget" if p else "source_cap" for i, (p, s, _) in want.items() if not s}
    assert m.stats.counters["decide.selected"] == kept.num_rows
    assert m.stats.counters["kl.replay"] == sum(kept["replay"].to_pylist()) > 0
    decided = read_manifest(step_manifest_uri(stage_dir(out, "decide")))
    assert decided is not None
    if keys == "spread":  # the decision read a few bins' worth of records, not every candidate
        assert decided.summary["open_records"] < n / 10


def test_key_bins_keep_the_key_order() -> None:
    rng = np.random.default_rng(3)
    key = np.concatenate([rng.normal(size=5000) * 10.0 ** rng.integers(-30, 30, 5000),
                          [np.inf, -np.inf, 0.0, -0.0, 1e-300, -1e-300, np.nan]])
    bins = cutoffs.key_bins(key)
    finite = ~np.isnan(key)
    order = np.argsort(key[finite], kind="stable")
    assert (np.diff(bins[finite][order]) >= 0).all()  # a higher key never has a lower bin
    assert bins[np.isnan(key)].tolist() == [0] and bins.min() == 0 and bins.max() < cutoffs.KEY_TOP
    r = rng.random(5000)
    rb = cutoffs.rkey_bins(r)
    assert (np.diff(rb[np.argsort(r)]) >= 0).all() and rb.max() < 1 << cutoffs.RKEY_BITS


def test_domain_bounds_hold_whatever_the_capped_records_do() -> None:
    """For every way the `maybe` records could pass, the budget's cutoff lies within (lo, hi)."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        size = 64
        sure = rng.integers(0, 5, size)
        maybe = np.zeros(size, np.int64)
        maybe[rng.integers(0, size)] = rng.integers(0, 30)
        budget = float(rng.choice([0.1, 0.5, 0.9, 1.0, 7, 40]))
        lo, hi = cutoffs.domain_bounds(sure, maybe, budget)
        for passing in range(int(maybe.sum()) + 1):
            pool = sure.copy()
            pool[np.flatnonzero(maybe)] += passing if maybe.any() else 0
            k = cutoffs.budget_take(budget, int(pool.sum()))
            if (lo, hi) == (cutoffs.KEEP_ALL, cutoffs.KEEP_ALL):
                assert k == pool.sum()
                continue
            assert pool[hi + 1:].sum() <= k <= pool[lo:].sum()
