"""Benchmark: paraphrase decontamination: recall on hand-written rephrasings, false positives, clean loss, speed.

    python bench/paraphrase.py [--clean 2000] [--thresholds 0.7,0.75,0.8,0.85,0.9] [--judge] [--quick]
                               [--no-peer] [--judge-pairs 60] [--seed 17] [--data ../shared/data] [--show 5]
                               [--step-bench] [--embed-every-threshold] [--keep]

1. Records (canonical Parquet, one exchange each: the prompt as the human turn, a neutral answer): the 128
   rephrasings of `bench/_rephrased.py` (GSM8K, MATH-500, MBPP test, MMLU, HumanEval; light, heavy and
   Chinese), its 60 hard negatives (same topic and template, not a benchmark item) and `--clean` real
   ShareGPT first human turns. Benchmarks: GSM8K test, MATH-500, MBPP test, MMLU test and MT-Bench from
   `../shared/data` (read at run time, never copied into the repository) and the packaged HumanEval: 16,685
   prompts.
2. Measured runs, each in its own child process with one thread (its own wall/CPU time and peak RSS):
   - `decontaminate` (exact, 13-gram, short-prompt containment): the n-gram comparison, since LMSYS's
     llm-decontaminator (embedding top-k + LLM judge) is not on PyPI (`--no-peer` skips it);
   - the brute-force reference: every human turn against every benchmark prompt (all-MiniLM-L6-v2 through
     `load_embedder`, full cosine matrix): what the step must match. Its benchmark embedding time is the one
     reported; its vectors then seed the step's benchmark cache (`--step-bench` instead times a warm-up run
     of the step that embeds them itself), so a threshold run does not embed 16,685 prompts again;
   - `decontaminate_paraphrase`, judge off, once per threshold: the first run embeds the records (the
     throughput figure: records/s on one thread, embedding included, the model load timed apart), the others
     read its record cache (the threshold's own cost; `--embed-every-threshold` embeds in each). Each run's
     drops are compared with the reference (records the top-k search lost, extra ones, similarity drift).
     If the step is missing or fails, the reference stands in and the output says so;
   - `--judge`: the step with the judge on (SmolLM2-135M on CPU, top_k 1, floor = the lowest threshold) on at
     most `--judge-pairs` candidates above the floor: rephrasings (round-robin over benchmarks) and hard
     negatives, clean prompts to fill; its verdicts are scored against what each pair is.
3. Prints per threshold recall (overall, per benchmark, per style, and how many matched the right item),
   hard-negative false positives, clean loss with examples, throughput and peak RSS, the n-gram step's
   figures beside them, a finer sweep from the reference, the recommended threshold (best recall at clean
   loss <= 0.5%), the load average at the start and end, and LAST one JSON line with every figure.

`--quick`: 30 rephrasings, 10 hard negatives, 200 clean prompts, one threshold (0.8), no judge (unless
`--judge`), no cache seeding, and each benchmark cut to its first 40 prompts plus the planted items'
originals (temporary files): about a minute of CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `python bench/paraphrase.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import last_json_line, print_json_line, print_machine_load, rate, run_child
from bench._rephrased import (
    DATA,
    HARD_NEGATIVES,
    PLANTED_BENCHMARKS,
    REPHRASED,
    STYLES,
    benchmark_rows,
    benchmark_sources,
    check_selection,
    clean_prompts,
    item_index,
    original_prompt,
    quick_subset,
)

STEP = "decontaminate_paraphrase"
ANSWER = "Sure, here is a careful answer to your request."
MIN_CHARS = 20
TOP_K = 3
QUICK_BENCH_ROWS = 40
MAX_CLEAN_LOSS = 0.005
BORDER = 0.002  # cached vectors are float16: a cosine within this of the threshold may fall either side
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ----------------------------------------------------------------------------------------------------
# Children


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _canonical(rows: list[tuple[str, str]]) -> Any:
    import pyarrow as pa

    from operators.schema import CANONICAL_SCHEMA

    return pa.Table.from_pylist(
        [{"id": rid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": ANSWER}],
          "label": None, "langdetect": "en", "source": "paraphrase-bench", "reward": None, "origin": None}
         for rid, text in rows], schema=CANONICAL_SCHEMA)


def child_records(args: argparse.Namespace, work: Path) -> None:
    """Write the records (in/), a one-record input (tiny/), meta.json and benchmarks.json (quick: cut files)."""
    import pyarrow.parquet as pq

    reph, negs = quick_subset() if args.quick else (REPHRASED, HARD_NEGATIVES)
    meta: list[dict[str, Any]] = []
    for k, r in enumerate(reph):
        meta.append({"id": f"r{k:03d}", "kind": "rephrased", "benchmark": r.benchmark, "item": r.item,
                     "style": r.style, "text": r.text, "original": original_prompt(r.benchmark, r.item, args.data)})
    for k, h in enumerate(negs):
        meta.append({"id": f"n{k:03d}", "kind": "negative", "benchmark": h.benchmark, "item": h.near,
                     "text": h.text, "original": original_prompt(h.benchmark, h.near, args.data)})
    for k, text in enumerate(clean_prompts(args.clean, args.seed, MIN_CHARS)):
        meta.append({"id": f"c{k:05d}", "kind": "clean", "text": text})
    (work / "in").mkdir()
    (work / "tiny").mkdir()
    pq.write_table(_canonical([(m["id"], m["text"]) for m in meta]), work / "in" / "part-00000.parquet")
    pq.write_table(_canonical([("tiny0", "hi")]), work / "tiny" / "part-00000.parquet")
    sources = benchmark_sources(args.data)
    if args.quick:  # each benchmark cut to its first rows plus the planted items' originals
        keep: dict[str, set[int]] = {}
        for m in meta:
            if m["kind"] != "clean":
                keep.setdefault(m["benchmark"], set()).add(item_index(m["benchmark"], m["item"], args.data))
        (work / "bench").mkdir()
        cut = []
        for name, _, fmt in sources:
            lines = [json.dumps(row, ensure_ascii=False) for row in benchmark_rows(name, args.data)]
            rows = sorted(set(range(min(QUICK_BENCH_ROWS, len(lines)))) | keep.get(name, set()))
            out = work / "bench" / f"{name}.jsonl"
            out.write_text("".join(lines[i] + "\n" for i in rows), encoding="utf-8")
            cut.append((name, str(out), fmt))
        sources = cut
    (work / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
    (work / "benchmarks.json").write_text(json.dumps([{"name": n, "uri": u, "format": f} for n, u, f in sources]))
    print_json_line({"records": len(meta), "rephrased": len(reph), "negatives": len(negs),
                     "clean": sum(m["kind"] == "clean" for m in meta)})


def _dropped(step_dir: Path) -> dict[str, dict[str, Any]]:
    from operators.core.runner import read_step_table

    t = read_step_table(str(step_dir), "dropped")
    if t.num_rows == 0:
        return {}
    return {r["id"]: {**json.loads(r["detail"]), "reason": r["reason"]} for r in t.to_pylist()}


def child_ngram(args: argparse.Namespace, work: Path) -> None:
    """The `decontaminate` step (exact, 13-gram, containment) on the records."""
    from operators.cli import build_step
    from operators.core.runner import run_all

    benches = json.loads((work / "benchmarks.json").read_text())
    t0, c0 = time.perf_counter(), time.process_time()
    m = run_all(build_step("decontaminate", {"benchmarks": benches}), [str(work / "in")], str(work / "ngram"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    (work / "ngram.json").write_text(json.dumps({"dropped": _dropped(work / "ngram"), "seconds": wall,
                                                 "cpu_seconds": cpu, "records_in": m.stats.records_in},
                                                ensure_ascii=False))
    print_json_line({"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2)})


def child_reference(args: argparse.Namespace, work: Path) -> None:
    """Brute force: every human turn of at least MIN_CHARS against every benchmark prompt (full cosine matrix)."""
    _one_thread()
    import numpy as np

    from operators.benchmarks.loaders import load_prompts
    from operators.llm.embed import EmbedConfig, load_embedder

    t0 = time.perf_counter()
    embedder = load_embedder(EmbedConfig())
    load_s = time.perf_counter() - t0
    items: list[tuple[str, int, str]] = []
    for b in json.loads((work / "benchmarks.json").read_text()):
        items += [(b["name"], i, p) for i, p in enumerate(load_prompts(b["uri"], b["format"]))]
    t0, c0 = time.perf_counter(), time.process_time()
    bench = embedder.embed([p for _, _, p in items])
    bench_s, bench_cpu = time.perf_counter() - t0, time.process_time() - c0
    seeded = None
    if args.seed_cache:  # the same vectors, in the step's benchmark cache: the step need not embed them again
        try:
            from operators.llm.embed import EmbeddingCache, text_keys
            from operators.steps.decontam.paraphrase import BENCH_CACHE

            cache = EmbeddingCache(args.seed_cache, name=BENCH_CACHE)
            cache.store(text_keys(embedder.cfg.fingerprint(), [p for _, _, p in items]), bench)
        except Exception as e:  # no such step (yet), or another cache layout: the step embeds them itself
            seeded = f"{type(e).__name__}: {e}"
        else:
            seeded = "ok"
    meta = json.loads((work / "meta.json").read_text())
    checked = [m for m in meta if len(m["text"].strip()) >= MIN_CHARS]
    t0, c0 = time.perf_counter(), time.process_time()
    vecs = embedder.embed([m["text"] for m in checked])
    sims = vecs @ bench.T
    rec_s, rec_cpu = time.perf_counter() - t0, time.process_time() - c0
    first_row: dict[tuple[str, str], int] = {}
    for row, (name, _, p) in enumerate(items):
        first_row.setdefault((name, p), row)
    out: dict[str, Any] = {}
    for m, s in zip(checked, sims, strict=True):
        top = np.argsort(-s)[:5]
        entry: dict[str, Any] = {"top": [[round(float(s[j]), 5), items[j][0], items[j][1]] for j in top]}
        if m["kind"] != "clean":  # the similarity to the item it rephrases (or imitates) and that item's rank
            row = first_row[(m["benchmark"], m["original"])]
            entry["orig_sim"] = round(float(s[row]), 5)
            entry["orig_rank"] = int((s > s[row]).sum()) + 1
        out[m["id"]] = entry
    (work / "reference.json").write_text(json.dumps(
        {"records": out, "benchmark_prompts": len(items), "bench_embed_s": bench_s, "bench_embed_cpu_s": bench_cpu,
         "records_s": rec_s, "records_cpu_s": rec_cpu, "model_load_s": load_s, "checked": len(checked),
         "seeded": seeded}))
    print_json_line({"benchmark_prompts": len(items), "bench_embed_s": round(bench_s, 1),
                     "records_s": round(rec_s, 1)})


def _step_config(work: Path, threshold: float, cache: Path, judge: bool = False, top_k: int = TOP_K
                 ) -> dict[str, Any]:
    return {"benchmarks": json.loads((work / "benchmarks.json").read_text()), "threshold": threshold,
            "top_k": top_k, "min_chars": MIN_CHARS, "judge": {"enabled": judge, "floor": threshold},
            "embed_cache_uri": str(cache)}


def child_step(args: argparse.Namespace, work: Path) -> None:
    """`decontaminate_paraphrase` on `--input` at `--threshold` (judge per `--judge`), vectors cached in
    `--cache`; the embedder is loaded before the clock starts. Failures are written, not raised."""
    _one_thread()
    name = args.child_name
    result: dict[str, Any] = {}
    try:
        from operators.cli import build_step
        from operators.core.runner import run_all
        from operators.llm.embed import EmbedConfig, load_embedder

        t0 = time.perf_counter()
        load_embedder(EmbedConfig())  # the step's own call finds it loaded (lru_cache on the same config)
        result["model_load_s"] = time.perf_counter() - t0
        cfg = _step_config(work, args.threshold, Path(args.cache), judge=args.judge, top_k=args.top_k)
        step = build_step(args.step, cfg)
        t0, c0 = time.perf_counter(), time.process_time()
        m = run_all(step, [args.input], str(work / name))
        result.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                      records_in=m.stats.records_in, counters=m.stats.counters,
                      dropped_by_reason=m.stats.dropped_by_reason, dropped=_dropped(work / name))
    except Exception as e:  # the step is missing or broke: the parent falls back to the reference
        import traceback

        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-3000:]
    (work / f"{name}.json").write_text(json.dumps(result, ensure_ascii=False))
    print_json_line({k: v for k, v in result.items() if k not in ("dropped", "traceback")})


def child_judge_input(args: argparse.Namespace, work: Path) -> None:
    """The records whose ids are in judge_ids.json, as a separate input folder."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = json.loads((work / "judge_ids.json").read_text())
    t = pq.read_table(work / "in" / "part-00000.parquet")
    (work / "judge_in").mkdir()
    pq.write_table(t.filter(pc.is_in(t.column("id"), value_set=pa.array(ids))),
                   work / "judge_in" / "part-00000.parquet")
    print_json_line({"records": len(ids)})


