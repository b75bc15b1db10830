"""The figures of a drift review: error rates with 95% Wilson intervals, agreement between reviewers, the gate.

An item's verdict: among its reviewers' marks other than `skip`, it is an error when at least half say drifted,
factual_error or unsafe (a tie counts as an error: a drift one of two reviewers saw is worth a stronger validator);
an item nobody marked, or only skipped, is not reviewed and counts nowhere. Error rate = errors / reviewed items,
per (strategy, round), per strategy and overall, each with a 95% Wilson score interval (it stays inside [0, 1] and
is honest at 0 of 12 where the normal approximation claims certainty).

The gate: a strategy fails when its observed error rate (pooled over rounds) is above the gate (default 5%);
a run with a failing strategy "needs a stronger validator". The interval is shown beside it, so a reader sees when
the verdict rests on few items (the rule is the point estimate, not the interval: a review is a warning light,
not a test).

Agreement, with two or more reviewers: for each pair, on the items both marked (not skip), the share with the same
mark and Cohen's kappa over the four marks; the run's figure is the mean over pairs (Light's kappa).
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from typing import Any

from operators.review.marks import ERRORS, all_marks
from operators.review.sample import read_sample

DEFAULT_GATE = 0.05
Z95 = 1.959963984540054


def wilson(errors: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `errors`/`n` ((0, 1) when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = errors / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items (None when undefined: no items, or both raters used
    one and the same label throughout, so chance agreement is 1)."""
    if not a or len(a) != len(b):
        return None
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def verdicts(sample: dict[str, Any], marks: dict[str, dict[str, dict[str, Any]]]) -> dict[str, str | None]:
    """Per sample item: its error kind when the reviewers' majority calls it an error, "ok" when not, None when
    nobody reviewed it (skips do not count)."""
    out: dict[str, str | None] = {}
    for item in sample.get("items", []):
        said = [m[item["id"]]["mark"] for m in marks.values() if item["id"] in m and m[item["id"]]["mark"] != "skip"]
        if not said:
            out[item["id"]] = None
            continue
        errs = [x for x in said if x in ERRORS]
        out[item["id"]] = Counter(errs).most_common(1)[0][0] if 2 * len(errs) >= len(said) else "ok"
    return out


def _row(errors: int, reviewed: int, **key: Any) -> dict[str, Any]:
    lo, hi = wilson(errors, reviewed)
    return {**key, "reviewed": reviewed, "errors": errors,
            "rate": round(errors / reviewed, 4) if reviewed else None, "ci_low": round(lo, 4), "ci_high": round(hi, 4)}


def agreement(marks: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """Pairwise agreement and Cohen's kappa on items both reviewers marked (not skip); None with one reviewer."""
    if len(marks) < 2:
        return None
    pairs = []
    for (ra, ma), (rb, mb) in combinations(sorted(marks.items()), 2):
        both = sorted(i for i in set(ma) & set(mb) if ma[i]["mark"] != "skip" and mb[i]["mark"] != "skip")
        a, b = [ma[i]["mark"] for i in both], [mb[i]["mark"] for i in both]
        kappa = cohen_kappa(a, b)
        pairs.append({"a": ra, "b": rb, "items": len(both),
                      "percent": round(sum(x == y for x, y in zip(a, b, strict=True)) / len(both), 4) if both else None,
                      "kappa": None if kappa is None else round(kappa, 4)})
    percents = [float(p["percent"]) for p in pairs if p["percent"] is not None]
    kappas = [float(p["kappa"]) for p in pairs if p["kappa"] is not None]
    return {"pairs": pairs,
            "percent": round(sum(percents) / len(percents), 4) if percents else None,
            "kappa": round(sum(kappas) / len(kappas), 4) if kappas else None}


def summarize(sample: dict[str, Any], marks: dict[str, dict[str, dict[str, Any]]],
              gate: float | None = None) -> dict[str, Any]:
    """Everything the review page and the report show: progress per reviewer, error rates per (strategy, round),
    per strategy and overall with 95% intervals, agreement, and the gate's verdict."""
    gate = float(sample.get("gate", DEFAULT_GATE) if gate is None else gate)
    ids = {i["id"] for i in sample.get("items", [])}
    marks = {r: {i: v for i, v in m.items() if i in ids} for r, m in marks.items()}
    v = verdicts(sample, marks)
    cells: dict[tuple[str, int], list[str | None]] = {}
    for item in sample.get("items", []):
        cells.setdefault((item["strategy"], int(item["round"])), []).append(v[item["id"]])
    population = {(s["strategy"], int(s["round"])): int(s["population"]) for s in sample.get("strata", [])}

    def count(vs: list[str | None]) -> tuple[int, int, dict[str, int]]:
        done = [x for x in vs if x is not None]
        kinds = Counter(x for x in done if x != "ok")
        return sum(kinds.values()), len(done), dict(sorted(kinds.items()))

    strata = []
    for (strategy, round_), vs in sorted(cells.items()):
        errors, reviewed, kinds = count(vs)
        strata.append(_row(errors, reviewed, strategy=strategy, round=round_, sampled=len(vs),
                           population=population.get((strategy, round_), len(vs)), kinds=kinds))
    strategies = []
    for strategy in sorted({s for s, _ in cells}):
        errors, reviewed, kinds = count([x for (s, _), vs in cells.items() if s == strategy for x in vs])
        row = _row(errors, reviewed, strategy=strategy, kinds=kinds)
        row["fails_gate"] = bool(reviewed) and errors / reviewed > gate
        strategies.append(row)
    errors, reviewed, kinds = count(list(v.values()))
    failing = [r["strategy"] for r in strategies if r["fails_gate"]]
    return {"gate": gate, "items": len(ids), "reviewed": reviewed,
            "reviewers": {r: sum(1 for _ in m) for r, m in marks.items()},
            "strata": strata, "strategies": strategies, "overall": _row(errors, reviewed, kinds=kinds),
            "agreement": agreement(marks), "failing_strategies": failing,
            "needs_stronger_validator": bool(failing)}


def review_summary(run_root: str) -> dict[str, Any] | None:
    """The run's review figures from its files, or None when no review has started."""
    sample = read_sample(run_root)
    if sample is None:
        return None
    return summarize(sample, all_marks(run_root))


def failing_strategies(run_root: str, gate: float | None = None) -> list[str]:
    """The strategies whose reviewed error rate in the run at `run_root` is above the gate (its own gate unless
    one is given); empty when the run has no review."""
    sample = read_sample(run_root)
    if sample is None:
        return []
    return list(summarize(sample, all_marks(run_root), gate)["failing_strategies"])


__all__ = ["DEFAULT_GATE", "agreement", "cohen_kappa", "failing_strategies", "review_summary", "summarize",
           "verdicts", "wilson"]
