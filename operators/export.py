"""Export formats of a dataset: Parquet, a Hugging Face `datasets` folder, and ShareGPT JSONL.

Written part by part (memory bounded by a part; operators/tail.py spreads the parts over shard tasks).
Records flagged `replay` are also written as a separate `replay` split for the second training stage. The
Hugging Face folder is the Hub's Parquet layout (`data/<split>-NNNNN-of-MMMMM.parquet` plus a README with
`configs`), which `datasets.load_dataset(<folder>)` reads without this project installed.
"""

from __future__ import annotations

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.core import storage
from operators.schema import CANONICAL_SCHEMA

FORMATS = ("parquet", "hf", "sharegpt")


class ExportError(RuntimeError):
    """The export could not be written."""


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """A table as one zstd Parquet file in memory (every file the tail writes is one part or smaller)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


SHAREGPT_FIELDS = ("id", "conversations", "label", "langdetect", "source", "reward")


def _sharegpt_lines(table: pa.Table) -> bytes:
    """One JSON object per record and line, UTF-8 as is (msgspec: 2.4x the stdlib's json per record; a NaN
    reward becomes null, where json.dumps would write the invalid `NaN`)."""
    encode = msgspec.json.Encoder().encode
    return b"".join(encode({k: r[k] for k in SHAREGPT_FIELDS}) + b"\n"
                    for r in table.select(CANONICAL_SCHEMA.names).to_pylist())


def _hf_card(name: str, splits: dict[str, int]) -> str:
    configs = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in splits if splits[s])
    counts = "\n".join(f"- `{s}`: {n} records" for s, n in splits.items())
    return (f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}\n---\n# {name}\n\n"
            "Instruction data in the Infinity-Instruct schema (`id`, `conversations[{from, value}]`, `label`, "
            f"`langdetect`, `source`, `reward`).\n\n{counts}\n")


def write_part(table: pa.Table, out_dir: str, index: int, of: int, formats: tuple[str, ...]
               ) -> tuple[dict[str, int], list[str]]:
    """Write data part `index` (of `of` parts) of a dataset in every format: its `train` split and, for records
    flagged `replay`, its `replay` split. Returns (rows per split, URIs written). A part's files are named by
    its index alone, so any task may write any part and a rewrite replaces the same files."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ExportError(f"unknown export formats {sorted(unknown)}; use {FORMATS}")
    splits = {"train": table}
    if "replay" in table.column_names:
        splits["replay"] = table.filter(pc.equal(table["replay"], True))
    counts: dict[str, int] = {}
    written: list[str] = []
    for split, t in splits.items():
        counts[split] = t.num_rows
        if not t.num_rows:
            continue
        if "parquet" in formats:
            uri = storage.join(out_dir, "parquet", split, f"part-{index:05d}.parquet")
            storage.write_bytes(uri, parquet_bytes(t))
            written.append(uri)
        if "hf" in formats:
            uri = storage.join(out_dir, "hf", "data", f"{split}-{index:05d}-of-{of:05d}.parquet")
            storage.write_bytes(uri, parquet_bytes(t.select(CANONICAL_SCHEMA.names)))
            written.append(uri)
        if "sharegpt" in formats:
            uri = storage.join(out_dir, "sharegpt", f"{split}-{index:05d}.jsonl")
            storage.write_bytes(uri, _sharegpt_lines(t))
            written.append(uri)
    return counts, written


def write_card(out_dir: str, name: str, counts: dict[str, int]) -> str:
    """The Hugging Face folder's README (its `configs` name the splits' files); returns its URI."""
    uri = storage.join(out_dir, "hf", "README.md")
    storage.write_bytes(uri, _hf_card(name, counts).encode())
    return uri
