"""decontaminate_paraphrase: a human turn that rephrases a benchmark prompt is dropped as contamination (no
n-gram in common), with a JSON detail the report can show; vectors are cached; the LLM judge's verdict decides
when it is on. Real encoder (all-MiniLM-L6-v2 wheel) and real judge (SmolLM2-135M on CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators.cli import build_step
from operators.core.runner import read_step_table, run_all
from operators.schema import CANONICAL_SCHEMA
from operators.steps.decontam.index import ContaminationIndex

BENCHMARK = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
    "clips did Natalia sell altogether in April and May?",
    "Write a function to find the shared elements from the given two lists.",
    "What is the embryological origin of the hyoid bone?",
]
REPHRASED = {
    "r0": "In April a girl called Natalia managed to sell hair clips to forty-eight friends; in May she sold only "
          "half that number. What is the total number of clips she sold over the two months?",
    "r1": "Given two lists, write a function that returns the elements they have in common.",
}
CLEAN = {
    "c0": "Give me a recipe for banana bread with walnuts and a crunchy top.",
    "c1": "How does TCP congestion control react when a packet is lost?",
    "c2": "thanks!",  # too short to check
}


def rec(rid: str, prompt: str) -> dict[str, Any]:
    return {"id": rid, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "Sure."}],
            "label": None, "langdetect": "en", "source": "s", "reward": None, "origin": None}


def setup(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in BENCHMARK))
    src = tmp_path / "in.parquet"
    rows = [rec(k, v) for k, v in {**REPHRASED, **CLEAN}.items()]
    pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), src)
    return str(src), {"benchmarks": [{"name": "mixed", "uri": str(bench), "format": "jsonl:prompt"}],
                      "threshold": 0.7}


def test_rephrasings_that_no_ngram_catches_are_dropped_with_a_detail(tmp_path: Path) -> None:
    src, cfg = setup(tmp_path)
    index = ContaminationIndex(n=13)
    index.add("mixed", BENCHMARK)
    index.prepare()
    assert all(m is None for m in index.match_many(list(REPHRASED.values())))  # n-grams see nothing
    out = tmp_path / "out"
    m = run_all(build_step("decontaminate_paraphrase", cfg), [src], str(out))
    s = m.stats
    assert s.records_in == 5 == s.records_kept + sum(s.dropped_by_reason.values())
    assert s.dropped_by_reason == {"contamination": 2}
    assert s.counters["turns_checked"] == 4  # "thanks!" is too short to check
    dropped = {r["id"]: json.loads(r["detail"]) for r in read_step_table(str(out), "dropped").to_pylist()}
    assert set(dropped) == set(REPHRASED)
    assert dropped["r0"]["item"] == 0 and dropped["r1"]["item"] == 1
    for d in dropped.values():
        assert d["match"] == "paraphrase" and d["verdict"] is None and d["similarity"] >= 0.7
        assert d["benchmark"] == "mixed" and d["benchmark_prompt"] in BENCHMARK and d["turn"] == 0
    # A second run with another threshold embeds nothing: records and benchmark prompts come from the cache.
    m = run_all(build_step("decontaminate_paraphrase", {**cfg, "threshold": 0.99}), [src], str(out))
    assert m.stats.counters["embedded"] == 0 and m.stats.counters["cache_hits"] == 4
    assert m.stats.dropped_by_reason == {}
    assert any(p.name.startswith("bench-") for p in (out / "_embed_cache").iterdir())


def test_with_the_judge_on_its_verdict_decides_and_is_cached(tmp_path: Path) -> None:
    src, cfg = setup(tmp_path)
    cfg = {**cfg, "judge": {"enabled": True, "floor": 0.5}, "top_k": 1, "max_tokens": 8}
    out = tmp_path / "out"
    m = run_all(build_step("decontaminate_paraphrase", cfg), [src], str(out))
    c = m.stats.counters
    asked = c["judge.asked"]
    assert asked >= 2  # at least the two rephrasings are above the floor
    assert c.get("judge.failed", 0) < asked  # the small model's "1" and "yes" are read as verdicts
    assert c.get("judge.yes", 0) + c.get("judge.no", 0) + c.get("judge.failed", 0) == asked
    dropped = [json.loads(r["detail"]) for r in read_step_table(str(out), "dropped").to_pylist()]
    assert len(dropped) == c.get("judge.yes", 0)  # top_k 1: one pair per record, a yes drops it
    assert all(d["verdict"] is True for d in dropped)  # nothing is dropped without the judge's yes
    rerun = run_all(build_step("decontaminate_paraphrase", {**cfg, "threshold": 0.71}), [src], str(out))
    # The judge's answers (repairs included) are cached beside the step: the re-run asks the model nothing.
    assert rerun.stats.counters["llm.cache_hits"] == c["llm.requests"] and \
        rerun.stats.counters.get("llm.backend_requests", 0) == 0
    assert rerun.stats.dropped_by_reason == m.stats.dropped_by_reason


def test_a_rephrasing_after_a_long_preamble_is_found_in_a_window(tmp_path: Path) -> None:
    """The encoder reads a turn's first 128 tokens and averages them: a benchmark item pasted after a preamble
    scores low as a whole turn; the turn's windows find it."""
    from operators.steps.decontam.paraphrase import turn_windows

    preamble = ("I have been preparing for a maths olympiad with my study group for several weeks now, and we "
                "keep collecting practice questions from old worksheets, library books and friends. ") * 4
    src, cfg = setup(tmp_path)
    long_turn = preamble + REPHRASED["r0"]
    assert len(turn_windows(long_turn, 600)) > 2 and turn_windows("short", 600) == ["short"]
    pq.write_table(pa.Table.from_pylist([rec("long", long_turn)], schema=CANONICAL_SCHEMA), src)
    whole = run_all(build_step("decontaminate_paraphrase", {**cfg, "window_chars": 8192}), [src],
                    str(tmp_path / "whole"))
    assert whole.stats.dropped_by_reason == {}  # read as one turn, the item is drowned out
    m = run_all(build_step("decontaminate_paraphrase", cfg), [src], str(tmp_path / "windows"))
    assert m.stats.dropped_by_reason == {"contamination": 1}
    (d,) = [json.loads(r["detail"]) for r in read_step_table(str(tmp_path / "windows"), "dropped").to_pylist()]
    assert d["item"] == 0 and d["match"] == "paraphrase" and d["similarity"] >= cfg["threshold"]
