"""Storage at the edge: every byte the platform reads or writes goes through here.

URIs are `file:///abs/path`, plain absolute/relative paths (local), or `s3://bucket/key`. The S3 endpoint
comes from `S3_ENDPOINT_URL` (any S3 API: AWS, MinIO, Ceph, moto on loopback); credentials come from the
standard AWS environment variables, which in Kubernetes are injected from Secret refs, never from config.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from operators.core import faults

ALLOWED_SCHEMES = ("file", "s3")
log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage URI is invalid or an operation on it failed."""


class StorageUnavailable(StorageError):
    """The store did not answer through every retry: an outage that a later attempt of the task may outlast."""


class StorageFull(StorageUnavailable):
    """The filesystem under a local write is full (or over quota): a retry succeeds once space is freed."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def validate_uri(uri: str) -> str:
    """Return `uri` normalized, or raise StorageError naming what is wrong with it.

    User-supplied paths are untrusted: reject unknown schemes, `..` segments (path traversal out of a
    run root), NUL bytes and empty paths.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError("storage URI is empty")
    if "\x00" in uri:
        raise StorageError(f"storage URI contains a NUL byte: {uri!r}")
    parsed = urlparse(uri)
    scheme = parsed.scheme or "file"
    if len(scheme) == 1:  # a Windows drive letter is not a scheme; this platform runs on POSIX only
        raise StorageError(f"unsupported storage URI {uri!r}")
    if scheme not in ALLOWED_SCHEMES:
        raise StorageError(f"unsupported storage scheme {scheme!r} in {uri!r}; use one of {ALLOWED_SCHEMES}")
    path = parsed.path if parsed.scheme else uri
    if ".." in path.split("/"):
        raise StorageError(f"storage URI must not contain '..' segments: {uri!r}")
    if scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"s3 URI needs a bucket: {uri!r}")
        return f"s3://{parsed.netloc}{posixpath.normpath('/' + parsed.path.lstrip('/')).rstrip('/')}".rstrip("/")
    if scheme == "file" and parsed.scheme and parsed.netloc:
        raise StorageError(f"file URI must be file:///absolute/path, got {uri!r}")
    return "file://" + posixpath.normpath(os.path.abspath(path))


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI (segments are validated like URIs)."""
    out = uri.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if not p or ".." in p.split("/"):
            raise StorageError(f"invalid path segment {p!r}")
        out = f"{out}/{p}"
    return out


# Retries against a flaky object store, measured through a fault-injecting proxy (bench/flaky_storage.py,
# tests/reliability/test_flaky_storage.py; figures in the README's Reliability section). Both S3 clients
# retry each request themselves: pyarrow's AWS C++ SDK (data files, listings, plain writes, deletes) and
# boto3 (conditional commits, pointer reads). Their defaults are 3 attempts; at 3, a 10% error rate fails
# about one request in a thousand, and a step makes thousands, so both get 5.
# pyarrow's default AwsStandardS3RetryStrategy also draws each retry from the SDK's retry quota (500
# tokens, 5 a retry) and pyarrow's wrapper never refunds it: measured, a filesystem object stops retrying
# for good after its 100th retry, and since ours is cached for the process, a long task on a flaky store
# would fail every later blip at once. AwsDefaultS3RetryStrategy has no quota (backoff 25 ms x 2^n).
S3_MAX_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 20.0
# botocore retries a request whose response fails, but not a failure while reading the body it returned
# (a reset or a short body): ours does, this many times in all.
BODY_READ_ATTEMPTS = 3


@dataclass(frozen=True)
class S3Settings:
    """Connection settings for the S3 API, read from the environment (never logged).

    `IIP_S3_MAX_ATTEMPTS` and `IIP_S3_READ_TIMEOUT_S` override the retry budget and boto3's read timeout
    (a test of a dead endpoint uses them to fail fast; production keeps the defaults above)."""

    endpoint_url: str | None
    region: str
    max_attempts: int = S3_MAX_ATTEMPTS
    read_timeout_s: float = S3_READ_TIMEOUT_S

    @staticmethod
    def from_env() -> S3Settings:
        return S3Settings(
            endpoint_url=os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
            max_attempts=int(os.environ.get("IIP_S3_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS),
            read_timeout_s=float(os.environ.get("IIP_S3_READ_TIMEOUT_S") or S3_READ_TIMEOUT_S),
        )


@lru_cache(maxsize=8)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": settings.region,
                              "retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=settings.max_attempts)}
    if settings.endpoint_url:
        ep = urlparse(settings.endpoint_url)
        kwargs["endpoint_override"] = ep.netloc or ep.path
        kwargs["scheme"] = ep.scheme or "https"
    # Credentials: pyarrow picks up AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY itself; never pass them around.
    return pafs.S3FileSystem(**kwargs)


@lru_cache(maxsize=8)
def _s3_client(settings: S3Settings) -> Any:
    import boto3  # boto3 is only needed for conditional writes, which pyarrow's S3 layer cannot express
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
                    connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=settings.read_timeout_s)
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config)


def is_remote_failure(exc: BaseException) -> bool:
    """True when `exc` is the object store failing (a network or service error that pyarrow's S3 layer
    raised once its retries were spent), not the content of a file being bad.

    A reader that quarantines unreadable files must re-raise these: else a flaky network passes for a
    corrupt file, and the step commits a partial result as if it were complete."""
    return isinstance(exc, OSError) and "AWS Error" in str(exc)


def _s3_get(client: Any, bucket: str, key: str, uri: str) -> tuple[bytes, str, dict[str, str]] | None:
    """A small object's bytes, ETag and user metadata, or None if absent; a failed body read is retried."""
    from botocore.exceptions import BotoCoreError, ClientError

    for attempt in range(1, BODY_READ_ATTEMPTS + 1):
        try:
            r = client.get_object(Bucket=bucket, Key=key)
            return bytes(r["Body"].read()), str(r["ETag"]), dict(r.get("Metadata") or {})
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404"):
                return None
            raise StorageError(f"cannot read {uri}: {e}") from e
        except BotoCoreError as e:  # the connection broke mid-body, or botocore's own retries were spent
            if attempt == BODY_READ_ATTEMPTS:
                raise StorageUnavailable(f"cannot read {uri} after {attempt} attempts: {e}") from e
            log.warning("reading %s failed (%s: %s); reading it again", uri, type(e).__name__, e)
    raise AssertionError("unreachable")


