"""Benchmark: near-duplicate detection (MinHash + LSH) against datasketch and rensa, in one run.

    python bench/dedup.py [--records 20000] [--seed 7] [--num-perm 128] [--ngram 5] [--threshold 0.7]
                          [--bands 16 --rows 8] [--edit-rate 0.01:0.05] [--minhash-seed 1]
                          [--skip datasketch,rensa] [--threads 1] [--repeats 3] [--keep]

1. Builds a deterministic corpus with planted near-duplicates: base documents of 100-300 words
   drawn (Zipf-like) from a seeded vocabulary of pseudo-words, with sentence case and punctuation,
   some sharing a boilerplate opener, ~4% written in Chinese (one token per character), ~5% with
   an accented word, a few empty or punctuation-only texts; ~30% of the bases get 1-4 copies, each
   lightly edited (adjacent word swaps and deletions at a per-copy rate drawn from
   ``--edit-rate``); ~5% get a near miss (their first 50-80% with a new ending, exact Jaccard
   ~0.33-0.67: linking it is a false positive); then everything is shuffled. Planted pairs are all
   pairs within one base's cluster. The exact shingle Jaccard of each is computed too, so recall is
   also reported against the pairs an LSH at ``--threshold`` is meant to find (exact Jaccard >= it):
   with 5-gram shingles every edited word breaks up to 5 shingles, so at a 5-10% edit rate most
   planted pairs fall below 0.7 (the default 1-5% keeps about half above it).
2. Runs each method in its own child process (own wall time and peak RSS; the corpus load is not
   timed; ours gets the Arrow column a step would read, the peers get Python strings), with the
   same num_perm, ngram, MinHash seed, bands x rows (16 x 8 by default: rensa needs bands to divide
   num_perm; the datasketch optimum for 0.7 is 14 x 9), threshold and normalized tokens:
   - ours: ``minhash_signatures`` -> ``band_hashes`` -> ``band_rows`` -> ``candidate_pairs``
     verified by estimated Jaccard >= threshold;
   - datasketch: ``MinHash.update_batch`` per record + ``MinHashLSH`` insert and query, candidates
     verified with ``MinHash.jaccard``;
   - rensa: ``RMinHash.from_token_sets`` + ``RMinHashLSH`` insert and ``query_all``, candidates
     verified with ``RMinHash.jaccard``; after the timed run, its sketch kernel alone is timed on
     our 64-bit shingle hashes next to ours on the same input (``rensa_kernel_s``,
     ``ours_kernel_s``), to show where the time goes.
   Every method's verified links go through the same connected components; predicted pairs are
   all pairs within a predicted component (what dedup acts on).
   The methods run ``--repeats`` rounds, interleaved (ours, datasketch, rensa, ours, ...), so every side
   sees the same load; each rate is the median of its rounds with their spread, and each speed-up is the
   median of the per-round ratios (ours against the peer run next to it). The machine's load average is
   printed at the start and the end.
3. Prints human-readable lines, then LAST one JSON line: records, records_per_s,
   datasketch_records_per_s, rensa_records_per_s, speedup_vs_datasketch, speedup_vs_rensa,
   precision/recall/f1/recall_at_threshold/peak_rss_mb per method, and the parameters.

Children run with one thread each (RAYON_NUM_THREADS=1, BLAS/OpenMP threads 1): rates are per
core, as a shard-parallel map stage uses them. ``--threads`` changes that.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `python bench/dedup.py`
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

METHODS = ("ours", "datasketch", "rensa")

# ----------------------------------------------------------------------------------------------------
# Corpus


_OPENERS = [
    "Please answer the following question carefully and explain your reasoning step by step",
    "You are a helpful assistant. Read the text below and respond in a clear and concise way",
    "Write a detailed response to the instruction that appropriately completes the request",
    "Below is an instruction that describes a task paired with an input that provides context",
    "Summarize the main points of the passage and list any open questions it raises",
]


def _vocabulary(rng: random.Random, size: int) -> tuple[list[str], list[float]]:
    """Pseudo-words of 2-11 letters with Zipf-like weights (a few very common, a long tail)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(dict.fromkeys("".join(rng.choice(letters) for _ in range(rng.randint(2, 11)))
                               for _ in range(size)))
    cum: list[float] = []
    total = 0.0
    for i in range(len(words)):
        total += 1.0 / (i + 1) ** 1.05
        cum.append(total)
    return words, cum


