"""Ingestion: raw corpora in any supported format -> canonical Infinity-Instruct records.

Reads JSONL, JSON arrays and Parquet (optionally gzip/zstd/bz2-compressed), detects each file's format
(ShareGPT, OpenAI messages, Alpaca, Infinity-Instruct) unless the config fixes it, and normalizes every
record to the canonical schema with a stable content-hash `id` and a detected language. A record that
cannot be read or normalized is quarantined in `dropped/` with its raw text and a reason; it never stops
the run and never vanishes. Parts of split conversations are rejoined or trimmed (`split_conversations`,
see `splits.py`); a part joined into its conversation leaves as `merged`, so the ledger reads
in = kept + quarantined (by reason) + merged.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any, BinaryIO, ClassVar, cast

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field

from operators.core import storage
from operators.core.step import DETAIL, REASON, BatchResult, ShardSpec, Step, StepConfig
from operators.schema import CANONICAL_SCHEMA, LABEL_FIELDS
from operators.steps.ingest.formats import (
    DropReason,
    Normalized,
    Rejected,
    SourceFormat,
    content_id,
    detect_format,
    normalize,
)
from operators.steps.ingest.readers import (
    CORRUPT_CONTAINER,
    REFUSED_LINK,
    TRUNCATED_STREAM,
    BoundedStream,
    ContainerError,
    check_parquet_expansion,
    container_error_row,
    expansion_limit,
    iter_json_array_batches,
    iter_jsonl_batches,
    sniff_container,
)
from operators.steps.ingest.splits import (
    MERGED,
    SplitMode,
    as_part,
    chains,
    joined_record,
    raw_split_base,
    without_leading_answer,
)
from operators.text.langid import detect_language

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
DETECT_SAMPLE = 200  # records looked at to decide a file's format
MAX_PARTS = 256  # parts of one split conversation kept in one batch, at most (see _parts_together)
# strict=False accepts raw control characters inside strings, as the JSON-array reader does, so a
# record parses the same whichever container it arrived in.
_DECODER = json.JSONDecoder(strict=False)

# Raw rows as the readers hand them to the transform: text of one record plus where it came from.
RAW_BATCH_SCHEMA = pa.schema([
    ("raw", pa.string()),
    ("line", pa.int64()),
    ("error", pa.string()),
    ("file", pa.string()),
    ("format", pa.string()),
])
DROPPED_SCHEMA = pa.schema([
    ("raw", pa.string()),
    ("file", pa.string()),
    ("line", pa.int64()),
    ("format", pa.string()),
    (REASON, pa.string()),
    (DETAIL, pa.string()),
])


class IngestConfig(StepConfig):
    """How to read and normalize one source corpus."""

    source_name: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$",
        description="Name recorded in every record's `source` (used for per-source caps and reports).",
    )
    format: SourceFormat = Field(SourceFormat.AUTO, description="Input format, or auto-detect per file.")
    max_record_bytes: int = Field(1 << 20, ge=256, description="Records larger than this are quarantined.")
    langid_chars: int = Field(
        200, ge=16, description="Characters of human turns used for language id (200 agree with 400 on "
        "benchmarks and halve its cost, the largest in ingestion).")
    split_conversations: SplitMode = Field(
        SplitMode.REJOIN, description="Parts `<base>_<n>` of split conversations: rejoin the parts found in one "
        "file (and trim what still starts with the assistant), trim each part's leading assistant turn, or "
        "quarantine them as broken_role_order.")


def _base_suffix(uri: str) -> tuple[str, str | None]:
    for ext, codec in COMPRESSIONS.items():
        if uri.endswith(ext):
            return uri[: -len(ext)], codec
    return uri, None


def detect_file_format(raw_texts: list[str | None]) -> SourceFormat | None:
    """The format of a file, decided by the first records in it that parse and are recognizable."""
    for text in raw_texts:
        if text is None:
            continue
        try:
            rec = _DECODER.decode(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and (fmt := detect_format(rec)) is not None:
            return fmt
    return None


class IngestStep(Step[IngestConfig]):
    """Normalize raw records of one source into the canonical schema."""

    name: ClassVar[str] = "ingest"
    version: ClassVar[int] = 2  # v2: split conversations rejoined or trimmed
    config_model: ClassVar[type[StepConfig]] = IngestConfig
    input_suffixes: ClassVar[tuple[str, ...]] = tuple(
        base + comp for base in (".jsonl", ".json", ".parquet") for comp in ("", *COMPRESSIONS)
    )

    # -- edge: reading raw files -----------------------------------------------------------------------
    def _raw_batches(self, uri: str) -> Iterator[pa.RecordBatch]:
        """Raw rows of one file; a file that cannot be read on ends in one quarantined row saying why."""
        base, codec = _base_suffix(uri)
        try:
            yield from self._container_batches(uri, base, codec)
        except ContainerError as e:
            yield container_error_row(e.reason, f"{uri}: {e.detail}", -1)
        except (OSError, EOFError, pa.ArrowException) as e:  # a truncated or corrupt compressed stream or Parquet
            if storage.is_remote_failure(e):  # the store failing is not the file being bad: fail, never quarantine
                raise storage.StorageError(f"cannot read {uri}: {e}") from e
            truncated = codec is not None and ("truncat" in str(e).lower() or isinstance(e, EOFError))
            yield container_error_row(TRUNCATED_STREAM if truncated else CORRUPT_CONTAINER,
                                      f"{uri}: {type(e).__name__}: {e}", -1)

    def _container_batches(self, uri: str, base: str, codec: str | None) -> Iterator[pa.RecordBatch]:
        cfg = self.config
        fs, path = storage.filesystem(uri)
        if isinstance(fs, pafs.LocalFileSystem) and os.path.islink(path):
            raise ContainerError(REFUSED_LINK, "a symbolic link; inputs must be regular files")
        size = storage.file_size(uri)
        if base.endswith(".parquet"):
            with storage.open_input(uri) as f:
                line = 0
                pf = pq.ParquetFile(f)
                meta = pf.metadata
                check_parquet_expansion(sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)),
                                        size)
                for batch in pf.iter_batches(batch_size=cfg.batch_rows):
                    rows = batch.to_pylist()
                    raws = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
                    yield pa.record_batch(
                        [pa.array(raws, pa.string()), pa.array(range(line, line + len(rows)), pa.int64()),
                         pa.nulls(len(rows), pa.string())], names=["raw", "line", "error"])
                    line += len(rows)
            return
        with fs.open_input_stream(path, compression=codec) as raw_stream:
            stream = BoundedStream(raw_stream, expansion_limit(size)) if codec else raw_stream
            head = stream.read(4096)
            # Re-join the sniffed head with the rest of the stream without seeking (compressed streams can't).
            joined = cast(BinaryIO, _Prefixed(bytes(head), stream))
            reader = iter_json_array_batches if sniff_container(bytes(head)) == "json_array" else iter_jsonl_batches
            yield from reader(joined, cfg.batch_rows, cfg.max_record_bytes)

    def read(self, shard: ShardSpec) -> Iterator[pa.RecordBatch]:
        """Stream raw rows of every file in the shard, tagged with file and detected format."""
        for uri in shard.uris:
            batches = self._raw_batches(uri)
            first = next(batches, None)
            if first is None:
                continue
            if self.config.format != SourceFormat.AUTO:
                fmt: str = self.config.format.value
            else:
                detected = detect_file_format(first.column("raw").to_pylist()[:DETECT_SAMPLE])
                fmt = detected.value if detected else ""
            stream = _chain(first, batches)
            if self.config.split_conversations == SplitMode.REJOIN:
                stream = _parts_together(stream)
            for batch in stream:
                n = batch.num_rows
                yield pa.record_batch(
                    [batch.column("raw"), batch.column("line"), batch.column("error"),
                     pa.array([uri] * n, pa.string()), pa.array([fmt] * n, pa.string())],
                    schema=RAW_BATCH_SCHEMA,
                )

    # -- the pure part ---------------------------------------------------------------------------------
    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        """Parse and normalize raw rows; quarantine each failure with its reason."""
        return normalize_batch(batch, self.config)


def _empty_label() -> dict[str, list[str]]:
    return {k: [] for k in LABEL_FIELDS}


def normalize_batch(batch: pa.RecordBatch, cfg: IngestConfig) -> BatchResult:
    """Pure transform: raw rows (RAW_BATCH_SCHEMA) -> canonical records + quarantined (and merged) rows."""
    raws = batch.column("raw").to_pylist()
    lines = batch.column("line").to_pylist()
    errors = batch.column("error").to_pylist()
    files = batch.column("file").to_pylist()
    fmts = batch.column("format").to_pylist()
    kept: dict[str, list[Any]] = {name: [] for name in CANONICAL_SCHEMA.names}
    dropped: dict[str, list[Any]] = {name: [] for name in DROPPED_SCHEMA.names}
    counters: Counter[str] = Counter()

    def drop(i: int, reason: str, detail: str) -> None:
        dropped["raw"].append(raws[i])
        dropped["file"].append(files[i])
        dropped["line"].append(lines[i])
        dropped["format"].append(fmts[i])
        dropped[REASON].append(reason)
        dropped[DETAIL].append(detail)

    parsed: dict[int, Any] = {}  # rows that reach normalization: their decoded record
    for i, raw in enumerate(raws):
        if errors[i]:
            drop(i, errors[i], "record could not be read")
            continue
        if raw is None:
            drop(i, DropReason.BAD_JSON.value, "null record")
            continue
        if len(raw) > cfg.max_record_bytes:  # chars <= bytes, so this is only a cheap early bound
            drop(i, DropReason.OVERSIZE.value, f"{len(raw)} characters > {cfg.max_record_bytes}")
            continue
        try:
            rec = _DECODER.decode(raw)
        except (ValueError, RecursionError) as e:  # absurdly deep nesting must not crash the shard
            drop(i, DropReason.BAD_JSON.value, str(e)[:200])
            continue
        if not fmts[i]:
            drop(i, DropReason.UNKNOWN_FORMAT.value, "no record in this file matched a known format")
            continue
        parsed[i] = rec

    # Rejoin: each run of parts becomes one record at its first part's row; the others are merged into it.
    joined: dict[int, tuple[Normalized, bool]] = {}
    merged: dict[int, tuple[int, str]] = {}  # row -> (row of its conversation, detail prefix)
    if cfg.split_conversations == SplitMode.REJOIN:
        groups: dict[tuple[str, str], list[Any]] = {}
        for i, rec in parsed.items():
            if (part := as_part(i, rec, fmts[i])) is not None:
                groups.setdefault((files[i], part.base), []).append(part)
        for parts in groups.values():
            for run, repeated in chains(parts) if len(parts) > 1 else []:
                if len(run) < 2:
                    continue
                out, trimmed = _outcome(joined_record(run), SourceFormat.SHAREGPT.value, cfg.split_conversations)
                if not isinstance(out, Normalized):  # broken inside a part: each part is judged on its own
                    continue
                head = run[0].row
                joined[head] = (out, trimmed)
                for k, p in enumerate(run[1:], start=2):
                    merged[p.row] = (head, f"part {k} of {len(run)} ({p.origin_id}) of split conversation "
                                           f"{p.base!r}, merged into")
                counters["split.rejoined_conversations"] += 1
                counters["split.rejoined_parts"] += len(run) - 1
                counters["split.repeated_turns_removed"] += repeated

    ids: dict[int, str] = {}
    for i, rec in parsed.items():
        if i in merged:
            continue
        out, trimmed = joined[i] if i in joined else _outcome(rec, fmts[i], cfg.split_conversations)
        if isinstance(out, Rejected):
            drop(i, out.reason.value, out.detail)
            continue
        counters["split.trimmed"] += trimmed
        human_text = " ".join(t.value for t in out.turns if t.role == "human")
        ids[i] = content_id(out.turns)
        kept["id"].append(ids[i])
        kept["conversations"].append([{"from": t.role, "value": t.value} for t in out.turns])
        kept["label"].append(out.label if out.label is not None else _empty_label())
        kept["langdetect"].append(detect_language(human_text, cfg.langid_chars))
        kept["source"].append(cfg.source_name)
        kept["reward"].append(out.reward)
        kept["origin"].append({"file": files[i], "line": lines[i], "id": out.origin_id,
                               "source": out.origin_source, "format": fmts[i]})
    for i, (head, what) in merged.items():
        drop(i, MERGED, f"{what} {ids[head]} (line {lines[head]})")
    return BatchResult(
        kept=pa.table(kept, schema=CANONICAL_SCHEMA),
        dropped=pa.table(dropped, schema=DROPPED_SCHEMA),
        counters={k: float(v) for k, v in counters.items() if v},
    )


def _outcome(rec: Any, fmt: str, mode: SplitMode) -> tuple[Normalized | Rejected, bool]:
    """Normalize `rec`; unless quarantining, a record that starts with the assistant loses that turn when
    the rest is valid. Returns the outcome and whether it was trimmed."""
    out = normalize(rec, SourceFormat(fmt))
    if (isinstance(out, Rejected) and out.reason == DropReason.BROKEN_ROLE_ORDER and mode != SplitMode.QUARANTINE
            and (trimmed := without_leading_answer(rec, fmt)) is not None):
        retry = normalize(trimmed, SourceFormat(fmt))
        if isinstance(retry, Normalized):
            return retry, True
    return out, False


def _parts_together(batches: Iterator[pa.RecordBatch], limit: int = MAX_PARTS) -> Iterator[pa.RecordBatch]:
    """Re-cut one file's raw batches so that a run of rows with the same split base is never cut in two
    (the transform joins parts within a batch): a batch's trailing run moves to the next batch, and the
    file's last batch is never cut. A run of `limit` rows or more is cut anyway (a corpus whose ids all
    share one base must not grow a batch without bound; the real file's longest run is 89 parts)."""
    held: pa.RecordBatch | None = None  # the trailing run of the previous batch
    ready: pa.RecordBatch | None = None  # rows to yield once it is known that more batches follow
    for batch in batches:
        if held is not None:
            batch, held = pa.concat_batches([held, batch]), None
        if ready is not None:
            yield ready
            ready = None
        raws = batch.column("raw")
        start = batch.num_rows
        base = raw_split_base(raws[start - 1].as_py()) if start else None
        while (base is not None and start > 0 and batch.num_rows - start < limit
               and raw_split_base(raws[start - 1].as_py()) == base):
            start -= 1
        if start == batch.num_rows or batch.num_rows - start >= limit:
            ready = batch
        else:
            ready, held = (batch.slice(0, start) if start else None), batch.slice(start)
    last = [b for b in (ready, held) if b is not None]
    if last:
        yield pa.concat_batches(last)


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest


class _Prefixed:
    """A read-only binary stream: `head` bytes, then the rest of `stream`."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self._head = head
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                out, self._head = self._head + bytes(self._stream.read()), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += bytes(self._stream.read(n - len(out)))
            return out
        return bytes(self._stream.read(n) if n is not None and n >= 0 else self._stream.read())

    def readable(self) -> bool:
        return True
