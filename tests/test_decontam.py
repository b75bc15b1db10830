"""Decontamination against real benchmark files: planted exact and lightly edited prompts are caught,
clean records pass, every loader format reads, and the drop detail names benchmark and n-gram."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators.benchmarks.loaders import PACKAGED_HUMANEVAL, BenchmarkFormatError, load_prompts
from operators.schema import CANONICAL_SCHEMA
from operators.steps.decontam.step import DecontamConfig, DecontamStep
from tests.conftest import SHARED_DATA

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "gsm8k").exists(), reason="../shared/data not present")

SHARED_BENCHMARKS = [
    ("gsm8k", "gsm8k/test.jsonl", "gsm8k"),
    ("math", "math/test.jsonl", "math"),
    ("mbpp", "mbpp/mbpp.jsonl", "mbpp"),
    ("mmlu", "mmlu/test.jsonl", "mmlu"),
    ("mt_bench", "mt_bench/question.jsonl", "mt_bench"),
]


def rec(q: str, a: str = "Here is a careful answer to that question.") -> dict[str, Any]:
    return {"id": str(abs(hash(q))), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
            "label": None, "langdetect": "en", "source": "s", "reward": None, "origin": None}


def light_edit(text: str, rng: random.Random) -> str:
    """Change case and punctuation and append a request: what a paraphrasing scraper would do."""
    return "Please solve: " + text.upper().replace(",", " ,").replace(".", " . ") + " Show your work."


def run(step: DecontamStep, records: list[dict[str, Any]]) -> tuple[pa.Table, pa.Table]:
    step.bind(None, 0)  # type: ignore[arg-type]  # this step needs no stage artifacts
    res = step.transform(pa.Table.from_pylist(records, schema=CANONICAL_SCHEMA).to_batches()[0])
    assert res.kept.num_rows + res.dropped.num_rows == len(records)
    return res.kept, res.dropped


@needs_shared
def test_planted_benchmark_prompts_are_caught(tmp_path: Path) -> None:
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
    clean = [rec(q) for q in [
        "Write a haiku about the sea at dawn, with a seasonal word.",
        "What are the main differences between TCP and UDP for a video game's networking layer?",
        "Summarize the plot of a detective novel in which the butler is innocent, in five sentences.",
    ]]
    kept, dropped = run(DecontamStep(cfg), [r for _, r in planted] + clean)
    assert kept.num_rows == len(clean)
    assert set(dropped["reason"].to_pylist()) == {"contamination"}
    details = dropped["detail"].to_pylist()
    for (name, _), detail in zip(planted, details, strict=True):
        assert detail.startswith(f"{name} item "), detail


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
    # Prompts shorter than n words are caught by normalized exact match.
    kept, dropped = run(DecontamStep(cfg), [rec("give three tips for staying healthy!"), rec("Explain monads"),
                                            rec("Name the capital of Peru.")])
    assert kept.num_rows == 1 and dropped["detail"].to_pylist()[0].startswith("alpaca_eval item 0")
    with pytest.raises(BenchmarkFormatError, match="question"):
        load_prompts(str(tmp_path / "ae.json"), "gsm8k")


def test_answers_checked_only_when_asked() -> None:
    prompts = load_prompts(PACKAGED_HUMANEVAL, "humaneval")
    solution_like = prompts[0]
    r = rec("Write a function.", a=solution_like)
    kept, _ = run(DecontamStep(DecontamConfig()), [r])
    assert kept.num_rows == 1
    kept, dropped = run(DecontamStep(DecontamConfig(check_answers=True)), [r])
    assert kept.num_rows == 0 and dropped["detail"][0].as_py().startswith("humaneval item 0")


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="unknown format"):
        DecontamConfig(benchmarks=[{"name": "x", "uri": "/x", "format": "csv"}])
    with pytest.raises(ValidationError):
        DecontamConfig(ngram=2)