def _latin_doc(rng: random.Random, words: list[str], cum: list[float]) -> list[str]:
    """A base document as a word list: sentence case, commas and periods, maybe an opener."""
    n = rng.randint(100, 300)
    out: list[str] = rng.choice(_OPENERS).split() if rng.random() < 0.15 else []
    picks = rng.choices(words, cum_weights=cum, k=n)
    sentence_left = 0
    for w in picks:
        if sentence_left == 0:
            w = w.capitalize()
            sentence_left = rng.randint(6, 20)
        sentence_left -= 1
        if sentence_left == 0:
            w += "."
        elif rng.random() < 0.05:
            w += ","
        out.append(w)
    if rng.random() < 0.05:  # an accented word sends the text down the Unicode tokenizer path
        out.insert(rng.randrange(len(out)), rng.choice(["café", "naïve", "Zürich", "résumé", "São"]))
    return out


def _chinese_doc(rng: random.Random, chars: list[str]) -> list[str]:
    """A base document as a character list (each Han character is one token)."""
    out = rng.choices(chars, k=rng.randint(100, 300))
    for i in range(rng.randint(6, 20), len(out), rng.randint(8, 25)):
        out[i] += "，" if rng.random() < 0.7 else "。"
    return out


def _edit(rng: random.Random, units: list[str], edit_rate: float) -> list[str]:
    """A light edit: each unit is, with probability `edit_rate`, swapped with its successor or deleted."""
    out = list(units)
    i = 0
    while i < len(out):
        if rng.random() < edit_rate:
            if rng.random() < 0.5 and i + 1 < len(out):
                out[i], out[i + 1] = out[i + 1], out[i]
                i += 1
            else:
                del out[i]
                continue
        i += 1
    return out


def build_corpus(n: int, seed: int, edit_lo: float, edit_hi: float) -> tuple[list[str], list[int]]:
    """`n` texts and, per text, its planted cluster id (-1: no planted duplicate). Deterministic."""
    rng = random.Random(seed)
    words, cum = _vocabulary(rng, 20_000)
    chars = [chr(c) for c in rng.sample(range(0x4E00, 0x9FA5), 2500)]
    texts: list[str] = []
    cluster: list[int] = []
    n_base = 0
    while len(texts) < n:
        if rng.random() < 0.003:
            texts.append(rng.choice(["", "   ", "!!!", "...", "?", "- -"]))  # empty after normalization
            cluster.append(-1)
            continue
        chinese = rng.random() < 0.04
        units = _chinese_doc(rng, chars) if chinese else _latin_doc(rng, words, cum)
        sep = "" if chinese else " "
        copies = rng.randint(1, 4) if rng.random() < 0.30 else 0
        copies = min(copies, n - len(texts) - 1)
        cid = n_base if copies > 0 else -1
        texts.append(sep.join(units))
        cluster.append(cid)
        for _ in range(copies):
            texts.append(sep.join(_edit(rng, units, rng.uniform(edit_lo, edit_hi))))
            cluster.append(cid)
        if rng.random() < 0.05 and len(texts) < n:
            # A near miss: the base's first 50-80% with a fresh ending (exact Jaccard ~0.33-0.67).
            # Not a planted duplicate: linking it is a false positive.
            keep = int(len(units) * rng.uniform(0.5, 0.8))
            fresh = _chinese_doc(rng, chars) if chinese else _latin_doc(rng, words, cum)
            texts.append(sep.join(units[:keep] + fresh[: len(units) - keep]))
            cluster.append(-1)
        n_base += 1
    order = list(range(n))
    rng.shuffle(order)
    return [texts[i] for i in order], [cluster[i] for i in order]


