"""Decontamination: planted exact, edited and embedded benchmark prompts are caught (real benchmark files),
short prompts by containment, generic short prompts do not wipe out a corpus, normalization folds
case/spacing/punctuation/Unicode variants, uninformative n-grams are not indexed, every loader format
reads, the drop detail is the JSON the report reads, and the ledger holds through the runner."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from operators.benchmarks.loaders import PACKAGED_HUMANEVAL, BenchmarkFormatError, load_prompts
from operators.cli import build_step
from operators.core import storage
from operators.core.runner import read_step_table, run_all
from operators.schema import CANONICAL_SCHEMA
from operators.steps.decontam.index import ContaminationIndex, informative
from operators.steps.decontam.step import DecontamConfig, DecontamStep
from operators.text.normalize import match_token_spans, match_tokens, normalize_text
from tests.conftest import SHARED_DATA, require_or_skip

SHARED_BENCHMARKS = [
    ("gsm8k", "gsm8k/test.jsonl", "gsm8k"),
    ("math", "math/test.jsonl", "math"),
    ("mbpp", "mbpp/mbpp.jsonl", "mbpp"),
    ("mmlu", "mmlu/test.jsonl", "mmlu"),
    ("mt_bench", "mt_bench/question.jsonl", "mt_bench"),
]
MT_PROMPT = "Compose an engaging travel blog post about a recent trip to Hawaii."  # 11 words: shorter than n
GENERIC = ["Which of the following is true?", "Neural networks:", "How can we reverse this process?", "Continue",
           "Write a story."]


def rec(q: str, a: str = "Here is a careful answer to that question.", *more: str) -> dict[str, Any]:
    turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    for i, m in enumerate(more):
        turns += [{"from": "human", "value": m}, {"from": "gpt", "value": f"Answer {i}."}]
    return {"id": str(abs(hash((q, a, more)))), "conversations": turns, "label": None, "langdetect": "en",
            "source": "s", "reward": None, "origin": None}


def bench_file(tmp_path: Path, prompts: list[str], name: str = "b") -> dict[str, str]:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"q": p}) + "\n" for p in prompts))
    return {"name": name, "uri": str(path), "format": "jsonl:q"}


def light_edit(text: str, rng: random.Random) -> str:
    """Change case and punctuation and append a request: what a paraphrasing scraper would do."""
    return "Please solve: " + text.upper().replace(",", " ,").replace(".", " . ") + " Show your work."


def run(step: DecontamStep, records: list[dict[str, Any]]) -> tuple[pa.Table, pa.Table]:
    step.bind(None, 0)  # type: ignore[arg-type]  # this step needs no stage artifacts
    res = step.transform(pa.Table.from_pylist(records, schema=CANONICAL_SCHEMA).to_batches()[0])
    assert res.kept.num_rows + res.dropped.num_rows == len(records)
    return res.kept, res.dropped


def details(dropped: pa.Table) -> list[dict[str, Any]]:
    return [json.loads(d) for d in dropped["detail"].to_pylist()]


def test_planted_benchmark_prompts_are_caught() -> None:
    if not (SHARED_DATA / "gsm8k").exists():
        require_or_skip("shared-data", f"benchmark files missing: {SHARED_DATA} (../shared/data of the checkout)")
    rng = random.Random(7)
    cfg = DecontamConfig(benchmarks=[{"name": n, "uri": str(SHARED_DATA / p), "format": f}
                                     for n, p, f in SHARED_BENCHMARKS]
                         + [{"name": "humaneval", "uri": PACKAGED_HUMANEVAL, "format": "humaneval"}])
    planted: list[tuple[str, dict[str, Any]]] = []
    for name, path, fmt in [*SHARED_BENCHMARKS, ("humaneval", PACKAGED_HUMANEVAL, "humaneval")]:
        prompts = load_prompts(str(SHARED_DATA / path) if path != PACKAGED_HUMANEVAL else path, fmt)
        long_ones = [p for p in prompts if len(p.split()) >= 20]
        exact, edited = rng.sample(long_ones, 2)
        planted.append((name, rec(exact)))
        planted.append((name, rec(light_edit(edited, rng))))
        # A short prompt with enough informative words, inside a longer request.
        short = [p for p in prompts if 6 <= len(match_tokens(p)) < 13 and sum(len(t) > 3 for t in match_tokens(p)) >= 4]
        if short:
            planted.append((name, rec(f"I'm revising for an exam.\n\nAlso: {rng.choice(short)} Thanks a lot!")))
    clean = [rec(q) for q in [
        "Write a haiku about the sea at dawn, with a seasonal word.",
        "What are the main differences between TCP and UDP for a video game's networking layer?",
        "Summarize the plot of a detective novel in which the butler is innocent, in five sentences.",
    ]]
    kept, dropped = run(DecontamStep(cfg), [r for _, r in planted] + clean)
    assert kept.num_rows == len(clean)
    assert set(dropped["reason"].to_pylist()) == {"contamination"}
    assert [d["benchmark"] for d in details(dropped)] == [name for name, _ in planted]


def test_short_prompt_containment_and_detail(tmp_path: Path) -> None:
    cfg = DecontamConfig(benchmarks=[bench_file(tmp_path, ["Solve x^2 = 4.", MT_PROMPT], "mt")])
    records = [
        rec("Please help me with this: " + MT_PROMPT),  # polite prefix
        rec(MT_PROMPT + "\nThanks!"),  # suffix
        rec(MT_PROMPT.replace(" ", "  ").lower()),  # doubled spaces, case
        rec("First a question about Python.", "Sure.",
            "My friend flew to Maui last month. Could you compose an engaging travel blog post about a "
            "recent trip to Hawaii? Mention the beaches and the food, and keep it under 500 words."),
        rec("Compose an engaging travel blog post about a recent trip to Iceland."),  # another trip: clean
    ]
    kept, dropped = run(DecontamStep(cfg), records)
    assert kept.num_rows == 1 and kept["conversations"][0][0]["value"].as_py().endswith("Iceland.")
    found = details(dropped)
    assert [(d["match"], d["turn"]) for d in found] == [("containment", 0), ("containment", 0), ("exact", 0),
                                                         ("containment", 2)]
    assert all(d["benchmark"] == "mt" and d["item"] == 1 and d["benchmark_prompt"] == MT_PROMPT for d in found)
    # The matched text is the record's own text (its case and spacing), not the normalized tokens.
    assert found[3]["matched_text"] == "compose an engaging travel blog post about a recent trip to Hawaii"
    assert found[2]["matched_text"] == MT_PROMPT.replace(" ", "  ").lower().rstrip(".")
    # Without short-prompt containment only the normalized exact match is left.
    _, dropped = run(DecontamStep(DecontamConfig(benchmarks=cfg.benchmarks, short_prompts=False)), records)
    assert [d["match"] for d in details(dropped)] == ["exact"]


def test_generic_short_prompts_do_not_wipe_out_a_corpus(tmp_path: Path) -> None:
    corpus = [
        "Which of the following is true? A) cats bark B) dogs meow C) fish swim. Explain your choice.",
        "I have some questions about neural networks and how they learn from data.",
        "Tell me about convolutional neural networks.",
        "Photosynthesis turns light into sugar. How can we reverse this process in a fuel cell, and at what cost?",
        "Continue the story from where the dragon lands on the castle tower.",
        "Write a story about a lighthouse keeper who finds a message in a bottle from the future.",
        "Please continue.",
    ]
    cfg = DecontamConfig(benchmarks=[bench_file(tmp_path, GENERIC)])
    kept, dropped = run(DecontamStep(cfg), [rec(q) for q in corpus])
    assert dropped.num_rows == 0, details(dropped)
    # A generic prompt is still caught when it is the whole request ...
    kept, dropped = run(DecontamStep(cfg), [rec("which of the following is TRUE"), rec("Continue!")])
    assert kept.num_rows == 0 and {d["match"] for d in details(dropped)} == {"exact"}
    # ... and a weak one (few informative words) when it is most of the request.
    kept, dropped = run(DecontamStep(cfg), [rec("Please: how can we reverse this process?")])
    assert kept.num_rows == 0 and details(dropped)[0]["match"] == "containment"


@pytest.mark.parametrize("variant", [
    "EXPLAIN THE DIFFERENCE BETWEEN MITOSIS AND MEIOSIS IN DIPLOID CELLS",  # case
    "Explain   the difference\nbetween\tmitosis and meiosis in diploid cells",  # whitespace
    "Explain the difference -- between mitosis and meiosis, in diploid cells!!!",  # punctuation
    "Ｅｘｐｌａｉｎ the difference between mitosis and meiosis in diploid cells",  # full-width (NFKC)
    "Explain the dif\u00adference be\u200btween mitosis and meiosis in diploid cells",  # soft hyphen, zero width
    "Explain the difference between mitosis and meiosis in diploid cells\u2026",  # ellipsis character
    "Explain the diﬀerence between mitosis and meiosis in diploid cells",  # ligature (NFKC)
    "Explain the difference between mitosis and meïosis in diploïd cells",  # diacritics
])
def test_normalization_variants_match_exactly(tmp_path: Path, variant: str) -> None:
    cfg = DecontamConfig(benchmarks=[bench_file(tmp_path, ["Explain the difference between mitosis and meiosis "
                                                           "in diploid cells."])])
    _, dropped = run(DecontamStep(cfg), [rec(variant)])
    assert [d["match"] for d in details(dropped)] == ["exact"]


def test_match_tokens_quotes_dashes_and_spans() -> None:
    fancy = "Don\u2019t  “quote” me—it’s Straße, café"
    assert match_tokens(fancy) == ["dont", "quote", "me", "its", "strasse", "cafe"]
    assert match_tokens("don't quote me - it's strasse cafe") == match_tokens(fancy)
    text = "Say: ＨＥＬＬＯ  wörld!"
    spans = match_token_spans(text)
    assert [s[0] for s in spans] == match_tokens(text) == ["say", "hello", "world"]
    assert [text[a:b] for _, a, b in spans] == ["Say", "ＨＥＬＬＯ", "wörld"]
    # normalize_text (what exact dedup and the filters hash) is unchanged by the stronger matching tokens.
    assert normalize_text("Don’t  SHOUT—café!") == "don t shout café"


def test_uninformative_ngrams_are_not_indexed() -> None:
    hex_run = "0 1 2 3 4 5 6 7 8 9 a b c d e f"
    prompt = ("Convert the hexadecimal digits " + hex_run + " into their binary representations and print a "
              "table with one row for every digit")
    index = ContaminationIndex(n=13)
    index.add("hex", [prompt])
    toks = match_tokens(prompt)
    grams = [toks[j:j + 13] for j in range(len(toks) - 12)]
    assert any(not informative(g) for g in grams) and any(informative(g) for g in grams)
    assert len(index.windows[13]) == sum(informative(g) for g in grams)  # only the informative ones
    assert index.match("Here is a lookup table: " + hex_run + " and then 0 1 2 3 again.") is None
    m = index.match("Now print 8 9 a b c d e f into their binary representations and print a table with one row.")
    assert m is not None and m.kind == "ngram"
    # A long prompt without any informative n-gram is still found whole (containment), never by a piece.
    digits = " ".join(str(i % 10) for i in range(40))
    index.add("digits", [digits])
    assert index.match("Look: " + digits + " done") is not None
    assert index.match("Look: " + digits[:30] + " done") is None


def test_every_loader_format_and_short_prompts(tmp_path: Path) -> None:
    (tmp_path / "ae.json").write_text(json.dumps([{"instruction": "Give three tips for staying healthy."}]))
    (tmp_path / "ah.jsonl").write_text(json.dumps({"question_id": "x", "turns": [{"content": "Explain monads."}]})
                                       + "\n" + json.dumps({"prompt": "Write a limerick about a cat."}) + "\n")
    (tmp_path / "custom.jsonl").write_text(json.dumps({"q": "Name the capital of France."}) + "\n")
    assert load_prompts(str(tmp_path / "ae.json"), "alpaca_eval") == ["Give three tips for staying healthy."]
    assert load_prompts(str(tmp_path / "ah.jsonl"), "arena_hard") == ["Explain monads.",
                                                                      "Write a limerick about a cat."]
    assert len(load_prompts(PACKAGED_HUMANEVAL, "humaneval")) == 164
    cfg = DecontamConfig(benchmarks=[
        {"name": "alpaca_eval", "uri": str(tmp_path / "ae.json"), "format": "alpaca_eval"},
        {"name": "arena_hard", "uri": str(tmp_path / "ah.jsonl"), "format": "arena_hard"},
        {"name": "mine", "uri": str(tmp_path / "custom.jsonl"), "format": "jsonl:q"}])
    kept, dropped = run(DecontamStep(cfg), [rec("give three tips for staying healthy!"), rec("Explain monads"),
                                            rec("Name the capital of Peru.")])
    assert kept.num_rows == 1 and [(d["benchmark"], d["item"]) for d in details(dropped)] == [
        ("alpaca_eval", 0), ("arena_hard", 0)]
    with pytest.raises(BenchmarkFormatError, match="question"):
        load_prompts(str(tmp_path / "ae.json"), "gsm8k")


def test_answers_checked_only_when_asked() -> None:
    prompts = load_prompts(PACKAGED_HUMANEVAL, "humaneval")
    r = rec("Write a function.", prompts[0])
    kept, _ = run(DecontamStep(DecontamConfig()), [r])
    assert kept.num_rows == 1
    kept, dropped = run(DecontamStep(DecontamConfig(check_answers=True)), [r])
    d = details(dropped)[0]
    assert kept.num_rows == 0 and (d["benchmark"], d["item"], d["turn"]) == ("humaneval", 0, 1)
    assert d["match"] == "exact" and len(d["matched_text"]) <= 300 and len(d["benchmark_prompt"]) <= 500


def test_ledger_and_counters_through_the_runner(tmp_path: Path) -> None:
    records = [rec(f"Question {i} about the weather in town {i}?") for i in range(20)]
    records += [rec("Hi! " + MT_PROMPT), rec(MT_PROMPT), rec("What is 2+2?", "4", "Solve x^2 = 4.")]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(records, schema=CANONICAL_SCHEMA), src)
    cfg = {"benchmarks": [bench_file(tmp_path, ["Solve x^2 = 4.", MT_PROMPT])], "batch_rows": 7}
    out = storage.validate_uri(str(tmp_path / "out"))
    m = run_all(build_step("decontaminate", cfg), [str(src)], out)
    assert m.stats.records_in == len(records) == m.stats.records_kept + m.stats.records_dropped
    assert m.stats.dropped_by_reason == {"contamination": 3}
    assert m.stats.counters == {"match.containment": 1, "match.exact": 2}
    found = details(read_step_table(out, "dropped"))
    assert sorted((d["match"], d["turn"]) for d in found) == [("containment", 0), ("exact", 0), ("exact", 2)]


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="unknown format"):
        DecontamConfig(benchmarks=[{"name": "x", "uri": "/x", "format": "csv"}])
    with pytest.raises(ValidationError):
        DecontamConfig(ngram=2)
    with pytest.raises(ValidationError):
        DecontamConfig(min_coverage=0)
