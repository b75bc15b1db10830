"""`decontaminate` step: no benchmark prompt may leak into training data.

A record is dropped (reason `contamination`) when any of its human turns (and, optionally, answers)
shares a word n-gram (default 13, as in GPT-3's and the Infinity-Instruct paper's decontamination)
with a benchmark prompt, or equals one after normalization. The detail names the benchmark, the item
and the matching n-gram.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.benchmarks.loaders import FORMATS, load_prompts
from operators.core.step import Artifacts, BatchResult, Step, StepConfig, dropped_table
from operators.steps.decontam.index import ContaminationIndex

REASON = "contamination"


class BenchmarkSource(BaseModel):
    """One evaluation set: a name for reports, where its file is, and its format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    uri: str = Field(..., min_length=1, description="file://, s3:// or humaneval:// (the packaged HumanEval)")
    format: str

    @field_validator("format")
    @classmethod
    def _known(cls, fmt: str) -> str:
        if fmt not in FORMATS and not (fmt.startswith("jsonl:") and len(fmt) > 6):
            raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS} or jsonl:<field>")
        return fmt


class DecontamConfig(StepConfig):
    """Benchmarks to protect and how strictly."""

    benchmarks: list[BenchmarkSource] = Field(
        default_factory=lambda: [BenchmarkSource(name="humaneval", uri="humaneval://", format="humaneval")],
        min_length=1,
    )
    ngram: int = Field(13, ge=3, le=50, description="Word n-gram length that counts as overlap.")
    check_answers: bool = Field(False, description="Also check assistant turns (catches leaked solutions).")


class DecontamStep(Step[DecontamConfig]):
    """Drop records overlapping any benchmark prompt."""

    name: ClassVar[str] = "decontaminate"
    config_model: ClassVar[type[StepConfig]] = DecontamConfig

    def __init__(self, config: DecontamConfig) -> None:
        super().__init__(config)
        self._index: ContaminationIndex | None = None

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        if self._index is None:  # benchmarks are small: every shard builds the index once
            index = ContaminationIndex(n=self.config.ngram)
            for b in self.config.benchmarks:
                index.add(b.name, load_prompts(b.uri, b.format))
            self._index = index

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        if self._index is None:
            raise RuntimeError("decontaminate: bind() must run before transform()")
        return decontaminate(pa.Table.from_batches([batch]), self._index, self.config.check_answers)


def decontaminate(table: pa.Table, index: ContaminationIndex, check_answers: bool) -> BatchResult:
    """Pure transform: drop records whose turns overlap the benchmark index."""
    roles = ("human", "gpt") if check_answers else ("human",)
    keep: list[bool] = []
    details: list[str] = []
    for conv in table.column("conversations").to_pylist():
        hit = next((h for t in conv if t["from"] in roles and (h := index.match(t["value"])) is not None), None)
        keep.append(hit is None)
        if hit is not None:
            details.append(f"{hit[0]} item {hit[1]}: {hit[2][:200]!r}")
    mask = pa.array(keep, pa.bool_())
    return BatchResult(kept=table.filter(mask),
                       dropped=dropped_table(table.filter(pc.invert(mask)), [REASON] * len(details), details))