def planted_pairs(cluster: list[int]) -> set[tuple[int, int]]:
    """All (i, j), i < j, of texts in the same planted cluster."""
    members: dict[int, list[int]] = {}
    for i, c in enumerate(cluster):
        if c >= 0:
            members.setdefault(c, []).append(i)
    return {p for m in members.values() for p in combinations(sorted(m), 2)}


def exact_jaccards(texts: list[str], pairs: Iterable[tuple[int, int]], ngram: int) -> dict[tuple[int, int], float]:
    """Exact Jaccard of the shingle-string sets of each pair (the ground truth for the threshold)."""
    from operators.dedup import tokenize

    pairs = list(pairs)
    rows = sorted({i for p in pairs for i in p})
    tokens = dict(zip(rows, tokenize([texts[i] for i in rows]), strict=True))

    def shingle_set(toks: list[str]) -> set[str]:
        if len(toks) < ngram:
            return {" ".join(toks)} if toks else set()
        return {" ".join(toks[k: k + ngram]) for k in range(len(toks) - ngram + 1)}

    sets = {i: shingle_set(tokens[i]) for i in rows}
    out = {}
    for i, j in pairs:
        a, b = sets[i], sets[j]
        union = len(a | b)
        out[(i, j)] = len(a & b) / union if union else 0.0
    return out


# ----------------------------------------------------------------------------------------------------
# Children: one method each, timed from loaded texts to verified links


def _component_pairs(n: int, src: Any, dst: Any) -> Any:
    """All pairs within the connected components of the links, as an (m, 2) int64 array (i < j)."""
    import numpy as np

    from operators.dedup import connected_components

    labels = connected_components(n, src, dst)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    out: list[tuple[int, int]] = []
    bounds = np.flatnonzero(np.diff(sorted_labels)) + 1
    for group in np.split(order, bounds):
        if len(group) > 1:
            out.extend(combinations(sorted(int(g) for g in group), 2))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _shingle_lists(texts: list[str], ngram: int) -> list[list[str]]:
    """Shingle strings per text from the shared tokenizer (what peers take as input tokens)."""
    from operators.dedup import tokenize

    out = []
    for toks in tokenize(texts):
        if len(toks) < ngram:
            out.append([" ".join(toks)] if toks else [])
        else:
            out.append([" ".join(toks[k: k + ngram]) for k in range(len(toks) - ngram + 1)])
    return out


