"""`dsir` step: score every record's importance toward its domain's target (Xie et al. 2023).

Stages:
  counts (map)  per shard and domain, summed hashed unigram+bigram counts of the records' prompts
  fit (reduce)  global raw model per domain from the summed counts; target model from the domain's
                target prompts (math -> GSM8K+MATH, code -> HumanEval/MBPP by default in production)
  transform     per record: `dsir_log_weight` (log p_target - log p_raw over its features) and
                `dsir_key` = log weight + Gumbel noise derived from (seed, id), so Gumbel top-k over
                the keys is importance resampling without replacement and per-shard top-k merges to
                exactly the global top-k. Domains without a target get weight 0 (uniform sampling).
Nothing is dropped here: deciding is the `select` step's job, so new budgets never rescore.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from operators.benchmarks.loaders import PACKAGED_HUMANEVAL, load_prompts
from operators.benchmarks.synthetic import BUILTIN_MATH
from operators.core.arrays import list_matrix
from operators.core.step import Artifacts, BatchResult, Stage, StageOutput, StageRows, Step, StepConfig, keep_all
from operators.dsir.core import (
    NUM_BUCKETS,
    DSIRModel,
    ShardCountSums,
    gumbel_keys,
    hashed_ngram_counts,
    log_importance_weights,
)
from operators.steps.decontam.step import BenchmarkSource
from operators.text.turns import joined_role_turns

DOMAIN = "domain"
HIST_EDGES = (-500.0, -200.0, -100.0, -50.0, -20.0, -10.0, -5.0, 0.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)


def default_targets() -> dict[str, list[BenchmarkSource]]:
    return {
        "code": [BenchmarkSource(name="humaneval", uri=PACKAGED_HUMANEVAL, format="humaneval")],
        "math": [BenchmarkSource(name="math_word_problems", uri=BUILTIN_MATH, format="gsm8k")],
    }


class DSIRConfig(StepConfig):
    """Targets per domain and the feature space."""

    targets: dict[str, list[BenchmarkSource]] = Field(default_factory=default_targets)
    num_buckets: int = Field(NUM_BUCKETS, ge=16)
    smoothing: float = Field(1.0, gt=0)
    seed: int = 0
    freeze: bool = Field(
        False, description="Keep the importance models of the last committed fit (refit only domains it lacks), "
        "so a night's new records are scored by the same models and old records keep their keys; the "
        "incremental refresh's setting. False: refit from every shard's counts each run.")


def prompt_texts(table: pa.Table) -> pa.Array:
    """The text DSIR featurizes: the human turns of each conversation (what the target sets are), joined by
    newlines, as an Arrow column (the n-gram hashing reads its bytes)."""
    return joined_role_turns(table.column("conversations"), "human")


def histogram(values: np.ndarray, domain: str) -> dict[str, float]:
    """Additive counters of log weights in fixed bins (summable across shards)."""
    idx = np.searchsorted(np.asarray(HIST_EDGES), values, side="right")
    labels = [f"<{HIST_EDGES[0]:g}", *[f"[{lo:g},{hi:g})" for lo, hi in itertools.pairwise(HIST_EDGES)],
              f">={HIST_EDGES[-1]:g}"]
    counts = np.bincount(idx, minlength=len(labels))
    return {f"log_weight_hist.{domain}.{labels[i]}": float(c) for i, c in enumerate(counts) if c}


class DSIRStep(Step[DSIRConfig]):
    """Add `dsir_log_weight` and `dsir_key` to every record."""

    name: ClassVar[str] = "dsir"
    config_model: ClassVar[type[StepConfig]] = DSIRConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("counts", "map"), Stage("fit", "reduce"))
    grouped_run: ClassVar[bool] = True  # a shard's run scores its records with the fitted models: seconds per shard

    def __init__(self, config: DSIRConfig) -> None:
        super().__init__(config)
        self._models: dict[str, DSIRModel] = {}
        self._shard_counts: ShardCountSums[str] = ShardCountSums()  # the counts stage's sums over its shard

    def _domains(self, table: pa.Table) -> list[str]:
        if DOMAIN in table.column_names:
            return [d or "general" for d in table.column(DOMAIN).to_pylist()]
        return ["general"] * table.num_rows

    def begin_shard(self, shard: int) -> None:
        self._shard_counts = ShardCountSums()

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> StageRows:
        # Summed over the shard and written once (`finish_map`): a row per batch would make the fit read a
        # table that grows with the shard, 80 KB per batch and domain.
        table = pa.Table.from_batches([batch])
        texts, domains = prompt_texts(table), np.asarray(self._domains(table), dtype=object)
        for d in sorted(set(domains.tolist())):
            idx = np.flatnonzero(domains == d)
            self._shard_counts.add(d, texts.take(pa.array(idx)), self.config.num_buckets, self.config.seed)
        return {}

    def finish_map(self, stage: str, shard: int) -> StageRows | None:
        done = self._shard_counts.drain()
        return pa.table({"domain": pa.array([d for d, _, _ in done], pa.string()),
                         "n": pa.array([n for _, n, _ in done], pa.int64()),
                         "counts": pa.array([c for _, _, c in done], pa.list_(pa.int64()))})

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        raw: dict[str, np.ndarray] = {}
        pool: dict[str, int] = {}
        for t in artifacts.iter_tables("counts"):
            for d, n, c in zip(t["domain"].to_pylist(), t["n"].to_pylist(), list_matrix(t["counts"]), strict=True):
                raw[d] = raw.get(d, np.zeros(self.config.num_buckets, np.int64)) + c
                pool[d] = pool.get(d, 0) + n
        models: dict[str, Any] = {}
        target_counts: dict[str, list[int]] = {}
        target_sizes: dict[str, int] = {}
        previous = artifacts.previous_summary(stage) if self.config.freeze else None
        for d, sources in self.config.targets.items():
            if d not in raw:
                continue
            if previous is not None and d in previous.get("models", {}):
                models[d] = previous["models"][d]
                target_counts[d] = previous["target_counts"][d]
                target_sizes[d] = previous["target_prompts"][d]
                continue
            prompts = [p for s in sources for p in load_prompts(s.uri, s.format)]
            tc = hashed_ngram_counts(prompts, self.config.num_buckets, seed=self.config.seed).total_counts()
            model = DSIRModel.fit(tc, raw[d], seed=self.config.seed, smoothing=self.config.smoothing)
            models[d] = model.to_dict()
            target_counts[d] = np.asarray(tc, np.int64).tolist()
            target_sizes[d] = len(prompts)
        return StageOutput(summary={"pool": pool, "target_prompts": target_sizes, "models": models,
                                    "target_counts": target_counts})

    def transform_digest(self, artifacts: Artifacts, shard: int) -> str | None:
        # The transform reads only the fitted models: while they are unchanged a shard's scores are too.
        import hashlib
        import json

        models = json.dumps(artifacts.summary("fit")["models"], sort_keys=True)
        return hashlib.sha256(models.encode()).hexdigest()[:24]

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        self._models = {d: DSIRModel.from_dict(m) for d, m in artifacts.summary("fit")["models"].items()}

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        texts, domains = prompt_texts(table), np.asarray(self._domains(table), dtype=object)
        ids = table.column("id").to_pylist()
        log_w = np.zeros(table.num_rows, dtype=np.float64)
        counters: dict[str, float] = {}
        for d in sorted(set(domains.tolist())):
            idx = np.flatnonzero(domains == d)
            model = self._models.get(d)
            if model is not None:
                feats = hashed_ngram_counts(texts.take(pa.array(idx)), model.num_buckets, seed=self.config.seed)
                log_w[idx] = log_importance_weights(feats, model.log_p_target, model.log_p_raw)
                counters.update(histogram(log_w[idx], d))
        keys = gumbel_keys(log_w, self.config.seed, ids)
        for name in ("dsir_log_weight", "dsir_key"):
            if name in table.column_names:
                table = table.drop_columns([name])
        table = table.append_column("dsir_log_weight", pa.array(log_w)).append_column("dsir_key", pa.array(keys))
        return keep_all(table, counters)
