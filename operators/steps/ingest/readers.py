"""Streaming readers that cut raw input files into one-row-per-record Arrow batches.

These sit at the I/O edge of the ingest step but take an already opened binary stream, not a
path, so they work on local files, ``pyarrow.fs`` input streams and decompressing wrappers
alike. Only ``stream.read(n)`` is used (pyarrow's native streams do not support
``readline``). Memory stays bounded by the read chunk plus ``max_record_bytes``, whatever the
file size or the length of a single line.

Each output row is one raw record (see :data:`RAW_SCHEMA`). A record that cannot even be read
is still a row, with a :class:`~operators.steps.ingest.formats.DropReason` value in ``error``,
so the ingest ledger (rows in = normalized + rejected) holds from the very first byte.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Literal

import pyarrow as pa

from operators.steps.ingest.formats import DropReason, is_utf8_safe

__all__ = [
    "CONTAINER_REASONS",
    "RAW_SCHEMA",
    "BoundedStream",
    "ContainerError",
    "check_parquet_expansion",
    "container_error_row",
    "expansion_limit",
    "iter_json_array_batches",
    "iter_jsonl_batches",
    "sniff_container",
]

RAW_SCHEMA = pa.schema([("raw", pa.string()), ("line", pa.int64()), ("error", pa.string())])

_READ_CHUNK = 1 << 20
# How much of an unreadable record is kept for the quarantine: enough to recognise it by eye.
_OVERSIZE_KEEP = 4096
_BAD_JSON_KEEP = 64 * 1024
# Arrow `string` has 32-bit offsets (2 GiB per array); capping a batch's characters keeps even
# four-byte-per-char text far below that, whatever batch_size says.
_MAX_BATCH_CHARS = 128 << 20
_BOM = b"\xef\xbb\xbf"
_JSON_WS = " \t\n\r"
_ARRAY_SEPARATORS = " \t\n\r,"
# How close to the end of the buffered text a decode error must be to mean "cut off by the
# buffer" rather than "garbled"; the longest token that can be cut (-Infinity) is 9 characters.
_CUT_MARGIN = 16

_BAD_JSON = DropReason.BAD_JSON.value
_INVALID_UTF8 = DropReason.INVALID_UTF8.value
_OVERSIZE = DropReason.OVERSIZE.value

_Row = tuple[str, int, str | None]

# -- hostile containers ---------------------------------------------------------------------------------
# A whole file that cannot be read to its end is one quarantined row with one of these reasons (the records
# read before the fault stay, so nothing read is lost and the failure itself is on the ledger).
DECOMPRESSION_BOMB = "decompression_bomb"
TRUNCATED_STREAM = "truncated_stream"
CORRUPT_CONTAINER = "corrupt_container"
REFUSED_LINK = "refused_symlink"
CONTAINER_REASONS = (DECOMPRESSION_BOMB, TRUNCATED_STREAM, CORRUPT_CONTAINER, REFUSED_LINK)
# A file may expand to at most MAX_EXPANSION x its stored size plus EXPANSION_FLOOR bytes. Instruction text
# compresses 3-10x with gzip/zstd (templated corpora ~30x); a bomb expands 1,000x (gzip) to 30,000x+ (zstd).
# The floor lets tiny, very compressible files through. Readers stream, so memory is bounded anyway; the
# bound stops a bomb from costing hours of CPU and being mistaken for data.
MAX_EXPANSION = 200
EXPANSION_FLOOR = 64 << 20


class ContainerError(Exception):
    """A file (not one record) cannot be read: `reason` is one of :data:`CONTAINER_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def expansion_limit(stored_bytes: int) -> int:
    """Most bytes a file of `stored_bytes` may expand to before it counts as a decompression bomb."""
    return MAX_EXPANSION * stored_bytes + EXPANSION_FLOOR


_PIECE = 64 << 10


class BoundedStream:
    """A decompressed stream that raises :class:`ContainerError` once it yields more than `limit` bytes.

    It reads the wrapped stream in 64 KiB pieces and, when a read fails (a truncated or corrupt stream),
    first returns what the earlier pieces decoded and raises on the next call: pyarrow's decompressing
    streams drop everything a failing read decoded, which lost up to a chunk of good records before a cut.
    """

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._error: Exception | None = None
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        if self._error is not None:
            raise self._error
        # Never ask for more than one byte past the limit: a read(-1) must not inflate a bomb in memory.
        room = self._limit + 1 - self.bytes_read
        want = room if n is None or n < 0 else min(n, room)
        out = bytearray()
        while len(out) < want:
            try:
                piece = self._stream.read(min(_PIECE, want - len(out)))
            except Exception as e:
                if not out:
                    raise
                self._error = e
                break
            if not piece:
                break
            out += piece
        data = bytes(out)
        self.bytes_read += len(data)
        if self.bytes_read > self._limit:
            raise ContainerError(DECOMPRESSION_BOMB, f"expands past {self._limit} bytes "
                                 f"({MAX_EXPANSION}x its stored size + {EXPANSION_FLOOR >> 20} MiB)")
        return data

    def readable(self) -> bool:
        return True


def check_parquet_expansion(uncompressed_bytes: int, stored_bytes: int) -> None:
    """Refuse a Parquet file whose row groups claim to expand past the bound, before reading any of them."""
    if uncompressed_bytes > expansion_limit(stored_bytes):
        raise ContainerError(DECOMPRESSION_BOMB, f"row groups expand to {uncompressed_bytes} bytes, more than "
                             f"{MAX_EXPANSION}x its {stored_bytes} stored bytes + {EXPANSION_FLOOR >> 20} MiB")


def container_error_row(reason: str, detail: str, line: int) -> pa.RecordBatch:
    """The one :data:`RAW_SCHEMA` row that stands for a file read no further (``line`` -1 for the whole file)."""
    return _to_batch([detail[:_OVERSIZE_KEEP]], [line], [reason])


def _check_args(batch_size: int, max_record_bytes: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_record_bytes < 1:
        raise ValueError(f"max_record_bytes must be >= 1, got {max_record_bytes}")


def _batched(rows: Iterable[_Row], batch_size: int) -> Iterator[pa.RecordBatch]:
    raws: list[str] = []
    lines: list[int] = []
    errors: list[str | None] = []
    chars = 0
    try:
        for raw, line, error in rows:
            raws.append(raw)
            lines.append(line)
            errors.append(error)
            chars += len(raw)
            if len(raws) >= batch_size or chars >= _MAX_BATCH_CHARS:
                yield _to_batch(raws, lines, errors)
                raws, lines, errors, chars = [], [], [], 0
    except Exception:
        # The stream broke (truncated, corrupt, a bomb): the whole records read before it are still records.
        if raws:
            yield _to_batch(raws, lines, errors)
        raise
    if raws:
        yield _to_batch(raws, lines, errors)


def _to_batch(raws: list[str], lines: list[int], errors: list[str | None]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [
            pa.array(raws, type=pa.string()),
            pa.array(lines, type=pa.int64()),
            pa.array(errors, type=pa.string()),
        ],
        schema=RAW_SCHEMA,
    )


def _lossless_text(data: bytes) -> str:
    # backslashreplace keeps every undecodable byte visible as \xNN, so nothing is lost.
    return data.decode("utf-8", "backslashreplace")


def sniff_container(head: bytes) -> Literal["jsonl", "json_array"]:
    """Tell a JSON array file from JSON Lines by its first bytes.

    ``json_array`` when the first non-whitespace byte (after an optional UTF-8 BOM) is ``[``,
    else ``jsonl``. A few hundred bytes of the file's head are plenty.
    """
    if head.startswith(_BOM):
        head = head[len(_BOM) :]
    return "json_array" if head.lstrip(b" \t\r\n")[:1] == b"[" else "jsonl"


# --------------------------------------------------------------------------------------------
# JSON Lines


# One byte past the kept head: tells "the head is the whole line" (strip its "\r") from "cut".
_HEAD_SPAN = _OVERSIZE_KEEP + 1


def _line_head(head: bytes) -> bytes:
    if len(head) < _HEAD_SPAN:
        head = head.removesuffix(b"\r")
    return head[:_OVERSIZE_KEEP]


def _iter_lines(stream: BinaryIO, max_record_bytes: int) -> Iterator[tuple[int, bytes, bool]]:
    """Yield (1-based line number, content, oversize) for every non-blank line.

    Content excludes the newline and one trailing ``\\r``. An oversize line yields only its
    first bytes; the rest is read and discarded chunk by chunk, never held whole.
    """
    read = stream.read
    line_no = 0
    pending: list[bytes] = []  # pieces of a line that spans chunks
    pending_len = 0
    skipping = False  # inside an oversize line, discarding until its newline
    head = b""
    while True:
        chunk = read(_READ_CHUNK)
        if not chunk:
            break
        parts = chunk.split(b"\n")
        tail = parts.pop()
        if parts:
            if skipping:
                line_no += 1
                yield line_no, _line_head(head + parts[0][: _HEAD_SPAN - len(head)]), True
                skipping, head = False, b""
                parts = parts[1:]
            elif pending:
                pending.append(parts[0])
                parts[0] = b"".join(pending)
                pending, pending_len = [], 0
            for part in parts:
                line_no += 1
                if part.endswith(b"\r"):
                    part = part[:-1]
                if len(part) > max_record_bytes:
                    yield line_no, part[:_OVERSIZE_KEEP], True
                elif part and not part.isspace():
                    if line_no == 1 and part.startswith(_BOM):
                        part = part[len(_BOM) :]
                    yield line_no, part, False
        if skipping:
            if len(head) < _HEAD_SPAN:  # a limit under 4 KiB trips before the head is full
                head += tail[: _HEAD_SPAN - len(head)]
        elif tail:
            pending.append(tail)
            pending_len += len(tail)
            # +1: the line may still end in "\r\n", and the "\r" is not part of the record.
            if pending_len > max_record_bytes + 1:
                head = b"".join(pending)[:_HEAD_SPAN]
                pending, pending_len, skipping = [], 0, True
    if skipping:
        yield line_no + 1, _line_head(head), True
    elif pending:
        part = b"".join(pending)
        line_no += 1
        if part.endswith(b"\r"):
            part = part[:-1]
        if len(part) > max_record_bytes:
            yield line_no, part[:_OVERSIZE_KEEP], True
        elif part and not part.isspace():
            if line_no == 1 and part.startswith(_BOM):
                part = part[len(_BOM) :]
            yield line_no, part, False


def _jsonl_rows(stream: BinaryIO, max_record_bytes: int) -> Iterator[_Row]:
    for line_no, data, oversize in _iter_lines(stream, max_record_bytes):
        if oversize:
            yield _lossless_text(data)[:_OVERSIZE_KEEP], line_no, _OVERSIZE
            continue
        try:
            yield data.decode("utf-8"), line_no, None
        except UnicodeDecodeError:
            yield _lossless_text(data), line_no, _INVALID_UTF8


def iter_jsonl_batches(stream: BinaryIO, batch_size: int, max_record_bytes: int) -> Iterator[pa.RecordBatch]:
    """Stream a JSON Lines file as :data:`RAW_SCHEMA` batches of at most ``batch_size`` rows.

    One row per non-blank line (blank = empty or only ASCII whitespace), ``line`` being the
    1-based physical line number; ``\\n`` ends a line and a trailing ``\\r`` is dropped, as is a
    UTF-8 BOM at the start of the file. Lines are not parsed as JSON here. ``error`` is null,
    ``invalid_utf8`` (``raw`` then holds the bytes with undecodable ones as ``\\xNN``) or
    ``oversize_record`` for a line over ``max_record_bytes`` (``raw`` holds its first 4096
    characters; the rest is skipped in chunks, never held in memory). No batch is empty; an
    empty file yields none.
    """
    _check_args(batch_size, max_record_bytes)
    return _batched(_jsonl_rows(stream, max_record_bytes), batch_size)


# --------------------------------------------------------------------------------------------
# JSON array


class _TextWindow:
    """Decoded text over a byte stream; consumed text is dropped on each refill."""

    __slots__ = ("_decoder", "_read", "eof", "offset", "pos", "text")

    def __init__(self, stream: BinaryIO) -> None:
        self._read = stream.read
        # surrogateescape maps each invalid byte to a lone surrogate instead of failing the
        # whole chunk, so the bad record can be found and quarantined while the rest go on.
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.text = ""
        self.pos = 0
        self.offset = 0  # characters dropped before `text`: offset + pos is the absolute position
        self.eof = False

    def fill(self, at_least: int = 0) -> bool:
        """Read one more chunk (of at least ``at_least`` bytes); False once the stream is done."""
        if self.eof:
            return False
        data = self._read(max(_READ_CHUNK, at_least))
        if data:
            new = self._decoder.decode(data)
        else:
            self.eof = True
            new = self._decoder.decode(b"", True)
            if not new:
                return False
        self.offset += self.pos
        self.text = self.text[self.pos :] + new
        self.pos = 0
        return True

    def skip(self, chars: str) -> str | None:
        """Advance past any of ``chars``; return the next character, or None at end of stream."""
        while True:
            text, pos = self.text, self.pos
            end = len(text)
            while pos < end and text[pos] in chars:
                pos += 1
            self.pos = pos
            if pos < end:
                return text[pos]
            if not self.fill():
                return None

    def remainder(self, limit: int) -> str:
        """Up to ``limit`` bytes of the unconsumed input, as lossless text."""
        while len(self.text) - self.pos < limit and self.fill():
            pass
        return _source_text(self.text[self.pos : self.pos + limit], limit)


def _source_text(text: str, limit_bytes: int | None = None) -> str:
    # Undo surrogateescape to get the original bytes back, then make them Arrow-safe text.
    data = text.encode("utf-8", "surrogateescape")
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return _lossless_text(data)


_STRING_SPECIAL = re.compile(r'["\\]')
_STRUCTURAL = re.compile(r'["\[\]{}]')
_SCALAR_END = re.compile(r"[,\]\s]")


def _skip_value(window: _TextWindow, keep: int) -> tuple[bool, str]:
    """Move ``window.pos`` past the JSON value starting there without building it.

    Used only for values too big (or too deep) to decode: tracks strings, escapes and bracket
    depth, refilling as it goes so memory stays at one chunk. Returns whether the value ended
    before the stream did, and the value's first ``keep`` characters for the quarantine.
    """
    text, i = window.text, window.pos
    head = text[i : i + keep]
    first = text[i]
    depth = 0
    in_string = False
    if first == '"':
        in_string, i = True, i + 1
    elif first in "[{":
        depth, i = 1, i + 1
    else:  # a bare scalar: ends at the next separator
        while True:
            match = _SCALAR_END.search(window.text, i)
            if match is not None:
                window.pos = match.start()
                return True, head
            window.pos = len(window.text)
            if not window.fill():
                return True, head
            i = window.pos
            head += window.text[: keep - len(head)]
    while True:
        text = window.text
        if in_string:
            match = _STRING_SPECIAL.search(text, i)
            if match is not None:
                i = match.end()
                if match.group() == "\\":
                    i += 1  # the escaped character, which may lie in the next chunk
                else:
                    in_string = False
                    if depth == 0:
                        window.pos = i
                        return True, head
                continue
        else:
            match = _STRUCTURAL.search(text, i)
            if match is not None:
                i = match.end()
                char = match.group()
                if char == '"':
                    in_string = True
                elif char in "[{":
                    depth += 1
                else:
                    depth -= 1
                    if depth == 0:
                        window.pos = i
                        return True, head
                continue
        # Nothing more in this window: drop what was scanned, keep an escape's overshoot.
        i = max(i, len(text))
        overshoot = i - len(text)
        window.pos = min(i, len(text))
        if not window.fill():
            return False, head
        i = window.pos + overshoot
        if len(head) < keep:
            head += window.text[: keep - len(head)]


def _array_rows(stream: BinaryIO, max_record_bytes: int) -> Iterator[_Row]:
    window = _TextWindow(stream)
    decoder = json.JSONDecoder(strict=False)  # raw control characters in strings are common in scraped text
    raw_decode = decoder.raw_decode
    encode = json.JSONEncoder(ensure_ascii=False).encode
    encode_ascii = json.JSONEncoder(ensure_ascii=True).encode

    first = window.skip(_JSON_WS)
    if first == "\ufeff":
        window.pos += 1
        first = window.skip(_JSON_WS)
    if first is None:
        return  # an empty file holds no records
    if first != "[":
        yield window.remainder(_BAD_JSON_KEEP), 0, _BAD_JSON
        return
    window.pos += 1

    index = 0
    while True:
        char = window.skip(_ARRAY_SEPARATORS)
        if char is None:
            # Truncated between elements: no record text is left, but the truncation itself
            # must show up in the quarantine rather than pass as a complete file.
            yield "", index, _BAD_JSON
            return
        if char == "]":
            window.pos += 1
            if window.skip(_JSON_WS) is not None:
                yield window.remainder(_BAD_JSON_KEEP), index, _BAD_JSON
            return

        skip_reason: str | None = None  # set when the element must be skipped undecoded
        while True:
            text, start = window.text, window.pos
            pending = len(text) - start
            try:
                element, end = raw_decode(text, start)
            except json.JSONDecodeError as exc:
                cut = exc.pos >= len(text) - _CUT_MARGIN or exc.msg.startswith("Unterminated string")
                if window.eof or not cut:
                    yield window.remainder(_BAD_JSON_KEEP), index, _BAD_JSON
                    return
                if pending > max_record_bytes:
                    skip_reason = _OVERSIZE
                    break
                window.fill(pending)  # grow geometrically so re-decoding stays linear overall
                continue
            except (ValueError, RecursionError):
                # Too deep to decode, or an integer past Python's digit limit: well-formed
                # enough to step over, not decodable into a record.
                skip_reason = _BAD_JSON
                break
            if end > len(text) - _CUT_MARGIN and not window.eof:
                # A value ending near the window's edge may be a cut one ("12|34", "-0.|5", "1e|-7").
                if pending > max_record_bytes:
                    skip_reason = _OVERSIZE
                    break
                window.fill(pending)
                continue
            break

        if skip_reason is not None:
            at = window.offset + window.pos
            ended, head = _skip_value(window, _BAD_JSON_KEEP)
            # The head is read ahead: cut it to the element, or each quarantined row would carry up to 64 KiB
            # of the elements after it (memory grew with the file: 1.2 GB for 20 MB of 5 KB bad elements).
            head = head[: window.offset + window.pos - at]
            if not ended:
                yield _source_text(head, _BAD_JSON_KEEP), index, _BAD_JSON
                return
            keep = _OVERSIZE_KEEP if skip_reason == _OVERSIZE else _BAD_JSON_KEEP
            yield _source_text(head, keep)[:keep], index, skip_reason
            index += 1
            continue

        window.pos = end
        size = end - start
        # Characters are a lower bound on UTF-8 bytes and 4x an upper bound, so the byte count
        # is only computed when it can change the verdict.
        if size > max_record_bytes or (
            size * 4 > max_record_bytes and len(text[start:end].encode("utf-8", "surrogateescape")) > max_record_bytes
        ):
            yield _source_text(text[start : start + _OVERSIZE_KEEP])[:_OVERSIZE_KEEP], index, _OVERSIZE
            index += 1
            continue
        try:
            raw = encode(element)
        except (ValueError, RecursionError):
            yield _source_text(text[start:end], _BAD_JSON_KEEP), index, _BAD_JSON
            index += 1
            continue
        if not is_utf8_safe(raw):
            source = text[start:end]
            if is_utf8_safe(source):
                # The source escaped a lone surrogate ("\ud800"): keep it escaped, as valid JSON
                # in valid UTF-8, and let normalization judge the decoded value.
                raw = encode_ascii(element)
            else:
                yield _source_text(source), index, _INVALID_UTF8
                index += 1
                continue
        yield raw, index, None
        index += 1


def iter_json_array_batches(stream: BinaryIO, batch_size: int, max_record_bytes: int) -> Iterator[pa.RecordBatch]:
    """Stream a top-level JSON array as :data:`RAW_SCHEMA` batches, one row per element.

    Elements are decoded one at a time from 1 MiB chunks and re-encoded with
    ``json.dumps(element, ensure_ascii=False)`` as ``raw``; ``line`` is the 0-based element
    index. Commas and whitespace between elements are skipped leniently. ``error`` is null or:
    ``oversize_record`` for an element over ``max_record_bytes`` (first 4096 characters kept,
    the rest stepped over without decoding); ``invalid_utf8`` for an element with undecodable
    bytes (``raw`` shows them as ``\\xNN``); ``bad_json`` when the array is garbled or
    truncated (``raw`` holds up to 64 KiB of the unparsed remainder and reading stops; a file
    truncated between elements yields a ``bad_json`` row with empty ``raw``), when a file does
    not start with ``[``, or when non-whitespace follows the closing ``]``. An empty file
    yields no batch.
    """
    _check_args(batch_size, max_record_bytes)
    return _batched(_array_rows(stream, max_record_bytes), batch_size)