# ----------------------------------------------------------------------------------------------------
# Parent


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _frac(hit: int, total: int) -> str:
    return f"{hit}/{total} ({_pct(hit / total) if total else 'n/a'})"


def score(drops: dict[str, dict[str, Any]], meta: list[dict[str, Any]]) -> dict[str, Any]:
    """Recall (overall, per benchmark, per style, right item), hard-negative false positives, clean loss."""
    reph = [m for m in meta if m["kind"] == "rephrased"]
    negs = [m for m in meta if m["kind"] == "negative"]
    clean = [m for m in meta if m["kind"] == "clean"]
    caught = [m for m in reph if m["id"] in drops]
    right = [m for m in caught if drops[m["id"]].get("benchmark") == m["benchmark"]
             and drops[m["id"]].get("benchmark_prompt") == m["original"][:500]]
    by_bench = {b: round(sum(m["id"] in drops for m in reph if m["benchmark"] == b)
                         / max(1, sum(m["benchmark"] == b for m in reph)), 4)
                for b in PLANTED_BENCHMARKS if any(m["benchmark"] == b for m in reph)}
    by_style = {s: round(sum(m["id"] in drops for m in reph if m["style"] == s)
                         / max(1, sum(m["style"] == s for m in reph)), 4)
                for s in STYLES if any(m["style"] == s for m in reph)}
    fp = [m for m in negs if m["id"] in drops]
    lost = [m for m in clean if m["id"] in drops]
    return {"recall": round(len(caught) / max(1, len(reph)), 4), "caught": len(caught), "rephrased": len(reph),
            "right_item": len(right), "recall_by_benchmark": by_bench, "recall_by_style": by_style,
            "negatives_dropped": len(fp), "negatives": len(negs),
            "negative_fp_rate": round(len(fp) / max(1, len(negs)), 4), "negatives_dropped_ids": [m["id"] for m in fp],
            "clean_dropped": len(lost), "clean": len(clean), "clean_loss": round(len(lost) / max(1, len(clean)), 5),
            "clean_dropped_ids": [m["id"] for m in lost]}


