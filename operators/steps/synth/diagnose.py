"""`diagnose` step: which abilities are weak? Candidates answer a probe set, a judge scores (Phase 2).

The probe set is drawn from the labeled pool: per first-level ability, the `probes_per_ability` records
with the smallest hash of (seed, id) (stages: probe_keys (map) -> probes (reduce), exact across shards).
An ability with fewer than `min_label_samples` records in the pool is not probed: its evidence is too thin
to judge, and it is marked so (`probes.thin.<ability>` = its records) instead of getting a score that a
handful of records would decide.
Only probes are read by the transform (the rest of the pool is not copied anywhere). Each candidate model
answers each probe; the judge returns a structured {score 1-10, rationale}. Output: one row per probe with
every candidate's answer, score and rationale. Stats carry additive counters
`score_sum.<ability>.<model>` and `score_n.<ability>.<model>`, so per-ability means are exact across
shards; `ability_scores` turns them into the table the report shows and `seed_select` reads (abilities
below its threshold get extra seeds in the next round).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from operators.core.arrays import replace_column
from operators.core.step import (
    Artifacts,
    BatchResult,
    ShardSpec,
    Stage,
    StageOutput,
    StepConfig,
    keep_all,
    partition_by_shard,
)
from operators.llm.base import LLMConfig
from operators.schema import first_exchange
from operators.steps.select.step import hash_unit
from operators.steps.synth.base import LLMStep, LLMStepConfig

ANSWER_TYPE = pa.list_(pa.struct([("model", pa.string()), ("answer", pa.string()), ("score", pa.float64()),
                                  ("rationale", pa.string()), ("failure", pa.string())]))


class DiagnoseConfig(LLMStepConfig):
    """`llm` is the judge; `candidates` are the models under diagnosis."""

    candidates: dict[str, LLMConfig] = Field(default_factory=lambda: {"candidate": LLMConfig()}, min_length=1)
    probes_per_ability: int = Field(5, ge=1)
    min_label_samples: int = Field(
        100, ge=0, description="An ability with fewer records than this in the pool is marked too thin to judge "
        "and is not probed (0: judge every ability).")
    round: int = Field(1, ge=1)
    seed: int = 0


def thin_abilities(counters: dict[str, float]) -> dict[str, int]:
    """{ability: records in the pool} of the abilities a diagnose step found too thin to judge (its counters)."""
    return {k[len("probes.thin."):]: int(v) for k, v in sorted(counters.items()) if k.startswith("probes.thin.")}


def ability_scores(counters: dict[str, float]) -> dict[str, dict[str, float]]:
    """{ability: {model: mean judge score}} from a diagnose step's counters."""
    sums: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in counters.items():
        if key.startswith("score_sum."):
            ability, _, model = key[len("score_sum."):].rpartition(".")
            n = counters.get(f"score_n.{ability}.{model}", 0.0)
            if n:
                sums[ability][model] = round(value / n, 3)
    return {a: dict(sorted(m.items())) for a, m in sorted(sums.items())}


