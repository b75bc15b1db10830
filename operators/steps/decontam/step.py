"""`decontaminate` step: no benchmark prompt may leak into training data.

A record is dropped (reason `contamination`) when any of its human turns (and, optionally, answers)
equals a benchmark prompt after normalization (`exact`), shares a word n-gram with one (`ngram`,
default 13 words, as in GPT-3's and the Infinity-Instruct paper's decontamination) or contains a whole
short one (`containment`, with guards against generic prompts; see `index.py`). The detail is a JSON
object: benchmark, item, match kind, the matched text of the record, the benchmark prompt and the turn,
so a report can show the prompt beside the dropped turn.
"""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.benchmarks.loaders import FORMATS, load_prompts
from operators.core.step import Artifacts, BatchResult, Step, StepConfig, dropped_table
from operators.steps.decontam.index import ContaminationIndex, Match
from operators.text.normalize import match_token_spans, match_tokens
from operators.text.turns import turns_by_role

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
    short_prompts: bool = Field(
        True, description="Catch prompts shorter than `ngram` words contained in a turn (not only equal to it).")
    min_tokens: int = Field(3, ge=1, le=12, description="Words a short prompt needs to be found inside a turn; "
                            "shorter ones match only a whole turn.")
    min_informative: int = Field(
        3, ge=1, le=12, description="Informative words (not stopwords or boilerplate) a short prompt needs to "
        "match anywhere in a turn.")
    min_coverage: float = Field(
        0.5, gt=0.0, le=1.0, description="A short prompt with fewer informative words matches only if they are "
        "at least this share of the turn's informative words.")


class DecontamStep(Step[DecontamConfig]):
    """Drop records overlapping any benchmark prompt."""

    name: ClassVar[str] = "decontaminate"
    version: ClassVar[int] = 2  # v2: Unicode-folded tokens, short-prompt containment, JSON details
    config_model: ClassVar[type[StepConfig]] = DecontamConfig

    def __init__(self, config: DecontamConfig) -> None:
        super().__init__(config)
        self._index: ContaminationIndex | None = None

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        if self._index is None:  # benchmarks are small: every shard builds the index once
            cfg = self.config
            index = ContaminationIndex(n=cfg.ngram, short_prompts=cfg.short_prompts, min_tokens=cfg.min_tokens,
                                       min_informative=cfg.min_informative, min_coverage=cfg.min_coverage)
            for b in self.config.benchmarks:
                index.add(b.name, load_prompts(b.uri, b.format))
            index.prepare()
            self._index = index

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        if self._index is None:
            raise RuntimeError("decontaminate: bind() must run before transform()")
        return decontaminate(pa.Table.from_batches([batch]), self._index, self.config.check_answers)


def decontaminate(table: pa.Table, index: ContaminationIndex, check_answers: bool) -> BatchResult:
    """Pure transform: drop records whose turns match the benchmark index (first matching turn wins)."""
    roles = ("human", "gpt") if check_answers else ("human",)
    # The checked turns straight from the Arrow columns: only their texts become Python strings (not the
    # answers a prompt-only check never reads).
    record, turn, values = turns_by_role(table.column("conversations"), roles)  # of each checked text
    texts: list[str] = values.to_pylist()
    hits: dict[int, tuple[int, Match]] = {}
    counters: dict[str, float] = {}
    for k, m in enumerate(index.match_many(texts)):
        r = int(record[k])
        if m is not None and r not in hits:
            hits[r] = (k, m)
    details = []
    for r in sorted(hits):
        k, m = hits[r]
        details.append(drop_detail(index, m, texts[k], int(turn[k])))
        counters[f"match.{m.kind}"] = counters.get(f"match.{m.kind}", 0.0) + 1
    hit = np.zeros(table.num_rows, dtype=bool)
    hit[list(hits)] = True
    mask = pa.array(~hit)
    return BatchResult(kept=table.filter(mask), counters=counters,
                       dropped=dropped_table(table.filter(pc.invert(mask)), [REASON] * len(details), details))


def drop_detail(index: ContaminationIndex, m: Match, text: str, turn: int) -> str:
    """The JSON detail of a contamination drop: benchmark, item, kind, matched text, prompt, turn."""
    return json.dumps({"benchmark": m.benchmark, "item": m.item, "match": m.kind,
                       "matched_text": matched_text(text, m.start, m.length)[:300],
                       "benchmark_prompt": index.prompts[index.names.index(m.benchmark)][m.item][:500],
                       "turn": turn}, ensure_ascii=False)


def matched_text(text: str, start: int, length: int) -> str:
    """The part of `text` whose tokens `start`..`start + length` matched, as written in the record."""
    spans = match_token_spans(text)
    if [s[0] for s in spans] != match_tokens(text):  # the two foldings disagree: show the tokens instead
        return " ".join(match_tokens(text)[start:start + length])
    return text[spans[start][1]:spans[start + length - 1][2]]
