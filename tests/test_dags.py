"""DAGs: they parse, they obey the dependency rules, and `airflow dags test` runs them end to end."""

from __future__ import annotations

import ast
import itertools
import json
import re
from pathlib import Path

import pytest

from operators.core.manifest import read_manifest, step_manifest_uri
from operators.core.registry import FOUNDATIONAL_STEPS
from operators.core.runner import read_step_table
from tests.conftest import FAKE_SECRET, ROOT, airflow, dag_info, dags_test, migrated_airflow


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return migrated_airflow(tmp_path_factory)[0]


def test_dags_parse_without_errors(airflow_home: dict[str, str]) -> None:
    info = dag_info(airflow_home, "ingest_source")
    assert info["errors"] == {}
    assert "ingest_source" in info["dags"]
    assert info["tasks"] == ["ingest.plan", "ingest.reduce", "ingest.run", "report"]
    assert {"source_uri", "source_name", "format", "output_uri"} <= set(info["params"])


def _imports(path: Path) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
    return mods


def test_dependency_rules() -> None:
    """Steps and core never import Airflow; DAGs import only Airflow, the operator and step configs."""
    for path in list((ROOT / "operators" / "steps").rglob("*.py")) + list((ROOT / "operators" / "core").rglob("*.py")):
        bad = {m for m in _imports(path) if m.split(".")[0] == "airflow" or m.startswith("operators.orchestration")}
        assert not bad, f"{path} imports {bad}"
    for path in (ROOT / "operators" / "llm").rglob("*.py"):  # the LLM layer knows nothing of steps or Airflow
        bad = {m for m in _imports(path) if m.split(".")[0] == "airflow" or m.startswith("operators.steps")}
        assert not bad, f"{path} imports {bad}"
    for path in (ROOT / "dags").glob("*.py"):
        for m in _imports(path):
            top = m.split(".")[0]
            if top == "operators":
                assert m.startswith("operators.orchestration") or m.endswith((".formats", ".config")), (
                    f"{path} imports step internals {m}")
            else:
                assert top in {"airflow", "__future__", "datetime", "typing", "json", "os"}, f"{path} imports {m}"


def test_a_step_group_commits_through_its_reduce_even_when_its_shard_tasks_skip() -> None:
    """The reduce runs when the plan found the step up to date (its stage and shard tasks mapped over nothing
    and skipped: the nightly test's quiet night runs that), fails with them, and skips with a skipped plan."""
    from airflow.sdk import DAG

    from operators.orchestration.dag_builder import step_group

    with DAG("group_shape", schedule=None) as dag:
        step_group("exact_dedup", config={}, inputs=["/in"], output_uri="/out")
    reduce = dag.get_task("exact_dedup.reduce")
    assert reduce.trigger_rule == "none_failed_min_one_success"
    assert reduce.upstream_task_ids == {"exact_dedup.plan", "exact_dedup.run"}
    assert dag.get_task("exact_dedup.plan").trigger_rule == "all_success"


def test_a_chain_commits_each_step_in_the_next_steps_plan() -> None:
    """In a chain, step k's reduce runs inside step k+1's plan (`plan --after k`): no reduce task but the last
    one's, and the fused plan waits on step k's shard tasks and its plan with the reduce's trigger rule."""
    from airflow.sdk import DAG

    from operators.orchestration.dag_builder import step_chain

    with DAG("chain_shape", schedule=None) as dag:
        step_chain(["filter", "exact_dedup", "near_dedup"], configs={}, inputs=["/in"], run="/run")
    reduces = sorted(t.task_id for t in dag.tasks if t.task_id.endswith(".reduce"))
    assert reduces == ["near_dedup.reduce"]
    plan = dag.get_task("exact_dedup.plan")
    assert plan.upstream_task_ids == {"filter.plan", "filter.run"}
    assert plan.trigger_rule == "none_failed_min_one_success" and plan.after_step == "filter"
    assert dag.get_task("filter.plan").after_step is None
    assert dag.get_task("filter.plan").trigger_rule == "all_success"
    assert dag.get_task("near_dedup.plan").after_step == "exact_dedup"