def print_scores(label: str, s: dict[str, Any]) -> None:
    benches = " ".join(f"{b} {_pct(v)}" for b, v in s["recall_by_benchmark"].items())
    styles = " ".join(f"{k} {_pct(v)}" for k, v in s["recall_by_style"].items())
    print(f"  {label}: recall {_frac(s['caught'], s['rephrased'])} (right item {s['right_item']}); {benches}; "
          f"by style: {styles}")
    print(f"  {' ' * len(label)}  hard negatives dropped {_frac(s['negatives_dropped'], s['negatives'])}; "
          f"clean loss {_frac(s['clean_dropped'], s['clean'])}", flush=True)


def reference_drops(ref: dict[str, Any], meta: list[dict[str, Any]], threshold: float) -> dict[str, dict[str, Any]]:
    """What the step should drop at `threshold` per the brute force, in the step's detail shape."""
    out = {}
    orig = {m["id"]: m for m in meta}
    for rid, e in ref["records"].items():
        sim, bench, item = e["top"][0]
        if sim >= threshold:
            m = orig[rid]
            same = m["kind"] != "clean" and e.get("orig_sim") is not None and e["orig_sim"] >= sim - 1e-6
            out[rid] = {"benchmark": bench, "item": item, "similarity": sim, "match": "paraphrase (reference)",
                        "benchmark_prompt": m["original"][:500] if same else None}
    return out


