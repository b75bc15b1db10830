"""`route` step: assign every record a domain (math, code or general) and say why.

The paper selects each domain toward its own target (math toward GSM8K+MATH, code toward HumanEval,
general knowledge separately), so each record must land in exactly one domain. Routing is a scorer, not
a filter: nothing is dropped; the `domain` and `domain_reason` columns are added.

Rules are configurable: a record scores a point per matching signal of a domain (ability labels, code
fences, LaTeX, keywords in the first human turn); the highest score at or above `min_score` wins, ties
go to the domain listed first in `priority`.

Speed: `route` (one record, Python regexes) is the reference; the step runs `route_batch`, which gives
the same (domain, reason) column-wise: each pattern is one RE2 search over the batch's joined-text column
(pyarrow.compute), each keyword one search over the lowercased first-prompt column, labels one set lookup
over the flattened label lists. RE2 and Python's `re` agree exactly only on some texts and patterns, so
the column path is taken only where they must agree (see `re2_equivalent` and `ascii_safe`); other
records, patterns and ambiguous keyword sets go through the reference, one record at a time.
"""

from __future__ import annotations

import functools
import importlib
import re
import string
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from operators.core.step import BatchResult, Step, StepConfig, keep_all
from operators.text.turns import first_turn, joined_turns, turn_columns

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
    scores: dict[str, int] = {}
    for domain in order:
        score, why = rules[domain].score(conv, labels)
        scores[domain] = score
        if score >= min_score and score > best_score:
            best, best_score, best_why = domain, score, why
    if best == GENERAL and best_score == 0 and any(scores.values()):
        best_why = [f"below min_score {min_score}: {scores}"]
    return best, "; ".join(best_why[:6])


# ----------------------------------------------------------------------------------------------------
# The column-wise path

_sre: Any = importlib.import_module("re._parser")  # the parser of `re` itself (sre_parse is deprecated)
_SRE_UNICODE = 32  # re.UNICODE: the default flag of str patterns, nothing the pattern asked for
# On ASCII text without these, Python's \s \d \w \b and case folding equal RE2's ASCII classes
# (Python's \s also matches \v and \x1c-\x1f; RE2's does not).
_UNSAFE_ASCII = r"[\x0b\x1c-\x1f]"
_SAFE_CATEGORIES = {"CATEGORY_DIGIT", "CATEGORY_NOT_DIGIT", "CATEGORY_SPACE", "CATEGORY_NOT_SPACE",
                    "CATEGORY_WORD", "CATEGORY_NOT_WORD"}
_SAFE_AT = {"AT_BEGINNING", "AT_BEGINNING_STRING", "AT_BOUNDARY", "AT_NON_BOUNDARY"}  # not `$`: RE2's differs
_WORD = "0-9A-Za-z_"


def _safe_tree(items: Any) -> bool:
    """Whether a parsed `re` pattern uses only constructs RE2 reads the same way (on ASCII text)."""
    for op, av in items:
        name = str(op)
        if name in ("LITERAL", "NOT_LITERAL"):
            ch = chr(av)
            # A non-ASCII literal that case-folds to ASCII (the Kelvin sign) would match ASCII text.
            if not ch.isascii() and any(c.isascii() for c in ch.lower() + ch.upper() + ch.casefold()):
                return False
        elif name == "ANY":
            continue
        elif name == "IN":
            for iop, iav in av:
                iname = str(iop)
                if iname == "CATEGORY" and str(iav) not in _SAFE_CATEGORIES:
                    return False
                if iname == "LITERAL" and not _safe_tree([(iop, iav)]):
                    return False
                if iname == "RANGE" and not (iav[1] < 128 or iav[0] >= 0x250):  # ranges crossing folds
                    return False
                if iname not in ("LITERAL", "RANGE", "NEGATE", "CATEGORY"):
                    return False
        elif name == "CATEGORY":
            if str(av) not in _SAFE_CATEGORIES:
                return False
        elif name == "AT":
            if str(av) not in _SAFE_AT:
                return False
        elif name == "BRANCH":
            if not all(_safe_tree(b) for b in av[1]):
                return False
        elif name == "SUBPATTERN":
            if av[1] or av[2] or not _safe_tree(av[3]):  # inline flag groups like (?x:...) read differently
                return False
        elif name in ("MAX_REPEAT", "MIN_REPEAT"):
            lo, hi, sub = av
            if lo > 1000 or (hi != _sre.MAXREPEAT and hi > 1000) or not _safe_tree(sub):  # RE2's repeat limit
                return False
        else:  # lookarounds, back references, conditionals, atomic groups, possessive repeats
            return False
    return True


