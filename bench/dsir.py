"""Benchmark: this project's DSIR against the reference ``data-selection`` HashedNgramDSIR, same data, one run.

    python bench/dsir.py [--records 50000] [--k-frac 0.1] [--seed 0] [--shard-records 25000] [--repeats 3]
                         [--keep]

1. Builds a raw pool of N prompts from the shared reference sets (GSM8K train, MATH test, MBPP, MMLU
   test with its choices, oasst prompter turns, self-instruct seeds), drawn with fixed source weights
   and lightly perturbed (numbers re-drawn, a few words dropped, a preface or suffix added) so N can
   exceed the sets' size; the target is GSM8K train + MATH questions, as in the paper's math selection.
   Both are written as JSONL ({"id", "source", "text"} and {"text"}) to a temp dir; that is not timed.
2. Ours, in a child process: reads both JSONL files, runs the pipeline the way the distributed step
   will (map 1: hashed counts per shard; reduce 1: fit the models; map 2: featurize again, weigh,
   Gumbel keys, per-shard top-k; reduce 2: exact merge) and writes the selected raw lines to JSONL.
   Timed with and without the I/O.
3. Reference, in a child process: ``HashedNgramDSIR`` with ``num_proc=1`` (one core, like ours),
   ``fit_importance_estimator("all")``, ``compute_importance_weights()``, ``resample(k)``: its whole
   file-to-file pipeline in its own temp dirs. ``min_example_length=0``: its default (100 tokens) would
   drop almost every prompt; length rules belong to another step here.
4. Scores both selections with the DSIR paper's KL reduction, KL(target || random) - KL(target ||
   selected), on hashed unigram+bigram features under three independent hash seeds (averaged), so
   neither method is scored in the bucket space it selected in; random = mean over 5 random k-subsets.
   Expect the two to tie within the spread between hash families (about 1-2%): both compute the same
   estimator, only their bucket hashes differ.

Both children run single-threaded (BLAS/OpenMP pinned to one thread, pyarrow's JSON reader without
threads); records/s is per core. Rates are reported per wall second and per CPU second of the child's
pipeline (interpreter start and imports excluded for both); CPU time is the steadier figure on a busy
machine. Steps 2 and 3 are repeated `--repeats` times, interleaved (ours, reference, ours, reference, ...),
so both sides see the same load; rates and the speed-up (the median of the per-round ratios) are medians
with their spread, and the machine's load average is printed at the start and the end. Prints
human-readable lines, then LAST one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `python bench/dsir.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    ROOT,
    ChildResult,
    describe,
    interleaved,
    last_json_line,
    mib,
    paired_ratios,
    print_json_line,
    print_machine_load,
    rate,
    run_child,
    spread,
)

SHARED_DATA = ROOT.parent / "shared" / "data"
SOURCE_WEIGHTS = {"gsm8k": 0.10, "math": 0.10, "mbpp": 0.15, "mmlu": 0.30, "oasst": 0.20, "self_instruct": 0.15}
MATH_SOURCES = ("gsm8k", "math")
# The KL metric's hash seeds: independent of the selector's (--seed) and of the reference's sha256
# buckets; averaging three bucketings damps the luck of any one hash family.
EVAL_SEEDS = (12345, 23456, 34567)
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# ----------------------------------------------------------------------------------------------------
# The data


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_sources(data: Path) -> dict[str, list[str]]:
    """Prompt texts per source from the shared reference sets."""
    def oasst_prompts() -> list[str]:
        out = []
        for tree in _jsonl(data / "oasst" / "en_100_tree.jsonl"):
            stack = [tree["prompt"]]
            while stack:
                msg = stack.pop()
                if msg.get("role") == "prompter":
                    out.append(msg["text"])
                stack.extend(msg.get("replies", []))
        return out

    def self_instruct() -> list[str]:
        out = []
        for r in _jsonl(data / "self_instruct" / "seed_tasks.jsonl"):
            first = (r.get("instances") or [{}])[0].get("input", "")
            out.append(r["instruction"] + (f"\n{first}" if first else ""))
        return out

    return {
        "gsm8k": [r["question"] for r in _jsonl(data / "gsm8k" / "train.jsonl")],
        "math": [r["problem"] for r in _jsonl(data / "math" / "test.jsonl")],
        "mbpp": [r["text"] for r in _jsonl(data / "mbpp" / "mbpp.jsonl")],
        "mmlu": [r["question"] + "".join(f"\n{'ABCD'[i]}. {r[f'choice{i}']}" for i in range(4))
                 for r in _jsonl(data / "mmlu" / "test.jsonl")],
        "oasst": oasst_prompts(),
        "self_instruct": self_instruct(),
    }


_NUMBER = re.compile(r"\d+")
_PREFACES = ["Question: ", "Please help me with this. ", "Hi! ", "Task: ", "Can you answer this? ", "Quick one: "]
_SUFFIXES = [" Explain your reasoning.", " Be concise.", " Thanks!", " Show your work.", " Answer briefly."]


def perturb(rng: random.Random, text: str) -> str:
    """A light rewrite: numbers re-drawn with the same digit count, ~3% of words dropped, a preface/suffix."""
    if rng.random() < 0.5:
        text = _NUMBER.sub(lambda m: str(rng.randrange(10 ** (len(m.group()) - 1), 10 ** len(m.group()))), text)
    words = text.split(" ")
    if len(words) > 3:
        kept = [w for w in words if rng.random() >= 0.03]
        text = " ".join(kept or words)
    if rng.random() < 0.25:
        text = rng.choice(_PREFACES) + text
    if rng.random() < 0.15:
        text += rng.choice(_SUFFIXES)
    return text


def write_pool(sources: dict[str, list[str]], n: int, seed: int, work: Path) -> tuple[Path, Path, Counter[str]]:
    """Write raw.jsonl (N perturbed draws) and target.jsonl (GSM8K train + MATH); return paths and mix."""
    rng = random.Random(seed)
    names = list(SOURCE_WEIGHTS)
    weights = [SOURCE_WEIGHTS[s] for s in names]
    mix: Counter[str] = Counter()
    raw = work / "raw.jsonl"
    with raw.open("w", encoding="utf-8") as f:
        for i in range(n):
            source = rng.choices(names, weights)[0]
            mix[source] += 1
            text = perturb(rng, rng.choice(sources[source]))
            f.write(json.dumps({"id": f"r{i:08d}", "source": source, "text": text}, ensure_ascii=False) + "\n")
    target = work / "target.jsonl"
    with target.open("w", encoding="utf-8") as f:
        for text in sources["gsm8k"] + sources["math"]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return raw, target, mix


# ----------------------------------------------------------------------------------------------------
# Ours, in a child process


def ours_child(spec_path: str) -> int:
    """Run this project's DSIR file to file, staged as the distributed step will be; print timings."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.json as pj

    from operators.dsir import (
        DSIRModel,
        gumbel_keys,
        hashed_ngram_counts,
        log_importance_weights,
        merge_top_k,
        shard_candidates,
    )

    spec = json.loads(Path(spec_path).read_text())
    k, seed, shard_rows, batch_rows = spec["k"], spec["seed"], spec["shard_records"], spec["batch_records"]
    read_options = pj.ReadOptions(use_threads=False, block_size=16 << 20)
    timings: dict[str, float] = {}
    t_start, c_start = time.perf_counter(), time.process_time()

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - t0
        return now

    t = time.perf_counter()
    target_table = pj.read_json(spec["target"], read_options=read_options)
    raw_bytes = Path(spec["raw"]).read_bytes()
    raw_table = pj.read_json(pa.BufferReader(raw_bytes), read_options=read_options)
    t = lap("read", t)

    def batches(table: pa.Table, lo: int, hi: int) -> list[pa.ChunkedArray]:
        return [table.column("text").slice(a, min(batch_rows, hi - a)) for a in range(lo, hi, batch_rows)]

    def counts_of(table: pa.Table, lo: int, hi: int) -> Any:
        return sum(hashed_ngram_counts(b, seed=seed).total_counts() for b in batches(table, lo, hi))

    target_counts = counts_of(target_table, 0, target_table.num_rows)
    t = lap("target_counts", t)
    n = raw_table.num_rows
    shards = [(lo, min(lo + shard_rows, n)) for lo in range(0, n, shard_rows)]
    # Map 1: one additive count vector per shard (what each mapped task would write).
    raw_counts = sum(counts_of(raw_table, lo, hi) for lo, hi in shards)
    t = lap("map1_counts", t)
    model = DSIRModel.fit(target_counts, raw_counts, seed=seed)  # reduce 1
    t = lap("reduce1_fit", t)
    ids_all = raw_table.column("id")
    candidates = []
    for lo, hi in shards:  # map 2: featurize again (no per-record intermediate), weigh, key, keep k
        log_w = np.concatenate([
            log_importance_weights(hashed_ngram_counts(b, seed=seed), model.log_p_target, model.log_p_raw)
            for b in batches(raw_table, lo, hi)])
        ids = np.asarray(ids_all.slice(lo, hi - lo).to_pylist())
        candidates.append(shard_candidates(gumbel_keys(log_w, seed, ids), ids, k))
    t = lap("map2_weights_topk", t)
    selected = merge_top_k(candidates, k)  # reduce 2
    t = lap("reduce2_merge", t)
    # Write the chosen raw lines verbatim, as the reference does (ids are "r" + row number here, but
    # look them up generally: a real shard's ids are content hashes).
    keep = np.isin(np.asarray(ids_all.to_pylist()), selected.ids)
    lines = raw_bytes.split(b"\n")
    out = Path(spec["output"])
    with out.open("wb") as f:
        f.write(b"".join(line + b"\n" for line, chosen in zip(lines, keep, strict=False) if chosen))
    t = lap("write", t)

    seconds = time.perf_counter() - t_start
    cpu = time.process_time() - c_start
    io = timings["read"] + timings["write"]
    print_json_line({"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                     "core_seconds": round(seconds - io, 3), "selected": int(keep.sum()),
                     "timings": {key: round(v, 3) for key, v in timings.items()}})
    return 0


