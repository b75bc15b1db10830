"""Domain routing: math, code and general records land where they belong, with reasons; nothing dropped."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

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
