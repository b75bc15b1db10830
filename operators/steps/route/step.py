"""`route` step: assign every record a domain (math, code or general) and say why.

The paper selects each domain toward its own target (math toward GSM8K+MATH, code toward HumanEval,
general knowledge separately), so each record must land in exactly one domain. Routing is a scorer, not
a filter: nothing is dropped; the `domain` and `domain_reason` columns are added.

Rules are configurable: a record scores a point per matching signal of a domain (ability labels, code
fences, LaTeX, keywords in the first human turn); the highest score at or above `min_score` wins, ties
go to the domain listed first in `priority`.
"""

from __future__ import annotations

import re
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators.core.step import BatchResult, Step, StepConfig, keep_all

GENERAL = "general"


class DomainRule(BaseModel):
    """Signals of one domain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: list[str] = Field(default_factory=list, description="First-level ability labels (cate_ability_en).")
    patterns: list[str] = Field(default_factory=list, description="Regexes searched in all turns.")
    keywords: list[str] = Field(default_factory=list, description="Whole words searched in the first prompt.")


DEFAULT_RULES = {
    "code": DomainRule(
        labels=["programming and software development"],
        patterns=[r"```", r"\bdef \w+\(", r"#include\s*<", r"\bpublic static void\b", r"\bconsole\.log\(",
                  r"\bSELECT\b.+\bFROM\b", r"\bimport (numpy|pandas|torch|java\.)"],
        keywords=["python", "javascript", "typescript", "java", "c++", "rust", "golang", "sql", "regex",
                  "function", "code", "script", "compile", "debug", "algorithm", "api", "bash", "html", "css"],
    ),
    "math": DomainRule(
        labels=["mathematical ability"],
        patterns=[r"\$[^$]+\$", r"\\frac|\\sqrt|\\sum|\\int", r"\b\d+\s*[-+*/^×÷]\s*\d+\b", r"\bx\s*=\s*-?\d"],
        keywords=["calculate", "solve", "equation", "probability", "integral", "derivative", "sum", "prove",
                  "theorem", "how many", "percent", "average", "algebra", "geometry", "triangle", "fraction"],
    ),
}


class RouteConfig(StepConfig):
    """Domain rules and tie-breaking."""

    rules: dict[str, DomainRule] = Field(default_factory=lambda: dict(DEFAULT_RULES))
    priority: list[str] = Field(default_factory=lambda: ["code", "math"])
    min_score: int = Field(2, ge=1, description="Signals needed to leave the general domain.")


class CompiledRule:
    """A DomainRule with its regexes compiled once."""

    def __init__(self, rule: DomainRule) -> None:
        self.labels = {label.lower() for label in rule.labels}
        self.patterns = [re.compile(p, re.IGNORECASE | re.DOTALL) for p in rule.patterns]
        kws = sorted({k.lower() for k in rule.keywords}, key=len, reverse=True)
        self.keywords = re.compile(r"(?<!\w)(" + "|".join(re.escape(k) for k in kws) + r")(?!\w)") if kws else None

    def score(self, conv: list[dict[str, str]], labels: list[str]) -> tuple[int, list[str]]:
        why: list[str] = []
        why += [f"label {lab!r}" for lab in labels if lab.lower() in self.labels]
        text = "\n".join(t["value"][:4000] for t in conv)
        why += [f"pattern {p.pattern!r}" for p in self.patterns if p.search(text)]
        prompt = next((t["value"] for t in conv if t["from"] == "human"), "")[:2000].lower()
        if self.keywords is not None:
            why += [f"keyword {k!r}" for k in sorted(set(self.keywords.findall(prompt)))]
        return len(why), why


def route(conv: list[dict[str, str]], labels: list[str], rules: dict[str, CompiledRule], priority: list[str],
          min_score: int) -> tuple[str, str]:
    """(domain, reason) of one record. Pure."""
    best, best_score, best_why = GENERAL, 0, ["no domain signals"]
    order = priority + [d for d in rules if d not in priority]
    for domain in order:
        score, why = rules[domain].score(conv, labels)
        if score >= min_score and score > best_score:
            best, best_score, best_why = domain, score, why
    if best == GENERAL and best_score == 0:
        scores = {d: rules[d].score(conv, labels)[0] for d in order}
        if any(scores.values()):
            best_why = [f"below min_score {min_score}: {scores}"]
    return best, "; ".join(best_why[:6])


class RouteStep(Step[RouteConfig]):
    """Add `domain` and `domain_reason` to every record."""

    name: ClassVar[str] = "route"
    config_model: ClassVar[type[StepConfig]] = RouteConfig

    def __init__(self, config: RouteConfig) -> None:
        super().__init__(config)
        self._rules = {d: CompiledRule(r) for d, r in config.rules.items()}

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        labels = [(lab or {}).get("cate_ability_en") or [] for lab in table.column("label").to_pylist()]
        out = [route(c, lab, self._rules, self.config.priority, self.config.min_score)
               for c, lab in zip(table.column("conversations").to_pylist(), labels, strict=True)]
        for name in ("domain", "domain_reason"):
            if name in table.column_names:
                table = table.drop_columns([name])
        table = table.append_column("domain", pa.array([d for d, _ in out], pa.string()))
        table = table.append_column("domain_reason", pa.array([r for _, r in out], pa.string()))
        return keep_all(table)
