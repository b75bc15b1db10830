"""Benchmark: an incremental nightly refresh against a full recompute, on the same data in one run.

    python bench/refresh.py [--records 100000] [--new-frac 0.01] [--shard-mb 8] [--keep]

1. Writes an N-record synthetic corpus (bench/_common.py: exact and near duplicates planted) as the source's
   backfill, and a night's new files holding `--new-frac` x N more records (another seed, plus copies of
   some old records, so cross-night duplicates exist).
2. Full build: ingest the backfill, run Phase 1 (filter ... select, as bench/phase1.py configures it, each
   step one `python -m operators run` process) into one stable run folder, and publish version 1 of the
   dataset; the dedup steps protect the published records (`published`: the no-churn rule).
3. The 1% night: ingest only the new files into their own folder, then re-run Phase 1 over both ingest
   folders in the same run folder (new files first, as a night's folder sorts before the backfill's). The
   runner reuses every shard whose input and config are unchanged and whose global inputs (a drop list, a
   fitted model, a selection) did not change.
4. A full recompute of the same night: everything again in a fresh folder under the same no-churn rule (the
   same published version 1). `same_as_full`: the night's kept ids and drop reasons equal the recompute's in
   every step; with `freeze` (the default, the nightly's incremental setting: dsir keeps its models, select
   its decisions and only adds) in every step before dsir, and `previous_selection_kept` says that every
   record version 1 selected is still selected. `--no-freeze` compares every step.
5. A night with nothing new: the same inputs again. `unchanged_night_step_seconds` is the step work it did
   (seconds of shard and stage tasks that ran instead of skipping: planning and checks are not step work).

LAST line: JSON with incremental_cpu_ratio (CPU seconds of the 1% night / of the full recompute, both over
every step's processes, ingest included), same_as_full, unchanged_night_step_seconds, and per step the CPU
seconds of each run and the shards reused. Goal at 1M records: ratio <= 0.10.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import mib, print_json_line, print_machine_load, run_child, scratch_dir, write_instruction_corpus
from bench.phase1 import STEPS

SOURCE = "bench"


def _copy_some(src: Path, dst: Path, fraction: float, seed: int) -> int:
    """Copy a `fraction` of the lines of each JSONL file in `src` into a file of the same format in `dst`:
    records a night brings again (cross-night duplicates)."""
    rng = random.Random(seed)
    n = 0
    for f in sorted(src.glob("*.jsonl")):
        with (dst / f"copies-{f.name}").open("w", encoding="utf-8") as out, f.open(encoding="utf-8") as lines:
            for line in lines:
                if rng.random() < fraction:
                    out.write(line)
                    n += 1
    return n


def _run_step(step: str, cfg: dict[str, Any], inputs: list[str], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "operators", "run", step, "--config", json.dumps(cfg), "--output", str(out)]
    for i in inputs:
        cmd += ["--input", i]
    res = run_child(cmd).check(step)
    stats = json.loads((out / "stats.json").read_text())
    return {"cpu_seconds": res.cpu_seconds, "seconds": res.seconds, "peak_rss_mb": res.peak_rss_mb,
            "records_in": stats["records_in"], "records_kept": stats["records_kept"],
            "shards": stats.get("shards"), "shards_reused": int(stats["counters"].get("shards_reused", 0))}


def phase1(run: Path, ingests: list[str], shard_bytes: int, published: str, freeze: bool
           ) -> dict[str, dict[str, Any]]:
    """Every Phase 1 step over `ingests` into `run`, one process per step."""
    out: dict[str, dict[str, Any]] = {}
    prev = ingests
    for step, cfg in STEPS:
        cfg = {**cfg, "target_shard_bytes": shard_bytes}
        if step in ("exact_dedup", "near_dedup"):
            cfg["published"] = published
        if step in ("dsir", "select"):
            cfg["freeze"] = freeze
        if step == "select":
            cfg["dsir_dir"] = str(run / "dsir")
        out[step] = _run_step(step, cfg, prev, run / step)
        prev = [str(run / step)]
    return out


def ingest(raw: Path, out: Path, shard_bytes: int) -> dict[str, Any]:
    return _run_step("ingest", {"source_name": SOURCE, "target_shard_bytes": shard_bytes}, [str(raw)], out)


def decisions(step_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Kept ids (sorted) and drop reason by id of a committed step."""
    from operators.core.runner import read_step_table

    kept = sorted(read_step_table(str(step_dir))["id"].to_pylist())
    dropped = read_step_table(str(step_dir), "dropped")
    reasons = dict(zip(dropped["id"].to_pylist(), dropped["reason"].to_pylist(), strict=True)) \
        if dropped.num_rows else {}
    return kept, reasons


def step_work_seconds(run: Path, since: str) -> float:
    """Seconds of shard and stage tasks committed at or after `since` that did work (not reused)."""
    from operators.core.manifest import Manifest

    total = 0.0
    for path in run.rglob("*.json"):
        if "_shards" not in path.parts and path.name != "_MANIFEST.json":
            continue
        if path.name == "_MANIFEST.json" and "_stages" not in path.parts:
            continue  # a step manifest sums its shards' seconds: counted there
        try:
            m = Manifest.model_validate_json(path.read_text())
        except ValueError:
            continue
        if m.created_at >= since and m.reused_from is None:
            total += m.stats.seconds
    return round(total, 3)


