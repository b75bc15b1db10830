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

from operators.core.step import (
    Artifacts,
    BatchResult,
    Stage,
    StageOutput,
    Step,
    StepConfig,
    dropped_table,
    partition_by_shard,
    table_digest,
)

DOMAIN = "domain"
DEFAULT_DOMAIN = "general"


def hash_unit(ids: list[str], seed: int, salt: str) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) per id (same id, seed and salt -> same number)."""
    prefix = f"{seed}:{salt}:".encode()
    return np.array([xxhash.xxh3_64_intdigest(prefix + i.encode()) for i in ids], dtype=np.float64) / 2.0**64


def _dsir_fit(dsir_dir: str | None) -> dict[str, Any]:
    """The committed `fit` summary (models, target counts) of a dsir step, or {} when not configured."""
    if not dsir_dir:
        return {}
    from operators.core.manifest import read_manifest, stage_dir, step_manifest_uri

    m = read_manifest(step_manifest_uri(stage_dir(dsir_dir, "fit")))
    if m is None:
        raise RuntimeError(f"select: dsir_dir {dsir_dir} has no committed fit stage")
    return m.summary


def decide(c: pa.Table, budgets: dict[str, float], caps: dict[str, int], replay_fraction: float
           ) -> dict[str, np.ndarray]:
    """The selection over candidates `c` (domain, source, key, replay_key): per source at most its cap (best
    keys first), then per domain the best keys within its budget (a fraction of the domain's records in `c`, or
    a count; unlisted domains keep all), and a replay share of each domain's selection. Pure."""
    n = c.num_rows
    key = c["key"].to_numpy()
    source = np.asarray(c["source"].to_pylist(), dtype=object)
    domain = np.asarray(c["domain"].to_pylist(), dtype=object)
    passed_cap = np.ones(n, dtype=bool)
    for src, cap in caps.items():
        idx = np.flatnonzero(source == src)
        if len(idx) > cap:
            passed_cap[idx[np.argsort(-key[idx], kind="stable")[cap:]]] = False
    selected = np.zeros(n, dtype=bool)
    chosen: dict[str, int] = {}
    for d in sorted(set(domain.tolist())):
        idx = np.flatnonzero((domain == d) & passed_cap)
        b = budgets.get(d, 1.0)
        k = min(len(idx), math.floor(b * len(idx)) if b <= 1 else int(b))
        selected[idx[np.argsort(-key[idx], kind="stable")[:k]]] = True
        chosen[d] = k
    replay = np.zeros(n, dtype=bool)
    rkey = c["replay_key"].to_numpy()
    for d, k in chosen.items():  # stratified: each domain contributes its share
        idx = np.flatnonzero(selected & (domain == d))
        m = round(replay_fraction * k)
        replay[idx[np.argsort(rkey[idx], kind="stable")[:m]]] = True
    return {"passed_cap": passed_cap, "selected": selected, "replay": replay}


def _frozen_decisions(c: pa.Table, frozen: dict[int, pa.Table | None]) -> dict[str, np.ndarray]:
    """The kept decisions for the candidate rows `c` (all of frozen shards), aligned with `c`'s rows."""
    out = {col: np.zeros(c.num_rows, dtype=bool) for col in ("passed_cap", "selected", "replay")}
    tables = [t for t in frozen.values() if t is not None]
    if not c.num_rows or not tables:
        return out
    before = pa.concat_tables(tables)
    index = {(s, r): i for i, (s, r) in enumerate(zip(before["shard"].to_pylist(), before["row"].to_pylist(),
                                                       strict=True))}
    at = np.array([index[(s, r)] for s, r in zip(c["shard"].to_pylist(), c["row"].to_pylist(), strict=True)],
                  dtype=np.int64)
    for col in out:
        out[col] = before[col].to_numpy(zero_copy_only=False)[at]
    return out


