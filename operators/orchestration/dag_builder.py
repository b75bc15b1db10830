"""Turns a registered step into Airflow tasks, so DAG files stay pure wiring.

    plan -> [stage tasks: map and partition stages mapped over shards, reduce stages once] -> run[shard] -> reduce

Light per-shard waves (a `grouped` stage, a `grouped_run`, the export's shard tasks) map over the plan's shard
list zipped with the DAG's `slots` task: at most as many tasks as the DAG runs at once, each doing every G-th
shard, so 157 shards on 64 pods are 64 tasks in one round instead of 157 in three, each paying a pod start
(docs/architecture.md#grouped-waves).

Every task is a StepOperator running the same CLI; the shard list is the plan task's XCom, empty when the step
is already committed under the plan (then only the plan and the reduce run). In a chain of steps a step's
reduce runs inside the next step's plan (`plan --after`): the commit and the plan that reads it are one task,
one pod start and one scheduling round instead of two, and a 116M-record run has one wave fewer per step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from airflow.sdk import Asset, TaskGroup, XComArg, task
from airflow.sdk.definitions._internal.contextmanager import DagContext

from operators.core.fusion import folded_stages
from operators.core.registry import FOUNDATIONAL_STEPS as FOUNDATIONAL_STEPS  # the DAGs' chain, re-exported
from operators.core.registry import step_class
from operators.orchestration.chain import chain_steps, run_grouped
from operators.orchestration.pod_spec import shard_profile
from operators.orchestration.step_operator import StepOperator

SLOTS_TASK = "slots"


@task(task_id=SLOTS_TASK)
def _slots(**context: Any) -> list[dict[str, int]]:
    """[{"slot": j, "of": G}] for j < G: G is how many of this DAG's tasks run at once (its `max_active_tasks`,
    on Kubernetes the chart's `stepPods`), so a grouped wave never has more tasks than one round runs."""
    slots = max(1, int(context["dag"].max_active_tasks))
    return [{"slot": j, "of": slots} for j in range(slots)]


def task_slots() -> Any:
    """The XCom of the DAG's one `slots` task, made on first use: grouped waves zip the plan's shards with it."""
    dag = DagContext.get_current()
    if dag is None:
        raise RuntimeError("grouped tasks are made inside a DAG")
    if SLOTS_TASK not in dag.task_dict:  # at the DAG's top level, whichever task group asks first
        return _slots.override(task_group=dag.task_group)()
    return XComArg(dag.task_dict[SLOTS_TASK])


def per_shard_tasks(plan: StepOperator, *, grouped: bool, **kwargs: Any) -> Any:
    """A mapped StepOperator over `plan`'s shard list: one task per shard, or, `grouped` (light work), one per slot
    of the DAG, each doing every G-th shard (the zip stops at the shorter list: min(shards, slots) tasks, none
    when the plan found its step committed)."""
    if not grouped:
        return StepOperator.mapped(**kwargs).expand(shard=plan.output)
    return StepOperator.mapped(plan_task_id=plan.task_id, **kwargs).expand(shard=plan.output.zip(task_slots()))