# The user-metadata key of the unique token a conditional S3 write carries (see `_s3_conditional_put`).
WRITER_META = "iip-writer"


def _s3_conditional_put(uri: str, path: str, data: bytes, **condition: str) -> bool:
    """PUT `data` at `path` under `condition` (IfNoneMatch or IfMatch); False when the condition fails.

    botocore retries a PUT whose response was lost (a reset, a 500 sent after the server applied it); the
    retry then meets this very write and gets 412, which alone would read as a lost race: the caller
    would delete the files its own committed manifest lists. So every write carries a unique token in
    its metadata, and a 412 is a loss only if the object there holds another token."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = path.partition("/")
    client = _s3_client(S3Settings.from_env())
    token = uuid.uuid4().hex
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, Metadata={WRITER_META: token}, **condition)
        return True
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (404, 409, 412):
            there = _s3_get(client, bucket, key, uri)
            ours = there is not None and there[2].get(WRITER_META) == token
            if ours:
                log.warning("conditional write of %s: a retried PUT met its own earlier attempt; committed", uri)
            return ours
        raise StorageError(f"conditional write of {uri} failed: {code or e}") from e
    except BotoCoreError as e:  # botocore's retries were spent (timeouts, resets): the outcome is unknown
        raise StorageUnavailable(f"conditional write of {uri} failed after {S3Settings.from_env().max_attempts} "
                                 f"attempts: {e}") from e


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Resolve a URI to a pyarrow filesystem and the path inside it."""
    uri = validate_uri(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _s3_filesystem(S3Settings.from_env()), f"{parsed.netloc}{parsed.path}"
    return pafs.LocalFileSystem(), parsed.path


def exists(uri: str) -> bool:
    """True when a file exists at `uri`."""
    fs, path = filesystem(uri)
    return bool(fs.get_file_info(path).type == pafs.FileType.File)


def read_bytes(uri: str) -> bytes:
    """Read a whole (small) file: manifests, stats, configs."""
    fs, path = filesystem(uri)
    for attempt in range(1, BODY_READ_ATTEMPTS + 1):
        try:
            with fs.open_input_stream(path) as f:
                return bytes(f.read())
        except (FileNotFoundError, OSError) as e:
            # pyarrow reads an object into a buffer of the object's size: a 5xx whose error body is longer
            # (an object under ~300 bytes) overflows it and fails as INTERNAL_FAILURE "Failed to flush
            # response stream", which the SDK never retries (measured). Small files are cheap to read again.
            # Not timeouts: the SDK retried those already, and again would multiply its ~20 s per read.
            if not (is_remote_failure(e) and "INTERNAL_FAILURE" in str(e)) or attempt == BODY_READ_ATTEMPTS:
                raise StorageError(f"cannot read {uri}: {e}") from e
            log.warning("reading %s failed (%s); reading it again", uri, e)
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def read_json_object(uri: str) -> dict[str, Any] | None:
    """A small JSON object at `uri`, or None when there is none or the file is not one (a file of another
    writer or of an older layout: the caller treats it as absent)."""
    if not exists(uri):
        return None
    try:
        data = json.loads(read_bytes(uri))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def open_input(uri: str) -> Any:
    """Open a file for streaming binary reads (a pyarrow NativeFile, usable as a file object)."""
    fs, path = filesystem(uri)
    return fs.open_input_file(path)


def file_size(uri: str) -> int:
    """Size in bytes of the file at `uri`."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise StorageError(f"not a file: {uri}")
    return int(info.size or 0)


_TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{8}$")  # what _local_temp appends


def _local_temp(path: str, data: bytes | pa.Buffer) -> str:
    """Write `data` durably to a temp file beside `path` and return the temp file's path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if not is_no_space(e):
            raise
        # The partial temp file would hold on to the space an operator frees for the retry.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise no_space(path, len(memoryview(data))) from e
    return tmp


def is_no_space(exc: OSError) -> bool:
    """Whether `exc` says the filesystem (or the user's quota on it) is full."""
    return exc.errno in _NO_SPACE


def no_space(path: str, nbytes: int) -> StorageFull:
    """The error for a write of `nbytes` to `path` that found no space: what happened and what to do."""
    return StorageFull(f"no space left on device writing {path} ({nbytes} bytes): free space on that "
                       "filesystem, then retry the task; nothing of this write was committed")


def write_bytes(uri: str, data: bytes | pa.Buffer) -> None:
    """Write a whole file so that readers never see a partial one.

    Local: write a temp file beside the target, fsync, rename. S3: a single PUT is atomic already.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _local_temp(path, data)
        faults.point("write.temp")  # a crash here leaves a temp file no reader lists
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as out:
        out.write(data)


def commit_if_absent(uri: str, data: bytes) -> bool:
    """Create `uri` with `data` only if nothing exists there; return False if another writer got there first.

    This is the commit point of every step: of two concurrent writers exactly one wins. Local: `os.link`
    of a fully written temp file fails atomically when the target exists. S3: `PUT` with
    `If-None-Match: *` is rejected with 412 when the key exists.
    """
    fs, path = filesystem(uri)
    faults.point("commit.before")
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _local_temp(path, data)
        try:
            os.link(tmp, path)
            faults.point("commit.after")  # committed; the temp file and the caller's return are not done
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if not _s3_conditional_put(uri, path, data, IfNoneMatch="*"):
        return False
    faults.point("commit.after")
    return True


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """The content of a small pointer file and the token `compare_and_swap` expects, or (None, None) if absent.

    S3: the token is the object's ETag (what `If-Match` compares). Local: the sha256 of the content (pointers
    written here hold unique content, e.g. an increasing version, so equal content means an unchanged pointer).
    """
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, sha256_hex(data)
    bucket, _, key = path.partition("/")
    got = _s3_get(_s3_client(S3Settings.from_env()), bucket, key, uri)
    return (None, None) if got is None else (got[0], got[1])


def compare_and_swap(uri: str, expected: str | None, data: bytes) -> bool:
    """Replace the pointer at `uri` with `data` only if it is unchanged since `read_versioned` gave `expected`.

    `expected` None means "only if absent" (`commit_if_absent`). Returns False when another writer moved the
    pointer first: of two writers that read the same token, exactly one wins. S3: `PUT` with `If-Match: <etag>`
    (412 when stale). Local: under an exclusive `flock` on a lock file beside the pointer (held across the
    compare and the swap), the new content is written to a temp file and renamed over the pointer atomically,
    so readers (who take no lock) see the old or the new pointer, never a partial one.
    """
    if expected is None:
        return commit_if_absent(uri, data)
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
            if read_versioned(uri)[1] != expected:
                return False
            os.replace(_local_temp(path, data), path)
            return True
    return _s3_conditional_put(uri, path, data, IfMatch=expected)


def copy_file(src: str, dst: str) -> None:
    """Copy a whole file without passing its bytes through this process where the store allows it.

    Local: a hard link made under a temp name and renamed into place (atomic, no bytes copied; every write
    here replaces a file by rename, so a later rewrite of `src` never changes `dst`). S3 to S3: a
    server-side copy (CopyObject, multipart for large objects). Otherwise, or where a link cannot be made
    (another filesystem), a read and a write."""
    src, dst = validate_uri(src), validate_uri(dst)
    sfs, spath = filesystem(src)
    dfs, dpath = filesystem(dst)
    if isinstance(sfs, pafs.LocalFileSystem) and isinstance(dfs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(dpath), exist_ok=True)
        tmp = f"{dpath}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.link(spath, tmp)
        except FileNotFoundError as e:
            raise StorageError(f"cannot copy {src}: {e}") from e
        except OSError:  # another filesystem, or links not allowed there
            write_bytes(dst, read_bytes(src))
            return
        os.replace(tmp, dpath)
        return
    if src.startswith("s3://") and dst.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        sb, _, sk = spath.partition("/")
        db, _, dk = dpath.partition("/")
        try:
            _s3_client(S3Settings.from_env()).copy({"Bucket": sb, "Key": sk}, db, dk)
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"cannot copy {src} to {dst}: {e}") from e
        return
    write_bytes(dst, read_bytes(src))


def delete(uri: str) -> None:
    """Delete a file if it exists."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def list_files(uri: str, recursive: bool = True, include_temp: bool = False) -> list[str]:
    """List files under a directory/prefix URI (sorted URIs). A missing directory lists as empty.

    Temp files of local writes (`*.tmp-xxxxxxxx`) are left out unless `include_temp` (verify, sweeps)."""
    uri = validate_uri(uri)
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        return []
    prefix = "s3://" if uri.startswith("s3://") else "file://"
    if isinstance(fs, pafs.LocalFileSystem):
        # os.walk does not descend into symlinked folders (pyarrow's selector does): a link loop in an input
        # folder must not list for ever. A symlinked file is listed; ingest refuses it with a reason.
        walked = os.walk(path, followlinks=False) if recursive else [next(os.walk(path), (path, [], []))]
        return sorted(prefix + p for d, _, names in walked for name in names
                      if os.path.isfile(p := os.path.join(d, name)) and (include_temp or not _TEMP_NAME.search(name)))
    sel = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    # A temp file of a local write is never a file to read: a process killed between writing it and its
    # rename (or after a commit's link) leaves it behind, and a manifest's copy read as a second manifest
    # double-counts (found by tests/reliability: a partition task killed after its commit).
    return sorted(prefix + i.path for i in fs.get_file_info(sel)
                  if i.type == pafs.FileType.File and (include_temp or not _TEMP_NAME.search(i.path)))


def is_temp(uri: str) -> bool:
    """A local write's temp file (a write in flight, or one whose writer was killed)."""
    return _TEMP_NAME.search(uri) is not None


def sweep_temp_files(folder: str, older_than_s: float) -> int:
    """Delete temp files under a local `folder` older than `older_than_s` seconds (their writers are dead: a
    write renames its temp file within seconds); returns how many. Object stores have none (no temp files)."""
    if not validate_uri(folder).startswith("file://"):
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for uri in list_files(folder, include_temp=True):
        path = uri.removeprefix("file://")
        try:
            if is_temp(uri) and os.path.getmtime(path) < cutoff:
                os.unlink(path)
                removed += 1
        except FileNotFoundError:
            pass  # another sweeper, or the writer renamed it just now
    return removed


def sha256_hex(data: bytes | pa.Buffer) -> str:
    """Checksum used in manifests."""
    return hashlib.sha256(memoryview(data)).hexdigest()


def iter_chunks(uri: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Stream a file in chunks (for checksumming large inputs without loading them)."""
    with open_input(uri) as f:
        while True:
            b = f.read(chunk_size)
            if not b:
                return
            yield bytes(b)
