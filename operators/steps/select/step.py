"""`select` step: per-domain budgets and per-source caps over scored records, and the replay sample.

Deciding is kept apart from scoring: records arrive with a priority key (`dsir_key`, the Gumbel-perturbed
DSIR log importance weight; or, when absent, a deterministic hash of the id), and this cheap step picks
exactly, across all shards:
  1. per-source caps: the `cap` best records of each capped source;
  2. per-domain budgets: the best `budget` records of each domain (absolute, or a fraction of the domain);
  3. the replay sample: `replay_fraction` (paper: 1.2M of 7.4M, ~16%) of the selected set, stratified by
     domain, marked `replay = true` for the second training stage.
Stages: candidates (map; per-shard top lists, exact because a global top-k is a subset of the union of
per-shard top-ks) -> decide (reduce) -> transform (keep or drop with `source_cap` / `over_budget`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import Field, field_validator

from operators.core.step import Artifacts, BatchResult, Stage, StageOutput, Step, StepConfig, dropped_table

DOMAIN = "domain"
DEFAULT_DOMAIN = "general"


def hash_unit(ids: list[str], seed: int, salt: str) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) per id (same id, seed and salt -> same number)."""
    prefix = f"{seed}:{salt}:".encode()
    return np.array([xxhash.xxh3_64_intdigest(prefix + i.encode()) for i in ids], dtype=np.float64) / 2.0**64


class SelectConfig(StepConfig):
    """Budgets, caps and the replay share."""

    budgets: dict[str, float] = Field(
        default_factory=dict,
        description="Per domain: >= 1 is a record count, (0, 1) a fraction of the domain. Unlisted: keep all.")
    source_caps: dict[str, int] = Field(default_factory=dict, description="Most records kept per source.")
    key_column: str = Field("dsir_key", description="Higher is better; a hash of the id when the column is absent.")
    replay_fraction: float = Field(0.16, ge=0, le=1)
    seed: int = 0

    @field_validator("budgets")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        for d, b in v.items():
            if b <= 0 or (b > 1 and b != int(b)):
                raise ValueError(f"budget for {d!r} must be a fraction in (0, 1] or a whole count, got {b}")
        return v


class SelectStep(Step[SelectConfig]):
    """Exact global selection under budgets and caps, plus the replay flag."""

    name: ClassVar[str] = "select"
    config_model: ClassVar[type[StepConfig]] = SelectConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("candidates", "map"), Stage("decide", "reduce"))

    def __init__(self, config: SelectConfig) -> None:
        super().__init__(config)
        self._row = 0
        self._decision: dict[int, tuple[bool, bool, bool]] = {}

    def begin_shard(self, shard: int) -> None:
        self._row = 0

    def _keys(self, table: pa.Table) -> np.ndarray:
        if self.config.key_column in table.column_names:
            return table[self.config.key_column].to_numpy(zero_copy_only=False).astype(np.float64)
        return hash_unit(table["id"].to_pylist(), self.config.seed, "key")

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> pa.Table:
        t = pa.Table.from_batches([batch])
        n = t.num_rows
        domains = t[DOMAIN] if DOMAIN in t.column_names else pa.array([DEFAULT_DOMAIN] * n, pa.string())
        cand = pa.table({
            "shard": pa.array(np.full(n, shard, np.int32)),
            "row": pa.array(np.arange(self._row, self._row + n, dtype=np.int64)),
            "domain": domains, "source": t["source"], "key": pa.array(self._keys(t)),
            "replay_key": pa.array(hash_unit(t["id"].to_pylist(), self.config.seed, "replay")),
        })
        self._row += n
        return cand

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        parts = list(artifacts.iter_tables("candidates"))
        if not parts:
            return StageOutput(summary={"selected": 0})
        c = pa.concat_tables(parts).combine_chunks()
        n = c.num_rows
        key = c["key"].to_numpy()
        source = np.asarray(c["source"].to_pylist(), dtype=object)
        domain = np.asarray(c["domain"].to_pylist(), dtype=object)
        passed_cap = np.ones(n, dtype=bool)
        for src, cap in self.config.source_caps.items():
            idx = np.flatnonzero(source == src)
            if len(idx) > cap:
                passed_cap[idx[np.argsort(-key[idx], kind="stable")[cap:]]] = False
        selected = np.zeros(n, dtype=bool)
        pool: dict[str, int] = {}
        chosen: dict[str, int] = {}
        for d in sorted(set(domain.tolist())):
            idx = np.flatnonzero((domain == d) & passed_cap)
            pool[d] = len(idx)
            b = self.config.budgets.get(d, 1.0)
            k = min(len(idx), math.floor(b * len(idx)) if b <= 1 else int(b))
            selected[idx[np.argsort(-key[idx], kind="stable")[:k]]] = True
            chosen[d] = k
        replay = np.zeros(n, dtype=bool)
        rkey = c["replay_key"].to_numpy()
        for d, k in chosen.items():  # stratified: each domain contributes its share
            idx = np.flatnonzero(selected & (domain == d))
            m = round(self.config.replay_fraction * k)
            replay[idx[np.argsort(rkey[idx], kind="stable")[:m]]] = True
        decision = pa.table({"shard": c["shard"], "row": c["row"], "passed_cap": pa.array(passed_cap),
                             "selected": pa.array(selected), "replay": pa.array(replay)})
        shards = c["shard"].to_numpy()
        partitions = {int(s): decision.filter(pc.equal(decision["shard"], int(s))) for s in np.unique(shards)}
        return StageOutput(partitions=partitions, summary={
            "selected": int(selected.sum()), "replay": int(replay.sum()), "pool": pool, "chosen": chosen})

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        t = artifacts.partition("decide", shard)
        self._decision = {} if t is None else {
            r: (p, s, rp) for r, p, s, rp in zip(t["row"].to_pylist(), t["passed_cap"].to_pylist(),
                                                 t["selected"].to_pylist(), t["replay"].to_pylist(), strict=True)}

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        sources = table["source"].to_pylist()
        domains = table[DOMAIN].to_pylist() if DOMAIN in table.column_names else [DEFAULT_DOMAIN] * table.num_rows
        keep: list[bool] = []
        replay: list[bool] = []
        reasons: list[str] = []
        details: list[str] = []
        for i in range(table.num_rows):
            row = self._row + i
            passed, selected, rp = self._decision.get(row, (sources[i] not in self.config.source_caps, False, False))
            keep.append(selected)
            if selected:
                replay.append(rp)
            elif not passed:
                reasons.append("source_cap")
                details.append(f"source {sources[i]!r} capped at {self.config.source_caps[sources[i]]}")
            else:
                reasons.append("over_budget")
                details.append(f"domain {domains[i]!r} budget {self.config.budgets.get(domains[i], 1.0)}")
        self._row += table.num_rows
        mask = pa.array(keep, pa.bool_())
        kept = table.filter(mask)
        if "replay" in kept.column_names:
            kept = kept.drop_columns(["replay"])
        kept = kept.append_column("replay", pa.array(replay, pa.bool_()))
        counters: dict[str, Any] = {"replay": float(sum(replay))}
        return BatchResult(kept=kept, dropped=dropped_table(table.filter(pc.invert(mask)), reasons, details),
                           counters=counters)
