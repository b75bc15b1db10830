"""conversational_synthesis: Phase 2 of Infinity Instruct, from the foundational set to synthesized chats.

pool (sample of the foundational set) -> label (two-level abilities) -> label_vocab (merge tags)
-> seed_score (answer loss, IFD) -> seed_select (long tail, multi-ability, difficulty)
-> evolve (depth + breadth rounds, elimination) -> respond (answers + multi-turn extension)
-> diagnose (candidates answer probes, a judge scores each ability)
-> round 2: seed_select for the weak abilities -> evolve -> respond
-> conversational_set (canonical schema) -> pii -> export -> publish (dataset `conversational`) -> report
Drift review (operators/review/, plugins/iip_review.py): people mark a sample of the evolved instructions in the
run's Review tab (`review_sample`, `drift_gate`); `stronger_judge` makes a run's evolve steps judge some strategies'
evolutions with a stronger model (e.g. those an earlier run's review failed).
With IIP_ASSET_SCHEDULES=1 (read at parse time) it runs on each new version of the `foundational` dataset.
Every LLM step caches its results beside its output: a retried or re-run task pays no tokens twice.
In kubernetes mode LLM steps run in the `vllm` pod profile (GPU); embedded mode runs the packaged CPU model.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import dag

from operators.orchestration.dag_builder import asset_extra, asset_schedule, publish_tasks, step_group
from operators.orchestration.params import PII_CONFIG, keep_versions_param, param, pii_param, task_timeout_param
from operators.orchestration.settings import data_root, run_dir, safe_name
from operators.orchestration.stronger_judge import validator_config

RUN = "{{ data_root }}/runs/{{ safe_name(params.run_name or run_id) }}"
MODEL_ROLES = ("labeler", "reference", "evolver", "responder", "user", "judge")
LLM_PROFILE = "{{ params.llm_profile }}"


def llm(role: str) -> str:
    """Template for the LLM config of `role` (blank = the packaged CPU model)."""
    return "{{ params.models.get('" + role + "') or {} }}"


@dag(
    dag_id="conversational_synthesis",
    description="Synthesize conversational instructions: ability labels, long-tail seeds, evolution, "
    "multi-turn responses, and diagnosis-driven supplementation.",
    schedule=asset_schedule("foundational"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    user_defined_macros={"data_root": data_root(), "safe_name": safe_name, "run_dir": run_dir,
                         "asset_extra": asset_extra, "validator_config": validator_config},
    tags=["iip", "phase-2", "llm"],
    params={
        "foundational": param("demo", type="string", description="A foundational_selection run name (its "
                              "`select` output is the seed pool), or the URI of any canonical step dir."),
        "run_name": param(None, type=["null", "string"],
                          description="Folder under <data root>/runs; blank = the run id."),
        "pool_budgets": param({"math": 4, "code": 4, "general": 4}, type="object",
                              description="Records per domain taken from the foundational set into the seed "
                              "pool ({} = all of it, as in production)."),
        "models": param({}, type="object", description="LLM config per role (" + ", ".join(MODEL_ROLES) + "), e.g. "
                        '{"responder": {"backend": "openai", "model": "Qwen2-72B", "base_url": "http://vllm:8000/v1",'
                        ' "api_key_env": "VLLM_API_KEY"}}; a missing role uses the packaged CPU model.'),
        "candidates": param({"smollm2": {}}, type="object",
                            description="Models under diagnosis: name -> LLM config."),
        "llm_profile": param("cpu", enum=["cpu", "vllm"], description="Pod profile of LLM steps (vllm: GPU pods)."),
        "max_new_tokens": param(48, type="integer", minimum=1, description="Cap on every generation."),
        "seed_budget": param(4, type="integer", minimum=0),
        "supplement_budget": param(2, type="integer", minimum=0,
                                   description="Extra seeds for the weak abilities in round 2 (0: no round 2)."),
        "weak_threshold": param(6.0, type="number", minimum=1, maximum=10),
        "max_ifd": param(1.0, type=["number", "null"], description="Seeds need IFD below this (null: no limit)."),
        "evolution_rounds": param(2, type="integer", minimum=1, maximum=10),
        "min_turns": param(2, type="integer", minimum=1, maximum=8),
        "max_turns": param(3, type="integer", minimum=1, maximum=8),
        "probes_per_ability": param(1, type="integer", minimum=1),
        "min_label_samples": param(100, type="integer", minimum=0,
                                   description="An ability with fewer records in the pool is too thin to judge: "
                                   "diagnose marks it instead of scoring it, and the report lists second-level "
                                   "labels below this count (0: judge every ability)."),
        "drift_gate": param(0.05, type="number", minimum=0, maximum=1,
                            description="Drift review: a strategy whose reviewed error rate (drifted, factual error "
                            "or unsafe) is above this fails, and the run is marked 'needs a stronger validator'."),
        "review_sample": param({"size": 100, "seed": 0}, type="object",
                               description="Drift review: how many evolved instructions reviewers are shown "
                               "(stratified by strategy and round) and the sample's seed."),
        "stronger_judge": param({}, type="object",
                                description='Validation pass of the evolve steps: {"llm": {LLM config}, '
                                '"strategies": [...], "from_run": "<run name>"} judges those strategies\' '
                                "evolutions (and those the named run's drift review failed) with this model and "
                                "drops the drifted ones; {} = off."),
        **pii_param(),
        **keep_versions_param(),
        **task_timeout_param(),
    },
)
def conversational_synthesis() -> None:
    cap = "{{ params.max_new_tokens }}"
    evolve = {"llm": llm("evolver"), "max_tokens": cap, "rounds": "{{ params.evolution_rounds }}",
              "validator": "{{ validator_config(params.stronger_judge) }}"}
    respond = {"llm": llm("responder"), "user_llm": "{{ params.models.get('user') or None }}", "max_tokens": cap,
               "min_turns": "{{ params.min_turns }}", "max_turns": "{{ params.max_turns }}"}
    seeds = {"max_ifd": "{{ params.max_ifd }}"}
    plan: list[tuple[str, str, dict[str, Any], list[str] | str, str]] = [
        ("pool", "select", {"budgets": "{{ params.pool_budgets }}", "replay_fraction": 0.0},
         "{{ [run_dir(asset_extra(triggering_asset_events, 'step_dir', params.foundational), 'select')] }}", "cpu"),
        ("label", "label", {"llm": llm("labeler"), "max_tokens": cap}, [f"{RUN}/pool"], LLM_PROFILE),
        ("label_vocab", "label_vocab", {}, [f"{RUN}/label"], "cpu"),
        ("seed_score", "seed_score", {"llm": llm("reference")}, [f"{RUN}/label_vocab"], LLM_PROFILE),
        ("seed_select_r1", "seed_select", {**seeds, "budget": "{{ params.seed_budget }}", "round": 1},
         [f"{RUN}/seed_score"], "cpu"),
        ("evolve_r1", "evolve", evolve, [f"{RUN}/seed_select_r1"], LLM_PROFILE),
        ("respond_r1", "respond", respond, [f"{RUN}/evolve_r1"], LLM_PROFILE),
        ("diagnose_r1", "diagnose", {"llm": llm("judge"), "max_tokens": cap, "candidates": "{{ params.candidates }}",
                                     "probes_per_ability": "{{ params.probes_per_ability }}",
                                     "min_label_samples": "{{ params.min_label_samples }}", "round": 1},
         [f"{RUN}/label_vocab"], LLM_PROFILE),
        ("seed_select_r2", "seed_select", {**seeds, "budget": "{{ params.supplement_budget }}", "round": 2,
                                           "diagnosis_dir": f"{RUN}/diagnose_r1",
                                           "weak_threshold": "{{ params.weak_threshold }}",
                                           "exclude_dirs": [f"{RUN}/seed_select_r1"]},
         [f"{RUN}/seed_score"], "cpu"),
        ("evolve_r2", "evolve", evolve, [f"{RUN}/seed_select_r2"], LLM_PROFILE),
        ("respond_r2", "respond", respond, [f"{RUN}/evolve_r2"], LLM_PROFILE),
        ("conversational_set", "conversational_set", {}, [f"{RUN}/respond_r1", f"{RUN}/respond_r2"], "cpu"),
        # The models write addresses, keys and numbers too (and copy them from their seeds): redact before publish.
        ("pii", "pii", PII_CONFIG, [f"{RUN}/conversational_set"], "cpu"),
    ]
    groups: dict[str, Any] = {}
    for group_id, step, config, inputs, profile in plan:
        groups[group_id] = step_group(step, config=config, inputs=inputs, output_uri=f"{RUN}/{group_id}",
                                      profile=profile, group_id=group_id)
    for a, b in [("pool", "label"), ("label", "label_vocab"), ("label_vocab", "seed_score"),
                 ("seed_score", "seed_select_r1"), ("seed_select_r1", "evolve_r1"), ("evolve_r1", "respond_r1"),
                 ("label_vocab", "diagnose_r1"), ("diagnose_r1", "seed_select_r2"),
                 ("seed_select_r1", "seed_select_r2"), ("seed_select_r2", "evolve_r2"), ("evolve_r2", "respond_r2"),
                 ("respond_r1", "conversational_set"), ("respond_r2", "conversational_set"),
                 ("conversational_set", "pii")]:
        groups[a] >> groups[b]
    first, _ = publish_tasks("pii", f"{RUN}/pii", RUN, dataset="conversational")
    groups["pii"] >> first

conversational_synthesis()
