"""Benchmark: how long the run report takes and how big it gets, as the run grows.

    python bench/report.py [--records 100000 300000] [--keep]      # builds each run, then reports it
    python bench/report.py --run-root /path/to/run                  # report an existing run (e.g. bench/phase1 --keep)

Builds a run like Phase 1's front half (ingest -> filter -> exact_dedup -> near_dedup, every step in this process
with run_all) from the synthetic corpus bench/phase1.py uses (1% malformed lines, exact and 5% near duplicates),
then times `python -m operators report` as its own process (what the report task runs): seconds, peak RSS and the
bytes of report.html / report.json. The report reads a bounded sample per drop reason, the id column for survivor
lookups and the two columns of the kept profile, so its cost should grow far slower than the run and its size not
at all. There is no peer: NeMo Curator, datatrove and data-juicer write per-step stats files, not a report page.
Prints a table, then LAST one JSON line: {"runs": [{records, report_seconds, report_peak_rss_mb, html_bytes,
json_bytes, steps}]}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_json_line, run_child, write_instruction_corpus

CHAIN: list[tuple[str, dict[str, object]]] = [("ingest", {"source_name": "bench"}), ("filter", {"languages": []}),
                                              ("exact_dedup", {}), ("near_dedup", {})]


def build_run(root: Path, records: int) -> None:
    """The run the report is measured on (not timed)."""
    from operators.cli import build_step
    from operators.core.runner import run_all

    write_instruction_corpus(root / "raw", records, seed=1234, near_dup_rate=0.05)
    prev = str(root / "raw")
    for step, cfg in CHAIN:
        out = str(root / "run" / step)
        run_all(build_step(step, {**cfg, "target_shard_bytes": 64 << 20}), [prev], out)
        prev = out


def measure(run_root: Path) -> dict[str, Any]:
    """Time the report action on `run_root` as a child process."""
    res = run_child([sys.executable, "-m", "operators", "report", "--output", str(run_root)]).check("report")
    return {"report_seconds": round(res.seconds, 2), "report_cpu_seconds": round(res.cpu_seconds, 2),
            "report_peak_rss_mb": res.peak_rss_mb, "html_bytes": (run_root / "report.html").stat().st_size,
            "json_bytes": (run_root / "report.json").stat().st_size,
            "pages_bytes": sum(p.stat().st_size for p in (run_root / "_report").glob("*.html"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[100_000])
    ap.add_argument("--run-root", type=Path, default=None, help="report this existing run instead of building one")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    runs = []
    if args.run_root:
        runs.append({"records": None, "run_root": str(args.run_root), **measure(args.run_root)})
    else:
        for n in args.records:
            tmp = Path(tempfile.mkdtemp(prefix="iip-report-"))
            try:
                build_run(tmp, n)
                runs.append({"records": n, **measure(tmp / "run")})
            finally:
                if not args.keep:
                    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'records':>10s} {'seconds':>8s} {'peak MiB':>9s} {'html KiB':>9s} {'json KiB':>9s}")
    for r in runs:
        print(f"{r['records'] or '-':>10} {r['report_seconds']:8.2f} {r['report_peak_rss_mb']:9.0f} "
              f"{r['html_bytes'] / 1024:9.0f} {r['json_bytes'] / 1024:9.0f}")
    print_json_line({"runs": runs})


if __name__ == "__main__":
    main()
