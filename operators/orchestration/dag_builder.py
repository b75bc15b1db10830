"""Turns a registered step into Airflow tasks, so DAG files stay pure wiring.

    plan -> [stage tasks: map and partition stages mapped over shards, reduce stages once] -> run[shard] -> reduce

Every task is a StepOperator running the same CLI; the shard list is the plan task's XCom.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import TaskGroup

from operators.core.registry import step_class
from operators.orchestration.step_operator import StepOperator

# Phase 1 in the paper's order; `foundational_selection` and `nightly_refresh` both run exactly this chain.
FOUNDATIONAL_STEPS = ("filter", "exact_dedup", "near_dedup", "decontaminate", "route", "dsir", "select")


def step_group(
    step: str,
    *,
    config: dict[str, Any],
    inputs: list[str] | str,
    output_uri: str,
    profile: str = "cpu",
    group_id: str | None = None,
) -> TaskGroup:
    """A TaskGroup that plans, runs every stage and shard of `step`, and commits it."""
    stages = step_class(step).stages
    common: dict[str, Any] = {"step": step, "config": config, "inputs": inputs, "output_uri": output_uri,
                              "profile": profile}
    with TaskGroup(group_id=group_id or step, tooltip=f"step {step}") as group:
        plan = StepOperator(task_id="plan", action="plan", **common)
        prev: Any = plan
        for st in stages:
            if st.kind in ("map", "partition"):  # a partition stage's task k reduces shuffle partitions k mod shards
                task: Any = StepOperator.partial(task_id=st.name, action="stage", stage=st.name,
                                                 **common).expand(shard=plan.output)
            else:
                task = StepOperator(task_id=st.name, action="stage", stage=st.name, **common)
            prev >> task
            prev = task
        run = StepOperator.partial(task_id="run", action="run", **common).expand(shard=plan.output)
        prev >> run
        reduce = StepOperator(task_id="reduce", action="reduce", step=step, output_uri=output_uri,
                              profile=profile)
        run >> reduce
    return group


def report_task(output_uri: str, task_id: str = "report") -> StepOperator:
    """A task that (re)builds the run report from every committed step under `output_uri`.

    A teardown: it runs when the tasks before it are done, failed ones included (a failed run is when a report is
    most needed), and the run's state still comes from the work tasks. That is also why a failing report shows as
    a failed task without failing the run: Airflow would otherwise take the teardown as the run's leaf, and a
    report that succeeded would mark a failed run successful."""
    task = StepOperator(task_id=task_id, action="report", step="report", output_uri=output_uri)
    return task.as_teardown()


def step_chain(steps: Sequence[str], *, configs: dict[str, dict[str, Any]], inputs: list[str] | str, run: str,
               common: dict[str, Any] | None = None, after: Any = None) -> Any:
    """Step groups in order, each reading the previous one's output under `run`; returns the last group."""
    previous = after
    for step in steps:
        group = step_group(step, config={**configs.get(step, {}), **(common or {})}, inputs=inputs,
                           output_uri=f"{run}/{step}")
        if previous is not None:
            previous >> group
        previous, inputs = group, [f"{run}/{step}"]
    return previous


def publish_tasks(step: str, step_dir: str, run: str) -> tuple[StepOperator, StepOperator]:
    """validate -> export -> report for a final step output; returns (first task, last task)."""
    validate = StepOperator(task_id="validate", action="validate", step=step, output_uri=step_dir)
    export = StepOperator(task_id="export", action="export", step=step, inputs=[step_dir],
                          output_uri=f"{run}/export")
    report = report_task(run)
    validate >> export >> report
    return validate, report
