"""Drift review: the seeded stratified sample, the versioned marks files, the statistics and the gate, the plugin's
auth (Airflow's own auth manager and tokens, roles of its simple auth manager), the report's section, and the
stronger judge's routing in evolve with the real packaged model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from operators.core import storage
from operators.core.runner import read_step_table
from operators.orchestration.stronger_judge import validator_config
from operators.review import marks, sample, stats
from operators.steps.synth.evolve import EvolveConfig, EvolveStep, ValidatorConfig, strategy_for
from tests.conftest import ROOT, migrated_airflow
from tests.review_fixture import synthesis_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthesis run folder: 40 seeds x 2 rounds of evolved instructions, committed by the real runner."""
    return synthesis_run(tmp_path_factory.mktemp("review") / "run")


# -- sampling -----------------------------------------------------------------------------------------------
def test_allocation_is_proportional_with_one_per_stratum() -> None:
    sizes = {("a", 1): 50, ("b", 1): 30, ("c", 1): 15, ("d", 1): 5}
    assert sample.allocate(sizes, 20) == {("a", 1): 10, ("b", 1): 6, ("c", 1): 3, ("d", 1): 1}
    tiny = sample.allocate({("a", 1): 98, ("b", 1): 1, ("c", 1): 1}, 10)
    assert tiny[("b", 1)] == tiny[("c", 1)] == 1 and sum(tiny.values()) == 10  # small strata are not left out
    assert sample.allocate(sizes, 1000) == sizes  # a sample larger than the population takes it all


def test_sample_is_seeded_stratified_and_deterministic(run: Path) -> None:
    a = sample.build_sample(str(run), n=20, seed=0)
    b = sample.build_sample(str(run), n=20, seed=0)
    other = sample.build_sample(str(run), n=20, seed=1)
    assert [i["id"] for i in a["items"]] == [i["id"] for i in b["items"]]  # same data, same seed: same sample
    assert {i["id"] for i in a["items"]} != {i["id"] for i in other["items"]}  # the seed changes the draw
    assert len(a["items"]) == 20 and len({i["id"] for i in a["items"]}) == 20
    population = {(s["strategy"], s["round"]): s["population"] for s in a["strata"]}
    assert sum(population.values()) == 80  # 40 seeds x 2 rounds, every kept candidate
    per = {(s["strategy"], s["round"]): s["sampled"] for s in a["strata"]}
    assert per == sample.allocate(population, 20)  # each stratum got its share ...
    got: dict[tuple[str, int], int] = {}
    for i in a["items"]:
        got[(i["strategy"], i["round"])] = got.get((i["strategy"], i["round"]), 0) + 1
    assert got == {k: v for k, v in per.items() if v}  # ... and the items carry their stratum
    evolved = {r["id"]: r for r in read_step_table(str(run / "evolve_r1")).to_pylist()}
    for i in a["items"]:  # each item beside its seed (and, from round 2, the version it came from)
        row = evolved[i["id"]]
        assert i["evolved"] == row["conversations"][0]["value"] and i["strategy"] == row["lineage"]["strategy"]
        assert i["seed"].startswith(f"Question {int(i['seed_id'][4:])}: explain")
        assert i["evolved"].startswith(i["seed"])
        assert ("parent" in i) == (i["round"] == 2)


