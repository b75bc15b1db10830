"""The replay sweep (issue #23): stage 2 once more per replay ratio, from stage 1's model, nested replay samples,
and the report's trade-off plot. The DAG run of a sweep is in tests/test_train_stages.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from operators.report.render import render_html
from operators.train.config import TwoStageConfig
from operators.train.evaluate import read_report, write_report
from operators.train.stages import model_dir, stage_dir, stage_job, sweep_ratio, sweep_stage
from operators.train.trainer import DataSelection, read_prepared
from tests.conftest import run_cli
from tests.test_train_prep import prepare


def _cfg(tmp_path: Path, **kw: object) -> TwoStageConfig:
    return TwoStageConfig.model_validate({"foundational": str(tmp_path / "f"), "conversational": str(tmp_path / "c"),
                                          **kw})


def test_ratios_are_checked_sorted_and_need_stage1(tmp_path: Path) -> None:
    assert _cfg(tmp_path, replay_ratios=[0.25, 0, 0.1]).replay_ratios == [0, 0.1, 0.25]
    for bad, field in (([0.1, 1.5], r"within \[0, 1\]"), ([0.1, 0.1], "distinct")):
        with pytest.raises(ValidationError, match=field):
            _cfg(tmp_path, replay_ratios=bad)
    with pytest.raises(ValidationError, match="stage 1's model"):
        _cfg(tmp_path, replay_ratios=[0.1], mode="one_stage")


def test_stage_names_round_trip_and_strangers_are_not_sweep_stages() -> None:
    for r in (0.0, 0.1, 0.16, 0.25, 1.0):
        assert sweep_ratio(sweep_stage(r)) == r
    assert sweep_stage(0.16) == "stage2_replay_0.16" and sweep_stage(0) == "stage2_replay_0"
    # Not canonical, out of range, not a number, a path: none is a stage (a stage name becomes a folder).
    for name in ("stage2_replay_0.160", "stage2_replay_1.5", "stage2_replay_x", "stage2_replay_../x", "stage2"):
        assert sweep_ratio(name) is None


def test_a_sweep_stage_trains_stage2_from_stage1_with_its_share_replayed(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, replay_ratios=[0, 0.25], replay_fraction=0.5)
    train_dir = str(tmp_path / "ft")
    job = stage_job(cfg, sweep_stage(0.25), train_dir)
    assert job.init_model == model_dir(train_dir, "stage1") and job.train == cfg.stage2
    assert job.output == stage_dir(train_dir, "stage2_replay_0.25")
    assert [(d.name, d.fraction, d.replay_only) for d in job.data] == [
        ("conversational", 1.0, False), ("foundational_replay", 0.25, False)]  # its ratio, not replay_fraction
    assert [d.name for d in stage_job(cfg, sweep_stage(0), train_dir).data] == ["conversational"]


def test_replay_samples_are_nested_across_ratios(tmp_path: Path) -> None:
    prepared = prepare(tmp_path, "f", 120, heldout=0.0)
    ids = {r: set(read_prepared(DataSelection(name="f", uri=prepared, fraction=r), "train")["id"].to_pylist())
           for r in (0.1, 0.16, 0.25, 0.5, 1.0)}
    sizes = [len(ids[r]) for r in sorted(ids)]
    assert sizes == sorted(sizes) and 0 < sizes[0] < sizes[-1] == 120
    assert ids[0.1] <= ids[0.16] <= ids[0.25] <= ids[0.5] <= ids[1.0]  # a larger ratio's sample holds a smaller's
    assert abs(len(ids[0.25]) - 30) <= 12  # about the share asked for


def test_the_cli_refuses_an_unknown_stage_and_skips_a_ratio_the_config_lacks(tmp_path: Path) -> None:
    conf = json.dumps({"foundational": str(tmp_path / "f"), "conversational": str(tmp_path / "c"),
                       "replay_ratios": [0.1]})
    r = run_cli("train", "--stage", "stage2_replay_x", "--config", conf, "--output", str(tmp_path / "ft"))
    assert r.returncode == 2 and "unknown stage 'stage2_replay_x'" in r.stderr
    r = run_cli("train", "--stage", "stage2_replay_0.5", "--config", conf, "--output", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["skipped"] is True


def _eval(train_dir: Path, stage: str, f: float, c: float) -> None:
    (train_dir / stage).mkdir(parents=True, exist_ok=True)
    (train_dir / stage / "eval.json").write_text(json.dumps({
        "stage": stage, "heldout_loss": {"foundational": {"loss": f}, "conversational": {"loss": c}},
        "benchmarks": {"arithmetic": {"score": 0.5}}, "chat": None}))


def test_the_report_plots_one_point_per_ratio_beside_the_other_stages(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, replay_ratios=[0, 0.1, 0.25], evaluation={"benchmarks": [
        {"name": "arithmetic", "uri": "builtin://arithmetic", "format": "gsm8k", "limit": 1}]})
    ft = tmp_path / "ft"
    for stage, f, c in (("stage1", 1.0, 3.0), ("stage2", 1.6, 2.0), ("stage2_replay_0", 1.9, 1.8),
                        ("stage2_replay_0.1", 1.5, 1.9), ("stage2_replay_0.25", 1.3, 2.1), ("base", 2.5, 3.5)):
        _eval(ft, stage, f, c)
    write_report(str(ft), cfg)
    report = read_report(str(ft))
    assert [r["stage"] for r in report["rows"]] == ["base", "stage1", "stage2", "stage2_replay_0",
                                                    "stage2_replay_0.1", "stage2_replay_0.25"]
    points = {p["stage"]: p for p in report["tradeoff"]["points"]}
    assert [p["replay_ratio"] for p in report["tradeoff"]["points"]] == [None, None, None, 0, 0.1, 0.25]
    assert points["stage2_replay_0.1"] == {
        "stage": "stage2_replay_0.1", "label": "replay 10%", "replay_ratio": 0.1, "heldout_foundational": 1.5,
        "heldout_conversational": 1.9, "foundational_benchmarks": 0.5, "chat": None}
    assert points["stage2"]["label"] == "stage2 (select's replay rows)"
    # The run report's training section draws it: a curve through the sweep, every point labelled, and its table.
    html = render_html({"root": str(ft), "steps": [], "training": {"eval": report}})
    section = html[html.index("id='replay-sweep'"):]
    assert "Replay trade-off" in section and section.count("<circle") == 6
    assert all(label in section for label in ("replay 0%", "replay 10%", "replay 25%", "base model", "stage1"))
    assert "<path d='M" in section  # the three sweep points are joined
    # Without a sweep, no trade-off section.
    write_report(str(ft), _cfg(tmp_path))
    assert "tradeoff" not in read_report(str(ft))