# ----------------------------------------------------------------------------------------------------
# The reference, in a child process


def reference_child(spec_path: str) -> int:
    """Run data-selection's HashedNgramDSIR end to end on one core; print timings."""
    import numpy as np
    from data_selection import HashedNgramDSIR

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    timings: dict[str, float] = {}
    t_start, c_start = time.perf_counter(), time.process_time()
    dsir = HashedNgramDSIR([spec["raw"]], [spec["target"]], cache_dir=str(work / "ref-cache"), num_proc=1,
                           ngrams=2, num_buckets=10_000, tokenizer="wordpunct", min_example_length=0)
    t = time.perf_counter()
    dsir.fit_importance_estimator(num_tokens_to_fit="all")  # "all" skips its per-record budget check
    timings["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    dsir.compute_importance_weights()
    timings["weights"] = time.perf_counter() - t
    t = time.perf_counter()
    np.random.seed(spec["seed"])  # its Gumbel noise comes from the global numpy stream
    dsir.resample(out_dir=str(work / "ref-out"), num_to_sample=spec["k"], cache_dir=str(work / "ref-resample"))
    timings["resample_write"] = time.perf_counter() - t
    seconds = time.perf_counter() - t_start
    cpu = time.process_time() - c_start
    print_json_line({"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                     "timings": {key: round(v, 3) for key, v in timings.items()},
                     "out_dir": str(work / "ref-out")})
    return 0


def reference_available() -> str | None:
    """None when data-selection imports, else why not."""
    probe = run_child([sys.executable, "-c", "import data_selection, nltk"])
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or ["import failed"])[-1]