@functools.lru_cache(maxsize=4096)
def re2_equivalent(pattern: str) -> bool:
    """Whether RE2 (pyarrow.compute) finds `pattern` in exactly the ASCII texts Python's `re` finds it in,
    both case-insensitive with `.` matching newlines, as `CompiledRule` compiles it."""
    if "{," in pattern:  # Python reads {,n} as a repeat, RE2 as literal text
        return False
    try:
        parsed = _sre.parse(pattern, 0)
        pc.match_substring_regex(pa.array([""]), pattern="(?is)" + pattern)
    except (re.error, pa.ArrowInvalid):
        return False
    return bool(parsed.state.flags & ~_SRE_UNICODE == 0 and _safe_tree(list(parsed)))


def ascii_safe(texts: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.bool_]:
    """Texts on which RE2's ASCII classes equal Python's Unicode ones: ASCII, without \\v or \\x1c-\\x1f."""
    ascii_ = pc.string_is_ascii(texts)
    odd = pc.match_substring_regex(texts, pattern=_UNSAFE_ASCII)
    return np.asarray(pc.and_(ascii_, pc.invert(odd)).to_numpy(zero_copy_only=False), dtype=bool)


def joined_text(values: pa.Array, offsets: npt.NDArray[np.int64], limit: int) -> pa.Array:
    """Each record's turns, each cut to `limit` characters, joined by newlines (the reference's `text`)."""
    return joined_turns(values, offsets, limit)


def first_prompt(roles: pa.Array, values: pa.Array, offsets: npt.NDArray[np.int64], limit: int) -> pa.Array:
    """Each record's first human turn, cut to `limit` characters and lowercased ("" without one)."""
    return pc.utf8_lower(pc.utf8_slice_codeunits(first_turn(roles, values, offsets, "human"), 0, limit))


def _search(texts: pa.Array, pattern: str) -> npt.NDArray[np.bool_]:
    return np.asarray(pc.match_substring_regex(texts, pattern=pattern).fill_null(False)
                      .to_numpy(zero_copy_only=False), dtype=bool)


def _any_pattern(texts: pa.Array, patterns: list[str]) -> npt.NDArray[np.int64]:
    """Rows of `texts` where any of `patterns` matches, from one pass of their alternation. Pure."""
    if not patterns:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(_search(texts, "(?is)" + "|".join(f"(?:{p})" for p in patterns)))


def re2_escape(text: str) -> str:
    """`text` as an RE2 literal (re.escape writes escapes such as "\\ " that RE2 rejects)."""
    return "".join("\\" + c if c in string.punctuation else c for c in text)


def keyword_pattern(keywords: list[str]) -> str:
    """RE2 pattern of `(?<!\\w)(k1|k2|...)(?!\\w)` without lookarounds (RE2 has none): a non-word
    character or an end on each side. Equal to the reference on ASCII prompts, where \\w is [0-9A-Za-z_]."""
    alternation = "|".join(re2_escape(k) for k in keywords)
    return f"(?:^|[^{_WORD}])(?:{alternation})(?:$|[^{_WORD}])"


