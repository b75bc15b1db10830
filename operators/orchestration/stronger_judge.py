"""The `stronger_judge` Param of `conversational_synthesis` -> the `validator` config of its evolve steps.

    {}                                                    off (the default)
    {"llm": {...LLMConfig...}, "strategies": ["deepening"]}   judge these strategies' evolutions with this model
    {"llm": {...}, "from_run": "<run name or run folder URI>", "gate": 0.05}
                                                          judge the strategies that run's drift review failed
                                                          (its own gate unless `gate` is given)

Both may be given (the union is judged). A strategy the review flagged is resolved when the evolve step starts, so
marks made until then count.
"""

from __future__ import annotations

from typing import Any

from operators.core import storage
from operators.orchestration.settings import data_root, safe_name


def review_run_root(from_run: str) -> str:
    """The run folder of `from_run`: a bare run name under <data root>/runs, or a URI as given."""
    from_run = str(from_run).strip()
    if "/" in from_run or "://" in from_run:
        return storage.validate_uri(from_run)
    return storage.join(data_root(), "runs", safe_name(from_run))


def validator_config(stronger_judge: dict[str, Any] | None) -> dict[str, Any] | None:
    """The evolve step's `validator` config for the Param's value (None when the Param is empty)."""
    if not stronger_judge:
        return None
    unknown = sorted(set(stronger_judge) - {"llm", "strategies", "from_run", "gate"})
    if unknown:
        raise ValueError(f"stronger_judge has unknown keys {unknown}; known: llm, strategies, from_run, gate")
    out: dict[str, Any] = {"llm": stronger_judge.get("llm") or {},
                           "strategies": list(stronger_judge.get("strategies") or [])}
    if stronger_judge.get("from_run"):
        out["review_run"] = review_run_root(str(stronger_judge["from_run"]))
    if stronger_judge.get("gate") is not None:
        out["gate"] = float(stronger_judge["gate"])
    return out


__all__ = ["review_run_root", "validator_config"]