def step_group(
    step: str,
    *,
    config: dict[str, Any],
    inputs: list[str] | str,
    output_uri: str,
    profile: str = "cpu",
    group_id: str | None = None,
    after_step: str | None = None,
    commit: bool = True,
    then: Sequence[dict[str, Any]] = (),
    fold_head: bool = False,
    through: Sequence[dict[str, Any]] = (),
) -> TaskGroup:
    """A TaskGroup that plans, runs every stage and shard of `step`, and commits it.

    `after_step`: the upstream step whose output is `inputs`; the plan commits it first (its reduce, fused).
    `commit` False: no reduce task; the next step's plan commits this one (`step_chain`).
    `through`: the stage-less steps between `after_step` and this one (they have no tasks); the plan commits them
    after the upstream (`plan --through`).
    `then`: the chain's next steps whose record-local work each shard task runs after its own (fused,
    operators/core/fusion.py); `fold_head`: no task for this step's first map stage, the upstream's shard tasks
    run it (and the plan what they did not), nor for a reduce stage right after it, which the plan runs.
    In kubernetes mode its whole-step tasks run in `profile` pods, its per-shard tasks in
    `shard_profile(profile)` pods (one core for the CPU steps)."""
    cls = step_class(step)
    stages = cls.stages
    common: dict[str, Any] = {"step": step, "config": config, "inputs": inputs, "output_uri": output_uri}
    # Per-shard tasks get the one-core pod of `shard_profile`; whole-step tasks keep `profile`.
    whole, per_shard = {**common, "profile": profile}, {**common, "profile": shard_profile(profile)}
    with TaskGroup(group_id=group_id or step, tooltip=f"step {step}") as group:
        # A fused plan runs when the upstream's plan found it committed and its shard tasks skipped, as a
        # reduce does.
        fused: dict[str, Any] = {"after_step": after_step, "trigger_rule": "none_failed_min_one_success",
                                 "fold_head": fold_head, "through": list(through)} if after_step else {}
        plan = StepOperator(task_id="plan", action="plan", **whole, **fused)
        prev: Any = plan
        folded = folded_stages(cls) if fold_head and after_step else []
        for st in stages:
            if st.name in folded:  # the plan runs it
                continue
            if st.kind in ("map", "partition"):  # a partition stage's task k reduces shuffle partitions k mod shards
                task: Any = per_shard_tasks(plan, grouped=st.grouped, task_id=st.name, action="stage",
                                            stage=st.name, **per_shard)
            else:  # never right after the plan: a reduce stage there follows a folded head and folds with it
                task = StepOperator(task_id=st.name, action="stage", stage=st.name, **whole)
            prev >> task
            prev = task
        run = per_shard_tasks(plan, grouped=run_grouped(step, then), task_id="run", action="run", then=list(then),
                              **per_shard)
        prev >> run
        if not commit:
            return group
        # When the plan found the step already committed, its stage and shard tasks map over no shards and
        # skip; the reduce still runs (it finds the commit), so what follows the group runs as usual. It also
        # waits on the plan directly, so a plan that was itself skipped skips the reduce too.
        reduce = StepOperator(task_id="reduce", action="reduce", step=step, output_uri=output_uri,
                              profile=profile, trigger_rule="none_failed_min_one_success")
        [plan, run] >> reduce
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
               common: dict[str, Any] | None = None, after: Any = None,
               profiles: dict[str, str] | None = None, commit_last: bool = True) -> Any:
    """Step groups in order, each reading the previous one's output under `run`; returns the last group.
    `profiles` names the pod profile of a step whose default `cpu` does not fit (an encoder on a GPU).
    `commit_last` False: the last group has no reduce either; the export's plan commits it
    (`publish_tasks(commit_step=True)`, wired by `chain_into_export`).

    Each step but the last is committed by the next one's plan (`plan --after`); only the last group has a
    reduce task (with `commit_last`). The next plan waits on the shard tasks and on the plan of the step it
    commits, so it runs (and commits) when that step was up to date and mapped no shard task.

    Fused: each step after the first is planned aligned to the one before, so every shard task also runs the
    next steps' record-local work on its shard (`chain.fused_then`), and their plans commit it instead of mapping
    tasks for it (operators/core/fusion.py); a stage-less step they always run has no group: the next plan
    commits it (`ChainLink.through`)."""
    previous, previous_plan = after, None
    links = chain_steps(steps, configs=configs, inputs=inputs, run=run, common=common, profiles=profiles)
    for link in links:
        group = step_group(link.step, config=link.config, inputs=link.inputs, output_uri=link.output,
                           profile=link.profile, after_step=link.after, commit=commit_last and link is links[-1],
                           then=link.then, fold_head=link.fold_head, through=link.through)
        if previous is not None:
            previous >> group
        plan = group.children[f"{group.group_id}.plan"]
        if previous_plan is not None:
            previous_plan >> plan
        previous, previous_plan = group, plan
    return previous


def dataset_asset(name: str) -> Asset:
    """The Airflow asset a publish of dataset `name` updates (its events carry the version in `extra`)."""
    return Asset(f"iip://datasets/{name}")


