"""Benchmark: the ingest step against the bare pyarrow read+write floor, on the same bytes, in one run.

    python bench/ingest.py [--records 100000] [--workers 1] [--repeats 3] [--keep] [--seed 1234] [--files N]

1. Streams a deterministic synthetic corpus to a temp dir: JSONL files rotating ShareGPT / OpenAI /
   Alpaca, multi-turn, ~300-2000 characters per record, mostly English with some Chinese and French,
   ~1% of the lines broken (bad JSON, garbage, empty turns, wrong role order, unknown roles, missing
   fields).
2. Floor: a child process per worker reads each file with ``pyarrow.json.read_json`` (single-threaded,
   to be a per-core floor) and writes it with ``pyarrow.parquet.write_table(compression="zstd")``. The
   bad-JSON lines the generator planted are cut out of the bytes first (pyarrow cannot skip them);
   that cut is part of the floor's time.
3. Ingest: the real CLI, ``python -m operators run ingest ...``, as a child process, so its wall time
   includes interpreter start and its peak RSS is its own. With ``--workers K > 1`` the step is planned
   into about K shards, ``run --shard`` runs K at a time, then ``reduce``; wall time covers all three.

Prints human-readable lines, then LAST one JSON line: records, records_per_s (per worker), seconds,
floor_records_per_s, floor_seconds, floor_ratio (ingest seconds / floor seconds), cpu_ratio (the same
with CPU seconds of the children: steadier when other work shares the machine), peak_rss_mb,
floor_peak_rss_mb, kept, dropped, dropped_by_reason and more. The temp dir is removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `python bench/ingest.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    ChildResult,
    Corpus,
    describe,
    interleaved,
    last_json_line,
    mib,
    print_json_line,
    print_machine_load,
    rate,
    run_child,
    run_children,
    spread,
    write_instruction_corpus,
)

SOURCE_NAME = "bench"


# ----------------------------------------------------------------------------------------------------
# The floor, run in a child process


def floor_child(spec_path: str) -> int:
    """Read each listed JSONL file with pyarrow.json and write it as zstd Parquet; print a JSON line."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["output"])
    out_dir.mkdir(parents=True, exist_ok=True)
    read_options = pj.ReadOptions(use_threads=False)
    rows = 0
    out_bytes = 0
    for item in spec["files"]:
        data = Path(item["path"]).read_bytes()
        skip = set(item["skip_lines"])
        if skip:
            lines = data.split(b"\n")
            data = b"\n".join(line for n, line in enumerate(lines, 1) if n not in skip)
        table = pj.read_json(pa.BufferReader(data), read_options=read_options)
        del data
        target = out_dir / (Path(item["path"]).stem + ".parquet")
        pq.write_table(table, target, compression="zstd")
        rows += table.num_rows
        out_bytes += target.stat().st_size
        del table
    print_json_line({"rows": rows, "bytes_out": out_bytes})
    return 0


def run_floor(corpus: Corpus, work: Path, workers: int, rnd: int = 0) -> tuple[float, list[ChildResult], int]:
    """Run the floor over the corpus with `workers` children; (wall seconds, results, rows written)."""
    groups: list[list[dict[str, Any]]] = [[] for _ in range(max(1, workers))]
    for i, f in enumerate(corpus.files):
        groups[i % len(groups)].append({"path": f.path, "skip_lines": f.bad_json_lines})
    cmds = []
    for g, files in enumerate(groups):
        if not files:
            continue
        spec = work / f"floor-spec-{g}.json"
        spec.write_text(json.dumps({"files": files, "output": str(work / f"floor-{rnd}")}))
        cmds.append([sys.executable, str(Path(__file__).resolve()), "--floor-child", str(spec)])
    seconds, results = run_children(cmds, parallel=workers)
    for r in results:
        r.check("floor")
    return seconds, results, sum(int(last_json_line(r.stdout)["rows"]) for r in results)


# ----------------------------------------------------------------------------------------------------
# The ingest step, through its CLI


