"""Benchmark: semantic dedup (SemDeDup) on planted paraphrases, against near_dedup, sentence-transformers
paraphrase mining and an all-pairs baseline, in one run.

    python bench/semdedup.py [--records 2000] [--seed 7] [--thresholds 0.8,0.85,0.9,0.95] [--repeats 1]
                             [--plant-rate 0.3] [--scale 0.5,1,2] [--quick] [--no-peers] [--keep]

1. Builds a deterministic corpus (``bench/_paraphrases.py``): about ``--plant-rate`` of the records are
   planted prompts, intents rendered 1-4 times by different templates that mean the same ("How do I reverse
   a list in Rust?" / "In Rust, how can I flip a list so the last element comes first?"), some with a typo
   or a case change, and hard negatives (the same template with one slot changed: Rust -> Go, France ->
   Spain, 25 -> 26); the rest are real ShareGPT first prompts (unlabelled background). Each record's answer
   is a distinct generic sentence. Planted pairs: all pairs of records of one intent. The records are
   written as 4 canonical Parquet files (4 shards).
2. Runs each method in its own child process (own wall time and peak RSS; one thread: OMP/MKL/BLAS = 1 and
   ``torch.set_num_threads(1)``, so rates are per core), on the same records:
   - ours: the ``semantic_dedup`` step through ``run_all`` at its default threshold (0.9), from a cold
     embedding cache: the timed run;
   - sweep: the step again at every ``--thresholds`` value, and with 50x more clusters than the default
     (``records_per_cluster`` 40), from the warm cache the timed run left (not timed against peers: it shows
     which threshold to use and what k-means splitting costs in recall);
   - near_dedup: the ``near_dedup`` step through ``run_all`` at its defaults (MinHash, Jaccard 0.7);
   - peer: sentence-transformers ``util.paraphrase_mining`` with the same all-MiniLM-L6-v2 folder (no
     download), reading the same 128 tokens (``max_seq_length`` 128), batch 64; pairs scoring at or above
     each threshold, grouped by connected components;
   - embedding alone: our ``Embedder.embed`` and the peer's ``model.encode`` on the same prompts, batch 64,
     in ONE process (both models loaded, loads and a warm-up batch not timed), the prompts in 4 strided chunks
     embedded in ABBA order, so both sides see the same machine load: the ratio is the median of the 4 chunks'
     (separate children measured 1.66x on a machine at load 5, the same code 0.97x side by side);
   - exact: every pair of our own vectors (as the step stores them, float16) at each threshold: what the
     step would find without k-means (its recall against this is what clustering loses).
   Predicted pairs are all pairs within a predicted group (kept record + the records dropped for it, or a
   connected component), as in ``bench/dedup.py``. Precision counts the predicted pairs that touch a
   planted record; links among background records are unlabelled and printed apart.
   ``--repeats`` interleaves rounds of the timed children (ours, near, embed, peer, ours, ...).
3. Scaling: ours again (cold cache) on ``--scale`` multiples of ``--records`` (the same mix: a bigger corpus
   holds the smaller one's planted intents and more, and more background): seconds, seconds per 1000
   records, peak RSS, and the cost per record against the smallest size.
4. Prints human-readable lines, then LAST one JSON line: records, planted_pairs, hard_negative_pairs,
   methods {name: precision, recall, f1, hard_negative_links, background_links, records_per_s, peak_rss_mb},
   embed_records_per_s {ours, peer}, speedup_vs_peer, scaling, best threshold, gpu.

``--quick``: 300 records, the default threshold only, no sweep, no scaling. ``--no-peers``: no
sentence-transformers (``pip install -e '.[semdedup-peers]'``). The GPU figure is not measured here: the
benchmark machines have no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `python bench/semdedup.py`
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
    scratch_dir,
    spread,
)
from operators.steps.dedup.semantic import SemanticDedupConfig

# SemanticDedupConfig.threshold's default (read from the config, so the bench follows it)
DEFAULT_THRESHOLD = float(SemanticDedupConfig.model_fields["threshold"].default)
SWEEP_RECORDS_PER_CLUSTER = 40  # the "many clusters" variant: k = records / 40
N_FILES = 4
GPU = "not measured: no GPU"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TRANSFORMERS_VERBOSITY": "error"}

# ----------------------------------------------------------------------------------------------------
# Corpus (a child: the parent stays small, so the measured children's peak RSS is their own)


def corpus_main(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench._paraphrases import build_corpus
    from operators.schema import CANONICAL_SCHEMA

    out = Path(args.make_corpus)
    made = []
    for size in sorted({int(s) for s in args.sizes.split(",")}):
        t0 = time.perf_counter()
        corpus = build_corpus(size, round(size * args.plant_rate), args.seed)
        rows = corpus.rows(args.seed)
        d = out / f"corpus-{size}"
        d.mkdir(parents=True)
        for f in range(N_FILES):
            part = rows[f::N_FILES]  # interleaved: every shard holds planted and background records
            pq.write_table(pa.Table.from_pylist(part, schema=CANONICAL_SCHEMA), d / f"part-{f}.parquet")
        labels = {"records": size, "planted": {str(i): [p.intent, p.family, p.template]
                                               for i, p in corpus.planted.items()},
                  "planted_pairs": sorted(corpus.planted_pairs),
                  "hard_negative_pairs": sorted(corpus.hard_negative_pairs),
                  "background_available": corpus.background_available}
        (out / f"labels-{size}.json").write_text(json.dumps(labels))
        made.append({"records": size, "planted": len(corpus.planted), "planted_pairs": len(corpus.planted_pairs),
                     "hard_negative_pairs": len(corpus.hard_negative_pairs),
                     "intents": len({p.intent for p in corpus.planted.values()}),
                     "background_available": corpus.background_available,
                     "seconds": round(time.perf_counter() - t0, 2)})
    print_json_line({"corpora": made})
    return 0


# ----------------------------------------------------------------------------------------------------
# Children: one method each


def _one_thread(model: bool = True) -> None:
    """One torch thread; the encoder's modules imported before the clock (imports are not the method's work)."""
    if not model:
        return
    import torch
    from transformers import BertModel, BertTokenizerFast  # noqa: F401

    torch.set_num_threads(1)


def _prompts(corpus: str) -> tuple[list[str], list[int]]:
    """Every record's first prompt (what the step embeds) and its index, from the Parquet files."""
    import pyarrow.parquet as pq

    from operators.steps.dedup.semantic import semantic_texts

    texts: list[str] = []
    index: list[int] = []
    for f in sorted(Path(corpus).glob("*.parquet")):
        t = pq.read_table(f)
        texts += semantic_texts(t, "prompt")
        index += [int(i[1:]) for i in t.column("id").to_pylist()]
    return texts, index


