"""Find planted credential values in bytes, files, SQLite databases, S3 buckets and text, raw or encoded.

A credential can leak in a form a plain substring search misses: base64 (a Kubernetes Secret, a basic-auth
header, a blob), url-encoding (a query string, a presigned URL), a JSON string escape, hex, or cut short
(a truncated log line). The scanner looks for every one of those, also inside the containers a pipeline
writes whose bytes hide the text: Parquet pages (compressed), gzip and zstd streams, SQLite rows (a value
longer than a page is split across overflow pages) and zlib-compressed blobs.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
import os
import sqlite3
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

MAX_DECODED = 512 << 20  # bound on what one gzip/zstd member may expand to (a scan must not blow up memory)
FRAGMENT = 16  # a prefix or suffix this long of a value is still unique to it (a truncated leak)
MIN_LENGTH = 20  # shorter planted values could match by chance


@dataclass(frozen=True)
class Hit:
    """One planted value found: where, which value (by its variable name), in which encoding."""

    where: str
    secret: str
    encoding: str


def _b64_cores(raw: bytes, altchars: bytes | None) -> list[bytes]:
    """Base64 text that any embedding of `raw` in a longer byte string contains: for each of the three
    alignments, the encoding with the first and last 4-char groups dropped (those mix in the neighbours)."""
    cores = []
    for off in range(3):
        enc = base64.b64encode(b"\0" * off + raw, altchars=altchars)
        core = enc[4:-4]
        if len(core) >= 12:
            cores.append(core)
    return cores


def needles(values: dict[str, str]) -> list[tuple[str, str, bytes]]:
    """(variable name, encoding, bytes to look for) for every planted value and every encoding scanned."""
    out: list[tuple[str, str, bytes]] = []
    for name, value in values.items():
        raw = value.encode()
        forms: dict[str, list[bytes]] = {
            "raw": [raw],
            "base64": _b64_cores(raw, None),
            "base64url": _b64_cores(raw, b"-_"),
            "url": [quote(value, safe="").encode(), quote(value, safe="").lower().encode(),
                    quote_plus(value, safe="").encode()],
            "json-escaped": [json.dumps(value)[1:-1].encode(), value.replace("/", "\\/").encode()],
            "hex": [binascii.hexlify(raw), binascii.hexlify(raw).upper()],
            "utf-16": [value.encode("utf-16-le")],
        }
        if len(raw) >= FRAGMENT + 8:  # a fragment of a short value (an access key id) is no longer unique
            forms.update(prefix=[raw[:FRAGMENT]], suffix=[raw[-FRAGMENT:]])
        seen: set[bytes] = set()
        for encoding, variants in forms.items():
            for needle in variants:
                if needle not in seen:  # a value with no special characters url-encodes to itself: one hit
                    seen.add(needle)
                    out.append((name, encoding, needle))
    return out


@dataclass
class Scanner:
    """Scans everything handed to it for the planted `values`; keeps the hits and what it covered."""

    values: dict[str, str]
    hits: list[Hit] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    decoded: dict[str, int] = field(default_factory=dict)  # container kind -> how many were opened
    sqlite_rows: dict[str, int] = field(default_factory=dict)  # "db:table" -> rows dumped

    def __post_init__(self) -> None:
        if any(len(v) < MIN_LENGTH for v in self.values.values()):
            raise ValueError(f"planted values must be at least {MIN_LENGTH} characters")
        self._needles = needles(self.values)

    def _find(self, data: bytes, where: str) -> None:
        seen = set()
        for name, encoding, needle in self._needles:
            if (name, encoding) not in seen and needle in data:
                seen.add((name, encoding))
                self.hits.append(Hit(where, name, encoding))

    def _opened(self, kind: str) -> None:
        self.decoded[kind] = self.decoded.get(kind, 0) + 1

    def scan_text(self, text: str | bytes, where: str) -> None:
        """Scan one string (a process's output, a rendered manifest)."""
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        self.bytes += len(data)
        self._find(data, where)

    def scan_blob(self, data: bytes, where: str) -> None:
        """Scan a file's bytes, and the text inside it when it is a Parquet file, a gzip or zstd stream, or a
        SQLite database."""
        self.files += 1
        self.bytes += len(data)
        self._find(data, where)
        for kind, text in self._decoded_views(data):
            self._opened(kind)
            self._find(text, f"{where} ({kind})")

    def _decoded_views(self, data: bytes) -> Iterable[tuple[str, bytes]]:
        if data[:4] == b"PAR1" and data[-4:] == b"PAR1":
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(data))
            yield "parquet", json.dumps(table.to_pylist(), default=repr).encode()
        elif data[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
                yield "gzip", g.read(MAX_DECODED)
        elif data[:4] == b"\x28\xb5\x2f\xfd":
            import pyarrow as pa

            with pa.CompressedInputStream(pa.BufferReader(data), "zstd") as z:
                yield "zstd", z.read(MAX_DECODED)
        elif data[:16] == b"SQLite format 3\x00":
            yield "sqlite", self._sqlite_dump(data)

    def _sqlite_dump(self, data: bytes, label: str = "") -> bytes:
        """Every row of every table as text (blobs also zlib-inflated when they are zlib streams)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "db.sqlite")
            Path(path).write_bytes(data)
            con = sqlite3.connect(path)
            try:
                parts: list[bytes] = []
                tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
                for table in tables:
                    n = 0
                    for row in con.execute(f'SELECT * FROM "{table}"'):
                        n += 1
                        for v in row:
                            parts.append(_cell_bytes(v))
                    self.sqlite_rows[table] = self.sqlite_rows.get(table, 0) + n
                return b"\n".join(parts)
            finally:
                con.close()

    def scan_file(self, path: Path, where: str | None = None) -> None:
        """Scan one file. A SQLite database is dumped through sqlite3 on its own path too, so rows still in
        its write-ahead log (not yet in the main file) are read."""
        where = where or str(path)
        data = path.read_bytes()
        self.scan_blob(data, where)
        if data[:16] == b"SQLite format 3\x00" and Path(f"{path}-wal").exists():
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                for table in [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]:
                    text = b"\n".join(_cell_bytes(v) for row in con.execute(f'SELECT * FROM "{table}"') for v in row)
                    self._find(text, f"{where} (sqlite+wal:{table})")
            finally:
                con.close()

    def scan_tree(self, root: Path) -> int:
        """Scan every regular file under `root` (symlinks are not followed); returns how many."""
        n = 0
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                p = Path(dirpath) / name
                if p.is_file() and not p.is_symlink():
                    self.scan_file(p)
                    n += 1
        return n

    def scan_bucket(self, s3: Any, bucket: str) -> list[str]:
        """Scan every object of `bucket` (all pages of the listing); returns the keys read."""
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                self.scan_text(key, f"s3://{bucket} key listing")  # a secret in an object name counts too
                self.scan_blob(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), f"s3://{bucket}/{key}")
                keys.append(key)
        return keys


def _cell_bytes(v: Any) -> bytes:
    if v is None:
        return b""
    if isinstance(v, bytes | bytearray | memoryview):
        b = bytes(v)
        try:
            return b + b"\n" + zlib.decompress(b)
        except zlib.error:
            return b
    return str(v).encode("utf-8", "surrogateescape")
