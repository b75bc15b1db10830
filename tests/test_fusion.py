"""Fused shard tasks (operators/core/fusion.py): Phase 1 run as the DAG runs it, fused and unfused, over a
corpus with several shards and shuffle partitions, writes the same outputs, stats and ledgers."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench._common import write_instruction_corpus
from operators.cli import main as cli_main
from operators.core import storage
from operators.core.manifest import read_manifest, shard_manifest_uri, stage_dir, step_manifest_uri
from operators.core.registry import step_class
from operators.core.writer import part_shard
from operators.orchestration.chain import ChainLink, chain_steps
from operators.orchestration.step_command import step_arguments

PHASE1 = ("filter", "pii", "exact_dedup", "near_dedup", "decontaminate", "route", "dsir", "select")
CONFIGS: dict[str, dict[str, Any]] = {"filter": {"languages": []},
                                      "select": {"budgets": {"math": 0.5, "code": 0.5, "general": 0.3}}}
SHARDS = 5


def cli(args: list[str]) -> dict[str, Any]:
    """One task, in this process: its JSON summary (fails on a non-zero exit)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(args)
    assert rc == 0, f"{' '.join(args[:2])} exited {rc}"
    return dict(json.loads(out.getvalue().strip().splitlines()[-1]))


def run_chain(links: list[ChainLink], slots: int | None = None) -> dict[str, dict[str, int]]:
    """Run a chain's tasks in the DAG's order: each plan (committing the step before it), the stage tasks the
    chain has, the shard tasks over the plan's list (with their fused work), the last step's reduce. `slots`: the
    light waves grouped as a DAG with that many task slots runs them (`--shard j --of slots`). Per step, how
    many shard tasks its head wave ran and how many heads its plan found prepared, and how many tasks each
    grouped wave ran."""
    head_tasks, prepared, grouped = {}, {}, {}
    for link in links:
        common: dict[str, Any] = {"output": link.output, "config": link.config}
        plan = cli(step_arguments("plan", link.step, inputs=link.inputs, after=link.after, fold_head=link.fold_head,
                                  through=link.through, **common))
        shards = plan["to_run"]
        prepared[link.step] = plan["prepared"]
        for passed in plan.get("through", []):  # committed by this plan; none may have run here
            prepared[passed["step"]] = passed["prepared"] - passed["ran_here"]
            head_tasks[passed["step"]] = 0
        cls = step_class(link.step)
        stages = {st.name: st for st in cls.stages}

        def wave(light: bool, shards: list[int] = shards, common: dict[str, Any] = common, **kw: Any) -> int:
            of = slots if light and slots else None
            tasks = shards[:of] if of else shards  # the DAG zips the shard list with its slots
            for k in tasks:
                cli(step_arguments(shard=k, of=of, **kw, **common))
            return len(tasks)

        for name in link.stage_tasks():
            if stages[name].kind == "reduce":
                cli(step_arguments("stage", link.step, stage=name, **common))
            else:
                grouped[f"{link.step}.{name}"] = wave(stages[name].grouped, action="stage", step=link.step,
                                                      stage=name)
        grouped[f"{link.step}.run"] = wave(cls.grouped_run and not link.then, action="run", step=link.step,
                                           then=link.then)
        head_tasks[link.step] = len(shards) if not stages else (
            0 if link.fold_head else len(shards))
    cli(step_arguments("reduce", links[-1].step, output=links[-1].output))
    return {"head_tasks": head_tasks, "prepared": prepared, "tasks": grouped}


def shard_tables(step_dir: str, kind: str) -> dict[int, pa.Table]:
    """A committed step's `kind` parts ("data" or "dropped"), per shard, in order."""
    step_dir = storage.validate_uri(step_dir)
    m = read_manifest(step_manifest_uri(step_dir))
    assert m is not None, f"{step_dir} is not committed"
    out: dict[int, list[pa.Table]] = {}
    for f in m.files:
        if f.kind == kind:
            with storage.open_input(storage.join(step_dir, f.path)) as fh:
                out.setdefault(part_shard(f.path), []).append(pq.read_table(fh))
    return {k: pa.concat_tables(v) for k, v in out.items()}