# -- marks --------------------------------------------------------------------------------------------------
def test_marks_persist_versioned_per_reviewer_and_are_validated(tmp_path: Path, run: Path) -> None:
    folder = tmp_path / "r"
    synthesis_run(folder, seeds=10, rounds=1)
    s = sample.load_or_create(str(folder), n=6, seed=0)
    assert sample.load_or_create(str(folder), n=99, seed=5) == s  # one sample per run, drawn once
    ids = [i["id"] for i in s["items"]]
    marks.set_mark(str(folder), s, "alice", ids[0], "drifted", "  a different task  ")
    doc = marks.set_mark(str(folder), s, "alice", ids[1], "faithful")
    assert doc["format"] == marks.FORMAT and doc["revision"] == 2 and doc["reviewer"] == "alice"
    doc = marks.set_mark(str(folder), s, "alice", ids[0], "unsafe")  # a second mark replaces the first
    assert doc["revision"] == 3 and doc["marks"][ids[0]]["mark"] == "unsafe"
    assert doc["marks"][ids[0]]["comment"] == ""
    marks.set_mark(str(folder), s, "bob", ids[0], "skip")
    again = marks.read_marks(str(folder), "alice")  # a reviewer who comes back finds their marks
    assert again["marks"] == doc["marks"] and again["revision"] == 3
    assert set(marks.all_marks(str(folder))) == {"alice", "bob"}
    assert json.loads((folder / "review" / "marks" / "bob.json").read_text())["marks"][ids[0]]["mark"] == "skip"
    for item, mark, comment in [(ids[0], "meh", ""), ("not-in-sample", "faithful", ""),
                                (ids[0], "faithful", "x" * (marks.MAX_COMMENT + 1))]:
        with pytest.raises(marks.MarkError):
            marks.set_mark(str(folder), s, "alice", item, mark, comment)
    with pytest.raises(marks.MarkError):  # "a b" and "a_b" share a file name: the second may not write into it
        marks.set_mark(str(folder), s, "a b", ids[0], "faithful")
        marks.set_mark(str(folder), s, "a_b", ids[0], "faithful")
    assert marks.read_marks(str(folder), "alice")["revision"] == 3  # refused marks wrote nothing