def asset_schedule(name: str) -> list[Asset] | None:
    """Schedule for a DAG that consumes dataset `name`: its asset when `IIP_ASSET_SCHEDULES` is on (read at parse
    time; opt-in, so by default a DAG keeps `schedule=None` and runs only when triggered)."""
    on = os.environ.get("IIP_ASSET_SCHEDULES", "").strip().lower() in ("1", "true", "yes", "on")
    return [dataset_asset(name)] if on else None


def tail_group(step: str, step_dir: str, run: str, name: str, commit_step: bool = False) -> TaskGroup:
    """The tail of a run as a task group `export` (operators/tail.py): `plan` lists the shard tasks, each
    `shard` validates and exports its share of the step's parts (one-core pods), `commit` checks id
    uniqueness, writes validation.json and commits the export, or fails the run naming what broke.
    `commit_step`: the plan first commits `step` (its reduce: `step_chain(commit_last=False)`)."""
    tail: dict[str, Any] = {"step": step, "inputs": [step_dir], "output_uri": f"{run}/export",
                            "config": {"validate": True, "run": run, "name": name}}
    with TaskGroup(group_id="export", tooltip=f"validate and export {step}") as group:
        # As a chain's plan: it runs when the step's plan found it committed and its shard tasks skipped.
        committing: dict[str, Any] = {"after_step": step, "trigger_rule": "none_failed_min_one_success"} \
            if commit_step else {}
        plan = StepOperator(task_id="plan", action="tail_plan", **tail, **committing)
        # Each shard validates and writes a few MiB per format: light, grouped.
        shards = per_shard_tasks(plan, grouped=True, task_id="shard", action="tail_shard",
                                 profile=shard_profile("cpu"), **tail)
        # As a step's reduce: it runs when the plan found the export committed and mapped no shard task.
        commit = StepOperator(task_id="commit", action="tail_commit", trigger_rule="none_failed_min_one_success",
                              **tail)
        plan >> shards >> commit
        plan >> commit
    return group


def publish_tasks(step: str, step_dir: str, run: str, dataset: str | None = None,
                  keep: Any = "{{ params.keep_versions }}", beside: Sequence[Any] = (), commit_step: bool = False
                  ) -> tuple[TaskGroup, StepOperator]:
    """export (validate and export, spread over shard tasks) -> publish -> report for a final step output;
    returns (first, last).

    `publish` makes version N+1 of `dataset` under <data root>/datasets from the committed export (copies,
    not rewrites) and emits an event on its asset; `keep` (templated, a Param) is how many versions retention
    keeps. The report stays last: a teardown. `beside`: work that runs next to the export (the caller wires its
    start) and that publish, and so the dataset's event and the report, wait for. `commit_step`: the export's plan
    commits `step` first (a chain built with `commit_last=False`; wire its last group's plan and shard tasks to
    `chain_into_export`)."""
    export = tail_group(step, step_dir, run, dataset or step, commit_step)
    report = report_task(run)
    last: Any = export
    if dataset is not None:
        last = StepOperator(task_id="publish", action="publish", step=dataset, inputs=[step_dir], output_uri=run,
                            config={"keep": keep}, outlets=[dataset_asset(dataset)])
        export >> last
    for work in beside:  # before publish (and so its event), or, without a dataset, before the report
        work >> (report if dataset is None else last)
    last >> report
    return export, report


def chain_into_export(last: TaskGroup, export: TaskGroup) -> StepOperator:
    """Wire a chain's last group (no reduce: `step_chain(commit_last=False)`) to the export whose plan commits it:
    the plan waits on the group's plan and shard tasks, as a chain's next plan does. Returns that plan."""
    plan = export.children[f"{export.group_id}.plan"]
    assert isinstance(plan, StepOperator)
    last >> export
    last.children[f"{last.group_id}.plan"] >> plan
    return plan


def asset_extra(events: Any, key: str, default: Any) -> Any:
    """`extra[key]` of the newest asset event that triggered this run (a template passes it
    `triggering_asset_events`), or `default` for a run no asset event triggered (manual, the Params form)."""
    newest: Any = None
    for evs in (events or {}).values():
        for ev in evs:
            if key in (getattr(ev, "extra", None) or {}) and (newest is None or ev.timestamp > newest.timestamp):
                newest = ev
    return default if newest is None else newest.extra[key]
