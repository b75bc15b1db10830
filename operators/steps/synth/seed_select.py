"""`seed_select` step: choose the seeds that evolution grows into conversational data (paper, Phase 2).

Rules, in order; each rejected record says which rule rejected it:
  1. `already_seeded`   its id was a seed of an earlier round (`exclude_dirs`);
  2. `not_weak_ability` in a supplementation round (`diagnosis_dir` set), only records carrying an
                        ability the diagnosis scored below `weak_threshold` are eligible;
  3. `unscored` / `ifd_out_of_range`  difficulty: IFD must lie in [min_ifd, max_ifd] (IFD >= 1: the
                        instruction does not help predict the answer);
  4. `not_long_tail`    long tail: a record's band is set by the frequency of its rarest second-level tag;
                        each band keeps a fraction (rare tags kept whole, frequent ones sampled by hash);
  5. `over_budget`      the remaining records are ranked (more first-level abilities first, then higher
                        IFD, then higher answer loss) and the top `budget` kept, exactly across shards.
Kept records carry `seed_reason` (band, abilities, IFD, rank) and `seed_round`.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from operators.core import storage
from operators.core.arrays import replace_column
from operators.core.step import (
    Artifacts,
    BatchResult,
    Stage,
    StageOutput,
    Step,
    StepConfig,
    dropped_table,
    partition_by_shard,
)
from operators.steps.select.step import hash_unit


class Band(BaseModel):
    """Records whose rarest tag occurs at most `max_count` times (None: any) keep this fraction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_count: int | None = Field(None, ge=1)
    keep: float = Field(ge=0, le=1)


class SeedSelectConfig(StepConfig):
    """Budget, long-tail bands, difficulty range, and supplementation inputs."""

    budget: int = Field(1000, ge=0, description="Seeds chosen (exact, across shards).")
    bands: list[Band] = Field(default_factory=lambda: [Band(max_count=5, keep=1.0), Band(max_count=50, keep=0.5),
                                                       Band(max_count=None, keep=0.2)])
    min_ifd: float | None = Field(None, ge=0)
    max_ifd: float | None = Field(1.0, gt=0, description="IFD at or above this: the instruction adds nothing.")
    require_scores: bool = Field(False, description="Reject records without difficulty scores.")
    prefer_multi_ability: bool = True
    round: int = Field(1, ge=1)
    exclude_dirs: list[str] = Field(default_factory=list, description="Earlier seed_select outputs: no reseeding.")
    diagnosis_dir: str | None = Field(None, description="A diagnose step's output: select for its weak abilities.")
    weak_threshold: float = Field(6.0, ge=1, le=10, description="Mean judge score below which an ability is weak.")
    seed: int = 0


def band_of(count: int | None, bands: list[Band]) -> int:
    """Index of the first band that admits `count` (None: unlabeled, falls in the last band)."""
    for i, b in enumerate(bands):
        if b.max_count is None or (count is not None and count <= b.max_count):
            return i
    return len(bands) - 1