def run_ingest(corpus: Corpus, work: Path, workers: int, rnd: int = 0
               ) -> tuple[float, list[ChildResult], dict[str, Any]]:
    """Run the ingest CLI over the corpus into a fresh folder per round `rnd`; (wall seconds, child results,
    the step's final JSON summary)."""
    out = str(work / f"ingest-{rnd}")
    base = [sys.executable, "-m", "operators"]
    if workers <= 1:
        cfg = json.dumps({"source_name": SOURCE_NAME})
        r = run_child([*base, "run", "ingest", "--config", cfg, "--input", corpus.directory, "--output", out])
        r.check("ingest")
        return r.seconds, [r], last_json_line(r.stdout)
    # Several workers: plan into ~`workers` shards, run them `workers` at a time, reduce.
    cfg = json.dumps({"source_name": SOURCE_NAME,
                      "target_shard_bytes": max(1, math.ceil(corpus.bytes / workers))})
    plan = run_child([*base, "plan", "ingest", "--config", cfg, "--input", corpus.directory, "--output", out])
    plan.check("ingest plan")
    shards = last_json_line(plan.stdout)["shards"]
    shard_cmds = [[*base, "run", "ingest", "--config", cfg, "--input", corpus.directory, "--output", out,
                   "--shard", str(s)] for s in shards]
    run_s, shard_results = run_children(shard_cmds, parallel=workers)
    for r in shard_results:
        r.check("ingest shard")
    red = run_child([*base, "reduce", "ingest", "--output", out])
    red.check("ingest reduce")
    total = round(plan.seconds + run_s + red.seconds, 3)
    return total, [plan, *shard_results, red], last_json_line(red.stdout)


