"""Phase 2 steps: label vocabulary, seed selection, evolution elimination, responses, diagnosis, final set.

Deciding steps are tested on fixtures with known answers; LLM steps run the real packaged CPU model on a
few records with short generations, and every step's ledger is checked through the real runner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.core.manifest import read_manifest, step_manifest_uri
from operators.core.registry import step_class
from operators.core.runner import read_step_table, run_all
from operators.llm.base import LLMConfig
from operators.schema import CANONICAL_SCHEMA
from operators.steps.synth.diagnose import ability_scores, thin_abilities
from operators.steps.synth.evolve import DEPTH, clean_instruction, eliminate, strategy_for
from operators.steps.synth.finalize import conversation_problem
from operators.steps.synth.label_vocab import build_vocab, normalize_label
from operators.steps.synth.respond import target_turns
from operators.steps.synth.seed_select import Band, band_of

TINY = {"llm": LLMConfig(batch_size=8, max_model_len=1024).model_dump(), "max_tokens": 24}


def record(i: int | str, prompt: str, answer: str = "An answer.", abilities: list[str] | None = None,
           tags: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": str(i), "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
            "label": {"ability_en": tags or [], "ability_zh": None, "cate_ability_en": abilities or [],
                      "cate_ability_zh": None},
            "langdetect": "en", "source": "fixture", "reward": None, "origin": None, **extra}


def write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema) if schema is not None else pa.Table.from_pylist(rows)
    pq.write_table(table, path)
    return str(path)


def run(step: str, config: dict[str, Any], inputs: list[str], out: Path) -> Any:
    cls = step_class(step)
    manifest = run_all(cls(cls.config_model.model_validate(config)), inputs, str(out))
    s = manifest.stats
    assert s.records_in == s.records_kept + sum(s.dropped_by_reason.values())  # the ledger
    return manifest


# -- label_vocab -----------------------------------------------------------------------------------------
def test_tag_normalization_and_synonym_merging() -> None:
    assert normalize_label("Solving Equations!") == normalize_label("solving equation")
    counts = {normalize_label(t): c for t, c in [("equation solving", 9), ("solving equations", 2),
                                                  ("poetry writing", 5), ("poetry writings", 1),
                                                  ("sql query", 3), ("graph theory", 1)]}
    canon = build_vocab(counts, 0.88, 1000)
    assert canon[normalize_label("solving equations")] == normalize_label("equation solving")  # word order
    assert canon[normalize_label("poetry writings")] == normalize_label("poetry writing")  # inflection
    assert canon[normalize_label("sql query")] != canon[normalize_label("graph theory")]  # unrelated stay apart


def test_label_vocab_step_writes_canonical_tags_and_rarity(tmp_path: Path) -> None:
    rows = [record(i, f"q{i}", abilities=["mathematical ability"], tags=["Equation solving"]) for i in range(4)]
    rows += [record(10, "q10", abilities=["stem knowledge", "logic and reasoning"], tags=["solving equations",
                                                                                          "Graph Theory"])]
    a = write(tmp_path / "in" / "a.parquet", rows[:3], CANONICAL_SCHEMA)
    b = write(tmp_path / "in" / "b.parquet", rows[3:], CANONICAL_SCHEMA)  # two shards
    m = run("label_vocab", {"target_shard_bytes": 1}, [a, b], tmp_path / "vocab")
    assert m.stats.counters["vocab.raw_tags"] == 3 and m.stats.counters["vocab.canonical_tags"] == 2
    assert m.stats.counters["vocab.merged_away"] == 1
    out = {r["id"]: r for r in read_step_table(str(tmp_path / "vocab")).to_pylist()}
    assert out["10"]["label"]["ability_en"] == ["equation solving", "graph theory"]
    assert out["10"]["label_tags_raw"] == ["solving equations", "Graph Theory"]
    assert out["10"]["tag_min_count"] == 1 and out["0"]["tag_min_count"] == 5  # 4 + the merged synonym
    assert out["10"]["n_abilities"] == 2


# -- seed_select --------------------------------------------------------------------------------------
def scored(i: int, count: int | None, ifd: float | None, n_abilities: int = 1, loss: float = 1.0) -> dict[str, Any]:
    abilities = ["mathematical ability", "logic and reasoning", "stem knowledge"][:n_abilities]
    return record(i, f"prompt {i}", abilities=abilities, tag_min_count=count, ifd=ifd, answer_loss=loss)


def test_band_of() -> None:
    bands = [Band(max_count=3, keep=1.0), Band(max_count=None, keep=0.0)]
    assert [band_of(c, bands) for c in (1, 3, 4, None)] == [0, 0, 1, 1]


def test_seed_selection_keeps_the_long_tail_prefers_multi_ability_and_explains(tmp_path: Path) -> None:
    rows = [scored(i, count=1, ifd=0.5) for i in range(4)]          # rare: eligible
    rows += [scored(10 + i, count=500, ifd=0.5) for i in range(6)]  # frequent: sampled out entirely
    rows += [scored(20, count=2, ifd=1.3)]                           # rare but the instruction doesn't help
    rows += [scored(21, count=2, ifd=0.4, n_abilities=3)]            # rare, multi-ability: ranked first
    rows += [scored(22, count=2, ifd=0.9, n_abilities=2)]            # rare, two abilities: ranked second
    a = write(tmp_path / "in" / "a.parquet", rows[:7])
    b = write(tmp_path / "in" / "b.parquet", rows[7:])
    cfg = {"budget": 4, "bands": [{"max_count": 3, "keep": 1.0}, {"max_count": None, "keep": 0.0}],
           "max_ifd": 1.0, "target_shard_bytes": 1}
    m = run("seed_select", cfg, [a, b], tmp_path / "seeds")
    kept = read_step_table(str(tmp_path / "seeds")).to_pylist()
    ids = [r["id"] for r in kept]
    assert set(ids) >= {"21", "22"} and len(ids) == 4  # exact budget across two shards
    assert m.stats.dropped_by_reason == {"not_long_tail": 6, "ifd_out_of_range": 1, "over_budget": 2}
    why = {r["id"]: r["seed_reason"] for r in kept}
    assert "3 abilities" in why["21"] and "rank 1" in why["21"] and "rank 2" in why["22"]
    dropped = read_step_table(str(tmp_path / "seeds"), "dropped").to_pylist()
    assert {r["id"]: r["reason"] for r in dropped}["20"] == "ifd_out_of_range"

    # Single shard gives the same choice (exact global ranking).
    one = write(tmp_path / "in1" / "all.parquet", rows)
    run("seed_select", {**cfg, "target_shard_bytes": 1 << 30}, [one], tmp_path / "seeds1")
    assert sorted(r["id"] for r in read_step_table(str(tmp_path / "seeds1")).to_pylist()) == sorted(ids)

    # Round 2: only weak abilities, never a seed twice.
    diag = tmp_path / "diag"
    diag.mkdir()
    (diag / "stats.json").write_text(json.dumps({"counters": {
        "score_sum.logic and reasoning.m": 6.0, "score_n.logic and reasoning.m": 2.0,      # mean 3: weak
        "score_sum.mathematical ability.m": 18.0, "score_n.mathematical ability.m": 2.0}}))  # mean 9: fine
    m2 = run("seed_select", {**cfg, "round": 2, "diagnosis_dir": str(diag), "weak_threshold": 6,
                             "exclude_dirs": [str(tmp_path / "seeds")], "budget": 10},
             [a, b], tmp_path / "seeds_r2")
    r2 = read_step_table(str(tmp_path / "seeds_r2")).to_pylist()
    assert not set(ids) & {r["id"] for r in r2}
    assert all("logic and reasoning" in r["label"]["cate_ability_en"] for r in r2)
    assert m2.stats.dropped_by_reason["already_seeded"] == 4
    assert m2.stats.counters["choose.selected"] == len(r2)


def test_ability_scores_are_exact_means() -> None:
    counters = {"score_sum.stem knowledge.a": 14.0, "score_n.stem knowledge.a": 2.0,
                "score_sum.stem knowledge.b": 3.0, "score_n.stem knowledge.b": 1.0, "llm.requests": 9.0}
    assert ability_scores(counters) == {"stem knowledge": {"a": 7.0, "b": 3.0}}


# -- evolve: elimination rules -------------------------------------------------------------------------
PARENT = "Write a function that sorts a list of integers."


@pytest.mark.parametrize("child, reason", [
    ("Write a function that sorts a list of integers.", "no_information_gain"),
    ("write a function that sorts a list of integers!!", "no_information_gain"),
    ("I'm sorry, but I can't help with that request.", "refusal"),
    ("Sort it.", "too_short"),
    ("... ??? !!!", "only_punctuation_or_stopwords"),
    ("What is the of a to?", "only_punctuation_or_stopwords"),
    ("Rewritten Instruction: write a function that sorts integers descending in O(n log n).", "template_copy"),
    ("Write a function that sorts a list of integers in descending order without using built-in sort, "
     "and explain its time complexity.", None),
])
def test_every_elimination_rule(child: str, reason: str | None) -> None:
    verdict = eliminate(PARENT, child, min_words=4, max_jaccard=0.9)
    assert (verdict[0] if verdict else None) == reason


def test_strategies_are_stable_and_all_used() -> None:
    strategies = [*DEPTH, "breadth"]
    picks = {strategy_for(f"id{i}", 1, strategies, 0) for i in range(200)}
    assert picks == set(strategies)
    assert strategy_for("x", 2, strategies, 0) == strategy_for("x", 2, strategies, 0)
    assert clean_instruction('New instruction: "Explain X."') == "Explain X."


def test_evolve_respond_and_final_set_with_the_real_model(tmp_path: Path) -> None:
    seeds = [record("s1", "Write a Python function that returns the largest number in a list.",
                    abilities=["programming and software development"], tags=["list processing"])]
    src = write(tmp_path / "seeds" / "s.parquet", seeds, CANONICAL_SCHEMA)
    m = run("evolve", {**TINY, "rounds": 2}, [src], tmp_path / "evolve")
    assert m.stats.records_in == 2  # 1 seed x 2 rounds of candidates
    allowed = {"no_information_gain", "refusal", "too_short", "only_punctuation_or_stopwords", "template_copy",
               "llm_error"}
    assert set(m.stats.dropped_by_reason) <= allowed
    for kind in ("data", "dropped"):
        for r in read_step_table(str(tmp_path / "evolve"), kind).to_pylist():
            lin = r["lineage"]
            assert lin["root_id"] == "s1" and lin["round"] in (1, 2)
            assert lin["strategy"] in {*DEPTH, "breadth"}
            assert r["label"]["cate_ability_en"]  # labels travel with the lineage
            if lin["round"] == 1:
                assert lin["parent_id"] == lin["root_id"]
    if m.stats.records_kept == 0:  # the tiny model failed every evolution: respond gets a hand-made one
        write(tmp_path / "evolve2" / "e.parquet", [dict(seeds[0], conversations=seeds[0]["conversations"][:1])],
              CANONICAL_SCHEMA)
        evolved = str(tmp_path / "evolve2")
    else:
        evolved = str(tmp_path / "evolve")
    instructions = {r["id"]: r["conversations"][0]["value"] for r in read_step_table(evolved).to_pylist()}
    r = run("respond", {**TINY, "min_turns": 2, "max_turns": 2}, [evolved], tmp_path / "respond")
    assert set(r.stats.dropped_by_reason) <= {"llm_error", "empty_response", "refusal"}
    convs = read_step_table(str(tmp_path / "respond")).to_pylist()
    assert convs, r.stats.dropped_by_reason  # an empty set would make every check below vacuous
    for c in convs:
        turns = c["conversations"]
        assert conversation_problem(turns) is None
        assert turns[0] == {"from": "human", "value": instructions[c["id"]]}  # the evolved instruction, verbatim
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(t["value"].strip() for t in turns)
        assert len(turns) == 4 or (len(turns) == 2 and c["turns_note"])  # two user turns, or it says why not
    f = run("conversational_set", {}, [str(tmp_path / "respond")], tmp_path / "final")
    assert f.stats.records_kept == len(convs) >= 1
    assert sorted(row["id"] for row in read_step_table(str(tmp_path / "final")).to_pylist()) == sorted(
        c["id"] for c in convs)
    for row in read_step_table(str(tmp_path / "final")).to_pylist():
        assert row["source"].startswith("synthesized/") and row["langdetect"]


def test_conversation_checks() -> None:
    h, g = {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}
    assert conversation_problem([h, g, h, g]) is None
    assert conversation_problem([h]) is not None
    assert conversation_problem([h, g, h]) == "does not end with an answer"
    assert conversation_problem([g, h]) is not None
    assert conversation_problem([h, {"from": "gpt", "value": "  "}]) is not None
    assert 2 <= target_turns("abc", 2, 4, 0) <= 4


def test_seed_score_and_diagnose_with_the_real_model(tmp_path: Path) -> None:
    pool = [record("p1", "What is 12 times 12?", "12 times 12 is 144.", abilities=["mathematical ability"]),
            record("p2", "Name the capital of Japan.", "The capital of Japan is Tokyo.",
                   abilities=["open knowledge q&a"]),
            record("p3", "What is 7 plus 5?", "7 plus 5 is 12.", abilities=["mathematical ability"]),
            record("p4", "Say hi.", "", abilities=["open knowledge q&a"]),
            record("p5", "Write hello world in C.", "printf(\"hello world\");", abilities=["code generation"])]
    src = write(tmp_path / "pool" / "p.parquet", pool, CANONICAL_SCHEMA)
    s = run("seed_score", TINY, [src], tmp_path / "scored")
    rows = {r["id"]: r for r in read_step_table(str(tmp_path / "scored")).to_pylist()}
    for i in ("p1", "p2", "p3"):
        assert rows[i]["ifd"] == pytest.approx(rows[i]["answer_loss"] / rows[i]["answer_alone_loss"])
    assert rows["p4"]["ifd"] is None and rows["p4"]["score_note"] == "no answer to score"
    assert s.stats.counters["scored"] == 4

    # min_label_samples 2: code generation has one record in the pool, too thin to judge: not probed, marked.
    d = run("diagnose", {**TINY, "probes_per_ability": 1, "candidates": {"small": TINY["llm"]},
                         "min_label_samples": 2}, [str(tmp_path / "scored")], tmp_path / "diag")
    assert d.stats.records_in == 2  # one probe per ability; the rest of the pool is not read or copied
    assert thin_abilities(d.stats.counters) == {"code generation": 1}
    probes = read_step_table(str(tmp_path / "diag")).to_pylist()
    assert sorted(p["probe_ability"] for p in probes) == ["mathematical ability", "open knowledge q&a"]
    for p in probes:
        (entry,) = p["diagnosis"]
        assert entry["model"] == "small" and entry["answer"]
        assert (entry["score"] is None) == (entry["failure"] is not None)
        if entry["score"] is not None:
            assert 1 <= entry["score"] <= 10
    scores = ability_scores(d.stats.counters)
    judged = sum(p["diagnosis"][0]["score"] is not None for p in probes)
    assert sum(len(v) for v in scores.values()) == judged
    assert read_manifest(step_manifest_uri(str(tmp_path / "diag"))) is not None