class SeedSelectStep(Step[SeedSelectConfig]):
    """Exact, explained seed selection."""

    name: ClassVar[str] = "seed_select"
    config_model: ClassVar[type[StepConfig]] = SeedSelectConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("candidates", "map"), Stage("choose", "reduce"))

    def __init__(self, config: SeedSelectConfig) -> None:
        super().__init__(config)
        self._row = 0
        self._decision: dict[int, tuple[str, str]] = {}

    def begin_shard(self, shard: int) -> None:
        self._row = 0

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> pa.Table:
        t = pa.Table.from_batches([batch])
        n = t.num_rows

        def col(name: str, type_: pa.DataType) -> pa.Array | pa.ChunkedArray:
            return t[name] if name in t.column_names else pa.nulls(n, type_)

        abilities = [json.dumps((lab or {}).get("cate_ability_en") or []) for lab in t["label"].to_pylist()]
        cand = pa.table({
            "shard": pa.array(np.full(n, shard, np.int32)), "row": pa.array(np.arange(self._row, self._row + n)),
            "id": t["id"], "tag_min_count": col("tag_min_count", pa.int64()),
            "n_abilities": pa.array([len(json.loads(a)) for a in abilities], pa.int32()),
            "abilities": pa.array(abilities, pa.string()),
            "ifd": col("ifd", pa.float64()), "answer_loss": col("answer_loss", pa.float64()),
        })
        self._row += n
        return cand

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        parts = list(artifacts.iter_tables("candidates"))
        c = pa.concat_tables(parts).combine_chunks() if parts else None
        if c is None or c.num_rows == 0:
            return StageOutput(summary={"selected": 0})
        cfg = self.config
        n = c.num_rows
        ids = c["id"].to_pylist()
        reason = np.full(n, "", dtype=object)
        excluded = _seeded_ids(cfg.exclude_dirs)
        reason[[i for i, x in enumerate(ids) if x in excluded]] = "already_seeded"
        weak = weak_abilities_from(cfg.diagnosis_dir, cfg.weak_threshold) if cfg.diagnosis_dir else None
        abilities = [set(json.loads(a)) for a in c["abilities"].to_pylist()]
        if weak is not None:
            for i in range(n):
                if not reason[i] and not abilities[i] & weak:
                    reason[i] = "not_weak_ability"
        ifd = c["ifd"].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan
        loss = c["answer_loss"].to_numpy(zero_copy_only=False).astype(np.float64)
        for i in range(n):
            if reason[i]:
                continue
            if math.isnan(ifd[i]):
                if cfg.require_scores:
                    reason[i] = "unscored"
            elif (cfg.max_ifd is not None and ifd[i] >= cfg.max_ifd) or (cfg.min_ifd is not None
                                                                          and ifd[i] < cfg.min_ifd):
                reason[i] = "ifd_out_of_range"
        counts = c["tag_min_count"].to_pylist()
        band = np.array([band_of(x, cfg.bands) for x in counts])
        u = hash_unit(ids, cfg.seed, "band")
        keep_frac = np.array([cfg.bands[b].keep for b in band])
        reason[(reason == "") & (u >= keep_frac)] = "not_long_tail"
        eligible = np.flatnonzero(reason == "")
        multi = c["n_abilities"].to_numpy().astype(np.float64) if cfg.prefer_multi_ability else np.zeros(n)
        order = np.lexsort((hash_unit(ids, cfg.seed, "rank"), -np.nan_to_num(loss, nan=-1.0),
                            -np.nan_to_num(ifd, nan=-1.0), -multi))  # last key sorts first
        ranked = [i for i in order if reason[i] == ""]
        chosen = set(ranked[: cfg.budget])
        detail = np.full(n, "", dtype=object)
        for rank, i in enumerate(ranked):
            if i not in chosen:
                reason[i] = "over_budget"
                detail[i] = f"rank {rank + 1} of {len(ranked)} eligible, budget {cfg.budget}"
            else:
                detail[i] = (f"round {cfg.round}; band {band[i]} (rarest tag count {counts[i]}, keep "
                             f"{cfg.bands[band[i]].keep:g}); {int(c['n_abilities'][i].as_py())} abilities; "
                             f"ifd {'n/a' if math.isnan(ifd[i]) else f'{ifd[i]:.3f}'}; rank {rank + 1}")
        for i in range(n):
            if reason[i] and not detail[i]:
                detail[i] = _explain(str(reason[i]), cfg, band[i], counts[i], ifd[i], weak)
        decision = pa.table({"shard": c["shard"], "row": c["row"], "reason": pa.array(reason.tolist(), pa.string()),
                             "detail": pa.array(detail.tolist(), pa.string())})
        by_reason = {str(k): int(v) for k, v in zip(*np.unique(reason[reason != ""], return_counts=True),
                                                    strict=True)}
        return StageOutput(partitions=partition_by_shard(decision), summary={
            "selected": len(chosen), "eligible": len(eligible), "rejected": by_reason,
            "weak_abilities": sorted(weak) if weak is not None else None})

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        t = artifacts.partition("choose", shard)
        self._decision = {} if t is None else dict(zip(
            t["row"].to_pylist(), zip(t["reason"].to_pylist(), t["detail"].to_pylist(), strict=True), strict=True))

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        decisions = [self._decision.get(self._row + i, ("over_budget", "not in the candidate list"))
                     for i in range(table.num_rows)]
        self._row += table.num_rows
        keep = pa.array([r == "" for r, _ in decisions])
        kept = table.filter(keep)
        kept = replace_column(kept, "seed_reason", [d for r, d in decisions if r == ""], pa.string())
        kept = replace_column(kept, "seed_round", pa.array(np.full(kept.num_rows, self.config.round, np.int32)))
        rejected = [(r, d) for r, d in decisions if r != ""]
        dropped = dropped_table(table.filter(pc.invert(keep)), [r for r, _ in rejected], [d for _, d in rejected])
        return BatchResult(kept=kept, dropped=dropped)


def _explain(reason: str, cfg: SeedSelectConfig, band: int, count: int | None, ifd: float,
             weak: set[str] | None) -> str:
    if reason == "not_long_tail":
        return f"band {band} (rarest tag count {count}) keeps {cfg.bands[band].keep:g}; sampled out"
    if reason == "ifd_out_of_range":
        return f"ifd {ifd:.3f} outside [{cfg.min_ifd}, {cfg.max_ifd})"
    if reason == "not_weak_ability":
        return f"no ability among the weak ones {sorted(weak or [])}"
    if reason == "already_seeded":
        return "chosen as a seed in an earlier round"
    return "no difficulty scores"


def _seeded_ids(dirs: list[str]) -> set[str]:
    from operators.core.runner import read_step_table

    out: set[str] = set()
    for d in dirs:
        t = read_step_table(storage.validate_uri(d))
        if t.num_rows:
            out.update(t["id"].to_pylist())
    return out


def weak_abilities_from(diagnosis_dir: str, threshold: float) -> set[str]:
    """Abilities whose best candidate's mean judge score is below `threshold`, from a diagnose step's stats."""
    from operators.steps.synth.diagnose import ability_scores

    stats = json.loads(storage.read_bytes(storage.join(storage.validate_uri(diagnosis_dir), "stats.json")))
    scores = ability_scores(stats.get("counters", {}))
    return {ability for ability, per_model in scores.items() if max(per_model.values()) < threshold}


__all__ = ["Band", "SeedSelectConfig", "SeedSelectStep", "band_of", "weak_abilities_from"]

