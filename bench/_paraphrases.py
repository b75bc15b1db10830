"""A deterministic planted set of paraphrase duplicates and hard negatives, mixed into real ShareGPT prompts.

Used by ``bench/semdedup.py``. The planted records are prompts rendered from templates:

- an *intent* is a family (what kind of request: a programming task, a sum, a capital, a translation...)
  with one value per slot ("reverse a list" + "Rust"); it is rendered 1-4 times, each time by a DIFFERENT
  template of its family that means the same thing ("How do I X in Y?", "What's the best way to X in Y?",
  "In Y, how can I X?", "X in Y — how?"), with a synonym drawn per slot ("reverse a list" / "flip a list so
  the last element comes first") and, for about a quarter of the renderings, a typo or a case change;
- *planted duplicate pairs* are all pairs of records of one intent;
- *hard negatives* are intents of the same family whose slots differ in exactly one value ("reverse a list
  in Python" / "reverse a list in Rust", "capital of France" / "capital of Spain", "sum of 17 and 25" /
  "sum of 17 and 26"): about half of the intents come with one or two such siblings, each rendered at least
  once by a template its group used; every pair of records rendered by the SAME template for two intents one
  slot apart (sibling or not) is a hard-negative pair, and linking it is a false link.

The background is real ShareGPT first prompts (the first human turn of each conversation, exact duplicates
removed, in a seeded order), unlabelled: links among them are printed, not scored. Every record, planted
or not, gets a distinct generic one-sentence answer, so near-dedup (which hashes the whole conversation)
sees the prompt plus an answer that neither helps nor hurts it.

The planted set depends only on (`planted`, `seed`), so a bigger corpus for the scaling runs holds the
same planted records plus more background.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

# A slot value is a tuple of synonyms (one is drawn per rendering).
Value = tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """A kind of request: slots (each a list of values), templates that all mean the same, and which slots a
    hard-negative sibling may change (numeric slots change by a small step: 25 -> 26)."""

    name: str
    slots: tuple[tuple[Value, ...], ...]
    templates: tuple[str, ...]
    vary: tuple[int, ...] = ()
    numeric: tuple[int, ...] = ()
    symmetric: bool = False  # the first two slots commute ("sum of 17 and 25" = "sum of 25 and 17")

    def key(self, slots: tuple[int, ...]) -> tuple[int, ...]:
        if self.symmetric:
            return (*sorted(slots[:2]), *slots[2:])
        return slots

    def one_apart(self, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        """Whether intents `a` and `b` differ in exactly one value, of a slot a sibling may change (for a
        symmetric family the first two slots are compared as a pair: {list, tuple} vs {tuple, set})."""
        if self.symmetric:
            shared = len(set(a[:2]) & set(b[:2]))
            rest = [i for i in range(2, len(a)) if a[i] != b[i]]
            return (shared == 1 and not rest) or (set(a[:2]) == set(b[:2]) and len(rest) == 1
                                                  and rest[0] in self.vary)
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 and diff[0] in self.vary

    def render(self, template: str, slots: tuple[int, ...], rng: random.Random) -> str:
        fields: dict[str, str] = {}
        for i, idx in enumerate(slots):
            word = rng.choice(self.slots[i][idx])
            fields[f"s{i}"] = word
            fields[f"S{i}"] = word[:1].upper() + word[1:]
        return template.format(**fields)


def _vals(*items: str | Value) -> tuple[Value, ...]:
    return tuple((v,) if isinstance(v, str) else v for v in items)


def _numbers(lo: int, hi: int) -> tuple[Value, ...]:
    return tuple((str(n),) for n in range(lo, hi + 1))


_CODE_TASKS = _vals(
    ("reverse a list", "reverse the order of a list", "flip a list so the last element comes first"),
    ("read a CSV file", "load a CSV file", "parse a CSV file from disk"),
    ("sort a dictionary by its values", "order a dict by value"),
    ("remove duplicate items from a list", "deduplicate a list", "get rid of repeated elements in a list"),
    ("check whether a string is a palindrome", "test if a string reads the same backwards"),
    ("send an HTTP GET request", "make a GET request to a URL", "fetch a web page over HTTP"),
    ("find the largest number in an array", "get the maximum value of an array"),
    ("convert a string to an integer", "parse an integer from a string", "turn a string into an int"),
    ("read a text file line by line", "iterate over the lines of a text file"),
    ("count how often each word appears in a text", "compute word frequencies for a string"),
    ("merge two sorted lists into one sorted list", "combine two sorted arrays so the result stays sorted"),
    ("get the current date and time", "find out today's date and the time right now"),
    ("split a string on commas", "break a comma-separated string into parts"),
    ("compute the factorial of a number", "calculate n factorial"),
    ("generate a random integer between 1 and 100", "pick a random whole number from 1 to 100"),
    ("pause execution for two seconds", "sleep for 2 seconds"),
)
_LANGS = _vals("Python", "JavaScript", "Rust", "Go", "Java", "C++", "Ruby", "C#", "TypeScript", "Kotlin", "Swift",
               "PHP")
_COUNTRIES = _vals("France", "Spain", "Germany", "Italy", "Portugal", "Japan", "Canada", "Australia", "Brazil",
                   "Argentina", "Egypt", "Kenya", "Nigeria", "India", "China", "Mexico", "Peru", "Chile", "Norway",
                   "Sweden", "Finland", "Poland", "Greece", "Turkey", "Thailand", "Vietnam", "Indonesia",
                   "South Korea", "New Zealand", "Ireland", "Austria", "Hungary", "Morocco", "Colombia", "Cuba")
_BOOKS = _vals("Pride and Prejudice", "War and Peace", "The Great Gatsby", "Moby-Dick", "Crime and Punishment",
               "One Hundred Years of Solitude", "Don Quixote", "Frankenstein", "Jane Eyre", "The Catcher in the Rye",
               "Brave New World", "Anna Karenina", "The Odyssey", "Les Misérables", "Wuthering Heights",
               "The Brothers Karamazov", "Great Expectations", "Dracula", "Middlemarch", "The Trial")
_STAINS = _vals("red wine", "coffee", "marker", "grease", "blood", "tomato sauce")
_SURFACES = _vals(("a carpet", "a rug"), ("a white shirt", "a white T-shirt"), "a wooden table",
                  ("a couch", "a sofa"), "a pair of jeans")
_METHODS = _vals("boil", "bake", "grill", "roast", "steam")
_FOODS = _vals("potatoes", ("a chicken breast", "chicken breasts"), ("salmon", "a salmon fillet"), "broccoli",
               "carrots", "sweet potatoes")
_FORMS = _vals("poem", "haiku", "limerick", ("short story", "brief story"), "sonnet", "song", "blog post", "speech",
               "bedtime story", "rap verse")
_TOPICS = _vals("the ocean", ("autumn leaves", "leaves falling in autumn"), ("a lost cat", "a cat that got lost"),
                "friendship", ("the city at night", "a city at night"), "first love", "a rainy Monday",
                "climbing a mountain", "an old lighthouse", "time travel", "a robot learning to paint",
                "grandma's kitchen")
_PHRASES = _vals("Where is the train station?", "I would like a cup of coffee", "Thank you very much",
                 "How much does this cost?", "Good morning, how are you?", "I am lost", "The bill, please",
                 "Nice to meet you", "I don't understand", "Can you help me?", "My name is Sam",
                 "What time is it?")
_TARGETS = _vals("French", "Spanish", "German", "Italian", "Japanese", "Portuguese", "Korean", "Dutch", "Turkish",
                 "Chinese", "Russian", "Swedish")
_CONCEPTS = _vals("recursion", "photosynthesis", "inflation", "blockchain", "quantum entanglement",
                  "gradient descent", "supply and demand", "the Doppler effect", "compound interest",
                  "natural selection", "public-key cryptography", "black holes", "plate tectonics",
                  "the immune system", "the greenhouse effect", "machine learning overfitting")
_STRUCTURES = _vals("a list", "a tuple", "a set", ("a dictionary", "a dict"), "a frozenset", "a deque",
                    "a NumPy array", "a generator")
_RECIPIENTS = _vals(("boss", "manager"), "landlord", "professor", "neighbor", "team lead", "doctor")
_REQUESTS = _vals(("a day off next Friday", "next Friday off"), "a raise", ("an extension on the deadline",
                  "more time on the deadline"), "a letter of recommendation", "help moving a couch",
                  ("a refund of my deposit", "my deposit back"), "a meeting next week")
_EVENTS = _vals("the fall of the Berlin Wall", ("the first Moon landing", "the first landing on the Moon"),
                "the sinking of the Titanic", "the signing of the Magna Carta", "the start of World War I",
                "the end of World War II", "the Battle of Hastings", "the storming of the Bastille",
                "the assassination of Julius Caesar", "the invention of the printing press",
                "the collapse of the Soviet Union", "the founding of Rome")
_NAMES = _vals("Tom", "Anna", "Ravi", "Maria", "Kenji", "Fatima", "Lucas", "Chloe")
_ITEMS = _vals("apples", "pencils", "marbles", "stickers", "books", "cookies")
_UNITS = (("miles", "kilometers"), ("pounds", "kilograms"), ("hours", "minutes"), ("gallons", "liters"))


def _unit_family(big: str, small: str) -> Family:
    return Family(f"convert_{big}", (_numbers(2, 60),), (
        f"How many {small} are in {{s0}} {big}?",
        f"Convert {{s0}} {big} to {small}.",
        f"{{s0}} {big} is how many {small}?",
        f"What is {{s0}} {big} in {small}?",
        f"How many {small} make up {{s0}} {big}?",
        f"Please convert {{s0}} {big} into {small} for me.",
    ), vary=(0,), numeric=(0,))


FAMILIES: tuple[Family, ...] = (
    Family("code", (_CODE_TASKS, _LANGS), (
        "How do I {s0} in {s1}?",
        "What's the best way to {s0} in {s1}?",
        "Can you show me how to {s0} using {s1}",
        "In {s1}, how can I {s0}?",
        "{S0} in {s1} — how?",
        "Write some {s1} code that will {s0}.",
        "I need to {s0} in {s1}. What is the idiomatic way to do it?",
        "Give me a {s1} snippet to {s0}, please.",
    ), vary=(0, 1)),
    Family("sum", (_numbers(2, 99), _numbers(2, 99)), (
        "What is the sum of {s0} and {s1}?",
        "What do you get when you add {s0} and {s1}?",
        "Add {s0} to {s1}. What's the result?",
        "{s0} plus {s1} equals what?",
        "Calculate {s0} + {s1}.",
        "If I add {s1} to {s0}, what number do I get?",
    ), vary=(0, 1), numeric=(0, 1), symmetric=True),
    Family("word_problem", (_NAMES, _numbers(2, 40), _numbers(2, 40), _ITEMS), (
        "{s0} has {s1} {s3} and buys {s2} more. How many {s3} does {s0} have now?",
        "If {s0} starts with {s1} {s3} and then gets {s2} more, how many {s3} does {s0} end up with?",
        "{s0} had {s1} {s3}, then bought another {s2}. What's the total number of {s3} {s0} has?",
        "Starting from {s1} {s3}, {s0} purchases {s2} additional ones. How many {s3} does {s0} have in total?",
        "After buying {s2} more {s3}, how many does {s0} have if {s0} had {s1} to begin with?",
    ), vary=(1, 2, 3), numeric=(1, 2)),
    Family("capital", (_COUNTRIES,), (
        "What is the capital of {s0}?",
        "What's {s0}'s capital city?",
        "Which city is the capital of {s0}?",
        "Name the capital city of {s0}.",
        "capital of {s0}?",
        "Tell me what the capital of {s0} is.",
    ), vary=(0,)),
    Family("author", (_BOOKS,), (
        "Who wrote {s0}?",
        "Who is the author of {s0}?",
        "Which writer wrote the book {s0}?",
        "{s0} was written by whom?",
        "Who's the author of the novel {s0}?",
        "Can you tell me who wrote {s0}?",
    ), vary=(0,)),
    Family("stain", (_STAINS, _SURFACES), (
        "How do I remove a {s0} stain from {s1}?",
        "What's the best way to get a {s0} stain out of {s1}?",
        "Can you show me how to clean a {s0} stain off {s1}?",
        "{S0} stain on {s1} — how do I get rid of it?",
        "Any tips for removing {s0} stains from {s1}?",
        "I spilled {s0} on {s1}. How can I get the stain out?",
    ), vary=(0, 1)),
    Family("cook_time", (_METHODS, _FOODS), (
        "How long should I {s0} {s1}?",
        "How many minutes does it take to {s0} {s1}?",
        "What's the right cooking time if I want to {s0} {s1}?",
        "If I {s0} {s1}, how long does it take?",
        "Cooking time to {s0} {s1}?",
        "For how long do you {s0} {s1}?",
    ), vary=(0, 1)),
    Family("writing", (_FORMS, _TOPICS), (
        "Write a {s0} about {s1}.",
        "Can you compose a {s0} on the subject of {s1}?",
        "I'd like a {s0} about {s1}, please.",
        "Please create a {s0} whose theme is {s1}.",
        "Could you write me a {s0} about {s1}?",
        "Compose a {s0} that is about {s1}",
    ), vary=(0, 1)),
    Family("translate", (_PHRASES, _TARGETS), (
        "Translate '{s0}' into {s1}.",
        "How do you say '{s0}' in {s1}?",
        "What is '{s0}' in {s1}?",
        "Can you translate the phrase '{s0}' to {s1} for me?",
        "'{s0}' — what's the {s1} translation?",
        "Please give me the {s1} version of '{s0}'.",
    ), vary=(0, 1)),
    Family("explain", (_CONCEPTS,), (
        "Explain {s0} in simple terms.",
        "Can you explain {s0} like I'm five?",
        "What is {s0}? Please keep it simple.",
        "Give me a beginner-friendly explanation of {s0}.",
        "I don't really get {s0}. Could you break it down for me?",
        "ELI5: {s0}",
    ), vary=(0,)),
    Family("compare", (_STRUCTURES, _STRUCTURES), (
        "What is the difference between {s0} and {s1} in Python?",
        "How does {s0} differ from {s1} in Python?",
        "Python: {s0} vs {s1}, what's the difference?",
        "Compare {s0} and {s1} in Python.",
        "Can you explain how {s0} and {s1} differ in Python?",
    ), vary=(0, 1), symmetric=True),
    Family("email", (_RECIPIENTS, _REQUESTS), (
        "Write an email to my {s0} asking for {s1}.",
        "Draft an email asking my {s0} for {s1}.",
        "Help me write a message to my {s0} requesting {s1}.",
        "Can you write an email I can send my {s0} to ask for {s1}?",
        "I need to email my {s0} to ask for {s1}. Can you draft it?",
    ), vary=(0, 1)),
    Family("history", (_EVENTS,), (
        "When did {s0} happen?",
        "In what year did {s0} take place?",
        "What year was {s0}?",
        "When was {s0}?",
        "Can you tell me the date of {s0}?",
        "{S0} — what year was that?",
    ), vary=(0,)),
    *(_unit_family(big, small) for big, small in _UNITS),
)

_ANSWER_OPENERS = ("Sure.", "Of course.", "Happy to help.", "Good question.", "Here you go.", "Certainly.",
                   "Glad you asked.", "No problem.")
_ANSWER_BODIES = ("The short answer is below, with a note on the details.",
                  "Here is one way to look at it, step by step.",
                  "There are a few ways to approach this; the simplest comes first.",
                  "The key idea fits in a sentence, and the rest follows from it.",
                  "Below is a concise explanation you can adapt.",
                  "Let me walk you through it briefly.")
_ANSWER_WORDS = ("amber", "birch", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
                 "kestrel", "lagoon", "meadow", "nectar", "onyx", "pebble", "quill", "raven", "saffron", "tundra")


def answer_sentence(rng: random.Random, i: int) -> str:
    """A short generic answer, distinct per record `i` (it carries nothing about the prompt)."""
    return f"{rng.choice(_ANSWER_OPENERS)} {rng.choice(_ANSWER_BODIES)} (Ref {rng.choice(_ANSWER_WORDS)}-{i}.)"


def _typo(text: str, rng: random.Random) -> str:
    """One light corruption: lower case, no final punctuation, two letters swapped, a letter dropped, 'pls'."""
    kind = rng.randrange(5)
    if kind == 0:
        return text.lower()
    if kind == 1 and text[-1:] in "?.":
        return text[:-1]
    if kind == 4 and "please" in text:
        return text.replace("please", "pls")
    words = text.split(" ")
    long_words = [k for k, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not long_words:
        return text.lower()
    k = rng.choice(long_words)
    w = words[k]
    p = rng.randrange(1, len(w) - 2)
    words[k] = w[:p] + w[p + 1] + w[p] + w[p + 2:] if kind in (2, 4) else w[:p] + w[p + 1:]
    return " ".join(words)


@dataclass
class Planted:
    """One planted record: its prompt, intent id, family and slot values (indices)."""

    text: str
    intent: int
    family: str
    slots: tuple[int, ...]
    template: int


def _sibling(fam: Family, slots: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
    """`slots` with one varied slot changed (a numeric one by 1-3)."""
    s = list(slots)
    i = rng.choice(fam.vary)
    n = len(fam.slots[i])
    if i in fam.numeric:
        step = rng.choice((-3, -2, -1, 1, 1, 1, 2, 3))
        s[i] = min(n - 1, max(0, s[i] + step))
    else:
        s[i] = rng.randrange(n)
    return tuple(s)


def build_planted(n_records: int, seed: int) -> list[Planted]:
    """About `n_records` planted prompts (intents round-robin over the families), in generation order."""
    rng = random.Random(f"planted:{seed}")
    used: set[tuple[str, tuple[int, ...]]] = set()
    out: list[Planted] = []
    intent = 0
    fam_order = list(FAMILIES)
    k = 0
    misses = 0
    while len(out) < n_records and misses < 10_000:
        fam = fam_order[k % len(fam_order)]
        k += 1
        base = tuple(rng.randrange(len(v)) for v in fam.slots)
        if fam.symmetric and base[0] == base[1]:
            misses += 1
            continue
        group = [base]
        if rng.random() < 0.5:
            for _ in range(rng.choice((1, 1, 2))):
                group.append(_sibling(fam, rng.choice(group), rng))
        group_templates: list[int] = []
        for slots in group:
            key = (fam.name, fam.key(slots))
            if key in used or (fam.symmetric and slots[0] == slots[1]):
                misses += 1
                continue
            used.add(key)
            copies = rng.choices((1, 2, 3, 4), weights=(2, 4, 3, 2))[0]
            templates = rng.sample(range(len(fam.templates)), min(copies, len(fam.templates)))
            if group_templates and not set(templates) & set(group_templates):
                templates[0] = rng.choice(group_templates)  # a sibling shares a template with its group
            group_templates += templates
            seen: set[str] = set()
            for t in templates:
                text = fam.render(fam.templates[t], slots, rng)
                if rng.random() < 0.25:
                    text = _typo(text, rng)
                if text in seen:
                    continue
                seen.add(text)
                out.append(Planted(text, intent, fam.name, slots, t))
            intent += 1
    return out


def planted_pairs(records: list[Planted]) -> set[tuple[int, int]]:
    """(i, j), i < j, of records of one intent (indices into `records`)."""
    by_intent: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_intent.setdefault(r.intent, []).append(i)
    return {p for m in by_intent.values() for p in combinations(m, 2)}


def hard_negative_pairs(records: list[Planted], families: tuple[Family, ...] = FAMILIES) -> set[tuple[int, int]]:
    """(i, j), i < j, of records rendered by the same template for two intents of one family whose slots
    differ in exactly one value ("How do I reverse a list in Python?" / "How do I reverse a list in Rust?")."""
    fams = {f.name: f for f in families}
    intents: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, r in enumerate(records):
        intents.setdefault((r.family, fams[r.family].key(r.slots)), []).append(i)
    by_family: dict[str, list[tuple[tuple[int, ...], list[int]]]] = {}
    for (fam, slots), members in intents.items():
        by_family.setdefault(fam, []).append((slots, members))
    out: set[tuple[int, int]] = set()
    for fam, groups in by_family.items():
        for (a, ma), (b, mb) in combinations(groups, 2):
            if fams[fam].one_apart(a, b):
                out.update((min(i, j), max(i, j)) for i in ma for j in mb
                           if records[i].template == records[j].template)
    return out


# ----------------------------------------------------------------------------------------------------
# Background: real ShareGPT first prompts


def sharegpt_prompts(seed: int) -> Iterator[str]:
    """Distinct non-empty first human prompts of ShareGPT V3, in a seeded order (the loader `load_turns` in
    `bench/_pii_planted.py` uses; the whole file is read once, ~1 s)."""
    from operators.schema import first_exchange
    from scripts.demo_corpus import _records, _sharegpt_path

    seen: set[str] = set()
    prompts: list[str] = []
    for r in _records(_sharegpt_path(), 0, 10**9):
        conv = [t for t in r.get("conversations", []) if isinstance(t, dict) and isinstance(t.get("value"), str)]
        prompt, _ = first_exchange(conv)
        if prompt.strip() and prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    random.Random(f"background:{seed}").shuffle(prompts)
    yield from prompts


@dataclass
class PlantedCorpus:
    """The records (in their final, shuffled order) and what was planted in them."""

    prompts: list[str]
    answers: list[str]
    planted: dict[int, Planted]  # record index -> planted record (the rest is background)
    planted_pairs: set[tuple[int, int]] = field(default_factory=set)  # record indices, i < j
    hard_negative_pairs: set[tuple[int, int]] = field(default_factory=set)
    background_available: int = 0

    def rows(self, reward_seed: int = 0) -> list[dict[str, Any]]:
        """Canonical records (`operators.schema.CANONICAL_SCHEMA`): ids r000000..., a reward each."""
        rng = random.Random(f"reward:{reward_seed}")
        return [{"id": f"r{i:06d}", "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}],
                 "label": None, "langdetect": None, "source": "planted" if i in self.planted else "sharegpt",
                 "reward": round(rng.random(), 4), "origin": None}
                for i, (p, a) in enumerate(zip(self.prompts, self.answers, strict=True))]


def build_corpus(n_records: int, n_planted: int, seed: int) -> PlantedCorpus:
    """`n_records` records: about `n_planted` planted prompts (the same for any `n_records`), the rest ShareGPT
    first prompts, shuffled together. Deterministic for the arguments."""
    planted = build_planted(n_planted, seed)[:n_records]
    background: list[str] = []
    available = 0
    planted_texts = {p.text for p in planted}
    for prompt in sharegpt_prompts(seed):
        available += 1
        if len(background) < n_records - len(planted) and prompt not in planted_texts:
            background.append(prompt)
    if len(planted) + len(background) < n_records:
        raise ValueError(f"only {available} distinct ShareGPT first prompts: ask for fewer records")
    items: list[tuple[str, Planted | None]] = [(p.text, p) for p in planted] + [(b, None) for b in background]
    rng = random.Random(f"shuffle:{seed}:{n_records}")
    rng.shuffle(items)
    answers = [answer_sentence(rng, i) for i in range(len(items))]
    index = {id(p): i for i, (_, p) in enumerate(items) if p is not None}
    order = [index[id(p)] for p in planted]  # planted list position -> record index

    def remap(pairs: set[tuple[int, int]]) -> set[tuple[int, int]]:
        return {(min(order[a], order[b]), max(order[a], order[b])) for a, b in pairs}

    return PlantedCorpus(
        prompts=[t for t, _ in items], answers=answers,
        planted={i: p for i, (_, p) in enumerate(items) if p is not None},
        planted_pairs=remap(planted_pairs(planted)), hard_negative_pairs=remap(hard_negative_pairs(planted)),
        background_available=available)


__all__ = ["FAMILIES", "Family", "Planted", "PlantedCorpus", "answer_sentence", "build_corpus", "build_planted",
           "hard_negative_pairs", "planted_pairs", "sharegpt_prompts"]