class SelectConfig(StepConfig):
    """Budgets, caps and the replay share."""

    budgets: dict[str, float] = Field(
        default_factory=dict,
        description="Per domain: >= 1 is a record count, (0, 1) a fraction of the domain. Unlisted: keep all.")
    source_caps: dict[str, int] = Field(default_factory=dict, description="Most records kept per source.")
    key_column: str = Field("dsir_key", description="Higher is better; a hash of the id when the column is absent.")
    replay_fraction: float = Field(0.16, ge=0, le=1)
    seed: int = 0
    dsir_dir: str | None = Field(
        None, description="The dsir step's output: when set, the KL reduction of the selection is reported.")
    freeze: bool = Field(
        False, description="Keep every decision of the last committed selection for the shards whose candidates "
        "are unchanged since, and select only among the other shards' records: each domain's fraction applies "
        "to them alone, a count budget and a source cap to what the kept decisions left. The incremental "
        "refresh's setting: a night adds to the selection and never takes a record back.")

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
    stages: ClassVar[tuple[Stage, ...]] = (
        Stage("candidates", "map"), Stage("decide", "reduce"), Stage("kl_counts", "map"), Stage("kl", "reduce"))

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
        if stage == "kl_counts":
            return self._kl_counts(pa.Table.from_batches([batch]))
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
        if stage == "kl":
            return self._kl(artifacts)
        parts = list(artifacts.iter_tables("candidates"))
        if not parts:
            return StageOutput(summary={"selected": 0})
        c = pa.concat_tables(parts).combine_chunks()
        # Only `freeze` compares the candidates' keys with the last selection's (reading every shard manifest).
        keys = {str(k): v for k, v in artifacts.shard_keys("candidates").items()} if self.config.freeze else {}
        frozen = self._frozen(artifacts, keys)
        is_frozen = np.isin(c["shard"].to_numpy(), np.array(sorted(frozen), dtype=np.int32))
        kept, rest = c.filter(pa.array(is_frozen)), c.filter(pa.array(~is_frozen))
        old = _frozen_decisions(kept, frozen)
        kept_domain = np.asarray(kept["domain"].to_pylist(), dtype=object)
        kept_source = np.asarray(kept["source"].to_pylist(), dtype=object)
        budgets: dict[str, float] = {}
        for d in sorted(set(c["domain"].to_pylist())):
            b = self.config.budgets.get(d, 1.0)
            budgets[d] = b if b <= 1 else max(0.0, b - int((old["selected"] & (kept_domain == d)).sum()))
        caps = {src: max(0, cap - int((old["passed_cap"] & (kept_source == src)).sum()))
                for src, cap in self.config.source_caps.items()}
        new = decide(rest, budgets, caps, self.config.replay_fraction)
        ordered = pa.concat_tables([kept, rest])  # the kept decisions first, then the new ones, row for row
        flags = {col: np.concatenate([old[col], new[col]]) for col in ("passed_cap", "selected", "replay")}
        decision = pa.table({"shard": ordered["shard"], "row": ordered["row"],
                             **{col: pa.array(v) for col, v in flags.items()}})
        domains = np.asarray(ordered["domain"].to_pylist(), dtype=object)
        pool = {d: int((flags["passed_cap"] & (domains == d)).sum()) for d in budgets}
        chosen = {d: int((flags["selected"] & (domains == d)).sum()) for d in pool}
        summary: dict[str, Any] = {"selected": int(flags["selected"].sum()), "replay": int(flags["replay"].sum()),
                                   "pool": pool, "chosen": chosen}
        if self.config.freeze:  # what the next run's freeze compares (keys name the input files' locations)
            summary.update({"candidate_keys": keys, "frozen_shards": len(frozen)})
        return StageOutput(partitions=partition_by_shard(decision), summary=summary)

    def _frozen(self, artifacts: Artifacts, keys: dict[str, str | None]) -> dict[int, pa.Table | None]:
        """With `freeze`: the shards whose candidates have the key they had at the last committed selection,
        with that selection's decisions for them (None: the shard had no candidates)."""
        previous = artifacts.previous_summary("decide") if self.config.freeze else None
        if not previous:
            return {}
        before = previous.get("candidate_keys", {})
        return {int(s): artifacts.previous_partition("decide", int(s)) for s, k in keys.items()
                if k is not None and before.get(s) == k}

    # -- KL reduction: hashed-feature KL(target || selected) vs KL(target || random sample, same size) --
    def prepare_stage(self, stage: str, artifacts: Artifacts, shard: int) -> None:
        if stage == "kl_counts":
            self.bind(artifacts, shard)
            summary = artifacts.summary("decide")
            self._sample_rate = {d: summary["chosen"][d] / max(summary["pool"][d], 1) for d in summary["pool"]}
            self._fit = _dsir_fit(self.config.dsir_dir)

    def _kl_counts(self, t: pa.Table) -> pa.Table:
        from operators.steps.dsir.step import prompt_texts

        n = t.num_rows
        rows = range(self._row, self._row + n)
        self._row += n
        fit = getattr(self, "_fit", None)
        empty = pa.table({"domain": pa.array([], pa.string()), "kind": pa.array([], pa.string()),
                          "n": pa.array([], pa.int64()), "counts": pa.array([], pa.list_(pa.int64()))})
        if not fit:
            return empty
        from operators.dsir.core import hashed_ngram_counts

        domains = np.asarray(t[DOMAIN].to_pylist() if DOMAIN in t.column_names else [DEFAULT_DOMAIN] * n, object)
        selected = np.array([self._decision.get(r, (False, False, False))[1] for r in rows], dtype=bool)
        u = hash_unit(t["id"].to_pylist(), self.config.seed, "kl")
        rate = np.array([self._sample_rate.get(d, 0.0) for d in domains])
        texts = prompt_texts(t)
        out: dict[str, list[Any]] = {"domain": [], "kind": [], "n": [], "counts": []}
        for d in sorted(set(domains.tolist()) & set(fit["target_counts"])):
            for kind, mask in (("selected", selected), ("random", u < rate)):
                idx = np.flatnonzero(mask & (domains == d))
                feats = hashed_ngram_counts([texts[i] for i in idx], len(fit["target_counts"][d]),
                                            seed=int(fit["models"][d]["seed"]))
                out["domain"].append(d)
                out["kind"].append(kind)
                out["n"].append(len(idx))
                out["counts"].append(feats.total_counts().astype(np.int64).tolist())
        return pa.table(out, schema=empty.schema)

    def _kl(self, artifacts: Artifacts) -> StageOutput:
        from operators.dsir.core import hashed_kl

        fit = _dsir_fit(self.config.dsir_dir)
        if not fit:
            return StageOutput(summary={})
        sums: dict[tuple[str, str], np.ndarray] = {}
        for t in artifacts.iter_tables("kl_counts"):
            for d, kind, c in zip(t["domain"].to_pylist(), t["kind"].to_pylist(), t["counts"].to_pylist(),
                                  strict=True):
                sums[(d, kind)] = sums.get((d, kind), 0) + np.asarray(c, np.int64)
        summary: dict[str, dict[str, float]] = {"kl_selected": {}, "kl_random": {}, "kl_reduction": {}}
        for d, target in fit["target_counts"].items():
            if (d, "selected") in sums and (d, "random") in sums:
                sel = hashed_kl(target, sums[(d, "selected")])
                rnd = hashed_kl(target, sums[(d, "random")])
                summary["kl_selected"][d] = round(sel, 4)
                summary["kl_random"][d] = round(rnd, 4)
                summary["kl_reduction"][d] = round(rnd - sel, 4)
        return StageOutput(summary=summary)

    def transform_digest(self, artifacts: Artifacts, shard: int) -> str | None:
        # The transform reads only the shard's decisions (selected, replay, capped per row).
        return table_digest(artifacts.partition("decide", shard))

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
