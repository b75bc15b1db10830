"""Result cache for LLM requests, stored beside the data so a retried or re-run task pays no tokens twice.

Keys are `request_key(model, sampling, prompt version, prompt)` hashes, so a changed model, decoding or
prompt version misses and anything else hits. Storage is append-only segments, one Parquet file per flush:
`<cache>/shard-SSSSS-<attempt>-NNNNN.parquet`. A task flushes after every batch it paid for, so a task
killed halfway keeps what it already bought; the retry (any attempt of the same shard) loads the shard's
segments on start. Keys are global, but a shard loads only its own segments: memory stays bounded by the
shard, not the corpus, and a re-run of the same plan maps the same records to the same shard.
A segment that cannot be read (a writer killed mid-upload) is skipped with a warning: it only costs tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators.core import faults, storage
from operators.llm.base import Generation, LossScore

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("kind", pa.string()),  # "chat" | "loss"
    ("text", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("finish_reason", pa.string()),
    ("loss", pa.float64()),
])


@dataclass
class CacheStats:
    """What the cache saved this task."""

    hits: int = 0
    misses: int = 0
    loaded: int = 0
    segments_written: int = 0
    bad_segments: int = 0


class ResultCache:
    """In-memory view of a shard's cached results plus an append-only segment writer."""

    def __init__(self, uri: str | None = None, shard: int = 0, attempt: str = "local") -> None:
        self.uri = storage.validate_uri(uri) if uri else None
        self.prefix = f"shard-{shard:05d}-"
        self.attempt = attempt
        self.stats = CacheStats()
        self._chat: dict[str, Generation] = {}
        self._loss: dict[str, LossScore] = {}
        self._pending: list[dict[str, Any]] = []
        self._seq = 0
        if self.uri:
            self._load()

    def _load(self) -> None:
        assert self.uri is not None
        for uri in sorted(storage.list_files(self.uri)):
            name = uri.rsplit("/", 1)[-1]
            if not (name.startswith(self.prefix) and name.endswith(".parquet")):
                continue
            try:
                with storage.open_input(uri) as f:
                    rows = pq.read_table(f).to_pylist()
            except Exception as e:  # a torn segment only costs tokens: say so and go on
                self.stats.bad_segments += 1
                log.warning("llm cache: skipping unreadable segment %s (%s)", name, e)
                continue
            for r in rows:
                self._remember(r)
        self.stats.loaded = len(self._chat) + len(self._loss)
        if self.stats.loaded:
            log.info("llm cache: %d cached result(s) loaded for %s*", self.stats.loaded, self.prefix)

    def _remember(self, r: dict[str, Any]) -> None:
        key = str(r["key"])
        if r["kind"] == "loss":
            self._loss[key] = LossScore(loss=float(r["loss"] or float("nan")),
                                        answer_tokens=int(r["completion_tokens"] or 0))
        else:
            self._chat[key] = Generation(text=str(r["text"]), prompt_tokens=int(r["prompt_tokens"] or 0),
                                         completion_tokens=int(r["completion_tokens"] or 0),
                                         finish_reason=str(r["finish_reason"]), cached=True)

    def get_chat(self, key: str) -> Generation | None:
        """A cached generation (marked `cached`), or None."""
        g = self._chat.get(key)
        self._count(g is not None)
        return g

    def get_loss(self, key: str) -> LossScore | None:
        """A cached loss score, or None."""
        s = self._loss.get(key)
        self._count(s is not None)
        return s

    def _count(self, hit: bool) -> None:
        if hit:
            self.stats.hits += 1
        else:
            self.stats.misses += 1

    def put_chat(self, key: str, g: Generation) -> None:
        """Remember a paid-for generation (written at the next flush)."""
        row = {"key": key, "kind": "chat", "text": g.text, "prompt_tokens": g.prompt_tokens,
               "completion_tokens": g.completion_tokens, "finish_reason": g.finish_reason, "loss": None}
        self._remember(row)
        self._pending.append(row)

    def put_loss(self, key: str, s: LossScore) -> None:
        """Remember a paid-for loss score (written at the next flush)."""
        row = {"key": key, "kind": "loss", "text": "", "prompt_tokens": 0,
               "completion_tokens": s.answer_tokens, "finish_reason": "", "loss": s.loss}
        self._remember(row)
        self._pending.append(row)

    def flush(self) -> None:
        """Write pending results as one new segment (no-op without a URI or without pending rows)."""
        if not self.uri or not self._pending:
            self._pending.clear()
            return
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(self._pending, schema=SCHEMA), sink, compression="zstd")
        name = f"{self.prefix}{self.attempt}-{self._seq:05d}.parquet"
        storage.write_bytes(storage.join(self.uri, name), sink.getvalue())
        self._seq += 1
        self.stats.segments_written += 1
        self._pending.clear()
        faults.point("llm.cache.flushed")  # paid for and cached, not yet in any committed output