class DiagnoseStep(LLMStep[DiagnoseConfig]):
    """Probe answers by each candidate, judged."""

    name: ClassVar[str] = "diagnose"
    config_model: ClassVar[type[StepConfig]] = DiagnoseConfig
    prompt_names: ClassVar[tuple[str, ...]] = ("respond", "judge_answer")
    stages: ClassVar[tuple[Stage, ...]] = (Stage("probe_keys", "map"), Stage("probes", "reduce"))

    def __init__(self, config: DiagnoseConfig) -> None:
        super().__init__(config)
        self._row = 0
        self._probe_rows: dict[int, str] | None = None  # set by bind: only the transform reads probes only

    def begin_shard(self, shard: int) -> None:
        self._row = 0

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> pa.Table:
        t = pa.Table.from_batches([batch])
        first = [((lab or {}).get("cate_ability_en") or ["unlabeled"])[0] for lab in t["label"].to_pylist()]
        out = pa.table({"shard": pa.array(np.full(t.num_rows, shard, np.int32)),
                        "row": pa.array(np.arange(self._row, self._row + t.num_rows)),
                        "ability": pa.array(first, pa.string()),
                        "key": pa.array(hash_unit(t["id"].to_pylist(), self.config.seed, "probe"))})
        self._row += t.num_rows
        return out

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        parts = [t for t in artifacts.iter_tables("probe_keys") if t.num_rows]
        if not parts:
            return StageOutput(summary={"probes": 0})
        c = pa.concat_tables(parts).combine_chunks()
        ability = np.asarray(c["ability"].to_pylist(), dtype=object)
        key = c["key"].to_numpy()
        chosen = np.zeros(c.num_rows, dtype=bool)
        per: dict[str, int] = {}
        thin: dict[str, int] = {}
        for a in sorted(set(ability.tolist())):
            idx = np.flatnonzero(ability == a)
            if idx.size < self.config.min_label_samples:
                thin[a] = int(idx.size)
                continue
            pick = idx[np.argsort(key[idx], kind="stable")[: self.config.probes_per_ability]]
            chosen[pick] = True
            per[a] = len(pick)
        probes = c.filter(pa.array(chosen)).select(["shard", "row", "ability"])
        return StageOutput(partitions=partition_by_shard(probes), summary={
            "probes": int(chosen.sum()), "per_ability": per, "thin": thin,
            "min_label_samples": self.config.min_label_samples})

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        t = artifacts.partition("probes", shard)
        self._probe_rows = {} if t is None else dict(zip(t["row"].to_pylist(), t["ability"].to_pylist(),
                                                         strict=True))

    def read(self, shard: ShardSpec) -> Iterator[pa.RecordBatch]:
        """For the transform, only the probe records: the pool is neither rewritten nor copied to dropped/."""
        if self._probe_rows is None:  # the probe_keys stage reads the whole pool
            yield from super().read(shard)
            return
        row = 0
        for batch in super().read(shard):
            rows = [i for i in range(batch.num_rows) if row + i in self._probe_rows]
            row += batch.num_rows
            if rows:
                yield batch.take(pa.array(rows))

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        questions = [first_exchange(c)[0] for c in table["conversations"].to_pylist()]
        abilities = [((lab or {}).get("cate_ability_en") or ["unlabeled"])[0] for lab in table["label"].to_pylist()]
        answers: list[list[dict[str, Any]]] = [[] for _ in questions]
        counters: dict[str, float] = defaultdict(float)
        respond, judge = self.prompts["respond"], self.prompts["judge_answer"]
        for name, cfg in sorted(self.config.candidates.items()):
            gens = self.client_for(f"candidate.{name}", cfg).chat(
                [[{"role": "user", "content": q}] for q in questions], respond.sampling, respond.cache_version)
            verdicts = self.client.run_task(judge, [
                {"question": q, "answer": g.text.strip(), "ability": a}
                for q, g, a in zip(questions, gens, abilities, strict=True)])
            for i, (g, v) in enumerate(zip(gens, verdicts, strict=True)):
                score = float(v.value["score"]) if v.failure is None else None
                answers[i].append({"model": name, "answer": g.text.strip(), "score": score,
                                   "rationale": (v.value or {}).get("rationale", "") if v.failure is None else "",
                                   "failure": v.failure})
                if score is not None:
                    counters[f"score_sum.{abilities[i]}.{name}"] += score
                    counters[f"score_n.{abilities[i]}.{name}"] += 1
                else:
                    counters[f"judge_failures.{name}"] += 1
        table = replace_column(table, "probe_ability", abilities, pa.string())
        table = replace_column(table, "diagnosis", pa.array(answers, ANSWER_TYPE))
        table = replace_column(table, "diagnosis_round", pa.array(np.full(table.num_rows, self.config.round,
                                                                           np.int32)))
        counters.update(self.drain_counters())
        return keep_all(table, dict(counters))


__all__ = ["DiagnoseConfig", "DiagnoseStep", "ability_scores", "thin_abilities"]