# ----------------------------------------------------------------------------------------------------
# Scoring


def selected_ids(paths: list[Path]) -> list[str]:
    """Record ids in JSONL output files."""
    ids = []
    for path in paths:
        with path.open(encoding="utf-8") as f:
            ids += [json.loads(line)["id"] for line in f if line.strip()]
    return ids


def score(raw: Path, target: Path, selections: dict[str, list[str]], k: int, seed: int) -> dict[str, dict[str, Any]]:
    """KL reduction and source mix of each selection, averaged over independently seeded feature spaces."""
    import numpy as np

    from operators.dsir import hashed_kl, hashed_ngram_counts

    records = _jsonl(raw)
    texts = [r["text"] for r in records]
    target_texts = [r["text"] for r in _jsonl(target)]
    row_of = {r["id"]: i for i, r in enumerate(records)}
    rows_of = {name: np.asarray([row_of[i] for i in ids], dtype=np.int64) for name, ids in selections.items()}
    rng = np.random.default_rng(seed)
    randoms = [rng.choice(len(records), k, replace=False) for _ in range(5)]
    kls: dict[str, list[float]] = {name: [] for name in ["random", *selections]}
    for eval_seed in EVAL_SEEDS:
        feats = hashed_ngram_counts(texts, seed=eval_seed)
        target_counts = hashed_ngram_counts(target_texts, seed=eval_seed).total_counts()
        kls["random"].append(float(np.mean([hashed_kl(target_counts, feats.total_counts(r)) for r in randoms])))
        for name, rows in rows_of.items():
            kls[name].append(hashed_kl(target_counts, feats.total_counts(rows)))
    random_kl = float(np.mean(kls["random"]))
    out: dict[str, dict[str, Any]] = {"random": {"kl": round(random_kl, 4)}}
    for name, rows in rows_of.items():
        kl = float(np.mean(kls[name]))
        mix = Counter(records[i]["source"] for i in rows)
        out[name] = {"kl": round(kl, 4), "kl_reduction": round(random_kl - kl, 4), "selected": len(rows),
                     "kl_reduction_per_eval_seed": [round(r - x, 4) for r, x in zip(kls["random"], kls[name],
                                                                                      strict=True)],
                     "math_share": round(sum(mix[s] for s in MATH_SOURCES) / max(1, len(rows)), 4),
                     "mix": dict(mix.most_common())}
    return out


