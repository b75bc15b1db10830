"""backfill_source: add a new raw corpus to a dataset and publish the dataset's next version.

register (the source registry) -> ingest (plan, shards, reduce into <data root>/sources/<name>/ingest)
-> inputs (every committed ingest of every source of the dataset) + caps (per-source caps)
-> filter -> exact_dedup -> near_dedup -> decontaminate -> route -> dsir -> select (over all of them, in
<data root>/runs/<dataset>) -> contribution (what the new corpus added) and export -> publish
-> report. Dedup runs across the corpora; with `no_churn` the records of the latest version keep their place,
and with `freeze_selection` the earlier selection stays and the new corpus adds to it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import dag, task

from operators.orchestration.backfill import contribution, dataset_inputs, register_source, source_caps
from operators.orchestration.dag_builder import FOUNDATIONAL_STEPS, publish_tasks, step_chain, step_group
from operators.orchestration.params import (
    SHARD_BYTES,
    incremental_configs,
    incremental_params,
    param,
    selection_params,
    sharding_config,
    source_params,
)
from operators.orchestration.settings import data_root, safe_name

RUN = "{{ data_root }}/runs/{{ safe_name(params.dataset) }}"
SOURCE = "{{ data_root }}/sources/{{ safe_name(params.source_name) }}"


@dag(
    dag_id="backfill_source",
    description="Register a new raw corpus, ingest it, re-select the dataset over all its sources (dedup and "
    "decontamination across corpora) and publish the next version with what the corpus contributed.",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    user_defined_macros={"data_root": data_root(), "safe_name": safe_name},
    tags=["iip", "phase-1", "backfill"],
    params={
        **source_params("new_corpus", "Name recorded in the registry and in each record's `source`."),
        "cap": param(None, type=["null", "integer"], minimum=1,
                     description="Most records of this source the selection keeps; blank = no cap."),
        "dataset": param("foundational", enum=["foundational"],
                         description="The dataset the corpus joins (its asset gets the new version)."),
        **selection_params(),
        **incremental_params(),
    },
)
def backfill_source() -> None:
    @task
    def register(**context: Any) -> dict[str, Any]:
        """Record the source in the registry (a compare-and-swap: racing backfills both land)."""
        return register_source(context["params"])

    @task
    def inputs(**context: Any) -> list[str]:
        """Every committed ingest of every source of the dataset, the new one included."""
        return dataset_inputs(context["params"]["dataset"])

    @task
    def caps(**context: Any) -> dict[str, int]:
        """Per-source caps of the dataset's sources (select's `source_caps`)."""
        return source_caps(context["params"]["dataset"])

    @task
    def contributed(**context: Any) -> dict[str, Any]:
        """What the new corpus contributed: kept per step, duplicates of other sources, contamination."""
        return contribution(context["templates_dict"]["run"], context["params"]["source_name"])

    ingest = step_group("ingest", inputs=["{{ params.source_uri }}"], output_uri=SOURCE + "/ingest",
                        config={"source_name": "{{ params.source_name }}", "format": "{{ params.format }}",
                                "target_shard_bytes": SHARD_BYTES})
    gathered, capped = inputs(), caps()
    register() >> ingest >> [gathered, capped]
    configs = incremental_configs(RUN, "params.dataset")
    configs["select"]["source_caps"] = "{{ ti.xcom_pull(task_ids='caps') }}"
    last = step_chain(FOUNDATIONAL_STEPS, configs=configs, inputs="{{ ti.xcom_pull(task_ids='inputs') }}",
                      run=RUN, common=sharding_config(), after=[gathered, capped])
    first, _ = publish_tasks("select", f"{RUN}/select", RUN, dataset="foundational")
    added = contributed.override(templates_dict={"run": RUN})()
    last >> added >> first  # before publish: the version keeps what its corpus contributed


backfill_source()