def test_a_stage_less_step_the_upstream_always_runs_has_no_tasks() -> None:
    """pii after filter: every filter shard task goes on to pii on its shard, so pii has no group; exact_dedup's
    plan commits filter, then pii (`plan --through`), and waits on filter's shard tasks."""
    from airflow.sdk import DAG

    from operators.orchestration.dag_builder import step_chain

    with DAG("through_shape", schedule=None) as dag:
        step_chain(["filter", "pii", "exact_dedup"], configs={}, inputs=["/in"], run="/run")
    assert not [t.task_id for t in dag.tasks if t.task_id.startswith("pii.")]
    plan = dag.get_task("exact_dedup.plan")
    assert plan.after_step == "filter" and plan.upstream_task_ids == {"filter.plan", "filter.run"}
    assert [(p["step"], p["input"], p["output"]) for p in plan.through] == [("pii", "/run/filter", "/run/pii")]
    assert plan.inputs == ["/run/pii"]
    assert [p["step"] for p in dag.get_task("filter.run").partial_kwargs["then"]] == ["pii", "exact_dedup"]


def test_the_selection_ablation_runs_beside_the_export_and_before_publish() -> None:
    """select_random needs only select's commit, which the export's plan makes (select has no reduce task): the
    export's waves do not wait for it (off, its plan and reduce are two pod starts off the critical path), while
    publish (the dataset's event) and the report do."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags" / "foundational_selection.py"))
    dag = bag.dags["foundational_selection"]
    assert not dag.has_task("select.reduce")
    plan = dag.get_task("export.plan")
    assert plan.upstream_task_ids == {"select.plan", "select.run"} and plan.after_step == "select"
    assert plan.trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("select_random.plan").upstream_task_ids == {"export.plan"}
    assert "export.shard" not in dag.get_task("select_random.plan").get_flat_relative_ids(upstream=True)
    assert "select_random.reduce" in dag.get_task("publish").upstream_task_ids
    assert "select_random.reduce" in dag.get_task("report").get_flat_relative_ids(upstream=True)


def test_ingest_source_dag_runs_end_to_end(airflow_home: dict[str, str], tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        with (raw / f"part{i}.jsonl").open("w") as f:
            for j in range(20):
                f.write(json.dumps({"conversations": [{"from": "human", "value": f"Question {i}-{j} about cats?"},
                                                      {"from": "gpt", "value": f"Answer {i}-{j}: cats purr."}]}) + "\n")
            f.write('{"conversations": [{"from": "human", "value": "no answer"}]}\n')
    out = tmp_path / "out"
    env = {**airflow_home, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    # A shard target of ~1 KB puts each file in its own shard: three mapped ingest tasks.
    conf = {"source_uri": str(raw), "source_name": "cats", "output_uri": str(out), "target_shard_mb": 0.001}
    r = dags_test(env, "ingest_source", "-c", json.dumps(conf))
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    step_dir = f"file://{out}/ingest"
    m = read_manifest(step_manifest_uri(step_dir))
    assert m is not None
    assert m.stats.shards == 3
    assert m.stats.records_in == 63 and m.stats.records_kept == 60
    assert m.stats.dropped_by_reason == {"broken_role_order": 3}
    assert len(read_step_table(step_dir)) == 60
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][0]["records_kept"] == 60
    assert FAKE_SECRET not in r.stdout + r.stderr
    # A second run finds every manifest committed and skips the work.
    r2 = dags_test(env, "ingest_source", "-c", json.dumps(conf))
    assert r2.returncode == 0
    assert "already committed" in r2.stdout + r2.stderr
    m2 = read_manifest(step_manifest_uri(step_dir))
    assert m2 is not None and m2.created_at == m.created_at


def test_bad_params_fail_before_any_work(airflow_home: dict[str, str], tmp_path: Path) -> None:
    conf = {"source_uri": str(tmp_path), "source_name": "bad name!", "output_uri": str(tmp_path / "out")}
    r = dags_test(airflow_home, "ingest_source", "-c", json.dumps(conf))
    assert r.returncode != 0
    assert "source_name" in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_airflow_loads_the_reports_plugin(airflow_home: dict[str, str]) -> None:
    r = airflow(airflow_home, "plugins", "--output", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "iip_reports" in r.stdout


def test_foundational_selection_dag_runs_end_to_end(airflow_home: dict[str, str], tmp_path: Path) -> None:
    from tests.conftest import run_cli, three_domain_conversations

    raw = tmp_path / "raw"
    raw.mkdir()
    lines = three_domain_conversations(60)
    lines += lines[:10]  # exact duplicates
    lines.append(json.dumps({"conversations": [{"from": "human", "value": "Why?"},
                                               {"from": "gpt", "value": "I'm sorry, but I can't help with that."}]}))
    # Two files -> two shards all the way down (tiny target shards), so every map and partition stage runs
    # as two mapped tasks and the duplicates (lines 60-69 repeat 0-9) sit in the other shard.
    (raw / "a.jsonl").write_text("\n".join(lines[:35]) + "\n")
    (raw / "b.jsonl").write_text("\n".join(lines[35:]) + "\n")
    data_root = Path(airflow_home["IIP_DATA_ROOT"])
    r = run_cli("run", "ingest", "--config", '{"source_name": "tiny", "target_shard_bytes": 1}', "--input", str(raw),
                "--output", str(data_root / "sources" / "tiny" / "ingest"))
    assert r.returncode == 0, r.stderr[-2000:]
    conf = {"sources": ["tiny"], "run_name": "t1", "budgets": {"math": 10, "code": 0.5, "general": 1.0},
            "target_shard_mb": 0.001, "semantic_dedup": True, "semantic_threshold": 0.999,
            "selection_ablation": True}
    # One task of this DAG at a time: each light wave (grouped stages, dsir and select runs, the export shard tasks) is
    # one task doing both shards, as 157 shards on 64 pods are 64 tasks.
    r = dags_test({**airflow_home, "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "1"}, "foundational_selection", "-c",
                  json.dumps(conf))
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    log = r.stdout + r.stderr
    for grouped, tasks in (("stage exact_dedup --stage resolve", 1), ("stage near_dedup --stage pairs", 1),
                           ("run select", 2), ("stage select --stage kl_counts", 2), ("tail_shard select", 1),
                           ("run dsir", 1)):  # fused with select's candidates, light too (fusion.grouped_run)
        # (select_random, the ablation, is a second select step)
        assert len(re.findall(rf"running: python -m operators {grouped} \(task 0 of 1 slots, 2 shard", log)) == tasks, \
            grouped
    assert len(re.findall(r"running: python -m operators run filter \(shard", log)) == 2  # heavy: one per shard
    run = data_root / "runs" / "t1"
    # With semantic_dedup switched on by its Param; decontaminate_paraphrase stays off and passes its input
    # on (its tasks are exercised in tests/reliability/test_crash_anywhere.py and its own tests).
    chain = list(FOUNDATIONAL_STEPS)
    chain.insert(chain.index("near_dedup") + 1, "semantic_dedup")
    stats = {s: json.loads((run / s / "stats.json").read_text()) for s in chain}
    assert stats["filter"]["records_in"] == 71 and stats["filter"]["dropped_by_reason"] == {"refusal": 1}
    assert stats["exact_dedup"]["dropped_by_reason"] == {"exact_duplicate": 10}
    assert stats["exact_dedup"]["shards"] == 2 == stats["near_dedup"]["shards"]
    # The dedup partition stages ran as mapped tasks, one per shard, covering every partition once.
    for step, stage in (("exact_dedup", "resolve"), ("near_dedup", "candidates"), ("near_dedup", "pairs")):
        tasks = sorted((run / step / "_stages" / stage / "_shards").glob("*.json"))
        assert len(tasks) == 2
        assert sum(json.loads(t.read_text())["stats"]["counters"]["partitions"] for t in tasks) == 64
    # Each step reads exactly what the previous one kept: nothing lost between steps.
    for a, b in itertools.pairwise(chain):
        assert stats[b]["records_in"] == stats[a]["records_kept"]
    assert (run / "decontaminate_paraphrase" / "_OFF.json").is_file()
    # semantic_dedup ran as its DAG tasks: one embed task per shard, every record embedded once.
    assert stats["semantic_dedup"]["shards"] == 2 and stats["semantic_dedup"]["counters"]["embed.embedded"] == \
        stats["semantic_dedup"]["records_in"]
    assert stats["select"]["records_kept"] == 10 + 10 + 20  # math 10 of 20, code half of 20, all general
    assert stats["select"]["counters"]["kl.kl_reduction.math"] > 0  # DSIR moved math toward its target
    validation = json.loads((run / "select" / "validation.json").read_text())
    assert validation["success"] is True and validation["records"] == 40
    export = json.loads((run / "export" / "_EXPORT.json").read_text())
    assert export["counts"]["train"] == 40 and export["counts"]["replay"] == round(0.16 * 10) * 2 + round(0.16 * 20)
    # The selection ablation: at random, as many records per domain as DSIR chose, from the same pool.
    ablation = json.loads((run / "select_random" / "stats.json").read_text())
    assert ablation["records_in"] == stats["select"]["records_in"] and ablation["records_kept"] == 40
    assert {k: v for k, v in ablation["counters"].items() if k.startswith("decide.chosen.")} == \
        {k: v for k, v in stats["select"]["counters"].items() if k.startswith("decide.chosen.")}
    report = json.loads((run / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [*chain, "select"]  # select_random is a select step
    assert report["selection"]["ablation"]["others"] == ["select_random"]