def _groups_from_drops(step_dir: str) -> list[list[int]]:
    """Predicted groups of a drop-list step: each kept record with the records dropped for it."""
    from operators.core.runner import read_step_table

    dropped = read_step_table(step_dir, "dropped")
    groups: dict[int, list[int]] = {}
    if dropped.num_rows:
        for rid, detail in zip(dropped.column("id").to_pylist(), dropped.column("detail").to_pylist(), strict=True):
            kept = int(detail.rsplit(" ", 1)[1][1:])
            groups.setdefault(kept, [kept]).append(int(rid[1:]))
    return list(groups.values())


def _run_step(name: str, config: dict[str, Any], corpus: str, step_dir: Path) -> tuple[float, Any]:
    from operators.cli import build_step
    from operators.core import storage
    from operators.core.runner import run_all

    t0 = time.perf_counter()
    m = run_all(build_step(name, {"target_shard_bytes": 1, **config}), [corpus], storage.validate_uri(str(step_dir)))
    return time.perf_counter() - t0, m


def child_step(args: argparse.Namespace) -> int:
    """ours (semantic_dedup, cold cache) or near (near_dedup): one timed run_all."""
    _one_thread(model=args.child == "ours")
    work = Path(args.work)
    if args.child == "ours":
        config: dict[str, Any] = {"threshold": args.threshold, "embed": {"device": "cpu"},
                                  "cache_uri": str(work / "cache")}
        seconds, m = _run_step("semantic_dedup", config, args.corpus, work / "step")
    else:
        seconds, m = _run_step("near_dedup", {}, args.corpus, work / "step")
    groups = _groups_from_drops(str(work / "step"))
    print_json_line({"method": args.child, "seconds": round(seconds, 3), "records": m.stats.records_in,
                     "shards": m.stats.shards, "dropped": m.stats.dropped_by_reason,
                     "counters": {k: round(v, 1) for k, v in sorted(m.stats.counters.items())}, "groups": groups})
    return 0


