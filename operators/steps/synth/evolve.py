"""`evolve` step: WizardLM-style instruction evolution over several rounds (paper, Phase 2).

Each seed is evolved `rounds` times. In round r a strategy is drawn per record (deterministically, from
its id and r): four in depth (add_constraints, deepening, concretizing, increase_reasoning) and breadth
(a new instruction in the same domain); the texts live in the versioned `evolve_instruction` prompt.
Every round yields one candidate per seed, so the ledger reads seeds x rounds = kept + dropped. A
candidate is eliminated, with its reason, when it is:
  `no_information_gain`  (nearly) the same as its parent (normalized equality or word-set Jaccard);
  `refusal`              a refusal or apology instead of an instruction;
  `too_short`            fewer than `min_words` words;
  `only_punctuation_or_stopwords`;
  `template_copy`        it copies the prompt's own words ("rewritten instruction", "given prompt", ...);
  `llm_error`            the model failed for good.
An accepted candidate becomes the parent of the next round; a rejected one leaves the parent in place.
Every output record carries `lineage` {root_id, parent_id, strategy, round}.

With a `validator` (the DAG's `stronger_judge` Param), the candidates that pass elimination and whose strategy is
one the validator covers (listed, or failed by an earlier run's drift review, operators/review/) are judged by the
validator's own model (role `validator`: its own cache and usage counters); one it calls unfaithful is dropped as
`drifted`. A failed judge call keeps the candidate (counted as `validator.failed`): the validator adds a check,
an outage of it must not empty a round.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pyarrow as pa
import xxhash
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.core.step import BatchResult, StepConfig, dropped_table
from operators.llm.base import LLMConfig
from operators.llm.prompts import coerce_bool_field
from operators.schema import CANONICAL_SCHEMA, first_exchange
from operators.steps.filters.rules import DEFAULT_REFUSALS
from operators.steps.synth.base import LLMStep, LLMStepConfig
from operators.text.normalize import normalize_text

DEPTH = ("add_constraints", "deepening", "concretizing", "increase_reasoning")
BREADTH = ("breadth",)
TEMPLATE_WORDS = ("rewritten instruction", "original instruction", "given prompt", "rewritten prompt",
                  "#rewritten", "#given", "new instruction:", "the instruction above")
STOPWORDS = frozenset(("a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "but", "is", "are", "be", "it",
                       "this", "that", "with", "as", "at", "by", "from", "what", "how", "why", "who", "which",
                       "please", "can", "you", "i", "me", "my", "your", "we"))
REFUSAL_HEADS = (*DEFAULT_REFUSALS, "i'm sorry", "i am sorry", "sorry,", "i apologize", "as an ai")

LINEAGE_TYPE = pa.struct([("root_id", pa.string()), ("parent_id", pa.string()), ("strategy", pa.string()),
                          ("round", pa.int32())])


def known_strategies(v: list[str]) -> list[str]:
    """`v`, when every name is an evolution strategy; else a ValueError naming the unknown ones."""
    unknown = sorted(set(v) - set(DEPTH) - set(BREADTH))
    if unknown:
        raise ValueError(f"unknown evolution strategies {unknown}; known: {[*DEPTH, *BREADTH]}")
    return v


class ValidatorConfig(BaseModel):
    """A stronger judge for the evolutions of some strategies (see the module doc)."""

    model_config = ConfigDict(extra="forbid")

    llm: LLMConfig = Field(default_factory=LLMConfig)
    strategies: list[str] = Field(default_factory=list, description="Strategies whose evolutions it judges.")
    review_run: str | None = Field(None, description="A run folder whose drift review's failing strategies it "
                                   "judges too.")
    gate: float | None = Field(None, ge=0, le=1, description="That review's gate (None: the one it recorded).")

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        return known_strategies(v)


class EvolveConfig(LLMStepConfig):
    """Rounds, strategies and elimination thresholds."""

    rounds: int = Field(2, ge=1, le=10)
    strategies: list[str] = Field(default_factory=lambda: [*DEPTH, *BREADTH], min_length=1)
    min_words: int = Field(4, ge=1)
    max_jaccard_with_parent: float = Field(0.9, gt=0, le=1,
                                           description="Word-set Jaccard with the parent at or above this: no gain.")
    seed: int = 0
    validator: ValidatorConfig | None = None

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        return known_strategies(v)


def strategy_for(record_id: str, round_: int, strategies: list[str], seed: int) -> str:
    """The strategy of `record_id` in round `round_` (stable across re-runs)."""
    return strategies[xxhash.xxh3_64_intdigest(f"{seed}:{round_}:{record_id}".encode()) % len(strategies)]


def clean_instruction(text: str) -> str:
    """The model's answer as an instruction: quotes, labels and surrounding whitespace removed."""
    t = text.strip().strip('"').strip()
    t = re.sub(r"^(new|rewritten|evolved)\s+(instruction|prompt)\s*[:\-]\s*", "", t, flags=re.IGNORECASE)
    return t.strip().strip('"').strip()


def eliminate(parent: str, child: str, min_words: int, max_jaccard: float) -> tuple[str, str] | None:
    """(reason, detail) when `child` is a failed evolution of `parent`, else None. Pure."""
    words = normalize_text(child).split()
    if not words or all(w in STOPWORDS for w in words):
        return "only_punctuation_or_stopwords", f"{len(words)} word(s), none meaningful"
    low = child.lower()
    for phrase in REFUSAL_HEADS:
        if low.startswith(phrase) or (phrase in DEFAULT_REFUSALS and phrase in low[:200]):
            return "refusal", f"contains {phrase!r}"
    for phrase in TEMPLATE_WORDS:
        if phrase in low:
            return "template_copy", f"copies prompt words {phrase!r}"
    if len(words) < min_words:
        return "too_short", f"{len(words)} word(s) < {min_words}"
    p, c = set(normalize_text(parent).split()), set(words)
    jac = len(p & c) / max(len(p | c), 1)
    if normalize_text(parent) == normalize_text(child) or jac >= max_jaccard:
        return "no_information_gain", f"word Jaccard with parent {jac:.2f}"
    return None


