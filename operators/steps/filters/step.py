"""`filter` step: the paper's rule filtering — length, language, broken or empty answers, refusals,
repetition, non-text, template residue, and source allow/deny lists — each with its own drop reason."""

from __future__ import annotations

import re
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from operators.core.step import BatchResult, Step, StepConfig, dropped_table
from operators.steps.filters.rules import (
    DEFAULT_PLACEHOLDERS,
    DEFAULT_REFUSALS,
    DEFAULT_TEMPLATE_RESIDUE,
    RuleSettings,
    judge,
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
    """Pure transform: split canonical records into kept and dropped-with-reason."""
    convs = table.column("conversations").to_pylist()
    sources = table.column("source").to_pylist()
    langs = table.column("langdetect").to_pylist()
    keep: list[bool] = []
    reasons: list[str] = []
    details: list[str] = []
    for turns, source, lang in zip(convs, sources, langs, strict=True):
        verdict = judge(turns, source or "", lang, settings)
        keep.append(verdict is None)
        if verdict is not None:
            reasons.append(verdict[0])
            details.append(verdict[1])
    mask = pa.array(keep, pa.bool_())
    return BatchResult(kept=table.filter(mask),
                       dropped=dropped_table(table.filter(pc.invert(mask)), reasons, details))
