"""`select` step: per-domain budgets and per-source caps over scored records, and the replay sample.

Deciding is kept apart from scoring: records arrive with a priority key (`dsir_key`, the Gumbel-perturbed
DSIR log importance weight; or, when absent, a deterministic hash of the id), and this cheap step picks
exactly, across all shards:
  1. per-source caps: the `cap` best records of each capped source;
  2. per-domain budgets: the best `budget` records of each domain (absolute, or a fraction of the domain);
  3. the replay sample: `replay_fraction` (paper: 1.2M of 7.4M, ~16%) of the selected set, stratified by
     domain, marked `replay = true` for the second training stage.
`decide` below is the selection's definition over one table of every candidate; the step reaches the same
answer without that table (histograms of key bins, then only the records the bins leave open: `cutoffs.py`
and `SelectStep`), so no task holds one row per candidate.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import Field, field_validator

from operators.core.arrays import list_matrix
from operators.core.step import (
    SHARD_ROWS,
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
from operators.dsir.core import ShardCountSums
from operators.steps.select import cutoffs

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


def _chosen_counts(select_dir: str) -> dict[str, int]:
    """How many records each domain got in the committed selection at `select_dir` (its decide summary)."""
    from operators.core.manifest import read_manifest, stage_dir, step_manifest_uri

    m = read_manifest(step_manifest_uri(stage_dir(select_dir, "decide")))
    if m is None:
        raise RuntimeError(f"select: match_selection {select_dir} has no committed decide stage")
    return {str(d): int(n) for d, n in m.summary["chosen"].items()}


def _count_budget(count: int) -> float:
    """A budget that takes exactly `count` records (budgets <= 1 are fractions: a count of one is written just
    above 1, which `cutoffs.budget_take` reads as the count 1)."""
    return math.nextafter(1.0, 2.0) if count == 1 else float(count)


def decide(c: pa.Table, budgets: dict[str, float], caps: dict[str, int], replay_fraction: float
           ) -> dict[str, np.ndarray]:
    """The selection's definition over candidates `c` (domain, source, key, replay_key), in candidate order:
    per source at most its cap (best keys first), then per domain the best keys within its budget (a fraction
    of the domain's records in `c`, or a count; unlisted domains keep all), and a replay share of each
    domain's selection. Pure. The step's bounded stages decide the same (tests/test_select_bounded.py)."""
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


class SelectConfig(StepConfig):
    """Budgets, caps and the replay share."""

    budgets: dict[str, float] = Field(
        default_factory=dict,
        description="Per domain: >= 1 is a record count, (0, 1) a fraction of the domain. Unlisted: keep all.")
    source_caps: dict[str, int] = Field(default_factory=dict, description="Most records kept per source.")
    key_column: str = Field("dsir_key", description="Higher is better; a hash of the id when the column is absent.")
    ranking: Literal["key", "random"] = Field(
        "key", description="`random`: rank by a seeded hash of the id, ignoring `key_column`: the same budgets, "
        "caps and domain sizes as the DSIR selection, chosen at random (the selection ablation's baseline).")
    match_selection: str | None = Field(
        None, description="A committed select step over the same pool: each domain's budget becomes the count that "
        "selection chose, so this one has the same size per domain even where source caps change the pools (the "
        "selection ablation; a domain's pool here may still hold fewer).")
    enabled: bool = Field(True, description="False: the step is off and passes its input on (the DAG's optional "
                          "`select_random`).")
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


CANDIDATES = pa.schema([("shard", pa.int32()), ("domain", pa.string()), ("source", pa.string()),
                        ("bin", pa.int64()), ("n", pa.int64())])
BOUNDARY = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("domain", pa.string()),
                      ("source", pa.string()), ("key", pa.float64()), ("rkey", pa.float64())])
COUNTS = pa.schema([("shard", pa.int32()), ("domain", pa.string()), ("source", pa.string()),
                    ("passed", pa.int64()), ("selected", pa.int64())])
REPLAY_HIST = pa.schema([("shard", pa.int32()), ("domain", pa.string()), ("bin", pa.int64()), ("n", pa.int64())])
REPLAY_ROWS = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("domain", pa.string()),
                         ("rkey", pa.float64())])
SHARD_SUMS = pa.schema([("shard", pa.int32()), ("domain", pa.string()), ("source", pa.string()),
                        ("passed", pa.int64()), ("selected", pa.int64()), ("replay", pa.int64())])
KL_COUNTS = pa.schema([("domain", pa.string()), ("kind", pa.string()), ("n", pa.int64()),
                       ("counts", pa.list_(pa.int64()))])
COUNTS_CHANNEL, REPLAY_CHANNEL = 0, 1  # the boundary stage's side tables (shuffle partitions as channels)
NO_SOURCE = None  # the source of a record whose source has no cap: caps are the only reason to tell them apart


def _lookup(values: pa.Array | pa.ChunkedArray, table: dict[str, int], default: int) -> np.ndarray:
    """Per value, `table[value]`, or `default` for a value (or null) the table does not name."""
    names = sorted(table)
    lut = np.array([table[n] for n in names] + [default], dtype=np.int64)
    idx = pc.index_in(values, value_set=pa.array(names, pa.string())).fill_null(-1)
    return lut[idx.to_numpy(zero_copy_only=False)]


def _group_sum(table: pa.Table, keys: list[str], value: str | list[str]) -> pa.Table:
    """Sum `value` (one column or several) per distinct `keys` (columns: keys, then the sums)."""
    values = [value] if isinstance(value, str) else value
    out = table.group_by(keys).aggregate([(v, "sum") for v in values])
    return out.rename_columns([c.removesuffix("_sum") for c in out.column_names]).select([*keys, *values])


def _by_shard(tables: Any, shards: set[int]) -> pa.Table:
    """Rows of `tables` whose shard is in `shards`."""
    t = pa.concat_tables(list(tables)) if tables else None
    if t is None or t.num_rows == 0:
        return t
    return t.filter(pc.is_in(t["shard"], value_set=pa.array(sorted(shards), pa.int32())))


class SelectStep(Step[SelectConfig]):
    """Exact global selection under budgets and caps, plus the replay flag, in bounded memory per task.

    candidates (map)   per shard: a histogram of key bins per (domain, capped source)
    cutoffs (reduce)   each capped source's boundary bin and each domain's range of bins (`cutoffs.py`)
    boundary (map)     per shard: the records those bins leave open, counts of the rest, and the replay-key
                       histogram of the records surely selected
    decide (reduce)    the exact decision over the open records; the replay boundary bin per domain; the rules
                       each shard's transform applies to the rest
    kl_counts (map)    hashed n-gram counts of the selected and of a random sample (the KL report), and the
                       selected records in their domain's replay boundary bin
    kl (reduce)        the KL reduction per domain, and which of those records are replayed
    transform          keep the selected (flagged `replay` or not), drop the rest as `source_cap` / `over_budget`
    """

    name: ClassVar[str] = "select"
    version: ClassVar[int] = 2  # bounded stages; decisions unchanged
    config_model: ClassVar[type[StepConfig]] = SelectConfig
    stages: ClassVar[tuple[Stage, ...]] = (
        Stage("candidates", "map", grouped=True), Stage("cutoffs", "reduce"), Stage("boundary", "map", grouped=True),
        Stage("decide", "reduce"), Stage("kl_counts", "map", grouped=True), Stage("kl", "reduce"))
    grouped_run: ClassVar[bool] = True  # a shard's run keeps or drops by the decided lists: seconds per shard

    def __init__(self, config: SelectConfig) -> None:
        super().__init__(config)
        self._row = 0
        self._parts: list[pa.Table] = []
        self._side: list[pa.Table] = []
        self._rules: dict[str, dict[str, int]] = {}
        self._exceptions: dict[int, tuple[bool, bool]] = {}
        self._replayed: dict[int, bool] = {}

    def is_off(self) -> bool:
        return not self.config.enabled

    def begin_shard(self, shard: int) -> None:
        self._row = 0
        self._parts, self._side = [], []
        self._kl_sums: ShardCountSums[tuple[str, str]] = ShardCountSums()  # kl_counts, by (domain, kind)

    # -- what every stage computes per record --------------------------------------------------------------
    def _keys(self, table: pa.Table) -> np.ndarray:
        if self.config.ranking == "key" and self.config.key_column in table.column_names:
            return table[self.config.key_column].to_numpy(zero_copy_only=False).astype(np.float64)
        return hash_unit(table["id"].to_pylist(), self.config.seed, "key")

    @staticmethod
    def _domains(t: pa.Table) -> pa.Array | pa.ChunkedArray:
        return t[DOMAIN] if DOMAIN in t.column_names else pa.array([DEFAULT_DOMAIN] * t.num_rows, pa.string())

    def _capped_source(self, t: pa.Table) -> pa.Array | pa.ChunkedArray:
        capped = pc.is_in(t["source"], value_set=pa.array(sorted(self.config.source_caps), pa.string()))
        return pc.if_else(capped, t["source"], pa.scalar(NO_SOURCE, pa.string()))

    def _next_rows(self, n: int) -> np.ndarray:
        rows = np.arange(self._row, self._row + n, dtype=np.int64)
        self._row += n
        return rows

    def _flags(self, t: pa.Table, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(passed its source cap, selected) per record of `t`: the shard's exceptions, else its rules."""
        kb = cutoffs.key_bins(self._keys(t))
        cap = _lookup(t["source"], self._rules.get("cap", {}), cutoffs.UNCAPPED)
        passed = (cap == cutoffs.UNCAPPED) | (kb > cap)
        selected = passed & (kb > _lookup(self._domains(t), self._rules.get("hi", {}), cutoffs.KEY_TOP))
        for i, r in enumerate(rows.tolist()):
            if r in self._exceptions:
                passed[i], selected[i] = self._exceptions[r]
        return passed, selected

    # -- map stages ----------------------------------------------------------------------------------------
    def prepare_stage(self, stage: str, artifacts: Artifacts, shard: int) -> None:
        if stage == "boundary":
            self._bins = artifacts.summary("cutoffs")["plan"]
        elif stage == "kl_counts":
            self.bind_decisions(artifacts, shard)
            summary = artifacts.summary("decide")
            self._sample_rate = {d: summary["chosen"][d] / max(summary["pool"][d], 1) for d in summary["pool"]}
            self._fit = _dsir_fit(self.config.dsir_dir)

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> Any:
        t = pa.Table.from_batches([batch])
        if stage == "candidates":
            self._parts.append(pa.table({"domain": self._domains(t), "source": self._capped_source(t),
                                         "bin": cutoffs.key_bins(self._keys(t)),
                                         "n": np.ones(t.num_rows, np.int64)}))
            return {}
        if stage == "boundary":
            return self._boundary(t, shard)
        return self._kl_counts(t, shard)

    def finish_map(self, stage: str, shard: int) -> Any:
        if stage == "candidates":
            hist = (_group_sum(pa.concat_tables(self._parts), ["domain", "source", "bin"], "n") if self._parts
                    else CANDIDATES.empty_table().drop_columns(["shard"]))
            return hist.add_column(0, "shard", pa.array(np.full(hist.num_rows, shard, np.int32))).cast(CANDIDATES)
        if stage == "boundary":
            side: dict[int, pa.Table] = {}
            if self._parts:
                settled = pa.concat_tables(self._parts)
                c = settled.group_by(["domain", "source"]).aggregate([("passed", "sum"), ("selected", "sum")])
                c = c.rename_columns([x.removesuffix("_sum") for x in c.column_names])
                side[COUNTS_CHANNEL] = c.add_column(0, "shard", pa.array(np.full(c.num_rows, shard, np.int32)))\
                    .select(COUNTS.names).cast(COUNTS)
            if self._side:
                h = _group_sum(pa.concat_tables(self._side), ["domain", "bin"], "n")
                side[REPLAY_CHANNEL] = h.add_column(0, "shard", pa.array(np.full(h.num_rows, shard, np.int32)))\
                    .select(REPLAY_HIST.names).cast(REPLAY_HIST)
            return side
        if stage == "kl_counts":
            done = self._kl_sums.drain()
            return {SHARD_ROWS: pa.table({"domain": [d for (d, _), _, _ in done], "kind": [k for (_, k), _, _ in done],
                                          "n": [n for _, n, _ in done], "counts": [c for _, _, c in done]},
                                         schema=KL_COUNTS)}
        return None

    def _boundary(self, t: pa.Table, shard: int) -> dict[int, pa.Table]:
        """The shard's records whose fate the cutoffs leave open; counts and replay-key bins of the rest."""
        rows = self._next_rows(t.num_rows)
        key = self._keys(t)
        kb = cutoffs.key_bins(key)
        domains = self._domains(t)
        cap = _lookup(t["source"], self._bins["cap"], cutoffs.UNCAPPED)
        lo = _lookup(domains, self._bins["lo"], cutoffs.KEY_TOP)
        hi = _lookup(domains, self._bins["hi"], cutoffs.KEY_TOP)
        open_cap = (cap != cutoffs.UNCAPPED) & (kb == cap)
        passed = (cap == cutoffs.UNCAPPED) | (kb > cap)
        is_open = open_cap | (passed & (kb >= lo) & (kb <= hi))
        rkey = hash_unit(t["id"].to_pylist(), self.config.seed, "replay")
        settled = ~is_open
        selected = passed & (kb > hi)
        self._parts.append(pa.table({"domain": domains.filter(pa.array(settled)),
                                     "source": self._capped_source(t).filter(pa.array(settled)),
                                     "passed": passed[settled].astype(np.int64),
                                     "selected": selected[settled].astype(np.int64)}))
        sure = settled & selected
        self._side.append(pa.table({"domain": domains.filter(pa.array(sure)),
                                    "bin": cutoffs.rkey_bins(rkey[sure]), "n": np.ones(int(sure.sum()), np.int64)}))
        open_rows = pa.table({"shard": np.full(int(is_open.sum()), shard, np.int32), "row": rows[is_open],
                              "domain": domains.filter(pa.array(is_open)),
                              "source": t["source"].filter(pa.array(is_open)),
                              "key": key[is_open], "rkey": rkey[is_open]}, schema=BOUNDARY)
        return {SHARD_ROWS: open_rows}

    def _kl_counts(self, t: pa.Table, shard: int) -> dict[int, pa.Table]:
        """Hashed n-gram counts of the selected records and of a random sample of the same rate per domain; and
        the selected records in their domain's replay boundary bin (the kl stage decides which are replayed)."""
        n = t.num_rows
        rows = self._next_rows(n)
        _, selected = self._flags(t, rows)
        domains = self._domains(t)
        rkey = hash_unit(t["id"].to_pylist(), self.config.seed, "replay")
        at_edge = selected & (cutoffs.rkey_bins(rkey) == _lookup(domains, self._rules.get("replay", {}), -1))
        edge = pa.table({"shard": np.full(int(at_edge.sum()), shard, np.int32), "row": rows[at_edge],
                         "domain": domains.filter(pa.array(at_edge)), "rkey": rkey[at_edge]}, schema=REPLAY_ROWS)
        fit = getattr(self, "_fit", None)
        if not fit:
            return {REPLAY_CHANNEL: edge}
        from operators.steps.dsir.step import prompt_texts

        dom = np.asarray(domains.to_pylist(), object)
        u = hash_unit(t["id"].to_pylist(), self.config.seed, "kl")
        rate = np.array([self._sample_rate.get(d, 0.0) for d in dom])
        texts = prompt_texts(t)
        # Summed over the shard, written once (`finish_map`): a row per batch would make the kl stage read a table
        # that grows with the shard.
        for d in sorted(set(dom.tolist()) & set(fit["target_counts"])):
            for kind, mask in (("selected", selected), ("random", u < rate)):
                idx = np.flatnonzero(mask & (dom == d))
                self._kl_sums.add((d, kind), texts.take(pa.array(idx)), len(fit["target_counts"][d]),
                                  int(fit["models"][d]["seed"]))
        return {REPLAY_CHANNEL: edge}

    # -- reduce stages -------------------------------------------------------------------------------------
    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        if stage == "cutoffs":
            return self._cutoffs(artifacts, num_shards)
        if stage == "decide":
            return self._decide(artifacts, num_shards)
        return self._kl(artifacts, num_shards)

    def _last_decision(self, artifacts: Artifacts) -> dict[str, Any] | None:
        """The last committed decide summary (while decide recomputes, the one it replaces), or None."""
        previous = artifacts.previous_summary("decide")
        if previous is not None:
            return previous
        try:
            return artifacts.summary("decide")
        except RuntimeError:  # never committed
            return None

    def _cutoffs(self, artifacts: Artifacts, num_shards: int) -> StageOutput:
        cfg = self.config
        # Only `freeze` compares the candidates' keys with the last selection's (reading every shard manifest).
        keys = {str(k): v for k, v in artifacts.shard_keys("candidates").items()} if cfg.freeze else {}
        last = self._last_decision(artifacts) if cfg.freeze else None
        frozen: list[int] = []
        if last and "shard_counts" in last:  # a selection made before the bounded stages cannot be frozen on
            before = last.get("candidate_keys", {})
            frozen = sorted(int(s) for s, k in keys.items() if k is not None and before.get(s) == k)
        old = [last["shard_counts"][str(s)] for s in frozen] if last else []
        rest = set(range(num_shards)) - set(frozen)
        hists: dict[tuple[str, str | None], np.ndarray] = {}
        for t in artifacts.iter_tables("candidates"):
            t = _by_shard([t], rest)
            if t is None or not t.num_rows:
                continue
            for (d, s), part in _split(t, ["domain", "source"]).items():
                h = cutoffs.dense(part["bin"].to_numpy(), part["n"].to_numpy(), cutoffs.KEY_TOP)
                hists[(d, s)] = hists[(d, s)] + h if (d, s) in hists else h
        domains = sorted({d for d, _ in hists} | {d for c in old for d in c["passed"]})
        budgets: dict[str, float] = {}
        matched = _chosen_counts(cfg.match_selection) if cfg.match_selection else None
        for d in domains:
            if matched is not None:
                budgets[d] = _count_budget(matched.get(d, 0))
                continue
            b = cfg.budgets.get(d, 1.0)
            budgets[d] = b if b <= 1 else max(0.0, b - sum(c["selected"].get(d, 0) for c in old))
        caps = {src: max(0, cap - sum(c["source_passed"].get(src, 0) for c in old))
                for src, cap in cfg.source_caps.items()}
        zero = np.zeros(cutoffs.KEY_TOP, np.int64)
        cap_bins: dict[str, int] = {}
        for src, cap in caps.items():
            b = cutoffs.cap_bin(sum((h for (_, s), h in hists.items() if s == src), zero), cap)
            if b != cutoffs.UNCAPPED:
                cap_bins[src] = b
        lo: dict[str, int] = {}
        hi: dict[str, int] = {}
        bins = np.arange(cutoffs.KEY_TOP)
        for d in domains:
            sure, maybe = zero.copy(), zero.copy()
            for (dd, s), h in hists.items():
                if dd != d:
                    continue
                b = cap_bins.get(s, cutoffs.UNCAPPED) if s is not None else cutoffs.UNCAPPED
                if b == cutoffs.UNCAPPED:
                    sure += h
                else:
                    sure += np.where(bins > b, h, 0)
                    if b < cutoffs.KEY_TOP:
                        maybe[b] += h[b]
            lo[d], hi[d] = cutoffs.domain_bounds(sure, maybe, budgets[d])
        plan = {"cap": cap_bins, "lo": lo, "hi": hi, "budgets": budgets, "caps": caps, "frozen": frozen}
        summary: dict[str, Any] = {"plan": plan, "open_bins": {d: max(0, hi[d] - lo[d] + 1) for d in domains}}
        if cfg.freeze:  # what the next run's freeze compares (keys name the input files' locations)
            summary["candidate_keys"] = keys
        return StageOutput(summary=summary)

    def _decide(self, artifacts: Artifacts, num_shards: int) -> StageOutput:
        cfg = self.config
        cut = artifacts.summary("cutoffs")
        plan = cut["plan"]
        frozen = set(plan["frozen"])
        rest = set(range(num_shards)) - frozen
        # The open records of every shard decided now, in candidate order (shard, row): ties go to the earlier.
        r = _by_shard(list(artifacts.iter_tables("boundary")), rest)
        r = BOUNDARY.empty_table() if r is None else r.sort_by([("shard", "ascending"), ("row", "ascending")])
        settled = _by_shard(list(artifacts.shuffled("boundary", COUNTS_CHANNEL)), rest)
        settled = COUNTS.empty_table() if settled is None else settled
        rhist = _by_shard(list(artifacts.shuffled("boundary", REPLAY_CHANNEL)), rest)
        rhist = REPLAY_HIST.empty_table() if rhist is None else rhist
        key, rkey = r["key"].to_numpy(), r["rkey"].to_numpy()
        kb, rb = cutoffs.key_bins(key), cutoffs.rkey_bins(rkey)
        # Domains and sources as small integers, never a Python string per open record: the open records grow
        # with the pool, and a string object each would make this task grow five times as fast.
        domains = sorted(plan["budgets"])
        code = {d: i for i, d in enumerate(domains)}
        dom, s_dom = _lookup(r["domain"], code, -1), _lookup(settled["domain"], code, -1)
        s_src = settled["source"].to_numpy(zero_copy_only=False).astype(object)
        s_passed, s_selected = settled["passed"].to_numpy(), settled["selected"].to_numpy()
        # 1. Caps: in each capped source's boundary bin, the best keys up to what its cap leaves.
        cap = _lookup(r["source"], plan["cap"], cutoffs.UNCAPPED)
        passed = (cap == cutoffs.UNCAPPED) | (kb > cap)
        for s, b in plan["cap"].items():
            of_s = pc.equal(r["source"], s).fill_null(False).to_numpy(zero_copy_only=False)
            at = np.flatnonzero(of_s & (kb == b))
            room = plan["caps"][s] - int(s_passed[s_src == s].sum()) - int((passed & of_s).sum())
            passed[at[cutoffs.take_best(key[at], room)]] = True
        # 2. Budgets: every passing record above the domain's range, then its best within the range.
        selected = passed & (kb > _lookup(r["domain"], plan["hi"], cutoffs.KEY_TOP))
        pool: dict[str, int] = {}
        chosen: dict[str, int] = {}
        replay_bin: dict[str, int] = {}
        replay_need: dict[str, int] = {}
        for i, d in enumerate(domains):
            mine = dom == i
            pool[d] = int(s_passed[s_dom == i].sum()) + int((passed & mine).sum())
            k = cutoffs.budget_take(plan["budgets"][d], pool[d])
            lo, hi = plan["lo"][d], plan["hi"][d]
            above = int(s_selected[s_dom == i].sum()) + int((selected & mine).sum())
            within = np.flatnonzero(passed & mine & (kb >= lo) & (kb <= hi))
            if not 0 <= k - above <= within.size:  # the bounds of cutoffs.domain_bounds failed: a bug, not data
                raise RuntimeError(f"select: domain {d!r} needs {k - above} of {within.size} open records")
            selected[within[cutoffs.take_best(key[within], k - above)]] = True
            chosen[d] = k
            # 3. Replay: the bin holding the domain's m-th lowest replay key among its selected records.
            m = round(cfg.replay_fraction * k)
            h = rhist.filter(pc.equal(rhist["domain"], d))
            sel_bins = cutoffs.dense(h["bin"].to_numpy(), h["n"].to_numpy(), 1 << cutoffs.RKEY_BITS) + \
                np.bincount(rb[selected & mine], minlength=1 << cutoffs.RKEY_BITS)
            replay_bin[d] = cutoffs.bin_of_kth_lowest(sel_bins, m)
            replay_need[d] = m - int(sel_bins[:max(replay_bin[d], 0)].sum())
        rules = {"cap": plan["cap"], "hi": plan["hi"], "replay": replay_bin}
        rule_id = xxhash.xxh3_64_hexdigest(json.dumps(rules, sort_keys=True).encode())
        shard_counts = self._shard_counts(r, passed, selected, rb, replay_bin, settled, rhist, rest)
        last = self._last_decision(artifacts) if frozen else None
        rule_sets = {rule_id: rules}
        shard_rules = {str(s): rule_id for s in rest}
        partitions = {}
        decision = pa.table({"shard": r["shard"], "row": r["row"], "passed_cap": passed, "selected": selected})
        for s, t in partition_by_shard(decision).items():
            partitions[s] = t
        for s in sorted(frozen):
            assert last is not None
            old_rule = last["shard_rules"][str(s)]
            rule_sets[old_rule] = last["rule_sets"][old_rule]
            shard_rules[str(s)] = old_rule
            shard_counts[str(s)] = last["shard_counts"][str(s)]
            if (t := artifacts.previous_partition("decide", s)) is not None:
                partitions[s] = t
        for d in pool:  # the whole selection's figures: the frozen shards' decisions count too
            pool[d] += sum(shard_counts[str(s)]["passed"].get(d, 0) for s in frozen)
            chosen[d] += sum(shard_counts[str(s)]["selected"].get(d, 0) for s in frozen)
        summary: dict[str, Any] = {
            "selected": sum(chosen.values()), "pool": pool, "chosen": chosen, "open_records": r.num_rows,
            "replay_plan": {"need": replay_need}, "rule_sets": rule_sets, "shard_rules": shard_rules,
            "shard_counts": shard_counts}
        if cfg.freeze:
            summary.update({"candidate_keys": cut.get("candidate_keys", {}), "frozen_shards": len(frozen)})
        return StageOutput(partitions=partitions, summary=summary)

    @staticmethod
    def _shard_counts(r: pa.Table, passed: np.ndarray, selected: np.ndarray, rb: np.ndarray,
                      replay_bin: dict[str, int], settled: pa.Table, rhist: pa.Table,
                      shards: set[int]) -> dict[str, dict[str, Any]]:
        """Per shard decided now: records passed and selected per domain, passed per capped source, and selected
        below their domain's replay boundary bin (what a later frozen run and the kl stage add up)."""
        out: dict[str, dict[str, Any]] = {str(s): {"passed": {}, "selected": {}, "source_passed": {}, "replay": 0}
                                          for s in shards}

        def add(kind: str, shard: int, name: str | None, n: int) -> None:
            if name is not None and n:
                c = out[str(shard)][kind]
                c[name] = c.get(name, 0) + int(n)

        # Summed per (shard, domain, source) in Arrow first: the settled counts, the open records (a Python loop
        # over them would hold objects for every one, and they grow with the pool), and the surely selected
        # records' replay bins (those below their domain's replay bin).
        zeros = np.zeros(rhist.num_rows, np.int64)
        below_bin = rhist["bin"].to_numpy() < _lookup(rhist["domain"], replay_bin, -1)
        rows = pa.concat_tables([
            settled.select(["shard", "domain", "source", "passed", "selected"]).append_column(
                "replay", pa.array(np.zeros(settled.num_rows, np.int64))).cast(SHARD_SUMS),
            pa.table({"shard": r["shard"], "domain": r["domain"], "source": r["source"],
                      "passed": passed.astype(np.int64), "selected": selected.astype(np.int64),
                      "replay": (selected & (rb < _lookup(r["domain"], replay_bin, -1))).astype(np.int64)}
                     ).cast(SHARD_SUMS),
            pa.table({"shard": rhist["shard"], "domain": rhist["domain"], "source": pa.nulls(rhist.num_rows),
                      "passed": zeros, "selected": zeros,
                      "replay": np.where(below_bin, rhist["n"].to_numpy(), 0).astype(np.int64)}).cast(SHARD_SUMS)])
        sums = _group_sum(rows, ["shard", "domain", "source"], ["passed", "selected", "replay"])
        for s, d, src, p, sel, rep in zip(*(c.to_pylist() for c in sums.columns), strict=True):
            add("passed", s, d, p)
            add("selected", s, d, sel)
            add("source_passed", s, src, p)
            out[str(s)]["replay"] += int(rep)
        return out

    def _kl(self, artifacts: Artifacts, num_shards: int) -> StageOutput:
        decided = artifacts.summary("decide")
        frozen = set(artifacts.summary("cutoffs")["plan"]["frozen"])
        rest = set(range(num_shards)) - frozen
        # Replay: in each domain's boundary bin, the lowest replay keys up to what the bins below left.
        edge = _by_shard(list(artifacts.shuffled("kl_counts", REPLAY_CHANNEL)), rest)
        edge = REPLAY_ROWS.empty_table() if edge is None else edge.sort_by([("shard", "ascending"),
                                                                              ("row", "ascending")])
        replay = np.zeros(edge.num_rows, dtype=bool)
        dom = edge["domain"].to_numpy(zero_copy_only=False).astype(object)
        rkey = edge["rkey"].to_numpy()
        for d, need in decided["replay_plan"]["need"].items():
            at = np.flatnonzero(dom == d)
            replay[at[cutoffs.take_best(rkey[at], need, ascending=True)]] = True
        partitions = partition_by_shard(pa.table({"shard": edge["shard"], "row": edge["row"], "replay": replay}))
        shard_replay = {str(s): int(decided["shard_counts"][str(s)]["replay"]) for s in rest}
        for s, n in zip(edge["shard"].to_pylist(), replay.tolist(), strict=True):
            shard_replay[str(s)] += int(n)
        previous = artifacts.previous_summary("kl") or {}
        for s in sorted(frozen):
            shard_replay[str(s)] = int(previous.get("per_shard", {}).get("replay", {}).get(str(s), 0))
            if (t := artifacts.previous_partition("kl", s)) is not None:
                partitions[s] = t
        # Per-shard figures one level down, where the step's counters (and the report) do not list them.
        summary: dict[str, Any] = {"replay": sum(shard_replay.values()), "per_shard": {"replay": shard_replay},
                                   **self._kl_summary(artifacts)}
        return StageOutput(partitions=partitions, summary=summary)

    def _kl_summary(self, artifacts: Artifacts) -> dict[str, Any]:
        """KL(target || selected) and KL(target || random sample of the same size) per domain, and the gap."""
        from operators.dsir.core import hashed_kl

        fit = _dsir_fit(self.config.dsir_dir)
        if not fit:
            return {}
        sums: dict[tuple[str, str], np.ndarray] = {}
        for t in artifacts.iter_tables("kl_counts"):
            for d, kind, c in zip(t["domain"].to_pylist(), t["kind"].to_pylist(), list_matrix(t["counts"]),
                                  strict=True):
                sums[(d, kind)] = sums.get((d, kind), 0) + c
        summary: dict[str, dict[str, float]] = {"kl_selected": {}, "kl_random": {}, "kl_reduction": {}}
        for d, target in fit["target_counts"].items():
            if (d, "selected") in sums and (d, "random") in sums:
                sel = hashed_kl(target, sums[(d, "selected")])
                rnd = hashed_kl(target, sums[(d, "random")])
                summary["kl_selected"][d] = round(sel, 4)
                summary["kl_random"][d] = round(rnd, 4)
                summary["kl_reduction"][d] = round(rnd - sel, 4)
        return summary

    # -- the transform -------------------------------------------------------------------------------------
    def bind_decisions(self, artifacts: Artifacts, shard: int) -> None:
        """Load the shard's rules and the decisions made record by record (decide's open records)."""
        decided = artifacts.summary("decide")
        self._rules = decided["rule_sets"][decided["shard_rules"][str(shard)]]
        t = artifacts.partition("decide", shard)
        self._exceptions = {} if t is None else {
            r: (p, s) for r, p, s in zip(t["row"].to_pylist(), t["passed_cap"].to_pylist(), t["selected"].to_pylist(),
                                         strict=True)}

    def transform_digest(self, artifacts: Artifacts, shard: int) -> str | None:
        # The transform reads the shard's rules and its record-by-record decisions and replay flags.
        decided = artifacts.summary("decide")
        rules = decided["rule_sets"][decided["shard_rules"][str(shard)]]
        return xxhash.xxh3_64_hexdigest((json.dumps(rules, sort_keys=True) + table_digest(
            artifacts.partition("decide", shard)) + table_digest(artifacts.partition("kl", shard))).encode())

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        self.bind_decisions(artifacts, shard)
        t = artifacts.partition("kl", shard)
        self._replayed = {} if t is None else dict(zip(t["row"].to_pylist(), t["replay"].to_pylist(), strict=True))

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        rows = self._next_rows(table.num_rows)
        passed, selected = self._flags(table, rows)
        domains = self._domains(table)
        rb = cutoffs.rkey_bins(hash_unit(table["id"].to_pylist(), self.config.seed, "replay"))
        replay_bin = _lookup(domains, self._rules.get("replay", {}), -1)
        replay = selected & (rb < replay_bin)
        for i in np.flatnonzero(selected & (rb == replay_bin)).tolist():
            replay[i] = self._replayed.get(int(rows[i]), False)
        sources = table["source"].to_pylist()
        domain_names = domains.to_pylist()
        reasons: list[str] = []
        details: list[str] = []
        for i in np.flatnonzero(~selected).tolist():
            if not passed[i]:
                reasons.append("source_cap")
                details.append(f"source {sources[i]!r} capped at {self.config.source_caps[sources[i]]}")
            else:
                reasons.append("over_budget")
                details.append(f"domain {domain_names[i]!r} budget {self.config.budgets.get(domain_names[i], 1.0)}")
        mask = pa.array(selected, pa.bool_())
        kept = table.filter(mask)
        if "replay" in kept.column_names:
            kept = kept.drop_columns(["replay"])
        kept = kept.append_column("replay", pa.array(replay[selected], pa.bool_()))
        return BatchResult(kept=kept, dropped=dropped_table(table.filter(pc.invert(mask)), reasons, details),
                           counters={"replay": float(replay[selected].sum())})


def _split(t: pa.Table, cols: list[str]) -> dict[tuple[Any, ...], pa.Table]:
    """`t`'s rows grouped by the values of `cols`."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, k in enumerate(zip(*(t[c].to_pylist() for c in cols), strict=True)):
        groups.setdefault(k, []).append(i)
    return {k: t.take(pa.array(v)) for k, v in groups.items()}