def run_ours(texts: Any, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    import numpy as np

    from operators.dedup import band_hashes, candidate_pairs, minhash_signatures, signature_verifier
    from operators.dedup.minhash import band_rows

    t0 = time.perf_counter()
    sig = minhash_signatures(texts, args.num_perm, args.ngram, args.seed)
    t1 = time.perf_counter()
    keys = band_hashes(sig, args.bands, args.rows)
    t2 = time.perf_counter()
    links = candidate_pairs(band_rows(np.arange(len(texts)), keys), verify=signature_verifier(sig, args.threshold))
    t3 = time.perf_counter()
    stages = {"signatures_s": round(t1 - t0, 3), "bands_s": round(t2 - t1, 3), "links_s": round(t3 - t2, 3)}
    return links.column("key").to_numpy(), links.column("linked_key").to_numpy(), stages


def run_datasketch(texts: list[str], args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    shingle_lists = _shingle_lists(texts, args.ngram)
    sketches = []
    for sh in shingle_lists:
        m = MinHash(num_perm=args.num_perm, seed=args.seed)
        m.update_batch([s.encode("utf-8") for s in sh])
        sketches.append(m)
    t1 = time.perf_counter()
    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm, params=(args.bands, args.rows))
    for i, m in enumerate(sketches):
        if len(shingle_lists[i]):  # empty texts are not indexed (they would all collide)
            lsh.insert(i, m)
    src, dst = [], []
    for i, m in enumerate(sketches):
        if not len(shingle_lists[i]):
            continue
        for j in lsh.query(m):
            if j < i and m.jaccard(sketches[j]) >= args.threshold:
                src.append(i)
                dst.append(j)
    t2 = time.perf_counter()
    return src, dst, {"signatures_s": round(t1 - t0, 3), "lsh_s": round(t2 - t1, 3)}


def run_rensa(texts: list[str], args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    from rensa import RMinHash, RMinHashLSH

    t0 = time.perf_counter()
    shingle_lists = _shingle_lists(texts, args.ngram)
    sketches = RMinHash.from_token_sets(shingle_lists, args.num_perm, args.seed)
    t1 = time.perf_counter()
    lsh = RMinHashLSH(args.threshold, args.num_perm, args.bands)
    live = [i for i, sh in enumerate(shingle_lists) if sh]
    lsh.insert_pairs([(i, sketches[i]) for i in live])
    candidates = lsh.query_all([sketches[i] for i in live])
    src, dst = [], []
    for i, cands in zip(live, candidates, strict=True):
        m = sketches[i]
        for j in cands:
            if j < i and m.jaccard(sketches[j]) >= args.threshold:
                src.append(i)
                dst.append(j)
    t2 = time.perf_counter()
    return src, dst, {"signatures_s": round(t1 - t0, 3), "lsh_s": round(t2 - t1, 3)}


def kernel_comparison(texts: Any, args: argparse.Namespace) -> dict[str, float]:
    """Sketch kernels alone on identical input (our 64-bit shingle hashes): rensa's and ours."""
    import numpy as np
    from rensa import RMinHash

    from operators.dedup import shingle_hashes, signatures_from_token_hashes, token_hashes32

    h64, offsets = shingle_hashes(texts, args.ngram)
    k0 = time.perf_counter()
    RMinHash.digest_matrix_from_flat_token_hashes(h64, offsets.astype(np.uint64), args.num_perm, args.seed)
    k1 = time.perf_counter()
    signatures_from_token_hashes(token_hashes32(h64), offsets, args.num_perm, args.seed)
    k2 = time.perf_counter()
    return {"rensa_kernel_s": round(k1 - k0, 4), "ours_kernel_s": round(k2 - k1, 4)}


def corpus_main(args: argparse.Namespace, edit_lo: float, edit_hi: float) -> int:
    """Build the corpus and write it as Parquet (text, cluster); print a JSON line describing it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, cluster = build_corpus(args.records, args.seed, edit_lo, edit_hi)
    # Row groups of 8192 records, as step shards are written: the reader then yields a chunked column.
    pq.write_table(pa.table({"text": texts, "cluster": cluster}), args.make_corpus, row_group_size=8192)
    sizes: dict[int, int] = {}
    for c in cluster:
        if c >= 0:
            sizes[c] = sizes.get(c, 0) + 1
    print_json_line({"records": len(texts), "planted_clusters": len(sizes),
                     "records_in_clusters": sum(sizes.values()),
                     "mean_chars": round(sum(map(len, texts)) / max(1, len(texts)), 1)})
    return 0


def child_main(args: argparse.Namespace) -> int:
    """Load the corpus, run one method, write its predicted pairs, print a JSON line."""
    import numpy as np
    import pyarrow.parquet as pq

    column = pq.read_table(args.corpus, columns=["text"]).column("text")
    # Each method gets its natural input, loaded before the clock starts: ours is a transform over
    # Arrow (what a step reads from Parquet), the peers take Python strings.
    texts = column if args.child == "ours" else column.to_pylist()
    runner = {"ours": run_ours, "datasketch": run_datasketch, "rensa": run_rensa}[args.child]
    cpu0, t0 = time.process_time(), time.perf_counter()
    src, dst, stages = runner(texts, args)
    cpu_seconds = time.process_time() - cpu0
    seconds = time.perf_counter() - t0
    if args.child == "rensa":  # after the timed pipeline: it must not count in rensa's rate
        stages.update(kernel_comparison(texts, args))
    pairs = _component_pairs(len(texts), np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64))
    np.save(args.out, pairs)
    print_json_line({"method": args.child, "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
                     "links": len(src), "pairs": len(pairs), "stages": stages})
    return 0


# ----------------------------------------------------------------------------------------------------
# Parent


def _scores(predicted: set[tuple[int, int]], planted: set[tuple[int, int]],
            findable: set[tuple[int, int]]) -> dict[str, float]:
    tp = len(predicted & planted)
    precision = tp / len(predicted) if predicted else 1.0
    recall = tp / len(planted) if planted else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    at_threshold = len(predicted & findable) / len(findable) if findable else 1.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "recall_at_threshold": round(at_threshold, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7, help="corpus seed")
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--bands", type=int, default=16, help="default 16x8: rensa needs bands | num_perm")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--minhash-seed", type=int, default=1, dest="mh_seed")
    parser.add_argument("--edit-rate", default="0.01:0.05", help="per-copy edit rate range lo:hi")
    parser.add_argument("--skip", default="", help="comma-separated peers to skip: datasketch,rensa")
    parser.add_argument("--threads", type=int, default=1, help="threads per child (RAYON/OMP/BLAS)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every method (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--make-corpus", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    edit_lo, edit_hi = (float(x) for x in args.edit_rate.split(":"))
    if args.child:
        args.seed = args.mh_seed
        return child_main(args)
    if args.make_corpus:
        return corpus_main(args, edit_lo, edit_hi)

    # The parent imports nothing heavy and holds no corpus until the measured children are done:
    # a child's peak RSS (ru_maxrss) starts from its parent's RSS at spawn time, which is kept
    # across exec, so a fat parent would inflate every child's number.
    load_start = print_machine_load("start")
    skip = {s for s in args.skip.split(",") if s}
    for peer in ("datasketch", "rensa"):
        if peer not in skip and importlib.util.find_spec(peer) is None:
            print(f"{peer} is not installed: skipped (pip install {peer})", flush=True)
            skip.add(peer)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    try:
        corpus = tmp / "corpus.parquet"
        made = run_child([sys.executable, str(Path(__file__).resolve()), "--make-corpus", str(corpus),
                          "--records", str(args.records), "--seed", str(args.seed),
                          "--edit-rate", args.edit_rate]).check("corpus")
        print(f"corpus: {last_json_line(made.stdout)}, built in {made.seconds:.1f}s", flush=True)
        threads = str(max(1, args.threads))
        env = {"RAYON_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads}
        common = ["--num-perm", args.num_perm, "--ngram", args.ngram, "--threshold", args.threshold,
                  "--bands", args.bands, "--rows", args.rows, "--minhash-seed", args.mh_seed,
                  "--corpus", corpus]
        def measure(method: str) -> Any:
            def run(r: int) -> dict[str, Any]:
                child = run_child([sys.executable, str(Path(__file__).resolve()), "--child", method,
                                   *(str(c) for c in common), "--out", str(tmp / f"{method}-{r}.npy")],
                                  env=env).check(method)
                out = {**last_json_line(child.stdout), "peak_rss_mb": child.peak_rss_mb}
                print(f"  round {r + 1} {method:>10}: {out['seconds']:.2f}s wall, {out['cpu_seconds']:.2f}s cpu, "
                      f"peak RSS {child.peak_rss_mb} MB, stages {out['stages']}", flush=True)
                return out
            return run

        repeats = max(1, args.repeats)
        methods = [m for m in METHODS if m not in skip]
        print(f"{repeats} round(s), interleaved: {' / '.join(methods)}", flush=True)
        rounds = interleaved(repeats, [(m, measure(m)) for m in methods])
        load_end = print_machine_load("end")
        # Heavy imports only now that every measured child is done (see above).
        import numpy as np
        import pyarrow.parquet as pq

        n_records = pq.read_metadata(corpus).num_rows
        results: dict[str, dict[str, Any]] = {}
        for method, runs in rounds.items():
            # Decisions are deterministic: every round must predict the same pairs (scored once, below).
            first = np.load(tmp / f"{method}-0.npy")
            assert all(np.array_equal(np.load(tmp / f"{method}-{r}.npy"), first) for r in range(repeats)), method
            rates = spread([rate(n_records, o["seconds"]) for o in runs], 1)
            results[method] = {**runs[-1], "seconds": statistics.median(o["seconds"] for o in runs),
                               "cpu_seconds": statistics.median(o["cpu_seconds"] for o in runs),
                               "peak_rss_mb": max(o["peak_rss_mb"] for o in runs), "records_per_s": rates["median"],
                               "records_per_s_spread": rates}
            print(describe(f"{method:>10} records/s", rates), flush=True)

        # Ground truth and scores, now that nothing else is measured.
        table = pq.read_table(corpus)
        texts = table.column("text").to_pylist()
        planted = planted_pairs(table.column("cluster").to_pylist())
        jac = exact_jaccards(texts, planted, args.ngram)
        findable = {p for p, j in jac.items() if j >= args.threshold}
        print(f"ground truth: {len(planted)} planted pairs, {len(findable)} with exact Jaccard >= "
              f"{args.threshold} (median {float(np.median(list(jac.values()))) if jac else 0:.3f}), "
              f"edit rate {edit_lo}-{edit_hi}", flush=True)
        for method, info in results.items():
            predicted = {(int(a), int(b)) for a, b in np.load(tmp / f"{method}-0.npy")}
            info.update(_scores(predicted, planted, findable))
            print(f"{method:>10}: {info['records_per_s']:>10.1f} records/s  precision {info['precision']:.4f} "
                  f"recall {info['recall']:.4f} f1 {info['f1']:.4f} recall@J>={args.threshold} "
                  f"{info['recall_at_threshold']:.4f}", flush=True)
        ours = results["ours"]
        summary: dict[str, Any] = {
            "records": len(texts), "num_perm": args.num_perm, "ngram": args.ngram, "threshold": args.threshold,
            "bands": args.bands, "rows": args.rows, "edit_rate": [edit_lo, edit_hi], "threads": int(threads),
            "corpus_seed": args.seed, "minhash_seed": args.mh_seed,
            "planted_pairs": len(planted), "planted_pairs_at_threshold": len(findable),
            "repeats": repeats, "load_at_start": load_start, "load_at_end": load_end,
            "records_per_s": ours["records_per_s"], "records_per_s_spread": ours["records_per_s_spread"],
            "seconds": ours["seconds"],
            "precision": ours["precision"], "recall": ours["recall"], "f1": ours["f1"],
            "recall_at_threshold": ours["recall_at_threshold"], "peak_rss_mb": ours["peak_rss_mb"],
            "stages": ours["stages"],
        }
        for peer in ("datasketch", "rensa"):
            r = results.get(peer)
            summary[f"{peer}_records_per_s"] = r["records_per_s"] if r else None
            summary[f"{peer}_records_per_s_spread"] = r["records_per_s_spread"] if r else None
            ratio = spread(paired_ratios(ours["records_per_s_spread"]["runs"], r["records_per_s_spread"]["runs"])
                           ) if r else None
            summary[f"speedup_vs_{peer}"] = ratio["median"] if ratio else None
            summary[f"speedup_vs_{peer}_spread"] = ratio
            for key in ("precision", "recall", "f1", "recall_at_threshold", "peak_rss_mb"):
                summary[f"{peer}_{key}"] = r[key] if r else None
        if "rensa" in results:
            summary["rensa_kernel_s"] = results["rensa"]["stages"]["rensa_kernel_s"]
            summary["ours_kernel_s"] = results["rensa"]["stages"]["ours_kernel_s"]
        for peer in ("datasketch", "rensa"):
            if summary[f"speedup_vs_{peer}"] is not None:
                print(describe(f"speedup vs {peer}", summary[f"speedup_vs_{peer}_spread"], "x")
                      + f" (median of per-round ratios; f1 {summary['f1']} vs {summary[f'{peer}_f1']})")
        if "rensa_kernel_s" in summary:
            print(f"sketch kernels alone on the same 64-bit shingle hashes: rensa {summary['rensa_kernel_s']}s, "
                  f"ours {summary['ours_kernel_s']}s")
        print_json_line(summary)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
