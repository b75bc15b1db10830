"""two_stage_finetune: the paper's training recipe on the foundational and conversational sets.

prep (tokenize, assistant-only labels, held-out split) for both sets
  -> stage1 (foundational) -> eval_stage1 -> stage2 (conversational + foundational replay) -> eval_stage2
  -> one_stage (both sets mixed once: the ablation) -> eval_one_stage          (mode one_stage or both)
  -> eval_base (the starting model) ; report (one table, every evaluated stage)
  -> stage2_sweep (mapped: stage 2 again per `replay_ratios` entry, from stage 1's model) -> eval_stage2_sweep
  -> prep_ablation -> stage1_ablation -> eval_stage1_ablation (only with `ablation_foundational`: stage 1 on
     another selection of the pool, e.g. foundational_selection's `select_random`; the report sets it beside
     stage 1)
     (the report then plots the replay trade-off: held-out loss on each set, one point per ratio)
Training runs DeepSpeed ZeRO-3 via the Hugging Face Trainer: locally on CPU (embedded); in kubernetes mode
as a torchrun pod with every GPU of a node (a one-node profile), or as an indexed Job of one pod per node
that the task creates, waits for (deferred), reports and deletes (a profile with `nodes` > 1; the Param
`train_profile` picks it). Checkpoints and models go to the run folder, `s3://` included.
With IIP_ASSET_SCHEDULES=1 (read at parse time) it runs on each new version of the `conversational` dataset: the
asset event's extra names the conversational set and the foundational set it was synthesized from.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import dag, get_current_context, task

from operators.orchestration.dag_builder import asset_extra, asset_schedule, report_task, step_group
from operators.orchestration.params import param, task_timeout_param
from operators.orchestration.settings import data_root, safe_name
from operators.orchestration.step_operator import StepOperator
from operators.train.config import ABLATION_STAGE, sweep_stage, train_root

RUN = "{{ data_root }}/runs/{{ safe_name(params.run_name or run_id) }}"
TRAIN_DIR = "{{ train_root }}/runs/{{ safe_name(params.run_name or run_id) }}/finetune"
# A run triggered by a new `conversational` version trains on it and on the foundational set it came from.
CONVERSATIONAL = "{{ asset_extra(triggering_asset_events, 'step_dir', params.conversational) }}"
FOUNDATIONAL = "{{ (asset_extra(triggering_asset_events, 'sources', []) + [params.foundational])[0] }}"
SCHEDULE = asset_schedule("conversational")
REQUIRED = 0 if SCHEDULE else 1  # a scheduled DAG's Params need valid defaults: the asset event fills these in


def _stage_config(prefix: str = "") -> dict[str, Any]:
    """TrainConfig fields filled from Params (the same form fields drive both stages)."""
    return {
        "epochs": "{{ params.epochs }}", "max_steps": "{{ params.max_steps }}",
        "learning_rate": "{{ params.learning_rate }}", "warmup_steps": "{{ params.warmup_steps }}",
        "global_batch_size": "{{ params.global_batch_size }}",
        "per_device_batch_size": "{{ params.per_device_batch_size }}", "world_size": "{{ params.world_size }}",
        "max_seq_len": "{{ params.max_seq_len }}", "bf16": "{{ params.bf16 }}",
        "gradient_checkpointing": "{{ params.gradient_checkpointing }}",
        "train_layers": "{{ params.train_layers }}", "save_steps": "{{ params.save_steps }}",
    }


@dag(
    dag_id="two_stage_finetune",
    description="Two-stage fine-tune (foundational, then conversational + replay) with DeepSpeed ZeRO-3, "
    "evaluation after each stage, and the one-stage ablation.",
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    user_defined_macros={"data_root": data_root(), "train_root": train_root(), "safe_name": safe_name,
                         "asset_extra": asset_extra},
    tags=["iip", "training"],
    params={
        **task_timeout_param(),
        "foundational": param("", type="string", minLength=REQUIRED,
                              description="Committed foundational set (e.g. <run>/select of foundational_selection)."),
        "conversational": param("", type="string", minLength=REQUIRED,
                                description="Committed conversational set (Phase 2 output, or any step dir)."),
        "run_name": param(None, type=["null", "string"],
                          description="Folder under <data root>/runs; blank = the run id."),
        "model": param("smollm2-135m-instruct", type="string", description="Base model: packaged name or folder."),
        "mode": param("two_stage", enum=["two_stage", "one_stage", "both"],
                      description="two_stage (paper), one_stage (ablation: mix once) or both, for the comparison."),
        "replay_fraction": param(None, type=["null", "number"], minimum=0, maximum=1,
                                 description="Share of the foundational set replayed in stage 2; blank = the "
                                 "select step's replay flag (paper ~16%)."),
        "epochs": param(3.0, type="number", exclusiveMinimum=0),
        "max_steps": param(-1, type="integer", minimum=-1, description="-1: run the epochs."),
        "learning_rate": param(5e-6, type="number", exclusiveMinimum=0),
        "warmup_steps": param(40, type="integer", minimum=0),
        "global_batch_size": param(528, type="integer", minimum=1,
                                   description="= per-device batch x accumulation x world size (checked)."),
        "per_device_batch_size": param(1, type="integer", minimum=1),
        "world_size": param(1, type="integer", minimum=1, description="Training processes: nodes x GPUs per node "
                            "of the training profile (checked before a Job is created)."),
        "train_profile": param("train", type="string", minLength=1, description="Pod profile of the training "
                               "stages in kubernetes mode (IIP_POD_PROFILES); nodes > 1 runs an indexed Job."),
        "max_seq_len": param(4096, type="integer", minimum=16),
        "bf16": param(True, type="boolean"),
        "gradient_checkpointing": param(True, type="boolean"),
        "train_layers": param(None, type=["null", "integer"], minimum=1,
                              description="Train only the last N blocks (CPU smoke runs); blank = all."),
        "save_steps": param(200, type="integer", minimum=1),
        "heldout_fraction": param(0.02, type="number", minimum=0, maximum=0.5),
        "evaluation": param({}, type="object", description="EvalConfig overrides: benchmarks, limits, judge."),
        "replay_ratios": param([], type="array", items={"type": "number", "minimum": 0, "maximum": 1},
                               maxItems=16, uniqueItems=True,
                               description="Replay sweep: stage 2 again per ratio (e.g. [0, 0.1, 0.16, 0.25]), "
                               "each from stage 1's model; the report plots the trade-off. Empty: no sweep."),
        "ablation_foundational": param(None, type=["null", "string"],
                                       description="Selection ablation: another committed selection of the same "
                                       "pool (e.g. <run>/select_random of foundational_selection with "
                                       "selection_ablation on); stage 1 runs once more on it and the report "
                                       "compares the two. Blank: no ablation."),
        "evaluate_base": param(True, type="boolean"),
        "target_shard_mb": param(256, type="number", exclusiveMinimum=0),
    },
)
def two_stage_finetune() -> None:
    prep_config = {"model": "{{ params.model }}", "max_seq_len": "{{ params.max_seq_len }}",
                   "heldout_fraction": "{{ params.heldout_fraction }}",
                   "target_shard_bytes": "{{ (params.target_shard_mb * 1048576) | int }}"}
    prep_f = step_group("train_prep", config=prep_config, inputs=[FOUNDATIONAL],
                        output_uri=f"{RUN}/train_prep_foundational", group_id="prep_foundational")
    prep_c = step_group("train_prep", config=prep_config, inputs=[CONVERSATIONAL],
                        output_uri=f"{RUN}/train_prep_conversational", group_id="prep_conversational")
    # Without an ablation set the group is off: it plans nothing and passes the foundational set on, unread.
    ablation_on = "{{ (params.ablation_foundational or '') != '' }}"
    prep_a = step_group("train_prep", config={**prep_config, "enabled": ablation_on},
                        inputs=["{{ params.ablation_foundational or " + FOUNDATIONAL.strip("{} ") + " }}"],
                        output_uri=f"{RUN}/train_prep_ablation", group_id="prep_ablation")
    config = {
        "foundational": f"{RUN}/train_prep_foundational", "conversational": f"{RUN}/train_prep_conversational",
        "base_model": "{{ params.model }}", "mode": "{{ params.mode }}",
        "replay_fraction": "{{ params.replay_fraction }}", "evaluate_base": "{{ params.evaluate_base }}",
        "replay_ratios": "{{ params.replay_ratios }}",
        "ablation_foundational": "{{ (data_root ~ '/runs/' ~ safe_name(params.run_name or run_id) ~ "
                                 "'/train_prep_ablation') if params.ablation_foundational else None }}",
        "stage1": _stage_config(), "stage2": _stage_config(), "evaluation": "{{ params.evaluation }}",
    }

    def task(action: str, stage: str, profile: str) -> StepOperator:
        # Training stages run under the profile the Param names (one node: a pod; several: an indexed Job).
        return StepOperator(task_id=stage if action == "train" else f"eval_{stage}", step="finetune",
                            action=action, stage=stage, config=config, output_uri=TRAIN_DIR,  # type: ignore[arg-type]
                            profile=profile)

    report = StepOperator(task_id="report", step="finetune", action="evaluate", stage="report", config=config,
                          output_uri=TRAIN_DIR, trigger_rule="none_failed")
    prepared = [prep_f, prep_c]
    train = "{{ params.train_profile }}"
    stage1, stage2, one_stage = task("train", "stage1", train), task("train", "stage2", train), \
        task("train", "one_stage", train)
    prepared >> stage1 >> task("evaluate", "stage1", "vllm") >> stage2 >> task("evaluate", "stage2", "vllm") >> report
    prepared >> one_stage >> task("evaluate", "one_stage", "vllm") >> report
    prepared >> task("evaluate", "base", "vllm") >> report
    # The replay sweep: one stage-2 run per ratio, mapped, each evaluated like the other stages.
    sweep = replay_sweep_stages()
    sweep_train = StepOperator.mapped(task_id="stage2_sweep", step="finetune", action="train", config=config,
                                      output_uri=TRAIN_DIR, profile=train).expand(stage=sweep)
    sweep_eval = StepOperator.mapped(task_id="eval_stage2_sweep", step="finetune", action="evaluate",
                                     config=config, output_uri=TRAIN_DIR, profile="vllm").expand(stage=sweep)
    stage1 >> sweep_train >> sweep_eval >> report
    # The selection ablation: stage 1 once more, on the other selection (mapped over one stage or none).
    ablation = ablation_stages()
    ablation_train = StepOperator.mapped(task_id="stage1_ablation", step="finetune", action="train", config=config,
                                         output_uri=TRAIN_DIR, profile=train).expand(stage=ablation)
    ablation_eval = StepOperator.mapped(task_id="eval_stage1_ablation", step="finetune", action="evaluate",
                                        config=config, output_uri=TRAIN_DIR, profile="vllm").expand(stage=ablation)
    [prep_a, *prepared] >> ablation_train >> ablation_eval >> report
    report >> report_task(RUN, task_id="run_report")  # the run's page: data prep funnel, loss curves, eval table


@task(task_id="replay_sweep")
def replay_sweep_stages() -> list[str]:
    """The sweep's stage names from the `replay_ratios` Param (none: the mapped sweep tasks skip)."""
    ratios = get_current_context()["params"].get("replay_ratios") or []
    if any(not isinstance(r, (int, float)) or not 0 <= r <= 1 for r in ratios) or len(set(ratios)) != len(ratios):
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"replay_ratios must be distinct numbers within [0, 1], got {ratios}")
    return [sweep_stage(float(r)) for r in sorted(ratios)]


@task(task_id="selection_ablation")
def ablation_stages() -> list[str]:
    """The ablation's stage, when the `ablation_foundational` Param names a set (none: its tasks skip)."""
    return [ABLATION_STAGE] if get_current_context()["params"].get("ablation_foundational") else []


two_stage_finetune()