def compare_with_reference(drops: dict[str, dict[str, Any]], ref: dict[str, Any], threshold: float
                           ) -> dict[str, Any]:
    """Records the brute force drops and the step kept (lost by its search), and the other way round."""
    should = {rid for rid, e in ref["records"].items() if e["top"][0][0] >= threshold}
    lost = sorted(rid for rid in should - set(drops) if ref["records"][rid]["top"][0][0] >= threshold + BORDER)
    extra = sorted(rid for rid in set(drops) - should
                   if rid not in ref["records"] or ref["records"][rid]["top"][0][0] < threshold - BORDER)
    border = len(should ^ set(drops)) - len(lost) - len(extra)
    diffs = [abs(d["similarity"] - ref["records"][rid]["top"][0][0]) for rid, d in drops.items()
             if "similarity" in d and rid in ref["records"]]
    wrong_item = sorted(rid for rid, d in drops.items() if rid in ref["records"]
                        and (d.get("benchmark"), d.get("item")) != tuple(ref["records"][rid]["top"][0][1:])
                        and abs(ref["records"][rid]["top"][0][0] - ref["records"][rid]["top"][1][0]) > BORDER)
    return {"lost_by_step": lost, "extra_in_step": extra, "borderline": border,
            "max_similarity_diff": round(max(diffs), 5) if diffs else None, "other_top_item": wrong_item}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", type=int, default=None, help="real ShareGPT prompts (default 2000; --quick 200)")
    ap.add_argument("--thresholds", default=None, help="comma-separated cosine thresholds (default "
                    "0.7,0.75,0.8,0.85,0.9; --quick 0.8)")
    ap.add_argument("--judge", action="store_true", help="also run the step with the LLM judge on (slow on CPU)")
    ap.add_argument("--judge-pairs", type=int, default=60, help="at most this many candidates go to the judge")
    ap.add_argument("--quick", action="store_true", help="small planted set and benchmarks, one threshold")
    ap.add_argument("--no-peer", action="store_true", help="skip the n-gram `decontaminate` comparison run")
    ap.add_argument("--seed", type=int, default=17, help="order of the ShareGPT prompts")
    ap.add_argument("--data", type=Path, default=DATA, help="the reference benchmark files (../shared/data)")
    ap.add_argument("--show", type=int, default=5, help="examples of dropped clean prompts per threshold")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--step-bench", action="store_true", help="time the step's own embedding of the benchmark "
                    "prompts (a warm-up run) instead of seeding its cache with the reference's vectors")
    ap.add_argument("--embed-every-threshold", action="store_true", help="embed the records in every threshold "
                    "run (default: only the first; the others read the first run's record cache)")
    ap.add_argument("--child", choices=("records", "ngram", "reference", "step", "judge_input"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-name", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--seed-cache", help=argparse.SUPPRESS)
    ap.add_argument("--threshold", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--top-k", type=int, default=TOP_K, help=argparse.SUPPRESS)
    ap.add_argument("--step", default=STEP, help=argparse.SUPPRESS)  # another registered name (tests the fallback)
    args = ap.parse_args(argv)
    args.clean = args.clean if args.clean is not None else (200 if args.quick else 2000)
    if args.child:
        {"records": child_records, "ngram": child_ngram, "reference": child_reference, "step": child_step,
         "judge_input": child_judge_input}[args.child](args, args.work)
        return 0
    thresholds = sorted({float(t) for t in (args.thresholds or ("0.8" if args.quick else
                                                                "0.7,0.75,0.8,0.85,0.9")).split(",") if t})

    # The parent stays light (no torch, no Arrow) until every measured child is done: a child's peak RSS
    # starts from its parent's RSS at fork.
    load_start = print_machine_load("start")
    problems = check_selection(args.data)
    for p in problems:
        print(f"WARNING planted set: {p}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-paraphrase-"))
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--work", str(work), "--data", str(args.data), "--clean", str(args.clean), "--seed", str(args.seed),
              "--step", args.step]
    if args.quick:
        common.append("--quick")
    children: dict[str, Any] = {}

    def child(name: str, *extra: str) -> dict[str, Any]:
        res = run_child([*me, *common, *extra], env=THREAD_ENV).check(name)
        out = {**last_json_line(res.stdout), "wall_s": res.seconds, "child_cpu_s": res.cpu_seconds,
               "peak_rss_mb": res.peak_rss_mb}
        children[name] = out
        return out

    try:
        made = child("records", "--child", "records")
        meta = json.loads((work / "meta.json").read_text())
        n_records = len(meta)
        n_bench = sum(1 for _ in json.loads((work / "benchmarks.json").read_text()))
        reph = [m for m in meta if m["kind"] == "rephrased"]
        print(f"records: {made['rephrased']} rephrasings ({dict(Counter(m['benchmark'] for m in reph))}; "
              f"{dict(Counter(m['style'] for m in reph))}), {made['negatives']} hard "
              f"negatives, {made['clean']} real ShareGPT first prompts; {n_bench} benchmark files"
              + (" (quick: cut to their first rows + the planted originals)" if args.quick else ""), flush=True)

        ngram = None
        if not args.no_peer:
            child("ngram", "--child", "ngram")
            ngram = json.loads((work / "ngram.json").read_text())
            print(f"decontaminate (n-gram) ran: {ngram['seconds']:.1f}s wall, peak RSS "
                  f"{children['ngram']['peak_rss_mb']} MB", flush=True)
        else:
            print("--no-peer: the n-gram `decontaminate` comparison is skipped", flush=True)

        warm_cache = work / "cache-warm"
        seed = [] if args.step_bench or args.quick else ["--seed-cache", str(warm_cache)]
        child("reference", "--child", "reference", *seed)
        ref = json.loads((work / "reference.json").read_text())
        print(f"brute-force reference: {ref['benchmark_prompts']} benchmark prompts embedded in "
              f"{ref['bench_embed_s']:.1f}s ({rate(ref['benchmark_prompts'], ref['bench_embed_s'])}/s), "
              f"{ref['checked']} records in {ref['records_s']:.1f}s "
              f"({rate(ref['checked'], ref['records_s'])}/s, full cosine matrix included), model load "
              f"{ref['model_load_s']:.1f}s, peak RSS {children['reference']['peak_rss_mb']} MB", flush=True)
        if ref.get("seeded") not in (None, "ok"):
            print(f"  could not seed the step's benchmark cache ({ref['seeded']}): the step embeds them itself",
                  flush=True)
        elif ref.get("seeded") == "ok":
            print("  its benchmark vectors seed the step's benchmark cache (--step-bench times the step's own "
                  "embedding instead)", flush=True)

        # The step: benchmark vectors from a warm cache (seeded by the reference, or with --step-bench embedded by
        # a warm-up run of the step on a one-record input); the first threshold run embeds the records (the
        # throughput figure), the others read its record cache (--embed-every-threshold: each embeds them).
        # --quick: no warm cache; its one run embeds the benchmark prompts too.
        warm: dict[str, Any] | None = None
        step_error: str | None = None
        if args.step_bench and not args.quick:
            child("warm", "--child", "step", "--child-name", "warm", "--input", str(work / "tiny"),
                  "--cache", str(warm_cache), "--threshold", str(thresholds[0]))
            warm = json.loads((work / "warm.json").read_text())
            if "error" in warm:
                step_error = warm["error"]
            else:
                print(f"{STEP}: benchmark prompts embedded through the step in {warm['seconds']:.1f}s "
                      f"({rate(ref['benchmark_prompts'], warm['seconds'])}/s; model load {warm['model_load_s']:.1f}s "
                      f"apart), peak RSS {children['warm']['peak_rss_mb']} MB", flush=True)
        runs: dict[float, dict[str, Any]] = {}
        first_cache: Path | None = None
        for t in thresholds if step_error is None else ():
            cache = work / f"cache-{t}"
            source = warm_cache if first_cache is None or args.embed_every_threshold else first_cache
            if source.exists():
                shutil.copytree(source, cache)
            name = f"step-{t}"
            child(name, "--child", "step", "--child-name", name, "--input", str(work / "in"),
                  "--cache", str(cache), "--threshold", str(t))
            runs[t] = json.loads((work / f"{name}.json").read_text())
            if "error" in runs[t]:
                print(f"{STEP} at {t} FAILED: {runs[t]['error']}\n{runs[t]['traceback']}", flush=True)
                if not any("error" not in r for r in runs.values()):
                    step_error = runs[t]["error"]
                    break
            else:
                first_cache = first_cache or cache
                print(f"{STEP} at {t}: {runs[t]['seconds']:.1f}s wall, embedded "
                      f"{runs[t]['counters'].get('embedded')}, cache hits {runs[t]['counters'].get('cache_hits')}, "
                      f"peak RSS {children[name]['peak_rss_mb']} MB", flush=True)
        step_ok = step_error is None
        bench_in_run = warm is None and ref.get("seeded") != "ok"  # the first run embedded the benchmark prompts
        if not step_ok:
            print(f"{STEP} is not usable here ({step_error}): EVERY figure below labelled 'REFERENCE' comes from "
                  "the brute-force reference instead of the step", flush=True)

        judge: dict[str, Any] | None = None
        floor = thresholds[0]
        if args.judge and step_ok:
            judge = run_judge(args, work, meta, ref, floor, child, first_cache or warm_cache)
        load_end = print_machine_load("end")

        # -- scoring (nothing is measured any more) -------------------------------------------------------
        by_id = {m["id"]: m for m in meta}
        print(f"\nrecall on {made['rephrased']} rephrasings, false positives on {made['negatives']} hard negatives, "
              f"loss of {made['clean']} clean prompts:")
        ngram_scores = None
        if ngram is not None:
            ngram_scores = score(ngram["dropped"], meta)
            print_scores("decontaminate (n-gram, exact, containment)", ngram_scores)
            print(f"    its drops by match kind: {dict(Counter(d.get('match') for d in ngram['dropped'].values()))}")
        per_t: dict[str, Any] = {}
        for t in thresholds:
            run = runs.get(t)
            fallback = run is None or "error" in run
            drops = reference_drops(ref, meta, t) if fallback else run["dropped"]
            s = score(drops, meta)
            label = f"threshold {t:.2f} " + ("(REFERENCE, step unavailable)" if fallback else "(step)")
            print_scores(label, s)
            entry: dict[str, Any] = {**s, "source": "reference" if fallback else "step"}
            if not fallback:
                cmp = compare_with_reference(drops, ref, t)
                entry["vs_reference"] = cmp
                print(f"    vs brute force: lost by the step's top-k search {len(cmp['lost_by_step'])} "
                      f"{cmp['lost_by_step'][:10]}, extra {len(cmp['extra_in_step'])} {cmp['extra_in_step'][:10]}, "
                      f"borderline (within {BORDER}) {cmp['borderline']}, max |similarity - reference| "
                      f"{cmp['max_similarity_diff']}, matched another item than the reference's top-1 "
                      f"{len(cmp['other_top_item'])}")
                secs, cpu = run["seconds"], run["cpu_seconds"]
                entry.update(records_per_s=rate(n_records, secs), records_per_cpu_s=rate(n_records, cpu),
                             seconds=round(secs, 2), peak_rss_mb=children[f"step-{t}"]["peak_rss_mb"],
                             counters=run["counters"], model_load_s=round(run["model_load_s"], 2))
                embedded = int(run["counters"].get("embedded", 0))
                entry["embedded"] = embedded
                what = ("records and benchmark prompts embedded in this run" if embedded and bench_in_run else
                        "records embedded, benchmark vectors from the warm cache" if embedded else
                        "records and benchmark vectors from the cache: the threshold's own cost")
                print(f"    {entry['records_per_s']} records/s wall, {entry['records_per_cpu_s']} per CPU s "
                      f"(one thread, {n_records} records, {what}; embedded {embedded}), peak RSS "
                      f"{entry['peak_rss_mb']} MB")
            for rid in s["negatives_dropped_ids"][:args.show]:
                d = drops[rid]
                print(f"    hard negative dropped: {by_id[rid]['text'][:90]!r} -> "
                      f"{d.get('benchmark')}[{d.get('item')}] sim {d.get('similarity')}")
            for rid in s["clean_dropped_ids"][:args.show]:
                d = drops[rid]
                bp = d.get("benchmark_prompt") or ""
                print(f"    clean dropped: {by_id[rid]['text'][:90]!r} -> {d.get('benchmark')}[{d.get('item')}] "
                      f"sim {d.get('similarity')}: {bp[:80]!r}")
            per_t[f"{t:g}"] = entry

        # A finer sweep from the reference (no run needed: the best cosine of every record is known).
        print("\nbrute-force sweep (best cosine of each record against all benchmark prompts):")
        sweep = {}
        for t in [round(0.5 + 0.05 * i, 2) for i in range(10)]:
            s = score(reference_drops(ref, meta, t), meta)
            sweep[f"{t:g}"] = {k: s[k] for k in ("recall", "negative_fp_rate", "clean_loss", "right_item")}
            print(f"  {t:.2f}: recall {_pct(s['recall'])} (right item {s['right_item']}), hard negatives "
                  f"{_pct(s['negative_fp_rate'])}, clean loss {_pct(s['clean_loss'])}")
        orig_sims = [ref["records"][m["id"]]["orig_sim"] for m in reph if m["id"] in ref["records"]]
        top1 = sum(ref["records"][m["id"]]["orig_rank"] == 1 for m in reph if m["id"] in ref["records"])
        by_style_sim = {s: round(statistics.median([ref["records"][m["id"]]["orig_sim"] for m in reph
                                                    if m["style"] == s and m["id"] in ref["records"]]), 3)
                        for s in STYLES if any(m["style"] == s for m in reph)}
        neg_best = [ref["records"][m["id"]]["top"][0][0] for m in meta if m["kind"] == "negative"]
        clean_best = sorted((ref["records"][m["id"]]["top"][0][0] for m in meta if m["kind"] == "clean"),
                            reverse=True)
        q995 = clean_best[int(len(clean_best) * MAX_CLEAN_LOSS)] if clean_best else None
        print(f"  rephrasing vs its original: median cosine {statistics.median(orig_sims):.3f} "
              f"(by style {by_style_sim}), the original is the top-1 match for {top1}/{len(reph)}; not checked "
              f"(< {MIN_CHARS} chars): {len(meta) - ref['checked']}")
        print(f"  hard negatives' best cosine: median {statistics.median(neg_best):.3f}, max {max(neg_best):.3f}; "
              f"clean prompts' best cosine: median {statistics.median(clean_best):.3f}, 99.5th percentile "
              f"{q995:.3f}, max {clean_best[0]:.3f}")
        missed_at = {}
        for t in thresholds:
            ids = [m for m in reph if ref["records"].get(m["id"], {"top": [[0]]})["top"][0][0] < t]
            missed_at[f"{t:g}"] = len(ids)
        lowest_missed = sorted(reph, key=lambda m: ref["records"].get(m["id"], {"orig_sim": 0})["orig_sim"])[:args.show]
        for m in lowest_missed:
            e = ref["records"].get(m["id"])
            print(f"  hardest rephrasing: {m['benchmark']}[{m['item']}] {m['style']} cosine to original "
                  f"{e['orig_sim'] if e else 'n/a'}: {m['text'][:90]!r}")

        if judge is not None:
            print_judge(judge)

        eligible = [(v["recall"], -v["clean_loss"], float(t)) for t, v in per_t.items()
                    if v["clean_loss"] <= MAX_CLEAN_LOSS]
        if eligible:
            rec_t = max(eligible)[2]
            best = per_t[f"{rec_t:g}"]
            print(f"\nrecommended threshold: {rec_t} (best recall at clean loss <= {_pct(MAX_CLEAN_LOSS)}): recall "
                  f"{_pct(best['recall'])}, hard negatives dropped {_pct(best['negative_fp_rate'])}, clean loss "
                  f"{_pct(best['clean_loss'])}" + ("" if best["source"] == "step" else " (from the reference)"))
        else:
            rec_t = None
            print(f"\nno threshold measured keeps clean loss <= {_pct(MAX_CLEAN_LOSS)}: none recommended")
        if ngram_scores is not None:
            print(f"n-gram decontaminate on the same rephrasings: recall {_pct(ngram_scores['recall'])}, clean loss "
                  f"{_pct(ngram_scores['clean_loss'])}")
        print("peer: LMSYS llm-decontaminator (embedding top-k + LLM judge) is not on PyPI; the n-gram step is the "
              "in-run comparison" + (" (skipped: --no-peer)" if args.no_peer else ""))
        measured = next((v for v in per_t.values() if v.get("embedded")), None)
        throughput = None if measured is None else {
            k: measured[k] for k in ("records_per_s", "records_per_cpu_s", "seconds", "embedded", "peak_rss_mb",
                                     "model_load_s")}
        if throughput is not None:
            inside = bench_in_run  # no warm cache (--quick): its time holds the benchmark prompts' embedding
            print(f"throughput of {STEP} (judge off, one thread, embedding included): {throughput['records_per_s']} "
                  f"records/s wall, {throughput['records_per_cpu_s']} per CPU s"
                  + (", the benchmark prompts' embedding INCLUDED (--quick);" if inside else
                     "; benchmark prompts' embedding apart:")
                  + f" {ref['benchmark_prompts']} in {ref['bench_embed_s']:.1f}s (reference, same encoder)"
                  + (f", {warm['seconds']:.1f}s through the step" if warm is not None and "error" not in warm else ""))
        summary: dict[str, Any] = {
            "recommended_threshold": rec_t,
            "recall": per_t[f"{rec_t:g}"]["recall"] if rec_t is not None else None,
            "clean_loss": per_t[f"{rec_t:g}"]["clean_loss"] if rec_t is not None else None,
            "throughput": throughput,
            "peak_rss_mb": max((v.get("peak_rss_mb", 0) for v in per_t.values()), default=None),
            "thresholds": per_t, "reference_sweep": sweep, "step_available": step_ok,
            "step_error": step_error,
            "ngram": ngram_scores, "peer": "llm-decontaminator: not on PyPI", "judge": judge,
            "rephrased": made["rephrased"], "negatives": made["negatives"], "clean": made["clean"],
            "records": n_records, "benchmark_prompts": ref["benchmark_prompts"],
            "rephrased_by_benchmark": dict(Counter(m["benchmark"] for m in reph)),
            "rephrased_by_style": dict(Counter(m["style"] for m in reph)),
            "orig_cosine_median": round(statistics.median(orig_sims), 4), "orig_top1": top1,
            "orig_cosine_median_by_style": by_style_sim, "missed_by_reference": missed_at,
            "negative_best_cosine_median": round(statistics.median(neg_best), 4),
            "clean_best_cosine_p995": q995, "clean_best_cosine_max": clean_best[0],
            "reference_bench_embed_s": round(ref["bench_embed_s"], 2),
            "reference_records_per_s": rate(ref["checked"], ref["records_s"]),
            "step_bench_embed_s": round(warm["seconds"], 2) if warm is not None and step_ok else None,
            "children": children, "load_at_start": load_start, "load_at_end": load_end,
            "quick": args.quick, "seed": args.seed, "min_chars": MIN_CHARS, "top_k": TOP_K,
            "planted_set_problems": problems, "gpu": "not measured: no GPU",
        }
        print_json_line(summary)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def run_judge(args: argparse.Namespace, work: Path, meta: list[dict[str, Any]], ref: dict[str, Any], floor: float,
              child: Any, cache_src: Path | None) -> dict[str, Any]:
    """The step with the judge on (top_k 1: one pair per record) on at most `--judge-pairs` candidates above
    `floor`: rephrasings (round-robin over benchmarks) and hard negatives half and half, clean ones to fill."""
    budget = max(2, args.judge_pairs)
    best = {rid: e["top"][0][0] for rid, e in ref["records"].items()}
    above = [m for m in meta if best.get(m["id"], 0.0) >= floor + BORDER]
    reph = [m for m in above if m["kind"] == "rephrased"]
    lanes = [[m for m in reph if m["benchmark"] == b] for b in PLANTED_BENCHMARKS]
    picked_r: list[dict[str, Any]] = []
    while len(picked_r) < budget // 2 and any(lanes):
        for lane in lanes:
            if lane and len(picked_r) < budget // 2:
                picked_r.append(lane.pop(0))
    negs = [m for m in above if m["kind"] == "negative"][:budget - len(picked_r)]
    clean = sorted((m for m in above if m["kind"] == "clean"), key=lambda m: -best[m["id"]])
    picked_c = clean[:max(0, budget - len(picked_r) - len(negs))]
    picked = picked_r + negs + picked_c
    (work / "judge_ids.json").write_text(json.dumps([m["id"] for m in picked]))
    child("judge_input", "--child", "judge_input")
    cache = work / "cache-judge"
    if cache_src is not None and cache_src.exists():  # benchmark (and record) vectors embedded before
        shutil.copytree(cache_src, cache)
    print(f"judge run: {len(picked_r)} rephrasings, {len(negs)} hard negatives, {len(picked_c)} clean prompts "
          f"above the floor {floor} (one pair each, top_k 1)...", flush=True)
    t0 = time.perf_counter()
    child("judge", "--child", "step", "--child-name", "judge", "--input", str(work / "judge_in"), "--cache",
          str(cache), "--threshold", str(floor), "--judge", "--top-k", "1")
    wall = time.perf_counter() - t0
    run = json.loads((work / "judge.json").read_text())
    if "error" in run:
        return {"error": run["error"], "traceback": run.get("traceback")}
    drops = run["dropped"]
    c = run.get("counters", {})

    def acc(group: list[dict[str, Any]], want_yes: bool) -> dict[str, Any]:
        yes = sum(m["id"] in drops for m in group)
        right = yes if want_yes else len(group) - yes
        return {"n": len(group), "judged_yes": yes, "correct": right,
                "accuracy": round(right / len(group), 4) if group else None}

    true_pair = [m for m in picked_r if ref["records"][m["id"]]["orig_rank"] == 1]
    wrong_pair = [m for m in picked_r if ref["records"][m["id"]]["orig_rank"] != 1]
    return {"floor": floor, "pairs": len(picked), "asked": c.get("judge.asked", 0), "yes": c.get("judge.yes", 0),
            "no": c.get("judge.no", 0), "failed": c.get("judge.failed", 0),
            "rephrased": acc(picked_r, True), "rephrased_true_pair": acc(true_pair, True),
            "rephrased_other_item": acc(wrong_pair, False), "negatives": acc(negs, False),
            "clean": acc(picked_c, False), "seconds": round(run["seconds"], 1), "child_wall_s": round(wall, 1),
            "pairs_per_s": rate(len(picked), run["seconds"]), "counters": c,
            "examples": [{"id": m["id"], "kind": m["kind"], "text": m["text"][:80], "yes": m["id"] in drops,
                          "sim": best[m["id"]]} for m in picked]}


