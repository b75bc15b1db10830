"""Small evaluation sets the project generates itself, so the embedded demo evaluates with no download.

They are stand-ins, named as such in every report (`arithmetic`, `arithmetic_mc`, `chat`): templated
word problems with computed answers (GSM8K's record format), four-way multiple choice over the same
arithmetic (MMLU's record format), and a handful of MT-Bench-style open questions. Production points the
evaluation at the real GSM8K / MATH / MMLU / MT-Bench files (any file:// or s3:// URI).
"""

from __future__ import annotations

import random
from typing import Any

ARITHMETIC = "builtin://arithmetic"
ARITHMETIC_MC = "builtin://arithmetic_mc"
CHAT = "builtin://chat"
_NAMES = ("Janet", "Tom", "Maria", "Wei", "Aisha", "Lucas", "Priya", "Omar")


def _problem(rng: random.Random) -> tuple[str, int]:
    a, x, y = rng.choice(_NAMES), rng.randint(3, 60), rng.randint(2, 40)
    kind = rng.randrange(4)
    if kind == 0:
        z = rng.randint(1, x + y - 1)
        return f"{a} has {x} apples, buys {y} more and gives {z} away. How many apples does {a} have now?", x + y - z
    if kind == 1:
        return f"{a} earns ${x} per hour and works {y} hours. How many dollars does {a} earn?", x * y
    if kind == 2:
        return f"A box holds {x} pencils. How many pencils are in {y} boxes?", x * y
    return f"{a} read {x} pages on Monday and {y} pages on Tuesday. How many pages did {a} read?", x + y


def arithmetic(n: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """`n` word problems in GSM8K's format: `question`, `answer` ending in `#### <number>`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, ans = _problem(rng)
        out.append({"question": q, "answer": f"#### {ans}"})
    return out


def arithmetic_mc(n: int = 200, seed: int = 1) -> list[dict[str, Any]]:
    """`n` four-way multiple-choice problems in MMLU's format: `question`, `choice0..3`, `answer` index."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, ans = _problem(rng)
        wrong: set[int] = set()
        while len(wrong) < 3:
            w = ans + rng.choice((-1, 1)) * rng.randint(1, max(2, ans // 3))
            if w != ans and w >= 0:
                wrong.add(w)
        choices = [ans, *sorted(wrong)]
        rng.shuffle(choices)
        rec: dict[str, Any] = {"question": q, "answer": choices.index(ans), "subject": "arithmetic"}
        rec.update({f"choice{i}": str(c) for i, c in enumerate(choices)})
        out.append(rec)
    return out


_CHAT = (
    ("writing", "Write a short, friendly email inviting a colleague to a team lunch on Friday."),
    ("reasoning", "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies? Explain."),
    ("coding", "Explain what a Python list comprehension is and give one example."),
    ("stem", "Why is the sky blue? Answer in two or three sentences."),
    ("humanities", "Give three tips for making a persuasive argument in an essay."),
    ("roleplay", "Pretend you are a tour guide and describe a walk through an old city market."),
    ("extraction", "List the numbers in this sentence: 'We sold 12 apples, 7 pears and 30 plums.'"),
    ("math", "What is 15% of 80? Show your reasoning."),
)


def chat_questions() -> list[dict[str, Any]]:
    """Open questions in MT-Bench's format: `question_id`, `category`, `turns`."""
    return [{"question_id": i + 1, "category": c, "turns": [q]} for i, (c, q) in enumerate(_CHAT)]


BUILTIN = {ARITHMETIC: arithmetic, ARITHMETIC_MC: arithmetic_mc, CHAT: chat_questions}
