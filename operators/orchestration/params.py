"""Params that several DAGs' forms share, defined once so that their defaults, checks and help text agree."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param

from operators.steps.ingest.formats import SourceFormat

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"  # one safe path segment (sources, datasets, runs)

# Airflow checks each Param's schema against its metaschema on every resolve, and resolves every Param of a
# DAG several times per task when it serializes the DAG (the DAG processor does that on every parse). Against
# draft 2020-12, jsonschema's default, that check costs 1.1 ms; against draft 7 it costs 0.1 ms, and the
# keywords these forms use (type, enum, pattern, minimum, items...) mean the same in both. Serializing the
# six DAGs took 4.5 CPU s with the default and 1.3 s with draft 7.
SCHEMA_DRAFT = "http://json-schema.org/draft-07/schema#"


def param(default: Any, description: str | None = None, **schema: Any) -> Param:
    """An Airflow `Param` whose JSON schema names draft 7 (cheap to check; see SCHEMA_DRAFT)."""
    return Param(default, description=description, **{"$schema": SCHEMA_DRAFT, **schema})


def source_params(default_name: str, name_help: str) -> dict[str, Param]:
    """`source_uri`, `source_name` and `format`: a raw corpus to ingest."""
    return {
        "source_uri": param("", type="string", minLength=1,
                            description="File, folder or prefix of the raw corpus (file://... or s3://...)."),
        "source_name": param(default_name, type="string", pattern=NAME_PATTERN, description=name_help),
        "format": param("auto", enum=[f.value for f in SourceFormat],
                        description="Input format; auto detects it per file."),
        **task_timeout_param(),
    }


def selection_params(shard_mb: float = 256) -> dict[str, Param]:
    """`budgets`, `target_shard_mb`, `shard_multiple` and `keep_versions`: a Phase 1 selection that publishes a
    version."""
    return {
        "budgets": param({"math": 0.5, "code": 0.5, "general": 0.5}, type="object",
                         description="Per domain: a count (>= 1) or a fraction of the domain."),
        "target_shard_mb": param(shard_mb, type="number", exclusiveMinimum=0,
                                 description="Inputs are grouped into parallel shards of about this size."),
        "shard_multiple": param(0, type="integer", minimum=0,
                                description="The pods one wave runs on: a step with more shards than this rounds "
                                "its shard count up to a multiple of it, so no wave ends with a few tasks. 0: the "
                                "DAG's max_active_tasks (on Kubernetes, the chart's stepPods)."),
        **pii_param(),
        **keep_versions_param(),
        **task_timeout_param(),
    }


def pii_param() -> dict[str, Param]:
    """`pii_actions`: what the `pii` step does with each type of personal data."""
    return {"pii_actions": param({}, type="object",
                                 description="Per PII type (email, phone, ip_address, credit_card, iban, us_ssn, "
                                 "secret): redact (typed placeholder), drop (the record), flag (keep, count) or "
                                 "off. A type not named is redacted.")}


PII_CONFIG = {"actions": "{{ params.pii_actions }}"}  # the `pii` step's config from `pii_param` (templated)


def encoder_params() -> dict[str, Param]:
    """The optional encoder steps of Phase 1, both off by default (each embeds every record's prompts, a GPU
    pod's work at scale): `semantic_dedup` with its threshold, `paraphrase_decontam` with its threshold and
    judge, and the encoder and pod profile they share."""
    return {
        "semantic_dedup": param(False, type="boolean",
                                description="Drop records whose first prompt means what another's does (SemDeDup: "
                                "sentence embeddings, k-means, cosine within a cluster)."),
        "semantic_threshold": param(0.9, type="number", exclusiveMinimum=0, maximum=1,
                                    description="Cosine similarity of two prompts at or above which they are "
                                    "duplicates (semantic_dedup)."),
        "paraphrase_decontam": param(False, type="boolean",
                                     description="Also drop records with a human turn that rephrases a benchmark "
                                     "prompt (embedding top-k against `benchmarks`, after the n-gram check)."),
        "paraphrase_threshold": param(0.75, type="number", exclusiveMinimum=0, maximum=1,
                                      description="Cosine similarity of a turn and a benchmark prompt at which the "
                                      "record is dropped (paraphrase_decontam, judge off)."),
        "paraphrase_judge": param(False, type="boolean",
                                  description="Ask the LLM judge about pairs above its floor instead of using the "
                                  "threshold alone (the CPU model judges poorly: see docs/decontamination.md)."),
        "encoder_model": param("all-minilm-l6-v2", type="string", minLength=1,
                               description="Sentence encoder of semantic_dedup and paraphrase_decontam: the packaged "
                               "all-MiniLM-L6-v2, or a Hugging Face folder the pods mount."),
        "encoder_profile": param("cpu", type="string", minLength=1,
                                 description="Pod profile of the encoder steps' tasks on Kubernetes (a GPU profile "
                                 "for a large corpus)."),
    }


# The encoder steps' configs from `encoder_params` (templated), and their pod profile.
SEMANTIC_CONFIG = {"enabled": "{{ params.semantic_dedup }}", "threshold": "{{ params.semantic_threshold }}",
                   "embed": {"model": "{{ params.encoder_model }}"}}
PARAPHRASE_CONFIG = {"enabled": "{{ params.paraphrase_decontam }}", "benchmarks": "{{ params.benchmarks }}",
                     "threshold": "{{ params.paraphrase_threshold }}",
                     "judge": {"enabled": "{{ params.paraphrase_judge }}"},
                     "embed": {"model": "{{ params.encoder_model }}"}}
ENCODER_PROFILE = "{{ params.encoder_profile }}"


SHARD_BYTES = "{{ (params.target_shard_mb * 1048576) | int }}"  # the `target_shard_mb` Param, templated


def sharding_config() -> dict[str, str]:
    """The step config fields every step of a selection DAG takes from `selection_params` (templated)."""
    # 0 means the DAG's own slots: the pods a wave runs on are the tasks it runs at once (`slots` task).
    return {"target_shard_bytes": SHARD_BYTES,
            "shard_multiple": "{{ params.shard_multiple or dag.max_active_tasks }}"}


def task_timeout_param() -> dict[str, Param]:
    """`task_timeout_minutes`: each step task's time limit (a stuck task is stopped and retried)."""
    return {"task_timeout_minutes": param(0, type="number", minimum=0,
                                          description="Time limit of each step task, in minutes. 0: derived from "
                                          "the task's shard (10 min + 6 s per MiB; LLM steps 300 s per MiB; "
                                          "whole-step tasks 1 h; training none). A task past it is stopped and "
                                          "retried.")}


def keep_versions_param() -> dict[str, Param]:
    """`keep_versions`: how many dataset versions retention keeps."""
    return {"keep_versions": param(10, type="integer", minimum=1,
                                   description="Dataset versions retention keeps (LATEST and pinned ones always "
                                   "stay).")}


def incremental_params() -> dict[str, Param]:
    """`no_churn` and `freeze_selection`: how a refresh treats what earlier versions published."""
    return {
        "no_churn": param(True, type="boolean",
                          description="Records the latest version's run kept through dedup are never dropped for "
                          "duplicates that arrive later. Off: every run re-decides every duplicate cluster."),
        "freeze_selection": param(True, type="boolean",
                                  description="Keep DSIR's models and every earlier selection decision; a run only "
                                  "adds from its new records. Off: refit and reselect over everything."),
    }


def incremental_configs(run: str, dataset: str = "'foundational'") -> dict[str, dict[str, Any]]:
    """Step configs (templated) of a refresh over `run`: dedup protects what the dataset published (no_churn),
    dsir and select keep their models and decisions (freeze_selection). `dataset` is a Jinja expression (a
    quoted name, or `params.dataset`)."""
    published = "{{ (data_root ~ '/datasets/' ~ " + dataset + ") if params.no_churn else None }}"
    freeze = "{{ params.freeze_selection }}"
    return {
        "pii": PII_CONFIG,
        "exact_dedup": {"published": published},
        "near_dedup": {"published": published},
        "dsir": {"freeze": freeze},
        "select": {"budgets": "{{ params.budgets }}", "dsir_dir": f"{run}/dsir", "freeze": freeze},
    }