def print_judge(j: dict[str, Any]) -> None:
    if "error" in j:
        print(f"\njudge run FAILED: {j['error']}\n{j.get('traceback')}")
        return
    print(f"\nLLM judge (SmolLM2-135M, CPU, one thread) on {j['pairs']} pairs above {j['floor']}: asked {j['asked']}, "
          f"yes {j['yes']:g}, no {j['no']:g}, failed {j['failed']:g}; {j['seconds']}s ({j['pairs_per_s']} pairs/s); "
          "without the judge every one of these pairs is dropped (all are above the floor)")
    for key, what in (("rephrased", "rephrasings dropped (judged a rephrasing; the right answer: yes)"),
                      ("rephrased_true_pair", "  of them paired with their own original (yes is right)"),
                      ("rephrased_other_item", "  paired with another item (no is right for the pair)"),
                      ("negatives", "hard negatives kept (the right answer: no)"),
                      ("clean", "clean prompts kept (the right answer: no)")):
        g = j[key]
        if g["n"]:
            print(f"  {what}: {g['correct']}/{g['n']} correct ({_pct(g['accuracy'])}), said yes {g['judged_yes']}")
    if j["failed"]:
        print(f"  note: a kept record is a 'no' OR a failed judge call (kept: the step fails open); this run had "
              f"{j['no']:g} no and {j['failed']:g} failed" + (", so every kept record above is a failed call, not a "
                                                               "verdict" if not j["no"] else ""))


if __name__ == "__main__":
    sys.exit(main())
