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


def _fuzz_records(count: int, seed: int) -> list[dict[str, Any]]:
    """Records built from pieces that sit on the batch gates' edges: whitespace only Python strips (\\x1c, \\x85,
    U+3000) around answers, echoes in other case, refusals with curly quotes, a Kelvin sign or a dotted capital
    I, phrases past an answer's head, placeholders, symbol soup, other scripts, system turns, missing languages."""
    import random

    rng = random.Random(seed)
    pieces = [GOOD_A, GOOD_Q, "I’M SORRY, BUT I CAN’T do that.", "As an AI language \u212aodel",
              "AS AN AI LANGUAGE MODEL",
              "x" * 390 + " i'm sorry, but i can't", "Fill in {input} please", "[INSERT NAME]", "< insert text >",
              "★☆♥♦♣♠" * 5, "#$%^&*" * 8, "金黄的落叶铺满小路，风一吹便沙沙作响。", "\u0130'm sorry, but \u0130 can't",
              "ΟΔΟΣ ΣΑΣ", "the cat sat on the mat. " * 12, "ok", "   ", "\x1c\x85\u3000", "{x} <b> [1]", "İ" * 3]
    spaces = ["", " ", "\n", "\x1c", "\x85", "\u3000", "\u00a0", "\t "]
    clean = [(GOOD_Q, GOOD_A), ("写一个关于秋天的短句，要求有画面感。", "金黄的落叶铺满小路，风一吹便沙沙作响。" * 3),
             ("Why is the sky blue? " * 3, "Sunlight scatters off the air, and blue light scatters most. " + GOOD_A),
             ("Ring the bell.", "\x07\x08\x1b" * 20 + " " + GOOD_A),
             ("Say it.", GOOD_A + " I\u2019m sorry, but I can\u2019t."),
             ("Who are you?", "AS AN A\u0130. " + GOOD_A)]
    records = []
    for i in range(count):
        turns: list[tuple[str, str]] = [("system", rng.choice(pieces))] if rng.random() < 0.2 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            q, a = rng.choice(clean)
            if rng.random() < 0.4:  # about half the records stay clean: the gates must clear them
                q = rng.choice(pieces) + rng.choice(["", " " + rng.choice(pieces)])
                a = rng.choice([q.upper(), q.lower() + "!", rng.choice(pieces) + " " + rng.choice(pieces), a])
            turns += [("human", rng.choice(spaces) + q), ("gpt", rng.choice(spaces) + a + rng.choice(spaces))]
        r = rec(turns, source=rng.choice(["src"] * 8 + ["spam", "web"]), lang=rng.choice(["en"] * 5 + ["zh", None]))
        r["id"] = f"r{i}"
        records.append(r)
    return records


@pytest.mark.parametrize("cfg", [
    {},
    {"languages": [], "min_answer_chars": 5, "max_non_text_ratio": 0.1, "max_repetition_ratio": 0.2},
    # Python lowers "Aİ" to "ai" and a combining dot: "as an ai" is in it, a case-insensitive RE2 "ai" is not.
    {"sources_allow": ["src"], "refusals": ["抱歉", "CAN'T"], "template_residue": ["ΣΑΣ", "as an ai"]},
    {"placeholders": [r"\binsert\b", r"todo"], "min_chars": 0, "max_turns": 3},
    {"placeholders": [], "refusals": [], "template_residue": []},
])
def test_batch_verdicts_equal_the_rules_record_by_record(cfg: dict[str, Any]) -> None:
    """The batch gates decide only where the rules look: every record's verdict (kept, or the first failing
    rule with its detail) equals `judge` on that record alone."""
    from operators.steps.filters.gates import may_fail, placeholder_gate
    from operators.steps.filters.rules import judge
    from operators.steps.filters.step import filter_batch

    records = _fuzz_records(600, seed=len(str(cfg)))
    config = FilterConfig(sources_deny=["spam"], **cfg)
    table = pa.Table.from_pylist(records, schema=CANONICAL_SCHEMA)
    flagged, python_non_text = may_fail(table, config.settings())
    if placeholder_gate(config.settings().placeholders) or not config.placeholders:  # else every prompt is read
        assert (~flagged).sum() > len(records) / 8 and (~flagged & python_non_text).any()  # both paths are taken
    res = filter_batch(table, config.settings())
    expected = {r["id"]: judge(r["conversations"], r["source"], r["langdetect"], config.settings()) for r in records}
    assert sorted(res.kept["id"].to_pylist()) == sorted(k for k, v in expected.items() if v is None)
    got = {i: (reason, detail) for i, reason, detail in zip(res.dropped["id"].to_pylist(),
                                                             res.dropped["reason"].to_pylist(),
                                                             res.dropped["detail"].to_pylist(), strict=True)}
    assert got == {k: v for k, v in expected.items() if v is not None}
    assert 0 < len(got) < len(records)


def test_gates_know_the_characters_python_reads_differently() -> None:
    """The case-insensitive pass flags the dotted capital I (Python lowers it to two characters); the default
    placeholders start with `<`, `[` or `{`; a pattern that starts with a word has no gate."""
    import re

    from operators.steps.filters import gates
    from operators.steps.filters.gates import fold_unsafe, placeholder_gate

    # The constants the gates use are what the installed Unicode tables say (an upgrade that moves one fails here).
    assert fold_unsafe() == gates.FOLD_UNSAFE == "\u0130"
    assert gates.python_whitespace() == gates.PYTHON_WHITESPACE
    assert placeholder_gate(FilterConfig().settings().placeholders) == "<[{"
    assert placeholder_gate((re.compile(r"\binsert\b"),)) is None
    assert placeholder_gate((re.compile(r"(?:\{\{|<<)x"),)) == "<{"