def test_concurrent_marks_of_one_reviewer_are_all_kept(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    synthesis_run(folder, seeds=12, rounds=1)
    s = sample.load_or_create(str(folder), n=12)
    ids = [i["id"] for i in s["items"]]
    threads = [threading.Thread(target=marks.set_mark, args=(str(folder), s, "alice", i, "faithful")) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc = marks.read_marks(str(folder), "alice")  # two tabs saving at once: compare-and-swap loses none
    assert set(doc["marks"]) == set(ids) and doc["revision"] == len(ids)


# -- statistics ---------------------------------------------------------------------------------------------
def test_wilson_interval_on_known_values() -> None:
    lo, hi = stats.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = stats.wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = stats.wilson(1, 20)
    assert (lo, hi) == (pytest.approx(0.0089, abs=1e-4), pytest.approx(0.2361, abs=1e-4))
    assert stats.wilson(0, 0) == (0.0, 1.0)


def test_cohen_kappa_on_known_values() -> None:
    # 50 items: both "yes" 20, both "no" 15, a yes/b no 5, a no/b yes 10 -> po 0.70, pe 0.50, kappa 0.40
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert stats.cohen_kappa(a, b) == pytest.approx(0.4)
    assert stats.cohen_kappa(["x", "y"], ["x", "y"]) == pytest.approx(1.0)
    assert stats.cohen_kappa(["x", "x"], ["x", "x"]) is None and stats.cohen_kappa([], []) is None


def _fixed_sample() -> dict[str, Any]:
    items = [{"id": f"d{k}", "strategy": "deepening", "round": 1} for k in range(10)]
    items += [{"id": f"b{k}", "strategy": "breadth", "round": 2} for k in range(10)]
    return {"gate": 0.05, "items": items, "strata": [{"strategy": "deepening", "round": 1, "population": 500},
                                                     {"strategy": "breadth", "round": 2, "population": 300}]}


def test_error_rates_intervals_agreement_and_gate() -> None:
    s = _fixed_sample()
    a = {f"d{k}": {"mark": "faithful"} for k in range(10)} | {f"b{k}": {"mark": "faithful"} for k in range(8)}
    a |= {"b8": {"mark": "drifted"}, "b9": {"mark": "factual_error"}}
    b = {f"d{k}": {"mark": "faithful"} for k in range(9)} | {"d9": {"mark": "skip"}}
    b |= {"b0": {"mark": "unsafe"}, "b8": {"mark": "drifted"}, "b9": {"mark": "faithful"}}
    out = stats.summarize(s, {"alice": a, "bob": b})
    rows = {(r["strategy"], r["round"]): r for r in out["strata"]}
    # breadth: b8 (both drifted), b9 (1 of 2 says error: a tie counts), b0 (1 of 2) -> 3 of 10
    br = rows[("breadth", 2)]
    assert (br["errors"], br["reviewed"], br["rate"], br["population"]) == (3, 10, 0.3, 300)
    assert (br["ci_low"], br["ci_high"]) == (pytest.approx(0.1078, abs=1e-4), pytest.approx(0.6032, abs=1e-4))
    assert br["kinds"] == {"drifted": 1, "factual_error": 1, "unsafe": 1}
    assert (rows[("deepening", 1)]["errors"], rows[("deepening", 1)]["reviewed"]) == (0, 10)  # d9: alice's mark
    assert out["failing_strategies"] == ["breadth"] and out["needs_stronger_validator"]
    assert out["overall"]["errors"] == 3 and out["overall"]["reviewed"] == 20
    assert out["reviewers"] == {"alice": 20, "bob": 13}
    agree = out["agreement"]  # on the 12 items both marked (not skip): 10 the same
    assert agree["pairs"][0]["items"] == 12 and agree["percent"] == pytest.approx(10 / 12, abs=1e-4)
    assert agree["kappa"] == pytest.approx(stats.cohen_kappa(
        ["faithful"] * 9 + ["faithful", "drifted", "factual_error"],
        ["faithful"] * 9 + ["unsafe", "drifted", "faithful"]), abs=1e-4)
    assert not stats.summarize(s, {"alice": a}, gate=0.35)["needs_stronger_validator"]  # a looser gate passes
    assert stats.summarize(s, {"alice": a})["agreement"] is None  # one reviewer: no agreement to show


def test_report_shows_the_drift_review_and_the_gate(tmp_path: Path) -> None:
    from operators.report import write_report

    folder = synthesis_run(tmp_path / "run", seeds=20, rounds=2)
    s = sample.load_or_create(str(folder), n=10, seed=0, gate=0.05)
    for k, item in enumerate(s["items"]):
        marks.set_mark(str(folder), s, "alice", item["id"], "drifted" if k < 2 else "faithful")
        marks.set_mark(str(folder), s, "bob", item["id"], "faithful")
    out = write_report(str(folder))
    report = json.loads(storage.read_bytes(out["json"]))
    review = report["phase2"]["drift_review"]
    assert review["reviewed"] == 10 and review["overall"]["errors"] == 2  # 1 of 2 reviewers: a tie, an error
    assert review["needs_stronger_validator"] and review["agreement"]["percent"] == 0.8
    page = storage.read_bytes(out["html"]).decode()
    section = page[page.index("id='drift-review'"):]
    assert "Needs a stronger validator" in section and "Drift review: error rate per strategy and round" in section
    assert "95% CI" in section and "Cohen's kappa" in section and "alice (10)" in section


# -- the stronger judge ---------------------------------------------------------------------------------------
def test_stronger_judge_param_resolves_strategies_from_a_reviewed_run(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIP_DATA_ROOT", str(tmp_path / "data"))
    folder = synthesis_run(tmp_path / "data" / "runs" / "night1", seeds=20, rounds=1)
    s = sample.load_or_create(str(folder), n=20)
    bad = s["items"][0]["strategy"]
    for item in s["items"]:
        marks.set_mark(str(folder), s, "alice", item["id"], "drifted" if item["strategy"] == bad else "faithful")
    assert validator_config({}) is None
    cfg = validator_config({"llm": {"model": "strong"}, "from_run": "night1", "strategies": ["deepening"]})
    assert cfg is not None and cfg["review_run"] == storage.validate_uri(str(folder))
    step = EvolveStep(EvolveConfig(validator=ValidatorConfig.model_validate(cfg)))
    assert step.validated == {bad, "deepening"}  # the listed strategy and the one the review failed
    assert stats.failing_strategies(str(folder)) == [bad]
    with pytest.raises(ValueError, match="unknown keys"):
        validator_config({"model": "x"})


def test_stronger_judge_judges_only_the_chosen_strategies_with_its_own_model(tmp_path: Path) -> None:
    """Real packaged model: the evolver, and the validator under another name (its converted folder), so it is
    another model config with its own client, cache and counters."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.core.runner import run_all
    from operators.llm.base import LLMConfig
    from operators.llm.models import DEFAULT_MODEL, resolve_model
    from operators.schema import CANONICAL_SCHEMA
    from tests.review_fixture import seed_rows

    seeds = seed_rows(3)
    (tmp_path / "seeds").mkdir()
    pq.write_table(pa.Table.from_pylist(seeds, schema=CANONICAL_SCHEMA), tmp_path / "seeds" / "s.parquet")
    strategies = [strategy_for(s["id"], 1, EvolveConfig().strategies, 0) for s in seeds]
    chosen = sorted({strategies[0], strategies[2]})  # not seed 1's strategy
    assert strategies[1] not in chosen
    strong = LLMConfig(model=resolve_model(DEFAULT_MODEL), batch_size=8, max_model_len=1024)
    cfg = EvolveConfig(llm=LLMConfig(batch_size=8, max_model_len=1024), max_tokens=24, rounds=1,
                       validator=ValidatorConfig(llm=strong, strategies=chosen))
    m = run_all(EvolveStep(cfg), [str(tmp_path / "seeds")], str(tmp_path / "evolve"))
    c = m.stats.counters
    judged = {k.rsplit(".", 1)[1]: v for k, v in c.items() if k.startswith("validator.judged.")}
    assert set(judged) <= set(chosen)  # only the chosen strategies went to the stronger judge ...
    rows = read_step_table(str(tmp_path / "evolve")).to_pylist()
    dropped = read_step_table(str(tmp_path / "evolve"), "dropped").to_pylist()
    passed = [r for r in rows if r["lineage"]["strategy"] in chosen]
    passed += [r for r in dropped if r["reason"] == "drifted"]
    assert passed, "no chosen strategy's evolution passed elimination: the routing check would be vacuous"
    assert sum(judged.values()) == len(passed)  # ... every one of them that passed elimination
    assert c["llm.validator.requests"] >= len(passed)  # on the validator's own client and model
    assert c["llm.requests"] == len(seeds)  # the evolver asked once per seed, and only that
    assert all(r["lineage"]["strategy"] in chosen for r in dropped if r["reason"] == "drifted")


# -- the plugin: auth by Airflow's auth manager ---------------------------------------------------------------
RUN_ID = "manual__2026-12-01T10:00:00+00:00"
BASE = f"/runs/conversational_synthesis/{RUN_ID}"
PROBE = """
import importlib.util, json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import create_auth_manager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
am = create_auth_manager()
tokens = {name: am.generate_jwt(SimpleAuthManagerUser(username=name, role=role))
          for name, role in (("ed", "user"), ("ada", "admin"), ("rita", "viewer"))}
spec = importlib.util.spec_from_file_location("iip_review", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
client = TestClient(mod.create_app())
sample_file = Path(sys.argv[3])
out = []
for method, path, who, body, ctype in json.loads(sys.argv[2]):
    if isinstance(body, dict) and body.get("item") == "$FIRST":
        body["item"] = json.loads(sample_file.read_text())["items"][0]["id"]
    headers = {"Content-Type": ctype} if ctype else {}
    if who != "none": headers["Authorization"] = "Bearer " + tokens[who]
    data = json.dumps(body) if ctype == "application/json" else (None if body is None else str(body))
    r = client.request(method, path, headers=headers, content=data)
    out.append({"status": r.status_code, "text": r.text, "sample": sample_file.exists()})
print("PROBE " + json.dumps(out))
"""
J = "application/json"
REQUESTS: list[tuple[str, str, str, Any, str]] = [
    ("GET", BASE, "none", None, ""),                                       # 0 anonymous
    ("GET", BASE, "rita", None, ""),                                       # 1 a reader first: no sample drawn
    ("GET", BASE, "ed", None, ""),                                         # 2 an editor: draws the sample
    ("POST", BASE + "/marks", "rita", {"item": "$FIRST", "mark": "drifted"}, J),       # 3 reader may not write
    ("POST", BASE + "/marks", "none", {"item": "$FIRST", "mark": "drifted"}, J),       # 4 anonymous
    ("POST", BASE + "/marks", "ed", {"item": "$FIRST", "mark": "drifted", "comment": "off topic",
                                     "reviewer": "mallory"}, J),           # 5 editor writes (as ed, not mallory)
    ("POST", BASE + "/marks", "ed", {"item": "$FIRST", "mark": "wrong"}, J),           # 6 bad mark
    ("POST", BASE + "/marks", "ed", {"item": "nope", "mark": "faithful"}, J),          # 7 item not in sample
    ("POST", BASE + "/marks", "ed", {"item": "$FIRST", "mark": "faithful", "comment": "x" * 1001}, J),  # 8
    ("POST", BASE + "/marks", "ed", "item=x&mark=faithful", "application/x-www-form-urlencoded"),  # 9 a form
    ("POST", BASE + "/marks", "ada", {"item": "$FIRST", "mark": "faithful"}, J),       # 10 a second reviewer
    ("GET", BASE, "rita", None, ""),                                       # 11 the reader sees the results
    ("GET", BASE + "/summary.json", "rita", None, ""),                     # 12
    ("GET", BASE, "ed", None, ""),                                         # 13 ed comes back
    ("GET", "/runs/conversational_synthesis/..%2F..%2Fetc", "ed", None, ""),  # 14 out of the root
]


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    env, data = migrated_airflow(tmp_path_factory)
    folder = synthesis_run(data / "runs" / RUN_ID.replace(":", "_").replace("+", "_"), seeds=12, rounds=1)
    r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "plugins" / "iip_review.py"), json.dumps(REQUESTS),
                        str(folder / "review" / "sample.json")],
                       env={**env, "IIP_DATA_ROOT": str(data)}, capture_output=True, text=True, timeout=300, cwd=ROOT)
    line = next((x for x in r.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line is not None, r.stderr[-3000:]
    out: list[dict[str, Any]] = json.loads(line[len("PROBE "):])
    out.append({"folder": str(folder)})
    return out


def test_only_editors_write_readers_read(answers: list[dict[str, Any]]) -> None:
    assert answers[0]["status"] == 401 and answers[4]["status"] == 401  # anonymous: neither read nor write
    assert answers[1]["status"] == 200 and "No drift review yet" in answers[1]["text"] and not answers[1]["sample"]
    assert answers[2]["status"] == 200 and answers[2]["sample"] and "0 / 12 marked" in answers[2]["text"]
    assert answers[3]["status"] == 403  # a reader may not mark
    assert answers[5]["status"] == 200, answers[5]["text"]
    saved = json.loads(answers[5]["text"])
    assert saved["progress"] == "1 / 12 marked" and saved["saved"]["mark"] == "drifted"
    folder = Path(answers[-1]["folder"])
    assert sorted(p.name for p in (folder / "review" / "marks").glob("*.json")) == ["ada.json", "ed.json"]
    assert json.loads((folder / "review" / "marks" / "ed.json").read_text())["reviewer"] == "ed"  # not "mallory"
    for k in (6, 7, 8):
        assert answers[k]["status"] == 422, answers[k]
    assert answers[9]["status"] in (415, 422)  # not JSON: a cross-site form cannot mark
    assert answers[10]["status"] == 200
    page = answers[11]["text"]  # the reader: results, read only, no buttons to press
    assert answers[11]["status"] == 200 and "Read only" in page and "disabled" in page
    assert "ada (1)" in page and "ed (1)" in page and "Agreement between reviewers: 0.0%" in page
    summary = json.loads(answers[12]["text"])
    assert summary["reviewers"] == {"ada": 1, "ed": 1} and summary["overall"]["errors"] == 1
    back = answers[13]["text"]  # ed comes back: their mark is there, unmarked items first
    assert "1 / 12 marked" in back and back.index("id='todo'") < back.index("id='done'")
    done = back[back.index("id='done'"):]
    assert "data-mark='drifted'" in done and "off topic" in done
    assert answers[14]["status"] in (400, 404) or "No drift review yet" in answers[14]["text"]