# ----------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000, help="records to generate (default 100000)")
    p.add_argument("--workers", type=int, default=1, help="parallel shard processes (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (corpus and outputs)")
    p.add_argument("--seed", type=int, default=1234, help="corpus seed (default 1234)")
    p.add_argument("--files", type=int, default=None, help="JSONL files (default max(4, records/50000))")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of floor and ingest (default 3)")
    p.add_argument("--tmp-dir", default=None, help="where to create the temp dir (default: system temp)")
    p.add_argument("--floor-child", metavar="SPEC", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Generate, measure floor and ingest, print the report and the JSON result line."""
    args = _parser().parse_args(argv)
    if args.floor_child:
        return floor_child(args.floor_child)
    if args.records < 1 or args.workers < 1:
        raise SystemExit("--records and --workers must be >= 1")
    n, workers = args.records, args.workers
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.tmp_dir))
    try:
        corpus = write_instruction_corpus(work / "corpus", n, n_files=args.files, seed=args.seed)
        planted = sum(corpus.malformed.values())
        print(f"corpus: {n} records in {len(corpus.files)} JSONL files, {mib(corpus.bytes)} MiB "
              f"({corpus.bytes / n:.0f} B/record), generated in {corpus.seconds:.1f}s", flush=True)
        print(f"  languages {corpus.languages}; planted malformed {planted} {corpus.malformed}", flush=True)

        # Interleaved rounds (floor, ingest, floor, ingest, ...): both sides see the same load; medians below.
        load = print_machine_load()
        repeats = max(1, args.repeats)
        rounds = interleaved(repeats, [("floor", lambda r: run_floor(corpus, work, workers, r)),
                                       ("ingest", lambda r: run_ingest(corpus, work, workers, r))])
        floor_walls = [f[0] for f in rounds["floor"]]
        floor_cpus = [sum(c.cpu_seconds for c in f[1]) for f in rounds["floor"]]
        ingest_walls = [i[0] for i in rounds["ingest"]]
        ingest_cpus = [sum(c.cpu_seconds for c in i[1]) for i in rounds["ingest"]]
        floor_s, floor_cpu = statistics.median(floor_walls), round(statistics.median(floor_cpus), 3)
        ingest_s, ingest_cpu = statistics.median(ingest_walls), round(statistics.median(ingest_cpus), 3)
        floor_rows = rounds["floor"][0][2]
        summary = rounds["ingest"][-1][2]
        floor_rss = max(c.peak_rss_mb for f in rounds["floor"] for c in f[1])
        ingest_rss = max(c.peak_rss_mb for i in rounds["ingest"] for c in i[1])
        mb = corpus.bytes / 2**20
        print(f"floor  (pyarrow read_json -> parquet zstd, {workers} worker(s)), median of {repeats}: "
              f"{floor_s:.2f}s, {rate(n, floor_s, workers):.0f} records/s/worker, {mb / floor_s:.1f} MiB/s, "
              f"cpu {floor_cpu:.2f}s, peak RSS {floor_rss:.0f} MiB ({floor_rows} rows parsed)", flush=True)
        print(f"ingest (python -m operators run ingest, {workers} worker(s)), median of {repeats}: "
              f"{ingest_s:.2f}s wall ({summary['seconds']:.2f}s inside the runner, last round), "
              f"{rate(n, ingest_s, workers):.0f} records/s/worker, {mb / ingest_s:.1f} MiB/s, "
              f"cpu {ingest_cpu:.2f}s, peak RSS {ingest_rss:.0f} MiB", flush=True)
        wall_ratios = spread([i / f for i, f in zip(ingest_walls, floor_walls, strict=True) if f])
        cpu_ratios = spread([i / f for i, f in zip(ingest_cpus, floor_cpus, strict=True) if f])
        print(describe("floor_ratio per round (wall)", wall_ratios, "x"), flush=True)
        print(describe("cpu_ratio per round", cpu_ratios, "x"), flush=True)

        records_in = int(summary["records_in"])
        kept = int(summary["records_kept"])
        by_reason = {str(k): int(v) for k, v in summary["dropped_by_reason"].items()}
        dropped = sum(by_reason.values())
        ledger_ok = records_in == kept + dropped == n
        verdict = "ok" if ledger_ok else "MISMATCH"
        print(f"ledger: in {records_in} = kept {kept} + dropped {dropped} "
              f"[{verdict}; generated {n}, planted malformed {planted}]", flush=True)
        for reason, count in sorted(by_reason.items(), key=lambda kv: -kv[1]):
            print(f"  dropped {reason}: {count}", flush=True)
        ratio = wall_ratios["median"] or 0.0
        cpu_ratio = cpu_ratios["median"] or 0.0
        print(f"floor_ratio: ingest takes {ratio:.2f}x the floor's wall time, {cpu_ratio:.2f}x its CPU time "
              "(CPU time is the steadier figure on a busy machine)", flush=True)
        if args.keep:
            print(f"kept temp dir: {work}", flush=True)

        print_json_line({
            "records": n,
            "workers": workers,
            "files": len(corpus.files),
            "corpus_mb": mib(corpus.bytes),
            "generate_seconds": corpus.seconds,
            "seconds": ingest_s,
            "runner_seconds": summary["seconds"],
            "records_per_s": rate(n, ingest_s, workers),
            "mb_per_s": round(mb / ingest_s, 2),
            "cpu_seconds": ingest_cpu,
            "peak_rss_mb": ingest_rss,
            "floor_seconds": floor_s,
            "floor_records_per_s": rate(n, floor_s, workers),
            "floor_mb_per_s": round(mb / floor_s, 2),
            "floor_cpu_seconds": floor_cpu,
            "floor_peak_rss_mb": floor_rss,
            "floor_ratio": ratio,
            "cpu_ratio": cpu_ratio,
            "floor_ratio_rounds": wall_ratios,
            "cpu_ratio_rounds": cpu_ratios,
            "repeats": repeats,
            "load": load,
            "records_per_cpu_s": rate(n, ingest_cpu),
            "floor_records_per_cpu_s": rate(n, floor_cpu),
            "records_in": records_in,
            "kept": kept,
            "dropped": dropped,
            "dropped_by_reason": by_reason,
            "planted_malformed": planted,
            "ledger_ok": ledger_ok,
            "bytes_out": summary.get("bytes_out"),
        })
        return 0 if ledger_ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
