"""A math target set the project writes itself, for the embedded demo and tests without downloads.

GSM8K and MATH are the paper's math targets; no PyPI package ships them, so the demo's DSIR math
target is generated here: grade-school word problems from templates with seeded numbers. Production
runs point DSIR at the real GSM8K/MATH files instead (any `file://` or `s3://` URI).
"""

from __future__ import annotations

import random

BUILTIN_MATH = "builtin://math_word_problems"

_TEMPLATES = (
    "{a} has {x} apples. She buys {y} more and gives {z} to her friend. How many apples does {a} have now?",
    "A train travels {x} miles in {y} hours. What is its average speed in miles per hour?",
    "{a} earns ${x} per hour and works {y} hours a week. How much does {a} earn in {z} weeks?",
    "A rectangle has a length of {x} cm and a width of {y} cm. What is its area and its perimeter?",
    "Solve for x: {x}x + {y} = {z}.",
    "What is {x}% of {y}? Round your answer to two decimal places.",
    "{a} read {x} pages on Monday and twice as many on Tuesday. How many pages did {a} read in total?",
    "A store sells pencils at {x} cents each. How many pencils can you buy with ${y}?",
    "The sum of two numbers is {x} and their difference is {y}. What are the two numbers?",
    "If a recipe needs {x} cups of flour for {y} cookies, how much flour is needed for {z} cookies?",
    "A tank holds {x} liters and leaks {y} liters per hour. After how many hours is it empty?",
    "Find the probability of drawing a red ball from a bag with {x} red and {y} blue balls.",
    "Compute the derivative of f(x) = {x}x^3 - {y}x + {z}.",
    "What is the least common multiple of {x} and {y}?",
    "A shirt costs ${x} and is discounted by {y}%. What is the sale price?",
    "{a} is {x} years older than her brother, who is {y}. How old will {a} be in {z} years?",
    "Evaluate the integral of {x}x^2 from 0 to {y}.",
    "A triangle has sides {x}, {y} and {z}. Is it a right triangle? Explain.",
    "How many minutes are there in {x} hours and {y} minutes?",
    "The average of {x}, {y} and {z} is what number?",
)
_NAMES = ("Janet", "Tom", "Maria", "Wei", "Aisha", "Lucas", "Priya", "Omar")


def math_word_problems(n: int = 600, seed: int = 0) -> list[str]:
    """`n` templated grade-school math problems (deterministic for a seed)."""
    rng = random.Random(seed)
    return [rng.choice(_TEMPLATES).format(a=rng.choice(_NAMES), x=rng.randint(2, 99), y=rng.randint(2, 60),
                                          z=rng.randint(2, 40)) for _ in range(n)]
