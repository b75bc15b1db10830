"""nightly_refresh: ingest only the raw files that arrived since the last successful ingest, then re-select.

find_new (diff raw listings against committed ingest plans) -> ingest[source] (mapped; new files only,
into <data root>/sources/<name>/<ds>/ingest) -> selection_inputs (every committed ingest dir)
-> filter -> exact_dedup -> near_dedup -> decontaminate -> route -> dsir -> select -> export -> publish
-> report (publish: the next version of the `foundational` dataset, an event on its asset)
The selection writes to one stable run folder (`run_name`), so a night whose inputs and configs are
unchanged finds every step committed under the same config hash and skips it, and a night with new files
reuses every shard whose input and global inputs are unchanged (the runner's content keys): with `no_churn`
(dedup keeps what the latest version's run kept) and `freeze_selection` (dsir keeps its models, select its
decisions) that is every old shard, so a night's work follows its new data.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import dag, task

from operators.orchestration.dag_builder import FOUNDATIONAL_STEPS, chain_into_export, publish_tasks, step_chain
from operators.orchestration.params import (
    incremental_configs,
    incremental_params,
    param,
    selection_params,
    sharding_config,
)
from operators.orchestration.refresh import plan_night, selection_inputs
from operators.orchestration.settings import data_root, safe_name
from operators.orchestration.step_operator import StepOperator

RUN = "{{ data_root }}/runs/{{ safe_name(params.run_name) }}"
STEPS = FOUNDATIONAL_STEPS


@dag(
    dag_id="nightly_refresh",
    description="Nightly: ingest new raw files of the configured sources, then re-run Phase 1 selection over "
    "every ingested source dir (unchanged steps skip).",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    user_defined_macros={"data_root": data_root(), "safe_name": safe_name},
    tags=["iip", "phase-1", "nightly"],
    params={
        "sources": param([], type="array",
                         items={"type": "object", "required": ["name", "uri"],
                                "properties": {"name": {"type": "string",
                                                        "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"},
                                               "uri": {"type": "string", "minLength": 1}}},
                         description="Sources to refresh: {name, uri of the raw folder or prefix}."),
        "run_name": param("nightly", type="string", minLength=1,
                          description="Folder under <data root>/runs; one stable name lets unchanged steps skip."),
        **selection_params(),
        **incremental_params(),
    },
)
def nightly_refresh() -> None:
    @task
    def find_new(**context: Any) -> list[dict[str, Any]]:
        """Ingest-task kwargs for each source that has raw files no committed ingest has read."""
        return plan_night(context["params"]["sources"], context["ds"])

    @task(trigger_rule="none_failed")  # runs when no source had new files (the ingest expands to nothing)
    def inputs(**context: Any) -> list[str]:
        """Every committed ingest dir of the configured sources."""
        return selection_inputs(context["params"]["sources"])

    new = find_new()
    ingest = StepOperator.mapped(task_id="ingest", step="ingest", action="run").expand_kwargs(new)
    sources = inputs()
    new >> ingest >> sources

    configs = incremental_configs(RUN)
    last = step_chain(STEPS, configs=configs, inputs="{{ ti.xcom_pull(task_ids='inputs') }}", run=RUN,
                      common=sharding_config(), after=sources, commit_last=False)
    # The export's plan commits select (one pod start fewer than a reduce task of its own).
    first, _ = publish_tasks("select", f"{RUN}/select", RUN, dataset="foundational", commit_step=True)
    chain_into_export(last, first)

nightly_refresh()