# ----------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=50_000, help="raw pool size N (default 50000)")
    p.add_argument("--k-frac", type=float, default=0.1, help="records to select, as a share of N (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="pool, hash and Gumbel seed (default 0)")
    p.add_argument("--shard-records", type=int, default=25_000, help="records per simulated shard (default 25000)")
    p.add_argument("--batch-records", type=int, default=8192, help="records per featurized batch (default 8192)")
    p.add_argument("--data", default=str(SHARED_DATA), help="the shared reference data folder")
    p.add_argument("--no-reference", action="store_true", help="skip the data-selection run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side (default 3)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--tmp-dir", default=None, help="where to create the temp dir (default: system temp)")
    p.add_argument("--ours-child", metavar="SPEC", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reference-child", metavar="SPEC", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Build the pool, run both selectors, score them, print the report and the JSON line."""
    args = _parser().parse_args(argv)
    if args.ours_child:
        return ours_child(args.ours_child)
    if args.reference_child:
        return reference_child(args.reference_child)
    n = args.records
    k = max(1, round(n * args.k_frac))
    if n < 10 or not 0 < args.k_frac < 1:
        raise SystemExit("--records must be >= 10 and --k-frac in (0, 1)")
    data = Path(args.data)
    if not (data / "gsm8k" / "train.jsonl").exists():
        raise SystemExit(f"shared reference data not found under {data} (pass --data)")
    load_start = print_machine_load("start")
    work = Path(tempfile.mkdtemp(prefix="bench-dsir-", dir=args.tmp_dir))
    try:
        t = time.perf_counter()
        sources = load_sources(data)
        raw, target, mix = write_pool(sources, n, args.seed, work)
        n_target = len(sources["gsm8k"]) + len(sources["math"])
        print(f"pool: {n} records, {mib(raw.stat().st_size)} MiB ({raw.stat().st_size / n:.0f} B/record), "
              f"mix {dict(mix.most_common())}; target: {n_target} GSM8K+MATH questions; k = {k}; "
              f"built in {time.perf_counter() - t:.1f}s", flush=True)

        me = str(Path(__file__).resolve())

        def spec_file(name: str, r: int) -> Path:
            """Each round gets its own spec, output and reference work dir: no run reuses another's cache."""
            spec = {"raw": str(raw), "target": str(target), "k": k, "seed": args.seed, "work": str(work / f"ref-{r}"),
                    "output": str(work / f"ours-selected-{r}.jsonl"), "shard_records": args.shard_records,
                    "batch_records": args.batch_records}
            (work / f"ref-{r}").mkdir(exist_ok=True)
            path = work / f"spec-{name}-{r}.json"
            path.write_text(json.dumps(spec))
            return path

        def run_ours(r: int) -> tuple[ChildResult, dict[str, Any]]:
            child = run_child([sys.executable, me, "--ours-child", str(spec_file("ours", r))],
                              env=SINGLE_THREAD_ENV).check("ours")
            out = last_json_line(child.stdout)
            print(f"  round {r + 1} ours: {out['seconds']:.2f}s wall, {out['cpu_seconds']:.2f}s cpu "
                  f"({rate(n, out['seconds']):.0f} records/s); without I/O {out['core_seconds']:.2f}s; "
                  f"peak RSS {child.peak_rss_mb:.0f} MiB", flush=True)
            return child, out

        def run_reference(r: int) -> tuple[ChildResult, dict[str, Any]]:
            if r:  # only the last round's output is scored; earlier rounds' caches go
                shutil.rmtree(work / f"ref-{r - 1}", ignore_errors=True)
            child = run_child([sys.executable, me, "--reference-child", str(spec_file("reference", r))],
                              env=SINGLE_THREAD_ENV).check("reference")
            out = last_json_line(child.stdout)
            print(f"  round {r + 1} reference: {out['seconds']:.2f}s wall, {out['cpu_seconds']:.2f}s cpu "
                  f"({rate(n, out['seconds']):.0f} records/s); peak RSS {child.peak_rss_mb:.0f} MiB", flush=True)
            return child, out

        why_not = "--no-reference given" if args.no_reference else reference_available()
        if why_not is not None:
            print(f"reference: not run ({why_not})", flush=True)
        sides: list[tuple[str, Any]] = [("ours", run_ours)]
        if why_not is None:
            sides.append(("reference", run_reference))
        repeats = max(1, args.repeats)
        print(f"{repeats} round(s), interleaved: {' / '.join(name for name, _ in sides)}", flush=True)
        runs = interleaved(repeats, sides)
        load_end = print_machine_load("end")

        ours_runs = [out for _, out in runs["ours"]]
        ours_out = ours_runs[-1]
        ours = max((child for child, _ in runs["ours"]), key=lambda c: c.peak_rss_mb)
        first = selected_ids([work / "ours-selected-0.jsonl"])
        assert all(selected_ids([work / f"ours-selected-{r}.jsonl"]) == first for r in range(repeats)), (
            "our selection differs between rounds")
        ours_rate = spread([rate(n, o["seconds"]) for o in ours_runs], 1)
        ours_cpu_rate = spread([rate(n, o["cpu_seconds"]) for o in ours_runs], 1)
        ours_core_rate = spread([rate(n, o["core_seconds"]) for o in ours_runs], 1)
        print(describe("ours records/s", ours_rate) + "; " + describe("per CPU second", ours_cpu_rate), flush=True)
        ref_runs = [out for _, out in runs.get("reference", [])]
        ref_out: dict[str, Any] = ref_runs[-1] if ref_runs else {}
        ref = max((child for child, _ in runs["reference"]), key=lambda c: c.peak_rss_mb) if ref_runs else None
        ref_rate = spread([rate(n, o["seconds"]) for o in ref_runs], 1)
        ref_cpu_rate = spread([rate(n, o["cpu_seconds"]) for o in ref_runs], 1)
        speedup = spread(paired_ratios(ours_rate["runs"], ref_rate["runs"])) if ref_runs else spread([])
        cpu_speedup = spread(paired_ratios(ours_cpu_rate["runs"], ref_cpu_rate["runs"])) if ref_runs else spread([])
        if ref_runs:
            print(describe("reference records/s", ref_rate) + "; " + describe("per CPU second", ref_cpu_rate),
                  flush=True)
        tm = ours_out["timings"]
        spec = json.loads((work / f"spec-ours-{repeats - 1}.json").read_text())

        selections = {"ours": selected_ids([Path(spec["output"])])}
        if ref_out:
            selections["reference"] = selected_ids(sorted(Path(ref_out["out_dir"]).glob("*.jsonl")))
        scores = score(raw, target, selections, k, args.seed)
        print(f"KL(target || random {k}) = {scores['random']['kl']:.4f} (hashed 1+2-grams, mean over eval seeds "
              f"{list(EVAL_SEEDS)}, random = 5 random k-subsets)", flush=True)
        for name in selections:
            s = scores[name]
            print(f"  {name:9s}: KL {s['kl']:.4f}, KL reduction {s['kl_reduction']:.4f} "
                  f"(per eval seed {s['kl_reduction_per_eval_seed']}), "
                  f"math share {s['math_share']:.1%}, mix {s['mix']}", flush=True)
        overlap = None
        if "reference" in selections:
            overlap = round(len(set(selections["ours"]) & set(selections["reference"])) / k, 4)
            print(f"  overlap of the two selections: {overlap:.1%} of k", flush=True)

        if ref_runs:
            print(describe("speedup vs reference per wall second", speedup, "x") + "; "
                  + describe("per CPU second", cpu_speedup, "x") + " (medians of the per-round ratios, both "
                  "with their file I/O)", flush=True)
        if args.keep:
            print(f"kept temp dir: {work}", flush=True)
        print_json_line({
            "records": n,
            "k": k,
            "target_records": n_target,
            "repeats": repeats,
            "load_at_start": load_start,
            "load_at_end": load_end,
            "records_per_s": ours_rate["median"],
            "records_per_s_spread": ours_rate,
            "records_per_cpu_s": ours_cpu_rate["median"],
            "core_records_per_s": ours_core_rate["median"],
            "seconds": statistics.median(o["seconds"] for o in ours_runs),
            "stage_seconds": tm,
            "peak_rss_mb": ours.peak_rss_mb,
            "reference_records_per_s": ref_rate["median"],
            "reference_records_per_s_spread": ref_rate if ref_runs else None,
            "reference_records_per_cpu_s": ref_cpu_rate["median"],
            "reference_seconds": statistics.median(o["seconds"] for o in ref_runs) if ref_runs else None,
            "reference_stage_seconds": ref_out.get("timings"),
            "reference_peak_rss_mb": ref.peak_rss_mb if ref else None,
            "speedup_vs_reference": speedup["median"],
            "speedup_spread": speedup if ref_runs else None,
            "cpu_speedup_vs_reference": cpu_speedup["median"],
            "cpu_speedup_spread": cpu_speedup if ref_runs else None,
            "kl_random": scores["random"]["kl"],
            "kl_reduction": scores["ours"]["kl_reduction"],
            "reference_kl_reduction": scores.get("reference", {}).get("kl_reduction"),
            "kl_eval_seeds": list(EVAL_SEEDS),
            "math_share": scores["ours"]["math_share"],
            "reference_math_share": scores.get("reference", {}).get("math_share"),
            "selection_overlap": overlap,
            "reference_skipped": why_not,
        })
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
