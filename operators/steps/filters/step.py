"""`filter` step: the paper's rule filtering — length, language, broken or empty answers, refusals,
repetition, non-text, template residue, and source allow/deny lists — each with its own drop reason."""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from operators.core.step import BatchResult, Step, StepConfig, dropped_table
from operators.steps.filters.gates import flat_turns, may_fail
from operators.steps.filters.rules import (
    DEFAULT_PLACEHOLDERS,
    DEFAULT_REFUSALS,
    DEFAULT_TEMPLATE_RESIDUE,
    RuleSettings,
    Verdict,
    answer_repetition,
    check_non_text,
    judge,
    repetitive,
)


class FilterConfig(StepConfig):
    """Thresholds of the rule filters; every rule can be relaxed or switched off."""

    min_turns: int = Field(2, ge=1, description="Fewest non-system turns.")
    max_turns: int = Field(64, ge=1, description="Most non-system turns.")
    min_chars: int = Field(10, ge=0, description="Fewest characters over all turns.")
    max_chars: int = Field(64_000, ge=1, description="Most characters over all turns.")
    min_answer_chars: int = Field(1, ge=0, description="Fewest characters in any answer.")
    languages: list[str] = Field(default_factory=lambda: ["en", "zh"],
                                 description="Allowed `langdetect` values; empty allows all.")
    refusals: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS))
    template_residue: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATE_RESIDUE))
    placeholders: list[str] = Field(default_factory=lambda: list(DEFAULT_PLACEHOLDERS),
                                    description="Regexes of unfilled template slots in prompts.")
    repetition_ngram: int = Field(3, ge=1)
    max_repetition_ratio: float = Field(0.35, ge=0, le=1, description="Max share of repeated n-grams per answer.")
    max_non_text_ratio: float = Field(0.4, ge=0, le=1)
    sources_allow: list[str] = Field(default_factory=list, description="If set, only these sources pass.")
    sources_deny: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> FilterConfig:
        if self.min_turns > self.max_turns:
            raise ValueError("min_turns must be <= max_turns")
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must be <= max_chars")
        for p in self.placeholders:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"placeholders: invalid regex {p!r}: {e}") from None
        return self

    def settings(self) -> RuleSettings:
        return RuleSettings(
            min_turns=self.min_turns, max_turns=self.max_turns, min_chars=self.min_chars,
            max_chars=self.max_chars, min_answer_chars=self.min_answer_chars, languages=frozenset(self.languages),
            refusals=tuple(r.lower() for r in self.refusals),
            template_residue=tuple(t.lower() for t in self.template_residue),
            placeholders=tuple(re.compile(p, re.IGNORECASE) for p in self.placeholders),
            repetition_ngram=self.repetition_ngram, max_repetition_ratio=self.max_repetition_ratio,
            max_non_text_ratio=self.max_non_text_ratio, sources_allow=frozenset(self.sources_allow),
            sources_deny=frozenset(self.sources_deny),
        )


class FilterStep(Step[FilterConfig]):
    """Keep records that pass every rule; drop the rest with the first rule they fail."""

    name: ClassVar[str] = "filter"
    config_model: ClassVar[type[StepConfig]] = FilterConfig

    def __init__(self, config: FilterConfig) -> None:
        super().__init__(config)
        self._settings = config.settings()

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        return filter_batch(pa.Table.from_batches([batch]), self._settings)


def filter_batch(table: pa.Table, settings: RuleSettings) -> BatchResult:
    """Pure transform: split canonical records into kept and dropped-with-reason.

    Batch passes (`gates.may_fail`) clear most records of every rule but repetition; those get the repetition
    rule on their answers (and the non-text rule, where a text is not ASCII), every other record the whole
    `judge`. Either way the verdict is the rules' own."""
    n = len(table)
    flagged, non_ascii = may_fail(table, settings)
    starts, turn_row, speaker, value = flat_turns(table)
    verdicts: dict[int, Verdict] = {}
    # Flagged records: every rule, in order.
    rows = np.flatnonzero(flagged)
    if len(rows):
        picked = pa.array(rows)
        turn_idx = np.flatnonzero(flagged[turn_row])
        speakers, values = (a.take(pa.array(turn_idx)).to_pylist() for a in (speaker, value))
        at = [*np.searchsorted(turn_idx, starts[rows]).tolist(), len(turn_idx)]
        for j, (row, source, lang) in enumerate(zip(rows.tolist(), table.column("source").take(picked).to_pylist(),
                                                    table.column("langdetect").take(picked).to_pylist(), strict=True)):
            record = [{"from": speakers[k], "value": values[k]} for k in range(at[j], at[j + 1])]
            verdicts[row] = judge(record, source or "", lang, settings)
    # The others: repetition on their answers, then non-text where a text is not ASCII.
    answer_idx = np.flatnonzero(~flagged[turn_row] & np.asarray(pc.equal(speaker, "gpt").fill_null(False)))
    answers = value.take(pa.array(answer_idx)).to_pylist()
    for pos in repetitive(answers, settings):
        k = int(answer_idx[pos])
        row = int(turn_row[k])
        if row not in verdicts:
            verdicts[row] = answer_repetition(k - int(starts[row]), answers[pos], settings)
    for row in np.flatnonzero(non_ascii & ~flagged).tolist():
        if row not in verdicts:
            texts = value.slice(int(starts[row]), int(starts[row + 1] - starts[row])).to_pylist()
            verdicts[row] = check_non_text([{"value": t} for t in texts], settings)
    dropped_rows = sorted(row for row, v in verdicts.items() if v is not None)
    keep = np.ones(n, dtype=bool)
    keep[dropped_rows] = False
    failed = [v for row in dropped_rows if (v := verdicts[row]) is not None]
    mask = pa.array(keep, pa.bool_())
    return BatchResult(kept=table.filter(mask),
                       dropped=dropped_table(table.filter(pc.invert(mask)), [v[0] for v in failed],
                                             [v[1] for v in failed]))