def child_sweep(args: argparse.Namespace) -> int:
    """The step at every threshold (and with many clusters), from a warm embedding cache, in one process."""
    _one_thread()
    work = Path(args.work)
    out = []
    for n, spec in enumerate(args.configs.split(";")):
        threshold, per_cluster = spec.split("/")
        config: dict[str, Any] = {"threshold": float(threshold), "embed": {"device": "cpu"}, "cache_uri": args.cache}
        if per_cluster != "default":
            config["records_per_cluster"] = int(per_cluster)
        seconds, m = _run_step("semantic_dedup", config, args.corpus, work / f"sweep-{n}")
        out.append({"threshold": float(threshold), "records_per_cluster": per_cluster, "seconds": round(seconds, 3),
                    "counters": {k: round(v, 1) for k, v in sorted(m.stats.counters.items())},
                    "groups": _groups_from_drops(str(work / f"sweep-{n}"))})
    print_json_line({"method": "sweep", "runs": out})
    return 0


def child_peer(args: argparse.Namespace) -> int:
    """sentence-transformers paraphrase mining on the same prompts: model load + encode + mining, timed."""
    _one_thread()
    from sentence_transformers import SentenceTransformer, util

    from operators.llm.embed import resolve_encoder

    texts, index = _prompts(args.corpus)
    folder = str(resolve_encoder("all-minilm-l6-v2"))
    lowest = min(float(t) for t in args.thresholds.split(","))
    t0 = time.perf_counter()
    model = SentenceTransformer(folder, device="cpu")
    model.max_seq_length = 128  # what our EmbedConfig.max_tokens reads
    mined = util.paraphrase_mining(model, texts, batch_size=64, show_progress_bar=False)
    seconds = time.perf_counter() - t0
    edges = [(float(s), index[i], index[j]) for s, i, j in mined if s >= lowest]
    print_json_line({"method": "peer", "seconds": round(seconds, 3), "records": len(texts),
                     "pairs_mined": len(mined), "edges": edges})
    return 0