def comparable_stats(step_dir: str) -> dict[str, Any]:
    """A committed step's stats without what timing changes."""
    m = read_manifest(step_manifest_uri(storage.validate_uri(step_dir)))
    assert m is not None
    return m.stats.model_dump(exclude={"seconds", "peak_rss_mb"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fusion")
    write_instruction_corpus(tmp / "raw", 800, n_files=SHARDS, seed=7, near_dup_rate=0.1)
    ingest = str(tmp / "ingest")
    cli(["run", "ingest", "--config", json.dumps({"source_name": "bench", "target_shard_bytes": 1}),
         "--input", str(tmp / "raw"), "--output", ingest])
    common = {"target_shard_bytes": 1, "shard_multiple": SHARDS}
    out: dict[str, Any] = {}
    for name, fuse, slots in (("unfused", False, None), ("fused", True, None), ("grouped", True, 2)):
        run = str(tmp / name) if fuse else storage.validate_uri(str(tmp / name))  # paths and URIs both work
        links = chain_steps(PHASE1, configs=CONFIGS, inputs=[ingest], run=run, common=common, fuse=fuse)
        out[name] = {"run": run, "links": links, **run_chain(links, slots)}
    return out


@pytest.mark.parametrize("variant", ["fused", "grouped"])
def test_fused_chain_writes_what_the_unfused_chain_writes(runs: dict[str, Any], variant: str) -> None:
    """Every Phase 1 step's kept and dropped records, shard by shard, its stats (counters and ledger included) and
    its stages' per-shard commits are equal with and without fusion, and with the light waves grouped into two
    tasks, while the fused run has no task for the record-local work it fused."""
    fused, unfused = runs[variant], runs["unfused"]
    for step in PHASE1:
        a, b = f"{unfused['run']}/{step}", storage.validate_uri(f"{fused['run']}/{step}")
        for kind in ("data", "dropped"):
            ta, tb = shard_tables(a, kind), shard_tables(b, kind)
            assert ta.keys() == tb.keys(), (step, kind)
            for k in ta:
                assert ta[k].equals(tb[k]), f"{step} {kind} shard {k} differs"
        sa, sb = comparable_stats(a), comparable_stats(b)
        assert sa == sb, step
        assert sb["records_in"] == sb["records_kept"] + sum(sb["dropped_by_reason"].values()), step
        for st in step_class(step).stages:
            if st.kind == "reduce":  # committed under the step's plan, by its own task or (folded) by the plan
                mb = read_manifest(step_manifest_uri(stage_dir(b, st.name)))
                assert mb is not None and mb.config_hash == read_manifest(step_manifest_uri(b)).config_hash
                continue
            for k in range(SHARDS):
                ma = read_manifest(shard_manifest_uri(stage_dir(a, st.name), k))
                mb = read_manifest(shard_manifest_uri(stage_dir(b, st.name), k))
                assert ma is not None and mb is not None, (step, st.name, k)
                assert (ma.stats.records_in, ma.stats.records_kept) == (mb.stats.records_in, mb.stats.records_kept)
                assert mb.config_hash == read_manifest(step_manifest_uri(b)).config_hash  # adopted, not prepared
    # The corpus exercised what is compared: several shards, drops in the dedup steps, a selection.
    assert len(shard_tables(f"{fused['run']}/filter", "data")) == SHARDS
    for step in ("exact_dedup", "near_dedup"):
        assert sum(comparable_stats(f"{fused['run']}/{step}")["dropped_by_reason"].values()) > 0, step
    assert comparable_stats(f"{fused['run']}/select")["records_kept"] > 0
    # Fused, pii, decontaminate and route ran in the upstream's shard tasks and have no tasks of their own (the next
    # plan commits them); unfused, each has its plan and shard tasks.
    assert [link.step for link in fused["links"]] == ["filter", "exact_dedup", "near_dedup", "dsir", "select"]
    assert {link.step: [t["step"] for t in link.through] for link in fused["links"] if link.through} == {
        "exact_dedup": ["pii"], "dsir": ["decontaminate", "route"]}
    for step in ("pii", "decontaminate", "route"):
        assert unfused["head_tasks"][step] == SHARDS and fused["head_tasks"][step] == 0, step
    for step in ("exact_dedup", "near_dedup", "dsir", "select"):
        assert fused["head_tasks"][step] == 0 and unfused["head_tasks"][step] == SHARDS, step
    # The reduce stage right after a folded head ran in the plan: no task of its own.
    tasks = {link.step: link.stage_tasks() for link in fused["links"]}
    assert tasks["dsir"] == [] and tasks["select"][0] == "boundary", tasks
    assert {link.step: link.stage_tasks() for link in unfused["links"]}["dsir"] == ["counts", "fit"]
    # ... and each plan committed what they prepared (none ran in a plan: that is the slow fallback).
    for step in PHASE1[1:]:
        assert fused["prepared"][step] == SHARDS and unfused["prepared"][step] == 0, step


def test_grouped_waves_run_in_as_many_tasks_as_slots(runs: dict[str, Any]) -> None:
    """Grouped, each light wave over 5 shards ran 2 tasks (shards 0, 2, 4 and 1, 3); heavy waves one per shard."""
    tasks = runs["grouped"]["tasks"]
    light = {f"{s}.{st.name}" for s in PHASE1 for st in step_class(s).stages if st.grouped} | {"select.run"}
    assert {k for k, n in tasks.items() if n == 2} == light & set(tasks)
    assert {"exact_dedup.resolve", "near_dedup.pairs", "select.boundary", "select.run"} <= light & set(tasks)
    assert all(n == SHARDS for k, n in tasks.items() if k not in light and n)
    assert runs["fused"]["tasks"]["select.run"] == SHARDS


def test_a_grouped_task_number_outside_its_wave_is_refused(runs: dict[str, Any]) -> None:
    """Task 2 of a wave of 2 does not exist (exit 2), and neither does a wave of 0 slots."""
    link = runs["grouped"]["links"][-1]
    common: dict[str, Any] = {"output": link.output, "config": link.config}
    assert cli_main(step_arguments("stage", "select", stage="boundary", shard=2, of=2, **common)) == 2
    assert cli_main(step_arguments("run", "select", shard=0, of=0, **common)) == 2


def test_every_chain_step_has_the_heads_shard_count(runs: dict[str, Any]) -> None:
    """Aligned planning: each step after the first plans one shard per upstream shard, so a fused task's shard k
    is every step's shard k (even where a step's output got much smaller than its input)."""
    from operators.core.runner import load_plan

    for step in PHASE1:
        plan = load_plan(f"{runs['fused']['run']}/{step}")
        assert len(plan.shards) == SHARDS, step


def test_bad_fusion_arguments_are_refused_before_any_work(tmp_path: Path) -> None:
    """`run --then` validates its steps, configs and outputs, and needs a shard; `plan --fold-head` needs
    `--after`: each refused with exit code 2 and nothing written."""
    out = str(tmp_path / "filter")
    cfg = ["--config", "{}", "--input", str(tmp_path), "--output", out]
    then = json.dumps([{"step": "pii", "config": {}, "output": str(tmp_path / "pii")}])
    assert cli_main(["run", "filter", *cfg, "--then", then]) == 2  # no --shard
    assert cli_main(["run", "filter", *cfg, "--shard", "0", "--then", "{not json"]) == 2
    assert cli_main(["run", "filter", *cfg, "--shard", "0", "--then", '{"step": "pii"}']) == 2  # not a list
    bad = json.dumps([{"step": "pii", "config": {"no_such_field": 1}, "output": str(tmp_path / "pii")}])
    assert cli_main(["run", "filter", *cfg, "--shard", "0", "--then", bad]) == 2
    assert cli_main(["plan", "filter", *cfg, "--fold-head"]) == 2
    assert not (tmp_path / "filter").exists() and not (tmp_path / "pii").exists()


def test_a_step_committed_on_the_way_runs_what_was_not_prepared(tmp_path: Path) -> None:
    """`plan --through`: when the upstream is up to date and only the stage-less step between changed (pii's
    actions), the upstream's shard tasks do not run, so the next plan runs every pii shard itself; pii is
    then committed under its new config, equal to pii run on its own, with its ledger."""
    from operators.cli import build_step
    from operators.core.runner import read_step_table, run_all

    write_instruction_corpus(tmp_path / "raw", 300, n_files=3, seed=11)
    ingest = str(tmp_path / "ingest")
    cli(["run", "ingest", "--config", json.dumps({"source_name": "bench", "target_shard_bytes": 1}),
         "--input", str(tmp_path / "raw"), "--output", ingest])
    run = str(tmp_path / "run")
    steps = ("filter", "pii", "exact_dedup")
    common = {"target_shard_bytes": 1, "shard_multiple": 3}
    run_chain(chain_steps(steps, configs=CONFIGS, inputs=[ingest], run=run, common=common))
    before = read_manifest(step_manifest_uri(storage.validate_uri(f"{run}/pii")))
    configs = {**CONFIGS, "pii": {"actions": {"email": "drop"}}}
    link = chain_steps(steps, configs=configs, inputs=[ingest], run=run, common=common)[1]
    assert link.step == "exact_dedup" and [t["step"] for t in link.through] == ["pii"]
    plan = cli(step_arguments("plan", link.step, inputs=link.inputs, after=link.after, fold_head=link.fold_head,
                              through=link.through, output=link.output, config=link.config))
    assert [(t["step"], t["prepared"], t["ran_here"]) for t in plan["through"]] == [("pii", 0, 3)]
    alone = str(tmp_path / "pii_alone")
    run_all(build_step("pii", link.through[0]["config"]), [f"{run}/filter"], alone)
    after = read_manifest(step_manifest_uri(storage.validate_uri(f"{run}/pii")))
    assert before is not None and after is not None and after.config_hash != before.config_hash
    stats = comparable_stats(f"{run}/pii")
    assert stats == comparable_stats(alone) and stats["records_in"] > 0
    for kind in ("data", "dropped"):
        assert read_step_table(f"{run}/pii", kind).equals(read_step_table(alone, kind)), kind


def test_bad_through_arguments_are_refused_before_any_work(tmp_path: Path) -> None:
    """`plan --through` needs `--after`, takes only stage-less steps, and each must read the one before it and
    the planned step the last one's output: each refused with exit code 2, nothing written."""
    up, pii, out = (str(tmp_path / s) for s in ("filter", "pii", "exact_dedup"))
    piece = {"step": "pii", "config": {}, "input": up, "output": pii}
    plan = ["plan", "exact_dedup", "--config", "{}", "--input", pii, "--output", out]
    assert cli_main([*plan, "--through", json.dumps([piece])]) == 2  # no --after
    after = [*plan, "--after", "filter", "--through"]
    assert cli_main([*after, json.dumps([{**piece, "step": "near_dedup"}])]) == 2  # has stages
    assert cli_main([*after, json.dumps([piece, {**piece, "step": "route", "input": up}])]) == 2  # a gap
    assert cli_main([*after, json.dumps([{**piece, "output": str(tmp_path / "elsewhere")}])]) == 2  # not the input
    assert cli_main([*after, json.dumps([{**piece, "config": {"actions": {"nope": "drop"}}}])]) == 2
    assert not any(tmp_path.iterdir())
