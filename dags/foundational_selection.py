"""foundational_selection: Phase 1 of Infinity Instruct, from ingested sources to the foundational set.

filter -> pii (redact personal data and secrets) -> exact_dedup -> near_dedup (MinHash LSH)
-> semantic_dedup (same meaning, other words; off unless the `semantic_dedup` Param is on) -> decontaminate
-> decontaminate_paraphrase (rephrased benchmark prompts; off unless `paraphrase_decontam` is on) -> route
-> dsir (importance weights toward each domain's target)
-> select (budgets, caps, replay, KL reduction) -> export -> publish -> report
-> select_random after select, beside the export, before publish (off unless `selection_ablation` is on): as
   many records per domain as select chose, from the same pool, at random (`ablation_seed`);
   `<run>/select_random`, for the fine-tune's ablation
export validates and writes the formats in shard tasks, then commits (operators/tail.py); publish makes the next
version of the `foundational` dataset from it and emits an event on its asset.
A step is a task group (plan, stages, shards mapped); each plan commits the step before it, the export's plan
commits select. pii has no group: filter's shard tasks run it on their shards and exact_dedup's plan commits it
(docs/architecture.md#fused-shard-tasks). Every task is resumable on its own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import dag

from operators.orchestration.dag_builder import (
    FOUNDATIONAL_STEPS,
    chain_into_export,
    publish_tasks,
    step_chain,
    step_group,
)
from operators.orchestration.params import (
    ENCODER_PROFILE,
    PARAPHRASE_CONFIG,
    PII_CONFIG,
    SEMANTIC_CONFIG,
    encoder_params,
    param,
    selection_params,
    sharding_config,
)
from operators.orchestration.settings import data_root, safe_name, source_dirs

RUN = "{{ data_root }}/runs/{{ safe_name(params.run_name or run_id) }}"
# Phase 1 with its two optional encoder steps, each after the step it extends (the nightly and backfill DAGs
# run without them).
_AFTER = {"near_dedup": "semantic_dedup", "decontaminate": "decontaminate_paraphrase"}
STEPS = tuple(s for step in FOUNDATIONAL_STEPS for s in (step, _AFTER.get(step)) if s is not None)


@dag(
    dag_id="foundational_selection",
    description="Select the foundational instruction set: rule filters, exact dedup, decontamination, "
    "domain routing, DSIR, budgets and the replay sample.",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=2,
    render_template_as_native_obj=True,
    user_defined_macros={"data_root": data_root(), "safe_name": safe_name, "source_dirs": source_dirs},
    tags=["iip", "phase-1"],
    params={
        "sources": param(["demo"], type="array", items={"type": "string"}, minItems=1,
                         description="Ingested source names (see ingest_source) or step-dir URIs."),
        "run_name": param(None, type=["null", "string"],
                          description="Folder under <data root>/runs; blank = the run id."),
        "languages": param(["en", "zh"], type="array", items={"type": "string"}),
        "min_turns": param(2, type="integer", minimum=1),
        "max_repetition_ratio": param(0.35, type="number", minimum=0, maximum=1),
        "dedup_scopes": param(["conversation", "first_human"], type="array",
                              items={"enum": ["conversation", "first_human"]}),
        "benchmarks": param([{"name": "humaneval", "uri": "humaneval://", "format": "humaneval"}], type="array",
                            items={"type": "object"},
                            description="Evaluation sets to decontaminate against: {name, uri, format}."),
        "near_dup_threshold": param(0.7, type="number", exclusiveMinimum=0, exclusiveMaximum=1,
                                    description="MinHash Jaccard above which records are near-duplicates."),
        **encoder_params(),
        "decontam_ngram": param(13, type="integer", minimum=3),
        "dsir_targets": param({}, type="object",
                              description="Per domain: a list of {name, uri, format} target sets; empty = "
                              "built-in (code: HumanEval; math: templated word problems). Production: "
                              "GSM8K + MATH for math, HumanEval + MBPP for code."),
        "source_caps": param({}, type="object", description="Most records per source."),
        "replay_fraction": param(0.16, type="number", minimum=0, maximum=1),
        "selection_ablation": param(False, type="boolean",
                                    description="Also select at random, the same size per domain from the same "
                                    "pool (<run>/select_random), to train against the DSIR selection "
                                    "(two_stage_finetune's ablation_foundational)."),
        "ablation_seed": param(0, type="integer", minimum=0, description="Seed of the random selection."),
        **selection_params(),
    },
)
def foundational_selection() -> None:
    configs: dict[str, dict[str, Any]] = {
        "filter": {"languages": "{{ params.languages }}", "min_turns": "{{ params.min_turns }}",
                   "max_repetition_ratio": "{{ params.max_repetition_ratio }}"},
        "pii": PII_CONFIG,
        "exact_dedup": {"scopes": "{{ params.dedup_scopes }}"},
        "near_dedup": {"minhash": {"threshold": "{{ params.near_dup_threshold }}"}},
        "semantic_dedup": SEMANTIC_CONFIG,
        "decontaminate_paraphrase": PARAPHRASE_CONFIG,
        "decontaminate": {"benchmarks": "{{ params.benchmarks }}", "ngram": "{{ params.decontam_ngram }}"},
        "route": {},
        "dsir": {"targets": "{{ params.dsir_targets or None }}"},
        "select": {"budgets": "{{ params.budgets }}", "source_caps": "{{ params.source_caps }}",
                   "replay_fraction": "{{ params.replay_fraction }}", "dsir_dir": f"{RUN}/dsir"},
    }
    last = step_chain(STEPS, configs=configs, inputs="{{ source_dirs(params.sources) }}", run=RUN,
                      common=sharding_config(), profiles={"semantic_dedup": ENCODER_PROFILE,
                                                           "decontaminate_paraphrase": ENCODER_PROFILE},
                      commit_last=False)
    # The DSIR-vs-random ablation: the same select over the same scored pool, ranked by a seeded id hash, taking
    # as many records per domain as the DSIR selection did (so it runs after it).
    ablation = step_group("select", config={**configs["select"], **sharding_config(), "ranking": "random",
                                            "seed": "{{ params.ablation_seed }}", "match_selection": f"{RUN}/select",
                                            "enabled": "{{ params.selection_ablation }}"},
                          inputs=[f"{RUN}/dsir"], output_uri=f"{RUN}/select_random", group_id="select_random")
    # Beside the export rather than before it: it needs only select's commit (the export's plan makes it), and
    # the export's waves need nothing of it, so an ablation (or, off, its plan and reduce: two pod starts) is off
    # the critical path; the publish, whose event may start the next DAG, still waits for it.
    first, _ = publish_tasks("select", f"{RUN}/select", RUN, dataset="foundational", beside=[ablation],
                             commit_step=True)
    chain_into_export(last, first) >> ablation

foundational_selection()
