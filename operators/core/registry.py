"""Step names -> step classes, imported lazily so the CLI and DAG parsing stay fast."""

from __future__ import annotations

import importlib
from typing import Any

from operators.core.step import Step, StepConfig

# name -> "module:Class". New steps register here and nowhere else.
STEPS: dict[str, str] = {
    "ingest": "operators.steps.ingest.step:IngestStep",
    "filter": "operators.steps.filters.step:FilterStep",
    "pii": "operators.steps.pii.step:PiiStep",
    "exact_dedup": "operators.steps.dedup.exact:ExactDedupStep",
    "near_dedup": "operators.steps.dedup.near:NearDedupStep",
    "semantic_dedup": "operators.steps.dedup.semantic:SemanticDedupStep",
    "decontaminate": "operators.steps.decontam.step:DecontamStep",
    "decontaminate_paraphrase": "operators.steps.decontam.paraphrase:ParaphraseDecontamStep",
    "route": "operators.steps.route.step:RouteStep",
    "dsir": "operators.steps.dsir.step:DSIRStep",
    "select": "operators.steps.select.step:SelectStep",
    "label": "operators.steps.synth.label:LabelStep",
    "label_vocab": "operators.steps.synth.label_vocab:LabelVocabStep",
    "seed_score": "operators.steps.synth.seed_score:SeedScoreStep",
    "seed_select": "operators.steps.synth.seed_select:SeedSelectStep",
    "evolve": "operators.steps.synth.evolve:EvolveStep",
    "respond": "operators.steps.synth.respond:RespondStep",
    "diagnose": "operators.steps.synth.diagnose:DiagnoseStep",
    "conversational_set": "operators.steps.synth.finalize:ConversationalSetStep",
    "train_prep": "operators.train.data_prep:TrainPrepStep",
}

# Phase 1 in the paper's order, with `pii` right after the rule filters (so that dedup compares redacted text
# and no later step or report sees a raw value); `foundational_selection`, `nightly_refresh` and
# `backfill_source` all run exactly this chain.
FOUNDATIONAL_STEPS = ("filter", "pii", "exact_dedup", "near_dedup", "decontaminate", "route", "dsir", "select")


class UnknownStepError(KeyError):
    """No step is registered under this name."""


def step_class(name: str) -> type[Step[Any]]:
    """The Step class registered as `name`."""
    try:
        target = STEPS[name]
    except KeyError:
        raise UnknownStepError(f"unknown step {name!r}; known steps: {sorted(STEPS)}") from None
    module, _, attr = target.partition(":")
    cls: type[Step[Any]] = getattr(importlib.import_module(module), attr)
    return cls


def config_model(name: str) -> type[StepConfig]:
    """The pydantic config model of step `name` (used by DAG Params forms and validation)."""
    return step_class(name).config_model