class EvolveStep(LLMStep[EvolveConfig]):
    """seeds -> seeds x rounds candidate instructions (kept when they pass elimination)."""

    name: ClassVar[str] = "evolve"
    config_model: ClassVar[type[StepConfig]] = EvolveConfig
    prompt_names: ClassVar[tuple[str, ...]] = ("evolve_instruction", "drift_judge")

    def __init__(self, config: EvolveConfig) -> None:
        super().__init__(config)
        task = self.prompts["evolve_instruction"]
        missing = sorted(set(config.strategies) - set(task.variants))
        if missing:
            raise ValueError(f"prompt {task.name!r} has no text for strategies {missing}")
        self.task = task
        self.validated = validated_strategies(config.validator)

    def _validate(self, asked: list[tuple[int, str, str, str]], verdicts: list[tuple[str, str] | None],
                  counters: dict[str, float]) -> None:
        """Judge `asked` (index into verdicts, strategy, parent, child) with the validator; set `drifted` verdicts."""
        if not asked or self.config.validator is None:
            return
        judge = self.client_for("validator", self.config.validator.llm)
        rows = [{"goal": self.task.variants[st], "parent": parent[:4000], "child": child[:4000]}
                for _, st, parent, child in asked]
        for (i, st, _, _), res in zip(asked, judge.run_task(self.prompts["drift_judge"], rows, normalize=_faithful),
                                      strict=True):
            counters[f"validator.judged.{st}"] = counters.get(f"validator.judged.{st}", 0.0) + 1
            if res.failure is not None or not isinstance(res.value, dict):
                counters["validator.failed"] = counters.get("validator.failed", 0.0) + 1
            elif res.value.get("faithful") is False:
                counters[f"validator.drifted.{st}"] = counters.get(f"validator.drifted.{st}", 0.0) + 1
                verdicts[i] = ("drifted", f"validator {self.config.validator.llm.model} ({st}): not faithful")

    def outputs_per_input(self) -> int:
        return self.config.rounds

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        seeds = pa.Table.from_batches([batch]).to_pylist()
        current = {s["id"]: (s["id"], first_exchange(s["conversations"])[0]) for s in seeds}
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        reasons: list[str] = []
        details: list[str] = []
        judged: dict[str, float] = {}
        for r in range(1, self.config.rounds + 1):
            strategies = [strategy_for(s["id"], r, self.config.strategies, self.config.seed) for s in seeds]
            rows = [{"instruction": current[s["id"]][1], "variant": self.task.variants[st]}
                    for s, st in zip(seeds, strategies, strict=True)]
            results = self.client.run_task(self.task, rows)
            children = [clean_instruction(str(res.value or "")) for res in results]
            cfg = self.config
            verdicts = [("llm_error", res.failure) if res.failure else
                        eliminate(current[s["id"]][1], child, cfg.min_words, cfg.max_jaccard_with_parent)
                        for s, res, child in zip(seeds, results, children, strict=True)]
            self._validate([(i, st, current[s["id"]][1], children[i])
                            for i, (s, st) in enumerate(zip(seeds, strategies, strict=True))
                            if verdicts[i] is None and st in self.validated], verdicts, judged)
            for s, st, child, verdict in zip(seeds, strategies, children, verdicts, strict=True):
                parent_id, _ = current[s["id"]]
                record = self._candidate(s, parent_id, st, r, child)
                if verdict is None:
                    kept.append(record)
                    current[s["id"]] = (record["id"], child)
                else:
                    dropped.append(record)
                    reasons.append(verdict[0])
                    details.append(verdict[1])
        schema = CANONICAL_SCHEMA.append(pa.field("lineage", LINEAGE_TYPE))
        counters = {**self.drain_counters(), **judged}
        return BatchResult(kept=pa.Table.from_pylist(kept, schema),
                           dropped=dropped_table(pa.Table.from_pylist(dropped, schema), reasons, details),
                           counters=counters)

    @staticmethod
    def _candidate(seed: dict[str, Any], parent_id: str, strategy: str, round_: int, text: str) -> dict[str, Any]:
        root = (seed.get("lineage") or {}).get("root_id") or seed["id"]
        return {
            "id": xxhash.xxh3_128_hexdigest(f"{parent_id}|{round_}|{strategy}|{text}".encode()),
            "conversations": [{"from": "human", "value": text}],
            "label": seed.get("label"), "langdetect": seed.get("langdetect"), "source": "evolved",
            "reward": None, "origin": seed.get("origin"),
            "lineage": {"root_id": root, "parent_id": parent_id, "strategy": strategy, "round": round_},
        }


def validated_strategies(validator: ValidatorConfig | None) -> frozenset[str]:
    """The strategies whose evolutions the validator judges: those listed, and those an earlier run's drift
    review failed (read when the step starts)."""
    if validator is None:
        return frozenset()
    out = set(validator.strategies)
    if validator.review_run:
        from operators.review.stats import failing_strategies

        out |= set(failing_strategies(validator.review_run, validator.gate))
    return frozenset(out)


def _faithful(value: Any) -> Any:
    return coerce_bool_field(value, "faithful")


__all__ = ["EvolveConfig", "EvolveStep", "ValidatorConfig", "clean_instruction", "eliminate", "strategy_for",
           "validated_strategies"]
