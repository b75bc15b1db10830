"""The selection ablation (issue #23): DSIR against a random selection of the same size per domain from the same
pool, stage 1 trained on each, and the reports that set them side by side. The DAG runs are in tests/test_dags.py
(foundational_selection with `selection_ablation`) and tests/test_train_stages.py (`ablation_foundational`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators.cli import build_step
from operators.core import storage
from operators.core.runner import read_step_table, run_all
from operators.report.collect import selection_section
from operators.report.render import render_html
from operators.train.config import ABLATION_STAGE, TwoStageConfig
from operators.train.evaluate import read_report, write_report
from operators.train.stages import known_stage, stage_job
from tests.conftest import run_cli
from tests.test_select_bounded import SCHEMA, _rows


def _select(tmp_path: Path, name: str, **cfg: Any) -> pa.Table:
    src = tmp_path / "in"
    if not src.exists():
        src.mkdir()
        rng = np.random.default_rng(3)
        rows = _rows(1200, rng.normal(size=1200) * 3, rng)
        for s in range(4):
            pq.write_table(pa.Table.from_pylist(rows[s::4], schema=SCHEMA), src / f"p{s}.parquet")
    out = storage.validate_uri(str(tmp_path / name))
    config = {"budgets": {"math": 0.3, "code": 100}, "replay_fraction": 0.16, "target_shard_bytes": 1, **cfg}
    run_all(build_step("select", config), [str(src)], out)
    kept = read_step_table(out)
    assert kept.num_rows + read_step_table(out, kind="dropped").num_rows == 1200  # the ledger
    return kept


def _per_domain(t: pa.Table) -> Counter[str]:
    return Counter(t["domain"].to_pylist())


def test_random_ranking_selects_the_same_size_per_domain_from_the_same_pool(tmp_path: Path) -> None:
    dsir = _select(tmp_path, "select")
    match = {"ranking": "random", "match_selection": str(tmp_path / "select")}
    rand = _select(tmp_path, "select_random", **match)
    again = _select(tmp_path, "select_random_again", **match)
    other = _select(tmp_path, "select_random_seed1", **match, seed=1)
    assert _per_domain(rand) == _per_domain(dsir) == _per_domain(other)  # as many per domain as DSIR took
    assert set(rand["id"].to_pylist()) != set(dsir["id"].to_pylist())  # but not by the DSIR key
    assert set(again["id"].to_pylist()) == set(rand["id"].to_pylist())  # seeded: the same draw again
    assert set(other["id"].to_pylist()) != set(rand["id"].to_pylist())  # another seed, another draw
    # Random means independent of the key: the DSIR selection's mean key is far above the random one's.
    assert np.mean(dsir["dsir_key"].to_numpy()) > np.mean(rand["dsir_key"].to_numpy()) + 1.0
    # A source cap ranks a source's records by the key too, so at random it leaves other records in each domain's
    # pool: the budgeted domains still get DSIR's counts, and no domain gets more than DSIR's count.
    capped = {"source_caps": {"a": 400}}
    dsir_c = _per_domain(_select(tmp_path, "select_capped", **capped))
    rand_c = _select(tmp_path, "select_random_capped", **capped, ranking="random",
                     match_selection=str(tmp_path / "select_capped"))
    assert Counter(rand_c["source"].to_pylist())["a"] <= 400  # the cap holds
    per = _per_domain(rand_c)
    assert per["math"] == dsir_c["math"] and per["code"] == dsir_c["code"]
    assert all(per[d] <= dsir_c[d] for d in dsir_c)


def test_the_selection_report_shows_the_random_selection_beside_the_run_s(tmp_path: Path) -> None:
    def counters(chosen: dict[str, float], kl: dict[str, float]) -> dict[str, float]:
        return {**{f"decide.pool.{d}": 100.0 for d in chosen}, **{f"decide.chosen.{d}": n for d, n in chosen.items()},
                **{f"kl.kl_selected.{d}": v for d, v in kl.items()},
                **{f"kl.kl_random.{d}": 0.9 for d in kl}, **{f"kl.kl_reduction.{d}": 0.9 - v for d, v in kl.items()}}

    steps = [{"step": "select", "dir": "select", "counters": counters({"math": 30, "code": 50}, {"math": 0.2})},
             {"step": "select", "dir": "select_random", "counters": counters({"math": 30, "code": 50}, {"math": 0.88})}]
    sel = selection_section(steps)
    assert sel["domain_mix"]["math"] == {"before": 100.0, "after": 30}  # the run's own selection, not the ablation
    assert sel["kl"]["math"]["selected"] == 0.2
    rows = {r["domain"]: r for r in sel["ablation"]["rows"]}
    assert sel["ablation"]["main"] == "select" and sel["ablation"]["others"] == ["select_random"]
    assert rows["math"] == {"domain": "math", "pool": 100.0, "selection.chosen": 30, "selection.kl": 0.2,
                            "select_random.chosen": 30, "select_random.kl": 0.88}
    html = render_html({"root": str(tmp_path), "steps": [], "selection": sel})
    assert "Selection ablation: DSIR against random" in html and "select_random: KL to target" in html
    assert "ablation" not in selection_section(steps[:1])  # one selection: no comparison


def _cfg(tmp_path: Path, **kw: object) -> TwoStageConfig:
    return TwoStageConfig.model_validate({"foundational": str(tmp_path / "f"), "conversational": str(tmp_path / "c"),
                                          **kw})


def test_the_ablation_stage_trains_stage1_s_recipe_on_the_other_selection(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, ablation_foundational=str(tmp_path / "r"))
    job, stage1 = stage_job(cfg, ABLATION_STAGE, str(tmp_path / "ft")), stage_job(cfg, "stage1", str(tmp_path / "ft"))
    assert job.init_model == stage1.init_model == cfg.base_model and job.train == stage1.train
    assert [d.uri for d in job.data] == [storage.validate_uri(str(tmp_path / "r"))]
    assert job.output.endswith("/stage1_ablation")
    assert known_stage(cfg, ABLATION_STAGE) and not known_stage(_cfg(tmp_path), ABLATION_STAGE)
    # Without an ablation set the CLI skips the stage (the DAG's mapped task has nothing to expand anyway).
    conf = json.dumps({"foundational": str(tmp_path / "f"), "conversational": str(tmp_path / "c")})
    r = run_cli("train", "--stage", ABLATION_STAGE, "--config", conf, "--output", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["skipped"] is True


def _eval(train_dir: Path, stage: str, loss: float, scores: dict[str, tuple[float, int]], steps: int) -> None:
    (train_dir / stage).mkdir(parents=True, exist_ok=True)
    (train_dir / stage / "eval.json").write_text(json.dumps({
        "stage": stage, "heldout_loss": {"foundational": {"loss": loss}, "conversational": {"loss": loss + 1}},
        "benchmarks": {k: {"score": s, "n": n} for k, (s, n) in scores.items()}, "chat": None}))
    (train_dir / stage / "train_result.json").write_text(json.dumps(
        {"global_step": steps, "first_loss": 3.0, "last_loss": loss}))


def test_the_fine_tune_report_compares_stage1_on_each_selection_and_flags_noise(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, ablation_foundational=str(tmp_path / "r"))
    ft = tmp_path / "ft"
    # gsm8k: 0.60 vs 0.30 over 400 items is beyond two standard errors (2 SE ~ 0.067); mmlu: 0.50 vs 0.48 is not.
    _eval(ft, "stage1", 1.2, {"gsm8k": (0.60, 400), "mmlu": (0.50, 400)}, steps=5)
    _eval(ft, ABLATION_STAGE, 1.4, {"gsm8k": (0.30, 400), "mmlu": (0.48, 400)}, steps=5)
    write_report(str(ft), cfg)
    report = read_report(str(ft))
    assert [r["stage"] for r in report["rows"]] == ["stage1", ABLATION_STAGE]
    metrics = {m["metric"]: m for m in report["ablation"]["metrics"]}
    assert metrics["gsm8k"]["delta"] == 0.3 and metrics["gsm8k"]["noise"] is False
    assert metrics["mmlu"]["noise"] is True and 0.06 < metrics["mmlu"]["two_se"] < 0.08
    assert metrics["heldout_foundational"] == {"metric": "heldout_foundational", "dsir": 1.2, "random": 1.4,
                                               "delta": -0.2, "lower_is_better": True}
    html = render_html({"root": str(tmp_path), "steps": [], "training": {"eval": report}})
    section = html[html.index("id='selection-ablation-eval'"):]
    assert "within noise" in section and "beyond 2 SE" in section
    assert "trained for 5 steps" in section  # a smoke run says its deltas cannot be read
    assert "Selection ablation" in (ft / "eval_report.md").read_text()
    # Without the ablation's evaluation there is nothing to compare.
    (ft / ABLATION_STAGE / "eval.json").unlink()
    write_report(str(ft), cfg)
    assert "ablation" not in read_report(str(ft))


def test_a_matched_count_is_a_count_even_at_one() -> None:
    from operators.steps.select.cutoffs import budget_take, keeps_all
    from operators.steps.select.step import _count_budget

    assert [budget_take(_count_budget(c), 50) for c in (0, 1, 2, 49, 50)] == [0, 1, 2, 49, 50]
    assert not keeps_all(_count_budget(1), 2) and keeps_all(_count_budget(1), 1)