class ColumnRule:
    """A DomainRule evaluated over columns: which patterns and keywords RE2 may decide."""

    def __init__(self, rule: DomainRule, compiled: CompiledRule) -> None:
        self.compiled = compiled
        self.patterns = [(p.pattern, re2_equivalent(p.pattern)) for p in compiled.patterns]
        self.keywords = sorted({k.lower() for k in rule.keywords})
        # Keywords of word characters only match whole words, which never overlap, so `findall`'s
        # set equals the set of keywords found one by one; a record that finds a keyword with other
        # characters ("c++", "how many") together with any other keyword is left to the reference.
        self.wordlike = [re.fullmatch(r"\w+", k) is not None for k in self.keywords]
        self.any_keyword = keyword_pattern(self.keywords) if self.keywords else None


def _label_hits(labels: pa.ChunkedArray | pa.Array, wanted: set[str]) -> tuple[npt.NDArray[np.int64], list[list[str]]]:
    """Per record: how many of its cate_ability_en labels are `wanted` (lowercased), and those labels' reasons."""
    arr = labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels
    cate = pc.struct_field(arr, "cate_ability_en")
    cate = pc.fill_null(cate, pa.scalar([], cate.type))
    offsets = np.asarray(cate.offsets.to_numpy(), dtype=np.int64)
    flat = cate.values.slice(offsets[0], offsets[-1] - offsets[0])
    offsets = offsets - offsets[0]
    n = len(offsets) - 1
    counts = np.zeros(n, dtype=np.int64)
    why: list[list[str]] = [[] for _ in range(n)]
    if not wanted or len(flat) == 0:
        return counts, why
    lowered = pc.utf8_lower(pc.fill_null(flat, ""))
    hit = np.asarray(pc.is_in(lowered, value_set=pa.array(sorted(wanted))).to_numpy(zero_copy_only=False), dtype=bool)
    # utf8proc's lowercase may differ from str.lower() outside ASCII: those labels are lowered by Python.
    other = np.flatnonzero(~np.asarray(pc.string_is_ascii(pc.fill_null(flat, "")).to_numpy(zero_copy_only=False),
                                       dtype=bool))
    for j, lab in zip(other.tolist(), flat.take(pa.array(other)).to_pylist(), strict=True):
        hit[j] = lab is not None and lab.lower() in wanted
    hit &= np.asarray(flat.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    idx = np.flatnonzero(hit)
    rec = np.searchsorted(offsets, idx, side="right") - 1
    counts = np.bincount(rec, minlength=n).astype(np.int64)
    for r, lab in zip(rec.tolist(), flat.take(pa.array(idx)).to_pylist(), strict=True):
        why[r].append(f"label {lab!r}")
    return counts, why


def route_batch(table: pa.Table, rules: dict[str, CompiledRule], config: RouteConfig) -> tuple[list[str], list[str]]:
    """(domains, reasons) of every record of `table`: equal to `route` record by record. Pure."""
    n = table.num_rows
    order = config.priority + [d for d in rules if d not in config.priority]
    roles, values, offsets = turn_columns(table.column("conversations"))
    text = joined_text(values, offsets, 4000)
    prompt = first_prompt(roles, values, offsets, 2000)
    slow = ~ascii_safe(text)  # records the reference routes, whole
    per_domain: dict[str, tuple[npt.NDArray[np.int64], list[list[str]], list[tuple[str, npt.NDArray[np.bool_]]],
                                list[tuple[str, npt.NDArray[np.bool_]]]]] = {}
    for d in order:
        col = ColumnRule(config.rules[d], rules[d])
        counts, label_why = _label_hits(table.column("label"), rules[d].labels)
        pats: list[tuple[str, npt.NDArray[np.bool_]]] = []
        # One alternation finds the texts with any of the domain's patterns (most have none); only those are
        # searched pattern by pattern.
        hits = _any_pattern(text, [p for p, ok in col.patterns if ok])
        some_text = text.take(pa.array(hits, pa.int64()))
        for pattern, ok in col.patterns:
            if ok:
                found = np.zeros(n, dtype=bool)
                if hits.size:
                    found[hits] = _search(some_text, "(?is)" + pattern)
                pats.append((pattern, found))
            else:
                slow |= True  # a pattern RE2 cannot decide: the reference routes every record
                pats.append((pattern, np.zeros(n, dtype=bool)))
        kws: list[tuple[str, npt.NDArray[np.bool_]]] = []
        if col.any_keyword is not None:
            # One alternation finds the prompts with any keyword; only those are searched keyword by keyword.
            rows = np.flatnonzero(_search(prompt, col.any_keyword))
            some = prompt.take(pa.array(rows))
            for k in col.keywords:
                hit = np.zeros(n, dtype=bool)
                if rows.size:
                    hit[rows] = _search(some, keyword_pattern([k]))
                kws.append((k, hit))
            found = np.sum([m for _, m in kws], axis=0)
            odd = np.sum([m for (_, m), w in zip(kws, col.wordlike, strict=True) if not w] or [np.zeros(n)], axis=0)
            slow |= (odd > 0) & (found > 1)
        per_domain[d] = (counts, label_why, pats, kws)
    domains = [GENERAL] * n
    reasons = [""] * n
    slow_rows = set(np.flatnonzero(slow).tolist())
    if slow_rows:
        sub = table.take(pa.array(sorted(slow_rows)))
        sub_labels = [(lab or {}).get("cate_ability_en") or [] for lab in sub.column("label").to_pylist()]
        for i, conv, labs in zip(sorted(slow_rows), sub.column("conversations").to_pylist(), sub_labels, strict=True):
            domains[i], reasons[i] = route(conv or [], labs, rules, config.priority, config.min_score)
    signals = np.zeros(n, dtype=bool)
    for counts, _, pats, kws in per_domain.values():
        signals |= counts > 0
        for _, m in pats + kws:
            signals |= m
    quiet = ~slow & ~signals
    for i in np.flatnonzero(quiet).tolist():
        domains[i], reasons[i] = GENERAL, "no domain signals"
    # Records with a signal: assemble reasons in the reference's order (labels, patterns, keywords).
    fast = np.flatnonzero(~slow & signals)
    names = {d: ([f"pattern {p!r}" for p, _ in per_domain[d][2]], [f"keyword {k!r}" for k, _ in per_domain[d][3]])
             for d in order}
    marks = {d: ([m[fast].tolist() for _, m in per_domain[d][2]], [m[fast].tolist() for _, m in per_domain[d][3]])
             for d in order}
    for j, i in enumerate(fast.tolist()):
        best, best_score, best_why = GENERAL, 0, ["no domain signals"]
        scores: dict[str, int] = {}
        for d in order:
            (pat_names, kw_names), (pat_marks, kw_marks) = names[d], marks[d]
            why = (per_domain[d][1][i] + [nm for nm, m in zip(pat_names, pat_marks, strict=True) if m[j]]
                   + [nm for nm, m in zip(kw_names, kw_marks, strict=True) if m[j]])
            scores[d] = len(why)
            if len(why) >= config.min_score and len(why) > best_score:
                best, best_score, best_why = d, len(why), why
        if best == GENERAL and best_score == 0 and any(scores.values()):
            best_why = [f"below min_score {config.min_score}: {scores}"]
        domains[i], reasons[i] = best, "; ".join(best_why[:6])
    return domains, reasons


class RouteStep(Step[RouteConfig]):
    """Add `domain` and `domain_reason` to every record."""

    name: ClassVar[str] = "route"
    config_model: ClassVar[type[StepConfig]] = RouteConfig

    def __init__(self, config: RouteConfig) -> None:
        super().__init__(config)
        self._rules = {d: CompiledRule(r) for d, r in config.rules.items()}

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        domains, reasons = route_batch(table, self._rules, self.config)
        for name in ("domain", "domain_reason"):
            if name in table.column_names:
                table = table.drop_columns([name])
        table = table.append_column("domain", pa.array(domains, pa.string()))
        table = table.append_column("domain_reason", pa.array(reasons, pa.string()))
        return keep_all(table)
