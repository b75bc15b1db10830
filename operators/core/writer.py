"""Bounded-size Parquet part files, written whole (checksummed in memory, then one atomic put)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from operators.core import faults, storage
from operators.core.manifest import FileEntry

ROW_GROUP_ROWS = 65_536


class PartWriter:
    """Writes `[subdir/]part-SSSSS-NNNNN-<attempt>.parquet` files of at most `max_rows` rows / ~`max_bytes`.

    Part names carry the writer's attempt id, so a zombie attempt can never overwrite files that another
    attempt committed; the manifest is the only list of files that count. Memory stays bounded by one
    row group plus one compressed part.
    """

    def __init__(
        self,
        step_dir: str,
        shard: int,
        attempt: str,
        kind: str,
        max_rows: int,
        max_bytes: int,
        subdir: str = "",
    ) -> None:
        self.step_dir = step_dir
        self.shard = shard
        self.attempt = attempt
        self.kind = kind
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.subdir = subdir
        self.files: list[FileEntry] = []
        self.schema: pa.Schema | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._sink: pa.BufferOutputStream | None = None
        self._writer: pq.ParquetWriter | None = None
        self._part_rows = 0

    @property
    def rows_written(self) -> int:
        return sum(f.rows for f in self.files) + self._part_rows + self._pending_rows

    def write(self, table: pa.Table) -> None:
        """Queue rows; full row groups and full parts are flushed as they fill."""
        if table.num_rows == 0:
            return
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = table.cast(self.schema)  # a mismatched batch fails here, loudly, not in a reader later
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._pending_bytes += table.nbytes
        rg_bytes = max(1 << 20, min(self.max_bytes // 4, 64 << 20))
        if self._pending_rows >= ROW_GROUP_ROWS or self._pending_bytes >= rg_bytes:
            self._flush_row_group()

    def _flush_row_group(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._sink = pa.BufferOutputStream()
                assert self.schema is not None
                self._writer = pq.ParquetWriter(self._sink, self.schema, compression="zstd")
                self._part_rows = 0
            take = min(table.num_rows - offset, self.max_rows - self._part_rows)
            self._writer.write_table(table.slice(offset, take))
            offset += take
            self._part_rows += take
            assert self._sink is not None
            if self._part_rows >= self.max_rows or self._sink.tell() >= self.max_bytes:
                self._finish_part()

    def _finish_part(self) -> None:
        if self._writer is None or self._sink is None:
            return
        self._writer.close()
        buf = self._sink.getvalue()
        name = part_name(self.shard, len(self.files), self.attempt)
        rel = f"{self.subdir}/{name}" if self.subdir else name
        storage.write_bytes(storage.join(self.step_dir, rel), buf)  # no copy: a Buffer is bytes-like
        faults.point("part.written")  # uploaded, but no manifest lists it: crash tests kill here
        self.files.append(
            FileEntry(path=rel, kind=self.kind, rows=self._part_rows, bytes=buf.size, sha256=storage.sha256_hex(buf))
        )
        self._writer, self._sink, self._part_rows = None, None, 0

    def close(self) -> list[FileEntry]:
        """Flush everything and return the committed-to-be file entries."""
        self._flush_row_group()
        self._finish_part()
        return self.files


def part_name(shard: int, seq: int, attempt: str) -> str:
    """`part-SSSSS-NNNNN-<attempt>.parquet`: the shard that wrote it, its sequence number, the attempt."""
    return f"part-{shard:05d}-{seq:05d}-{attempt}.parquet"


def part_shard(path: str) -> int:
    """The shard that wrote part file `path` (any folder): the inverse of `part_name`."""
    return int(path.rsplit("/", 1)[-1][5:10])
