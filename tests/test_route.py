"""Domain routing: math, code and general records land where they belong, with reasons; nothing dropped."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from operators.schema import CANONICAL_SCHEMA
from operators.steps.route.step import RouteConfig, RouteStep


def rec(q: str, a: str, cate: list[str] | None = None) -> dict[str, Any]:
    label = {"ability_en": [], "ability_zh": [], "cate_ability_en": cate or [], "cate_ability_zh": []}
    return {"id": q[:20], "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
            "label": label, "langdetect": "en", "source": "s", "reward": None, "origin": None}


def route(records: list[dict[str, Any]], **cfg: Any) -> list[tuple[str, str]]:
    batch = pa.Table.from_pylist(records, schema=CANONICAL_SCHEMA).to_batches()[0]
    res = RouteStep(RouteConfig(**cfg)).transform(batch)
    assert res.dropped.num_rows == 0 and res.kept.num_rows == len(records)
    return list(zip(res.kept["domain"].to_pylist(), res.kept["domain_reason"].to_pylist(), strict=True))


def test_domains_and_reasons() -> None:
    out = route([
        rec("Solve the equation 3x + 5 = 20. How many solutions are there?", "x = 5, one solution."),
        rec("Write a Python function that reverses a string.", "```python\ndef rev(s):\n    return s[::-1]\n```"),
        rec("What is the capital of Australia?", "Canberra."),
        rec("Help me plan a trip.", "Sure.", cate=["mathematical ability", "problem solving and support"]),
    ])
    assert [d for d, _ in out] == ["math", "code", "general", "general"]
    assert "keyword 'solve'" in out[0][1] and "pattern '```'" in out[1][1]
    assert out[2][1] == "no domain signals"
    assert "below min_score" in out[3][1]  # one signal (the label) is not enough by default


def test_labels_and_thresholds_are_configurable() -> None:
    r = rec("Help me plan a trip.", "Sure.", cate=["mathematical ability"])
    assert route([r], min_score=1)[0][0] == "math"
    both = rec("Write Python code to calculate the average of a list.", "```python\nsum(x)/len(x)\n```")
    assert route([both])[0][0] == "code"  # code has more signals here
    math_only = {"math": {"keywords": ["calculate", "average", "python"]}}
    assert route([both], rules=math_only, priority=["math"])[0][0] == "math"


# ----------------------------------------------------------------------------------------------------
# The column-wise path equals the per-record reference


def _varied_records(seed: int, n: int = 600) -> list[dict[str, Any]]:
    """Prompts and answers drawn from pieces that hit (or nearly hit) every signal, in ASCII and not."""
    import random

    rng = random.Random(seed)
    pieces = [
        "Solve the equation 3x + 5 = 20.", "How many apples?", "how  many", "HOW MANY", "Calculate 12 * 7",
        "Write a Python function.", "Fix my C++ code", "c++", "javascript vs java", "JavaScript!", "typescript_x",
        "the sum of", "summary", "percent%", "average,average", "api-key", "an API.", "bash:", "(regex)",
        "```python\ndef f(x):\n    return x\n```", "def foo(bar):", "#include <stdio.h>", "public static void main",
        "console.log(1)", "SELECT a\nFROM t", "select * from t", "import numpy as np", "import java.util",
        "$x^2$", "$ 5 and 6 $", "\\frac{1}{2}", "\\sqrt{2}", "x = -4", "x=3", "a1+2b", "debug", "Prove the theorem.",
        "triangle geometry", "fraction", "  ", "", "no signal here at all", "ok", "How many integers x satisfy x = 2?",
    ]
    # Texts where Python's Unicode classes and case folding differ from RE2's ASCII ones.
    odd = ["7 × 8", "9÷3", "中文问题：如何计算", "计算 3 + 4", "函数 def 名字(", "Ｓｏｌｖｅ", "café solve",
           "naïve_code",
           "ſelect x from y", "\u212aelvin", "x\u00a0=\u00a05", "1\u0660+\u06612", "word\x0bword", "a\x1cb",
           "5 +\x0b3", "x =\x1c4", "élgorithm", "algorithmé", "débug"]

    def text(k: int) -> str:
        pool = pieces + odd if mixed else pieces
        return " ".join(rng.choice(pool) for _ in range(rng.randint(0, k)))

    out = []
    for i in range(n):
        mixed = rng.random() < 0.3
        turns = []
        if rng.random() < 0.2:
            turns.append({"from": "system", "value": text(3)})
        if rng.random() < 0.1:  # an answer first, or no human turn at all
            turns.append({"from": "gpt", "value": text(3)})
        for _ in range(rng.randint(0, 3)):
            turns.append({"from": "human", "value": text(6)})
            turns.append({"from": "gpt", "value": text(8)})
        if rng.random() < 0.05:  # signals beyond the 2000/4000-character cuts are not seen
            turns.insert(0, {"from": "human", "value": "z " * 1000 + "python ```" + "y" * 3000 + " $a$ solve"})
        cate = rng.sample(["Mathematical Ability", "mathematical ability", "programming and software development",
                           "Programming and Software Development", "Problem Solving and Support", "İstanbul",
                           "MATHEMATİCAL ABILITY"], rng.randint(0, 3))
        if cate and rng.random() < 0.2:
            cate.append(cate[0])  # a repeated label counts twice
        label = None if rng.random() < 0.1 else {"ability_en": [], "ability_zh": [], "cate_ability_en": cate,
                                                  "cate_ability_zh": []}
        out.append({"id": f"r{i}", "conversations": turns, "label": label, "langdetect": "en", "source": "s",
                    "reward": None, "origin": None})
    return out


@pytest.mark.parametrize("cfg", [
    {},
    {"min_score": 1},
    # Keywords that overlap or hold spaces and punctuation.
    {"rules": {"math": {"patterns": [r"%", r"\bx\s*=\s*\d"],
                        "keywords": ["how many", "many", "how", "sum", "sum of", "x"]},
               "code": {"labels": ["Programming and Software Development"], "patterns": [r"```", r"\w+\("],
                        "keywords": ["c++", "c", "java", "javascript", "api-key", "key", "debug"]}},
     "priority": ["math", "code"], "min_score": 1},
    # Patterns RE2 cannot read like Python (inline flags, lookahead, `$`): the reference decides.
    {"rules": {"code": {"patterns": [r"(?i:def) \w+", r"SELECT.{0,20}FROM", r"[a-z]\d", r"\d(?=\s*%)", r"solve$"],
                        "keywords": ["python", "function", "bash"]},
               "math": {"patterns": [r"[\d]+\s*[+×]\s*\d+", r"\\(frac|sqrt)"], "keywords": ["calculate", "solve"]}}},
])
def test_vectorized_route_equals_the_per_record_reference(cfg: dict[str, Any]) -> None:
    from operators.steps.route.step import CompiledRule, route, route_batch

    records = _varied_records(7)
    config = RouteConfig(**cfg)
    rules = {d: CompiledRule(r) for d, r in config.rules.items()}
    table = pa.Table.from_pylist(records, schema=CANONICAL_SCHEMA)
    expected = [route(r["conversations"], (r["label"] or {}).get("cate_ability_en") or [], rules, config.priority,
                      config.min_score) for r in records]
    domains, reasons = route_batch(table, rules, config)
    assert list(zip(domains, reasons, strict=True)) == expected
    assert len(set(domains)) >= 2 and len(set(reasons)) > 20  # the fixture exercises many signals
    from operators.steps.route.step import ascii_safe, joined_text
    from operators.text.turns import turn_columns

    _, values, offsets = turn_columns(table.column("conversations"))
    assert 300 < ascii_safe(joined_text(values, offsets, 4000)).sum() < 550  # both paths are exercised


def test_one_alternation_finds_the_rows_any_pattern_matches() -> None:
    """The prefilter: rows where any pattern matches, from one pass of their alternation."""
    from operators.steps.route.step import _any_pattern

    texts = pa.array(["def f(x):", "no signal", "$x$ and ```", "", "SELECT a\nFROM t"])
    assert _any_pattern(texts, [r"```", r"\bdef \w+\(", r"\bSELECT\b.+\bFROM\b"]).tolist() == [0, 2, 4]
    assert _any_pattern(texts, [r"zzz"]).tolist() == []
    assert _any_pattern(texts, []).tolist() == []
    assert _any_pattern(texts, [r"^\$", r"t$"]).tolist() == [2, 4]  # anchors stay per pattern


def test_re2_equivalence_check() -> None:
    from operators.steps.route.step import re2_equivalent

    assert all(re2_equivalent(p) for r in RouteConfig().rules.values() for p in r.patterns)
    for p in [r"a(?=b)", r"(a)\1", r"end$", r"a{,3}", r"(?x) a b", "\u212a", r"[\w-]+\Z", r"(?<!x)y"]:
        assert not re2_equivalent(p), p