def _now() -> str:
    time.sleep(1.0)  # manifests carry whole seconds: start the window on a fresh one
    return datetime.now(UTC).isoformat(timespec="seconds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--new-frac", type=float, default=0.01, help="new records a night brings, as a share of N")
    ap.add_argument("--shard-mb", type=float, default=8.0, help="target shard size of every step (MiB)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-freeze", action="store_true",
                    help="refit dsir and reselect from scratch each night (then every step equals a full recompute)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    freeze = not args.no_freeze
    # Under `freeze` the night keeps the previous models and selection by design, which a fresh folder has no
    # record of: equality with a full recompute is then checked up to the step before dsir.
    compared = [s for s, _ in STEPS if not (freeze and s in ("dsir", "select"))]
    load = print_machine_load()
    shard_bytes = int(args.shard_mb * 2**20)
    with scratch_dir("iip-refresh-", args.keep) as tmp:
        from operators.datasets import versions as dv

        base = write_instruction_corpus(tmp / "raw" / "base", args.records, seed=args.seed, near_dup_rate=0.05)
        n_new = max(1, round(args.records * args.new_frac))
        write_instruction_corpus(tmp / "raw" / "night", n_new, seed=args.seed + 1, n_files=1, near_dup_rate=0.05)
        copies = _copy_some(tmp / "raw" / "base", tmp / "raw" / "night", 0.1 * args.new_frac, args.seed)
        print(f"corpus: {args.records} records ({mib(base.bytes)} MiB) + a night of {n_new} new records and "
              f"{copies} copies of old ones", flush=True)
        root = tmp / "data"
        published = str(root / "datasets" / "foundational")
        src = root / "sources" / SOURCE
        run = root / "runs" / "nightly"

        # 1. Full build and version 1.
        build = {"ingest": ingest(tmp / "raw" / "base", src / "ingest", shard_bytes)}
        build.update(phase1(run, [str(src / "ingest")], shard_bytes, published, freeze))
        v1 = dv.publish(str(root), dv.PublishConfig(name="foundational"), str(run / "select"), str(run))
        print(f"full build: {sum(s['cpu_seconds'] for s in build.values()):.1f} CPU s; published v{v1['version']}",
              flush=True)

        # 2. The 1% night, in the same folders.
        ingests = [str(src / "2026-01-02" / "ingest"), str(src / "ingest")]
        night = {"ingest": ingest(tmp / "raw" / "night", src / "2026-01-02" / "ingest", shard_bytes)}
        selected_v1 = set(decisions(run / "select")[0])
        night.update(phase1(run, ingests, shard_bytes, published, freeze))
        kept_selection = selected_v1 <= set(decisions(run / "select")[0])

        # 3. A full recompute of that night, from the raw files, under the same rule (version 1 protected).
        full_src = tmp / "full" / "sources"
        full = {"ingest": ingest(tmp / "raw" / "base", full_src / "ingest", shard_bytes)}
        full["ingest_night"] = ingest(tmp / "raw" / "night", full_src / "night" / "ingest", shard_bytes)
        full.update(phase1(tmp / "full" / "run", [str(full_src / "night" / "ingest"), str(full_src / "ingest")],
                           shard_bytes, published, freeze=False))
        same = all(decisions(run / step) == decisions(tmp / "full" / "run" / step) for step in compared)

        # 4. A night with nothing new.
        since = _now()
        unchanged = phase1(run, ingests, shard_bytes, published, freeze)
        unchanged_work = step_work_seconds(run, since)

        cpu = {name: round(sum(s["cpu_seconds"] for s in part.values()), 2)
               for name, part in (("build", build), ("night", night), ("full", full), ("unchanged", unchanged))}
        ratio = round(cpu["night"] / cpu["full"], 4) if cpu["full"] else None
        print(f"{'step':14s} {'full CPU s':>10s} {'night CPU s':>11s} {'reused':>9s} {'unchanged CPU s':>15s}")
        for step, _ in [("ingest", None), *STEPS]:
            f = full[step]["cpu_seconds"] + (full["ingest_night"]["cpu_seconds"] if step == "ingest" else 0)
            n = night[step]
            u = unchanged.get(step, {"cpu_seconds": 0.0})
            print(f"{step:14s} {f:10.1f} {n['cpu_seconds']:11.1f} {n['shards_reused']:4d}/{n['shards'] or 0:<4d} "
                  f"{u['cpu_seconds']:15.1f}")
        print(f"CPU seconds: full recompute {cpu['full']}, 1% night {cpu['night']} (ratio {ratio}), "
              f"unchanged night {cpu['unchanged']} (step work {unchanged_work} s); same as full over "
              f"{', '.join(compared)}: {same}; version 1's selection all still selected: {kept_selection}",
              flush=True)
        print_json_line({
            "records": args.records, "new_records": n_new, "copies_of_old": copies, "shard_mb": args.shard_mb,
            "incremental_cpu_ratio": ratio, "same_as_full": same, "same_as_full_steps": compared,
            "freeze": freeze, "previous_selection_kept": kept_selection,
            "unchanged_night_step_seconds": unchanged_work,
            "cpu_seconds": cpu, "load": load,
            "steps": {step: {"full_cpu_s": full[step]["cpu_seconds"], "night_cpu_s": night[step]["cpu_seconds"],
                             "night_shards_reused": night[step]["shards_reused"], "shards": night[step]["shards"],
                             "unchanged_cpu_s": unchanged.get(step, {}).get("cpu_seconds")}
                      for step in ["ingest", *(s for s, _ in STEPS)]},
        })


if __name__ == "__main__":
    main()
