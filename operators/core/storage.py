"""Storage at the edge: every byte the platform reads or writes goes through here.

URIs are `file:///abs/path`, plain absolute/relative paths (local), or `s3://bucket/key`. The S3 endpoint
comes from `S3_ENDPOINT_URL` (any S3 API: AWS, MinIO, Ceph, moto on loopback); credentials come from the
standard AWS environment variables, which in Kubernetes are injected from Secret refs, never from config.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
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


class StorageError(RuntimeError):
    """A storage URI is invalid or an operation on it failed."""


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


@dataclass(frozen=True)
class S3Settings:
    """Connection settings for the S3 API, read from the environment (never logged)."""

    endpoint_url: str | None
    region: str

    @staticmethod
    def from_env() -> S3Settings:
        return S3Settings(
            endpoint_url=os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        )


@lru_cache(maxsize=8)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": settings.region}
    if settings.endpoint_url:
        ep = urlparse(settings.endpoint_url)
        kwargs["endpoint_override"] = ep.netloc or ep.path
        kwargs["scheme"] = ep.scheme or "https"
    # Credentials: pyarrow picks up AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY itself; never pass them around.
    return pafs.S3FileSystem(**kwargs)


@lru_cache(maxsize=8)
def _s3_client(settings: S3Settings) -> Any:
    import boto3  # boto3 is only needed for conditional writes, which pyarrow's S3 layer cannot express

    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region)


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
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except (FileNotFoundError, OSError) as e:
        raise StorageError(f"cannot read {uri}: {e}") from e


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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


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
    from botocore.exceptions import ClientError

    bucket, _, key = path.partition("/")
    try:
        _s3_client(S3Settings.from_env()).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        faults.point("commit.after")
        return True
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return False
        raise StorageError(f"commit of {uri} failed: {code or e}") from e


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
    from botocore.exceptions import ClientError

    bucket, _, key = path.partition("/")
    try:
        r = _s3_client(S3Settings.from_env()).get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404"):
            return None, None
        raise StorageError(f"cannot read {uri}: {e}") from e
    return bytes(r["Body"].read()), str(r["ETag"])


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
    from botocore.exceptions import ClientError

    bucket, _, key = path.partition("/")
    try:
        _s3_client(S3Settings.from_env()).put_object(Bucket=bucket, Key=key, Body=data, IfMatch=expected)
        return True
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (404, 409, 412):
            return False
        raise StorageError(f"compare-and-swap of {uri} failed: {code or e}") from e


def delete(uri: str) -> None:
    """Delete a file if it exists."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """List files under a directory/prefix URI (sorted URIs). A missing directory lists as empty."""
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
                      if os.path.isfile(p := os.path.join(d, name)) and not _TEMP_NAME.search(name))
    sel = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    # A temp file of a local write is never a file to read: a process killed between writing it and its
    # rename (or after a commit's link) leaves it behind, and a manifest's copy read as a second manifest
    # double-counts (found by tests/reliability: a partition task killed after its commit).
    return sorted(prefix + i.path for i in fs.get_file_info(sel)
                  if i.type == pafs.FileType.File and not _TEMP_NAME.search(i.path))


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
