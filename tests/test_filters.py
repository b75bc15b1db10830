"""Rule filters: every drop reason from a crafted record, clean records kept, config errors named."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators.schema import CANONICAL_SCHEMA
from operators.steps.filters.rules import ALL_REASONS, non_text_ratio, repeated_ngram_ratio
from operators.steps.filters.step import FilterConfig, FilterStep

GOOD_Q = "Explain how a hash map handles collisions in a few sentences."
GOOD_A = ("A hash map stores entries in buckets chosen by the key's hash. When two keys land in the same "
          "bucket, it either chains them in a small list or probes for another free slot.")


def rec(turns: list[tuple[str, str]], source: str = "src", lang: str = "en") -> dict[str, Any]:
    return {"id": str(hash((tuple(turns), source))), "conversations": [{"from": r, "value": v} for r, v in turns],
            "label": None, "langdetect": lang, "source": source, "reward": None, "origin": None}


CASES: dict[str, dict[str, Any]] = {
    "source_denied": rec([("human", GOOD_Q), ("gpt", GOOD_A)], source="spam"),
    "language": rec([("human", GOOD_Q), ("gpt", GOOD_A)], lang="de"),
    "too_few_turns": rec([("human", GOOD_Q)]),
    "too_many_turns": rec([("human", GOOD_Q), ("gpt", GOOD_A)] * 40),
    "too_short": rec([("human", "hi"), ("gpt", "yo")]),
    "too_long": rec([("human", GOOD_Q), ("gpt", "word " * 20_000)]),
    "empty_answer": rec([("human", GOOD_Q), ("gpt", "   ")]),
    "echoed_answer": rec([("human", GOOD_Q), ("gpt", GOOD_Q.upper() + "!")]),
    "refusal": rec([("human", GOOD_Q), ("gpt", "I’m sorry, but I can’t help with that request.")]),
    "template_residue": rec([("human", GOOD_Q), ("gpt", "As an AI language model, I think " + GOOD_A)]),
    "repetition": rec([("human", GOOD_Q), ("gpt", "the cat sat on the mat. " * 30)]),
    "non_text": rec([("human", GOOD_Q), ("gpt", "★☆♥♦♣♠" * 30)]),
}


def run(records: list[dict[str, Any]], **cfg: Any) -> tuple[pa.Table, pa.Table]:
    step = FilterStep(FilterConfig(sources_deny=["spam"], **cfg))
    res = step.transform(pa.Table.from_pylist(records, schema=CANONICAL_SCHEMA).to_batches()[0])
    assert res.kept.num_rows + res.dropped.num_rows == len(records)
    return res.kept, res.dropped


@pytest.mark.parametrize("reason", sorted(CASES))
def test_each_rule_drops_with_its_reason(reason: str) -> None:
    kept, dropped = run([CASES[reason]])
    assert kept.num_rows == 0
    assert dropped["reason"].to_pylist() == [reason]
    assert dropped["detail"][0].as_py()


def test_clean_records_pass_and_reasons_cover_the_rules() -> None:
    zh_q, zh_a = "写一个关于秋天的短句，要求有画面感。", "金黄的落叶铺满小路，风一吹便沙沙作响。"
    code_a = "Close the paren: `print(x)` — {x} is fine in f-strings."
    good = [rec([("system", "Be concise."), ("human", GOOD_Q), ("gpt", GOOD_A)]),
            rec([("human", zh_q), ("gpt", zh_a)], lang="zh"),
            rec([("human", "Fix this code: print(x"), ("gpt", code_a)])]
    kept, dropped = run(good + list(CASES.values()))
    assert kept.num_rows == 3
    assert sorted(dropped["reason"].to_pylist()) == sorted(CASES)
    assert set(CASES) <= set(ALL_REASONS)


def test_allow_list_placeholders_and_relaxed_rules() -> None:
    _, dropped = run([rec([("human", GOOD_Q), ("gpt", GOOD_A)], source="other")], sources_allow=["src"])
    assert dropped["reason"].to_pylist() == ["source_not_allowed"]
    _, dropped = run([rec([("human", "Summarize: {input}"), ("gpt", GOOD_A)])])
    assert dropped["reason"].to_pylist() == ["template_residue"]
    kept, _ = run([CASES["language"]], languages=[])  # an empty allow-list admits every language
    assert kept.num_rows == 1


def test_metrics() -> None:
    assert repeated_ngram_ratio("a b c a b c a b c", 3) == pytest.approx(4 / 7)
    assert repeated_ngram_ratio("one two three four five six seven", 3) == 0.0
    assert non_text_ratio("def f(x): return {x: 1}") == 0.0
    assert non_text_ratio("★★") == 1.0


def test_ascii_fast_paths_equal_the_regex_paths() -> None:
    """`words` and `non_text_ratio` take a translate table for ASCII text; on every ASCII character (controls,
    separators, punctuation) and mixed strings they must give what the regexes give."""
    import random
    import re

    from operators.steps.filters.rules import _TEXT_CHARS
    from operators.text.normalize import words

    rng = random.Random(4)
    alphabet = [chr(c) for c in range(128)] + ["é", "ß", "中", "İ", "\u2028", "★"]
    samples = ["".join(rng.choice(alphabet[:128] if k % 2 else alphabet) for _ in range(rng.randint(0, 60)))
               for k in range(3000)]
    samples += [chr(c) * 3 for c in range(128)] + ["Don't  STOP_now!\x1fok\x00", "x\x7fy\x1c\x1dz"]
    for text in samples:
        assert words(text) == re.findall(r"\w+", text.lower()), repr(text)
        want = len(_TEXT_CHARS.sub("", text)) / len(text) if text else 0.0
        assert non_text_ratio(text) == want, repr(text)
    assert any(non_text_ratio(t) > 0 for t in samples if t.isascii())  # controls count as non-text


def test_the_distinct_token_bound_decides_like_the_ngrams() -> None:
    """check_repetition skips building n-grams when the distinct-token bound already keeps a text under the
    limit: on random texts (few to many repeats, every n and limit) its verdict and the reported ratio are
    those of the exact n-gram count."""
    import random

    from operators.steps.filters.rules import _ngram_ratio
    from operators.text.normalize import words

    rng = random.Random(3)
    for _ in range(2000):
        vocab = [f"w{j}" for j in range(rng.randint(1, 40))]
        toks = words(" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 80))))
        n, limit = rng.randint(1, 4), rng.choice([0.0, 0.1, 0.35, 0.6, 1.0])
        exact = _ngram_ratio(toks, n)
        fast = _ngram_ratio(toks, n, limit)
        assert (fast > limit) == (exact > limit)
        if exact > limit:
            assert fast == exact
        assert fast >= exact - 1e-12  # the bound never understates


def test_bad_config_names_the_problem() -> None:
    with pytest.raises(ValidationError, match="min_turns"):
        FilterConfig(min_turns=5, max_turns=2)
    with pytest.raises(ValidationError, match="invalid regex"):
        FilterConfig(placeholders=["(unclosed"])
    with pytest.raises(ValidationError, match="max_repetition_ratio"):
        FilterConfig(max_repetition_ratio=2)
