"""Benchmark: Phase 1 end to end (ingest + every selection step), seconds, records/s and peak RSS per step.

    python bench/phase1.py [--records 100000] [--keep] [--seed 1234]

Each step runs as its own CLI child process (`python -m operators run <step> ...`), exactly as a local
StepOperator task does, so its wall time includes interpreter start and its peak RSS is its own. Run it
at two sizes (e.g. 100k and 1M) to see how cost grows: seconds should grow linearly and peak RSS should
stay bounded by part size, not corpus size (except the in-memory reduce stages of exact dedup and select,
which hold a few dozen bytes per record; near dedup shuffles band rows by band hash and holds one
partition, one shard's signatures and the duplicate links). There is no peer for the whole
pipeline; the per-step peers are in bench/dsir.py, bench/dedup.py and bench/ingest.py.
Prints a table, then LAST one JSON line: records, seconds, records_per_s, peak_rss_mb, steps{...}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_json_line, rate, run_child, write_instruction_corpus

STEPS: list[tuple[str, dict[str, object]]] = [
    ("filter", {"languages": []}),
    ("exact_dedup", {}),
    ("near_dedup", {}),
    ("decontaminate", {}),
    ("route", {}),
    ("dsir", {}),
    ("select", {"budgets": {"math": 0.5, "code": 0.5, "general": 0.3}}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="iip-phase1-"))
    try:
        corpus = write_instruction_corpus(tmp / "raw", args.records, seed=args.seed)
        print(f"corpus: {args.records} records in {len(corpus.files)} files under {tmp / 'raw'}")
        results: dict[str, dict[str, float]] = {}
        prev = str(tmp / "raw")
        chain: list[tuple[str, dict[str, object]]] = [("ingest", {"source_name": "bench"}), *STEPS]
        for step, cfg in chain:
            out = str(tmp / "run" / step)
            if step == "select":
                cfg = {**cfg, "dsir_dir": f"file://{tmp / 'run' / 'dsir'}"}
            res = run_child([sys.executable, "-m", "operators", "run", step, "--config", json.dumps(cfg),
                             "--input", prev, "--output", out]).check(step)
            stats = json.loads((Path(out) / "stats.json").read_text())
            results[step] = {"seconds": res.seconds, "cpu_seconds": res.cpu_seconds,
                             "peak_rss_mb": res.peak_rss_mb, "records_in": stats["records_in"],
                             "records_kept": stats["records_kept"],
                             "records_per_s": rate(stats["records_in"], res.seconds)}
            print(f"{step:14s} in {stats['records_in']:9d}  kept {stats['records_kept']:9d}  "
                  f"{res.seconds:8.1f} s  {results[step]['records_per_s']:9.0f} rec/s  {res.peak_rss_mb:7.0f} MiB")
            prev = out
        seconds = round(sum(r["seconds"] for r in results.values()), 2)
        print_json_line({"records": args.records, "seconds": seconds, "records_per_s": rate(args.records, seconds),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in results.values()), "steps": results})
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
