"""`seed_score` step: difficulty of every candidate seed under a reference model (a scorer, drops nothing).

Columns, per record, from its first exchange (instruction x, answer y):
  `answer_loss`       mean token loss of y given x (masked prompt): high = hard for the reference model;
  `answer_alone_loss` mean token loss of y with no instruction;
  `ifd`               instruction-following difficulty, answer_loss / answer_alone_loss (Li et al. 2024).
                      Near or above 1 the instruction does not help predict the answer (noise, or a
                      mismatched pair); low values are easy pairs.
Scores are columns so budgets can change without rescoring; `seed_select` decides. A record with no
answer gets null scores and `score_note` saying why.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from operators.core.arrays import replace_column
from operators.core.step import BatchResult, StepConfig, keep_all
from operators.schema import first_exchange
from operators.steps.synth.base import LLMStep, LLMStepConfig


class SeedScoreConfig(LLMStepConfig):
    """The reference model is `llm`; long pairs are cut to keep scoring cost bounded."""

    max_chars: int = Field(4000, ge=100, description="Instruction and answer are each cut to this many chars.")


class SeedScoreStep(LLMStep[SeedScoreConfig]):
    """Add `answer_loss`, `answer_alone_loss`, `ifd` (and `score_note` when a record can't be scored)."""

    name: ClassVar[str] = "seed_score"
    config_model: ClassVar[type[StepConfig]] = SeedScoreConfig

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        cut = self.config.max_chars
        pairs = [first_exchange(c) for c in table["conversations"].to_pylist()]
        idx = [i for i, (x, y) in enumerate(pairs) if x.strip() and y.strip()]
        prompts = [[{"role": "user", "content": pairs[i][0][:cut]}] for i in idx]
        answers = [pairs[i][1][:cut] for i in idx]
        with_prompt = self.client.score_loss(prompts, answers)
        alone = self.client.score_loss([[] for _ in idx], answers)
        loss: list[float | None] = [None] * table.num_rows
        loss_alone: list[float | None] = [None] * table.num_rows
        ifd: list[float | None] = [None] * table.num_rows
        note: list[str | None] = ["no answer to score"] * table.num_rows
        for i, a, b in zip(idx, with_prompt, alone, strict=True):
            ok = math.isfinite(a.loss) and math.isfinite(b.loss) and b.loss > 0
            loss[i], loss_alone[i] = (a.loss, b.loss) if ok else (None, None)
            ifd[i] = a.loss / b.loss if ok else None
            note[i] = None if ok else "answer too short to score"
        for name, values, type_ in (("answer_loss", loss, pa.float64()), ("ifd", ifd, pa.float64()),
                                    ("answer_alone_loss", loss_alone, pa.float64()), ("score_note", note, pa.string())):
            table = replace_column(table, name, values, type_)
        counters = self.drain_counters()
        counters["scored"] = float(sum(v is not None for v in ifd))
        return keep_all(table, counters)
