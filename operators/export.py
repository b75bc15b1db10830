"""Export a committed dataset: Parquet, a Hugging Face `datasets` folder, and ShareGPT JSONL.

Streams part by part (memory bounded by a part). Records flagged `replay` are also written as a
separate `replay` split for the second training stage. The Hugging Face folder is the Hub's Parquet
layout (`data/<split>-NNNNN-of-MMMMM.parquet` plus a README with `configs`), which
`datasets.load_dataset(<folder>)` reads without this project installed.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.core import storage
from operators.core.manifest import read_manifest, step_manifest_uri
from operators.schema import CANONICAL_SCHEMA

FORMATS = ("parquet", "hf", "sharegpt")


class ExportError(RuntimeError):
    """The export could not be written."""


def _parquet_bytes(table: pa.Table) -> pa.Buffer:
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


def export_step(step_dir: str, out_dir: str, formats: tuple[str, ...] = FORMATS,
                name: str = "dataset") -> dict[str, Any]:
    """Write the exports of a committed step into `out_dir`; returns a summary with file URIs and counts."""
    step_dir, out_dir = storage.validate_uri(step_dir), storage.validate_uri(out_dir)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ExportError(f"unknown export formats {sorted(unknown)}; use {FORMATS}")
    m = read_manifest(step_manifest_uri(step_dir))
    if m is None:
        raise ExportError(f"no committed step at {step_dir}")
    files = m.data_files()
    counts = {"train": 0, "replay": 0}
    written: list[str] = []
    for i, f in enumerate(files):
        with storage.open_input(storage.join(step_dir, f.path)) as fh:
            table = pq.read_table(fh)
        splits = {"train": table}
        if "replay" in table.column_names:
            splits["replay"] = table.filter(pc.equal(table["replay"], True))
        for split, t in splits.items():
            counts[split] += t.num_rows
            if not t.num_rows:
                continue
            if "parquet" in formats:
                uri = storage.join(out_dir, "parquet", split, f"part-{i:05d}.parquet")
                storage.write_bytes(uri, _parquet_bytes(t))
                written.append(uri)
            if "hf" in formats:
                uri = storage.join(out_dir, "hf", "data", f"{split}-{i:05d}-of-{len(files):05d}.parquet")
                storage.write_bytes(uri, _parquet_bytes(t.select(CANONICAL_SCHEMA.names)))
                written.append(uri)
            if "sharegpt" in formats:
                uri = storage.join(out_dir, "sharegpt", f"{split}-{i:05d}.jsonl")
                storage.write_bytes(uri, _sharegpt_lines(t))
                written.append(uri)
    if "hf" in formats:
        uri = storage.join(out_dir, "hf", "README.md")
        storage.write_bytes(uri, _hf_card(name, counts).encode())
        written.append(uri)
    summary = {"step_dir": step_dir, "out_dir": out_dir, "counts": counts, "files": written}
    storage.write_bytes(storage.join(out_dir, "_EXPORT.json"), json.dumps(summary, indent=2).encode())
    return summary