def child_embed(args: argparse.Namespace) -> int:
    """Embedding alone, batch 64, in ONE process so both sides share the same load: the prompts in 4 strided
    chunks, embedded in ABBA order (ours, peer / peer, ours / ours, peer / peer, ours) by our `Embedder.embed`
    and the peer's `model.encode` (model loads and a warm-up batch not timed); vectors saved."""
    _one_thread()
    import numpy as np

    from operators.llm.embed import EmbedConfig, load_embedder

    texts, index = _prompts(args.corpus)
    embedder = load_embedder(EmbedConfig(batch_size=64, device="cpu"))
    sides: dict[str, Any] = {"ours": embedder.embed}
    if args.peer:
        from sentence_transformers import SentenceTransformer

        from operators.llm.embed import resolve_encoder

        model = SentenceTransformer(str(resolve_encoder("all-minilm-l6-v2")), device="cpu")
        model.max_seq_length = 128  # what our EmbedConfig.max_tokens reads

        def encode(batch: list[str]) -> Any:
            return model.encode(batch, batch_size=64, show_progress_bar=False, convert_to_numpy=True,
                                normalize_embeddings=True)
        sides["peer"] = encode
    for embed in sides.values():
        embed(texts[:16])  # warm-up: first-call allocations are not throughput
    chunks = 4
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    vectors = {name: np.zeros((len(texts), embedder.dim), dtype=np.float32) for name in sides}
    for c in range(chunks):
        part = list(range(c, len(texts), chunks))
        order = list(sides) if c % 2 == 0 else list(reversed(sides))
        for name in order:
            t0 = time.perf_counter()
            vectors[name][part] = sides[name]([texts[i] for i in part])
            seconds[name].append(time.perf_counter() - t0)
    for name, v in vectors.items():
        out = np.zeros_like(v)
        out[np.asarray(index)] = v  # record order
        np.save(f"{args.out}-{name}.npy", out)
    print_json_line({"method": "embed", "records": len(texts), "chunks": chunks,
                     "seconds": {k: round(sum(v), 3) for k, v in seconds.items()},
                     "chunk_seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()}})
    return 0


# ----------------------------------------------------------------------------------------------------
# Scoring (parent, after every measured child)


class Labels:
    def __init__(self, path: Path) -> None:
        raw = json.loads(path.read_text())
        self.records: int = raw["records"]
        self.planted: dict[int, tuple[int, str, int]] = {int(k): tuple(v) for k, v in raw["planted"].items()}
        self.pairs = {tuple(p) for p in raw["planted_pairs"]}
        self.hard = {tuple(p) for p in raw["hard_negative_pairs"]}
        self.background_available = raw["background_available"]


def _components(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    import numpy as np

    from operators.dedup import connected_components

    if not edges:
        return []
    e = np.asarray(edges, dtype=np.int64)
    labels = connected_components(n, e[:, 0], e[:, 1])
    groups: dict[int, list[int]] = {}
    for node in np.unique(e):
        groups.setdefault(int(labels[node]), []).append(int(node))
    return [g for g in groups.values() if len(g) > 1]


def _pairs(groups: list[list[int]]) -> set[tuple[int, int]]:
    return {p for g in groups for p in combinations(sorted(g), 2)}


def score(groups: list[list[int]], labels: Labels) -> dict[str, Any]:
    predicted = _pairs(groups)
    planted = labels.planted
    touching = {p for p in predicted if p[0] in planted or p[1] in planted}
    tp = len(predicted & labels.pairs)
    precision = tp / len(touching) if touching else 1.0
    recall = tp / len(labels.pairs) if labels.pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    merged = sum(max(0, len({planted[i][0] for i in g if i in planted}) - 1) for g in groups)
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "true_pairs": tp, "false_pairs": len(touching) - tp,
            "hard_negative_links": len(predicted & labels.hard),
            "planted_background_links": sum(1 for p in touching if (p[0] in planted) != (p[1] in planted)),
            "background_links": len(predicted) - len(touching), "intents_merged": merged}


def exact_groups(vectors: Any, threshold: float, block: int = 2048) -> list[list[int]]:
    """Connected components of every pair of `vectors` (float16-rounded, as stored) with cosine >= threshold."""
    import numpy as np

    x = vectors.astype(np.float16).astype(np.float32)
    edges: list[tuple[int, int]] = []
    for lo in range(0, len(x), block):
        sims = x[lo:lo + block] @ x[lo:].T
        i, j = np.nonzero(sims >= threshold)
        keep = j > i
        edges += zip((lo + i[keep]).tolist(), (lo + j[keep]).tolist(), strict=True)
    return _components(len(x), edges)


def _short(text: str, n: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------------------------------
# Parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7, help="corpus seed")
    parser.add_argument("--thresholds", default="0.8,0.85,0.9,0.95", help="cosine thresholds of the sweep")
    parser.add_argument("--plant-rate", type=float, default=0.3, help="share of planted prompts (default 0.3)")
    parser.add_argument("--scale", default="0.5,1,2",
                        help="corpus sizes of the scaling runs, as multiples of --records (default 0.5,1,2)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the timed children")
    parser.add_argument("--quick", action="store_true", help="300 records, default threshold only, no scaling")
    parser.add_argument("--no-peers", action="store_true", help="skip sentence-transformers")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--child", choices=("ours", "near", "sweep", "peer", "embed"), help=argparse.SUPPRESS)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make-corpus", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help=argparse.SUPPRESS)
    parser.add_argument("--configs", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_corpus:
        return corpus_main(args)
    if args.child in ("ours", "near"):
        return child_step(args)
    if args.child == "sweep":
        return child_sweep(args)
    if args.child == "peer":
        return child_peer(args)
    if args.child:
        return child_embed(args)

    if args.quick:
        args.records = min(args.records, 300)
        args.thresholds = str(DEFAULT_THRESHOLD)
        args.scale = "1"
    thresholds = sorted({float(t) for t in args.thresholds.split(",")} | {DEFAULT_THRESHOLD})
    scale = sorted({float(s) for s in args.scale.split(",")} | {1.0})
    sizes = [round(args.records * s) for s in scale]
    peers = not args.no_peers
    if peers and importlib.util.find_spec("sentence_transformers") is None:
        print("sentence-transformers is not installed: peer skipped (pip install -e '.[semdedup-peers]')", flush=True)
        peers = False
    load_start = print_machine_load("start")
    me = str(Path(__file__).resolve())
    with scratch_dir("bench-semdedup-", args.keep) as tmp:
        made = run_child([sys.executable, me, "--make-corpus", str(tmp), "--records", str(args.records),
                          "--sizes", ",".join(map(str, sizes)), "--seed", str(args.seed),
                          "--plant-rate", str(args.plant_rate)]).check("corpus")
        corpora = last_json_line(made.stdout)["corpora"]
        for c in corpora:
            print(f"corpus {c['records']} records: {c['planted']} planted prompts ({c['intents']} intents), "
                  f"{c['planted_pairs']} planted pairs, {c['hard_negative_pairs']} hard-negative pairs, "
                  f"{c['records'] - c['planted']} ShareGPT prompts (of {c['background_available']})", flush=True)
        print(f"corpora built in {made.seconds:.1f}s", flush=True)
        corpus = str(tmp / f"corpus-{args.records}")

        def child(name: str, *extra: str) -> dict[str, Any]:
            r = run_child([sys.executable, me, "--child", name, *extra], env=ENV).check(name)
            return {**last_json_line(r.stdout), "peak_rss_mb": r.peak_rss_mb, "wall": r.seconds}

        def measure(method: str) -> Any:
            def run(r: int) -> dict[str, Any]:
                work = tmp / f"{method}-{r}"
                if method in ("ours", "near"):
                    out = child(method, "--corpus", corpus, "--work", str(work), "--threshold", str(DEFAULT_THRESHOLD))
                elif method == "peer":
                    out = child("peer", "--corpus", corpus, "--thresholds", ",".join(map(str, thresholds)))
                else:
                    out = child("embed", "--corpus", corpus, "--out", str(tmp / f"embed-{r}"),
                                *(["--peer"] if peers else []))
                    print(f"  round {r + 1} {method:>10}: " + ", ".join(
                        f"{k} {v:.2f}s ({rate(args.records, v)} records/s)" for k, v in out["seconds"].items())
                        + f", same process, peak RSS {out['peak_rss_mb']} MB", flush=True)
                    return out
                print(f"  round {r + 1} {method:>10}: {out['seconds']:.2f}s, {rate(args.records, out['seconds'])} "
                      f"records/s, peak RSS {out['peak_rss_mb']} MB", flush=True)
                return out
            return run

        methods = ["ours", "near", "embed"] + (["peer"] if peers else [])
        repeats = max(1, args.repeats)
        print(f"{repeats} round(s), interleaved: {' / '.join(methods)} (one thread each)", flush=True)
        rounds = interleaved(repeats, [(m, measure(m)) for m in methods])

        sweep: list[dict[str, Any]] = []
        if not args.quick:  # after the timed rounds: it needs round 1's embedding cache
            configs = [f"{t}/default" for t in thresholds] + [f"{t}/{SWEEP_RECORDS_PER_CLUSTER}" for t in thresholds]
            sw = child("sweep", "--corpus", corpus, "--work", str(tmp / "sweep"),
                       "--cache", str(tmp / "ours-0" / "cache"), "--configs", ";".join(configs))
            sweep = sw["runs"]
            print(f"sweep ({len(configs)} runs of the step from the warm cache, one process, the first loads the "
                  f"model): {sum(s['seconds'] for s in sweep):.1f}s, peak RSS {sw['peak_rss_mb']} MB; seconds per run: "
                  + ", ".join(f"{s['threshold']}/{s['records_per_cluster']} {s['seconds']:.1f}" for s in sweep),
                  flush=True)

        scaling = [{"records": args.records, "seconds": statistics.median(o["seconds"] for o in rounds["ours"]),
                    "peak_rss_mb": max(o["peak_rss_mb"] for o in rounds["ours"]), "groups": rounds["ours"][0]["groups"],
                    "counters": rounds["ours"][0]["counters"]}]
        for size in (s for s in sizes if s != args.records):
            out = child("ours", "--corpus", str(tmp / f"corpus-{size}"), "--work", str(tmp / f"scale-{size}"),
                        "--threshold", str(DEFAULT_THRESHOLD))
            scaling.append({"records": size, "seconds": out["seconds"], "peak_rss_mb": out["peak_rss_mb"],
                            "groups": out["groups"], "counters": out["counters"]})
            print(f"  scaling {size:>6} records: {out['seconds']:.1f}s, peak RSS {out['peak_rss_mb']} MB", flush=True)
        load_end = print_machine_load("end")

        # ------------------------------------------------------------------ scores (nothing measured from here)
        import numpy as np
        import pyarrow.parquet as pq

        labels = Labels(tmp / f"labels-{args.records}.json")
        prompts: dict[int, str] = {}
        for f in sorted(Path(corpus).glob("*.parquet")):
            t = pq.read_table(f, columns=["id", "conversations"])
            for rid, conv in zip(t.column("id").to_pylist(), t.column("conversations").to_pylist(), strict=True):
                prompts[int(rid[1:])] = conv[0]["value"]
        n = labels.records
        print(f"\nground truth ({n} records): {len(labels.planted)} planted prompts, {len(labels.pairs)} planted "
              f"pairs, {len(labels.hard)} hard-negative pairs (same template, one slot changed)")

        results: dict[str, dict[str, Any]] = {}

        def timed(runs: list[dict[str, Any]]) -> dict[str, Any]:
            rates = spread([rate(n, o["seconds"]) for o in runs], 1)
            return {"records_per_s": rates["median"], "records_per_s_spread": rates,
                    "seconds": statistics.median(o["seconds"] for o in runs),
                    "peak_rss_mb": max(o["peak_rss_mb"] for o in runs)}

        ours_groups = rounds["ours"][0]["groups"]
        assert all(sorted(map(sorted, o["groups"])) == sorted(map(sorted, ours_groups)) for o in rounds["ours"])
        results[f"ours@{DEFAULT_THRESHOLD}"] = {"threshold": DEFAULT_THRESHOLD, **score(ours_groups, labels),
                                                **timed(rounds["ours"]), "counters": rounds["ours"][0]["counters"]}
        for s in sweep:
            name = (f"ours@{s['threshold']}" if s["records_per_cluster"] == "default"
                    else f"ours_k{round(n / int(s['records_per_cluster']))}@{s['threshold']}")
            if name == f"ours@{DEFAULT_THRESHOLD}":  # the warm re-run must decide what the timed run decided
                same = sorted(map(sorted, s["groups"])) == sorted(map(sorted, ours_groups))
                print(f"warm-cache re-run at {DEFAULT_THRESHOLD} decides as the timed run: {same}")
                continue
            results[name] = {"threshold": s["threshold"], **score(s["groups"], labels), "records_per_s": None,
                             "peak_rss_mb": None, "warm_cache_seconds": s["seconds"], "counters": s["counters"]}
        results["near_dedup"] = {"threshold": 0.7, **score(rounds["near"][0]["groups"], labels),
                                 **timed(rounds["near"])}
        vectors = np.load(tmp / "embed-0-ours.npy")
        for t in thresholds:
            results[f"exact@{t}"] = {"threshold": t, **score(exact_groups(vectors, t), labels), "records_per_s": None,
                                     "peak_rss_mb": None}
        embed_spread = {side: spread([rate(n, o["seconds"][side]) for o in rounds["embed"]], 1)
                        for side in rounds["embed"][0]["seconds"]}
        embed_rates: dict[str, Any] = {"ours": embed_spread["ours"]["median"], "peer": None}
        speedup = embed_speedup = None
        if peers:
            edges = rounds["peer"][0]["edges"]
            peer_timing = timed(rounds["peer"])
            for t in thresholds:
                groups = _components(n, [(i, j) for s, i, j in edges if s >= t])
                results[f"peer@{t}"] = {"threshold": t, **score(groups, labels), **peer_timing}
            embed_rates["peer"] = embed_spread["peer"]["median"]
            ours_rates = results[f"ours@{DEFAULT_THRESHOLD}"]["records_per_s_spread"]["runs"]
            speedup = spread(paired_ratios(ours_rates, peer_timing["records_per_s_spread"]["runs"]))
            # Per chunk, peer seconds / ours seconds: the two ran back to back in one process (ABBA order).
            chunk_pairs = [(o, p) for e in rounds["embed"]
                           for o, p in zip(e["chunk_seconds"]["ours"], e["chunk_seconds"]["peer"], strict=True)]
            embed_speedup = spread([p / o for o, p in chunk_pairs])
            peer_vectors = np.load(tmp / "embed-0-peer.npy")
            agreement = (vectors * peer_vectors).sum(axis=1)
            print(f"same model check: cosine(our vector, peer vector) per record: min {agreement.min():.5f}, "
                  f"median {float(np.median(agreement)):.5f}")

        print(f"\n{'method':<16}{'thr':>6}{'prec':>8}{'recall':>8}{'f1':>8}{'TP':>6}{'FP':>6}{'hardneg':>9}"
              f"{'plant-bg':>9}{'bg-bg':>7}{'merged':>8}{'rec/s':>9}{'RSS MB':>8}")
        for name, r in results.items():
            rps = f"{r['records_per_s']:.1f}" if r.get("records_per_s") else "-"
            rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-"
            print(f"{name:<16}{r['threshold']:>6}{r['precision']:>8.4f}{r['recall']:>8.4f}{r['f1']:>8.4f}"
                  f"{r['true_pairs']:>6}{r['false_pairs']:>6}{r['hard_negative_links']:>9}"
                  f"{r['planted_background_links']:>9}{r['background_links']:>7}{r['intents_merged']:>8}{rps:>9}{rss:>8}")
        print("  (TP/FP: predicted pairs touching a planted record; hardneg: of those, hard-negative pairs linked; "
              "plant-bg / bg-bg: pairs with one / no planted record; merged: distinct planted intents merged into "
              "another group, i.e. meanings lost)")

        ours_by_t = {t: results[f"ours@{t}"] for t in thresholds if f"ours@{t}" in results}
        best_t = max(ours_by_t, key=lambda t: (ours_by_t[t]["f1"], t))
        best = ours_by_t[best_t]
        print(f"\nbest threshold by F1 (ours, default clustering): {best_t}: precision {best['precision']}, "
              f"recall {best['recall']}, f1 {best['f1']}, {best['hard_negative_links']} of {len(labels.hard)} "
              f"hard-negative pairs linked, {best['background_links']} background pairs linked")
        for t in thresholds:
            ex = results[f"exact@{t}"]
            if f"ours@{t}" in results and ex["recall"]:
                line = (f"  clustering cost at {t}: recall ours {results[f'ours@{t}']['recall']} / exact "
                        f"{ex['recall']} ({int(results[f'ours@{t}']['counters'].get('pairs.clusters', 0))} cluster(s))")
                k_name = next((k for k in results if k.startswith("ours_k") and k.endswith(f"@{t}")), None)
                if k_name:
                    line += (f"; {k_name.split('@')[0][6:]} clusters: recall {results[k_name]['recall']} "
                             f"({results[k_name]['recall'] / ex['recall']:.3f} of exact)")
                print(line)

        # Where ours goes wrong at the best threshold, by family, with examples.
        best_pairs = _pairs(ours_groups if best_t == DEFAULT_THRESHOLD else
                            next(s["groups"] for s in sweep
                                 if s["threshold"] == best_t and s["records_per_cluster"] == "default"))
        fam_rows: dict[str, list[int]] = {}
        for a, b in labels.pairs:
            fam_rows.setdefault(labels.planted[a][1], [0, 0, 0, 0])[0] += 1
            fam_rows[labels.planted[a][1]][1] += (a, b) in best_pairs
        for a, b in labels.hard:
            fam_rows.setdefault(labels.planted[a][1], [0, 0, 0, 0])[2] += 1
            fam_rows[labels.planted[a][1]][3] += (a, b) in best_pairs
        print(f"\nby family at {best_t}: planted pairs found / planted, hard-negative pairs linked / hard-negative")
        for fam, (pp, found, hn, linked) in sorted(fam_rows.items()):
            print(f"  {fam:<16} found {found:>4} / {pp:<4}  hard negatives linked {linked:>4} / {hn}")
        missed = sorted(labels.pairs - best_pairs)[:4]
        wrong = sorted(labels.hard & best_pairs)[:4]
        bg = sorted(p for p in best_pairs if p[0] not in labels.planted and p[1] not in labels.planted)[:3]
        for title, sample in (("missed planted pairs", missed), ("hard negatives linked", wrong),
                              ("background pairs linked", bg)):
            if sample:
                print(f"  {title}:")
                for a, b in sample:
                    print(f"    {_short(prompts[a])!r}  ~  {_short(prompts[b])!r}")

        # Cost, peer ratios and scaling.
        ours = results[f"ours@{DEFAULT_THRESHOLD}"]
        print("\nours (semantic_dedup via run_all, 4 shards, cold cache): "
              + describe("records/s", ours["records_per_s_spread"]) + f", peak RSS {ours['peak_rss_mb']} MB, "
              f"counters {ours['counters']}")
        print("near_dedup: " + describe("records/s", results["near_dedup"]["records_per_s_spread"])
              + f", peak RSS {results['near_dedup']['peak_rss_mb']} MB")
        print("embedding alone, batch 64, one thread: " + describe("ours records/s", embed_spread["ours"]))
        if peers:
            peer = results[f"peer@{DEFAULT_THRESHOLD}"]
            print("peer (paraphrase_mining, model load + encode + mining): "
                  + describe("records/s", peer["records_per_s_spread"]) + f", peak RSS {peer['peak_rss_mb']} MB")
            print("embedding alone, batch 64, one thread: " + describe("peer records/s", embed_spread["peer"]))
            print(describe("speedup vs peer, end to end (ours/peer)", speedup, "x")
                  + f"; peak RSS ours/peer {ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}")
            print(describe("speedup vs peer, embedding alone (ours/peer, per chunk, one process, ABBA)",
                           embed_speedup, "x"))
        print(f"GPU embedding throughput: {GPU}")
        print("scaling (ours at the default threshold, cold cache, the same mix of planted and background prompts):")
        scaling.sort(key=lambda s: s["records"])
        base = scaling[0]
        scaling_out = []
        for s in scaling:
            labels_s = Labels(tmp / f"labels-{s['records']}.json")
            sc = score(s["groups"], labels_s)
            row = {"records": s["records"], "seconds": round(s["seconds"], 2), "peak_rss_mb": s["peak_rss_mb"],
                   "seconds_per_1000": round(1000 * s["seconds"] / s["records"], 2),
                   "clusters": s["counters"].get("pairs.clusters"),
                   "pairs_compared": s["counters"].get("pairs.pairs_compared"),
                   "recall": sc["recall"], "precision": sc["precision"]}
            scaling_out.append(row)
            growth = (s["seconds"] / base["seconds"]) / (s["records"] / base["records"])
            print(f"  {s['records']:>6} records: {s['seconds']:>7.1f}s ({row['seconds_per_1000']:.2f}s per 1000), "
                  f"peak RSS {s['peak_rss_mb']} MB, {row['clusters']} cluster(s), pairs compared "
                  f"{row['pairs_compared']}, recall {sc['recall']}, precision {sc['precision']}; cost per record "
                  f"x{growth:.2f} of the smallest size")

        summary: dict[str, Any] = {
            "records": n, "seed": args.seed, "planted_records": len(labels.planted), "planted_pairs": len(labels.pairs),
            "hard_negative_pairs": len(labels.hard), "thresholds": thresholds, "default_threshold": DEFAULT_THRESHOLD,
            "repeats": repeats, "load_at_start": load_start, "load_at_end": load_end,
            "methods": {k: {key: v.get(key) for key in ("threshold", "precision", "recall", "f1", "hard_negative_links",
                                                           "planted_background_links", "background_links",
                                                           "intents_merged", "records_per_s", "peak_rss_mb")}
                        for k, v in results.items()},
            "best_threshold": best_t, "best": {k: best[k] for k in ("precision", "recall", "f1", "hard_negative_links",
                                                                     "background_links")},
            "records_per_s": ours["records_per_s"], "peak_rss_mb": ours["peak_rss_mb"],
            "embed_records_per_s": embed_rates,
            "speedup_vs_peer": speedup["median"] if speedup else None, "speedup_vs_peer_spread": speedup,
            "embed_speedup_vs_peer": embed_speedup["median"] if embed_speedup else None,
            "scaling": scaling_out, "gpu": GPU,
        }
        print_json_line(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
