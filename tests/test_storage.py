"""Storage: URI validation, atomic writes, and the create-if-absent commit on local disk and on S3."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.core import storage


@pytest.mark.parametrize("bad", ["", "   ", "ftp://x/y", "s3://", "file://host/x", "/data/../etc/passwd",
                                 "s3://bucket/a/../../b", "a\x00b", "C:/x"])
def test_validate_uri_rejects_unsafe_or_unknown(bad: str) -> None:
    with pytest.raises(storage.StorageError):
        storage.validate_uri(bad)


def test_validate_uri_normalizes(tmp_path: Path) -> None:
    assert storage.validate_uri(str(tmp_path)) == f"file://{tmp_path}"
    assert storage.validate_uri(f"file://{tmp_path}/") == f"file://{tmp_path}"
    assert storage.validate_uri("s3://bucket/a//b/") == "s3://bucket/a/b"
    with pytest.raises(storage.StorageError):
        storage.join("s3://b/x", "../y")


def test_local_write_read_and_listing(tmp_path: Path) -> None:
    root = storage.validate_uri(str(tmp_path))
    storage.write_bytes(storage.join(root, "a/b.json"), b"{}")
    storage.write_bytes(storage.join(root, "c.txt"), b"x")
    assert storage.read_bytes(storage.join(root, "a/b.json")) == b"{}"
    assert storage.list_files(root) == [f"{root}/a/b.json", f"{root}/c.txt"]
    assert list(tmp_path.rglob("*.tmp-*")) == []  # no temp files left behind
    assert storage.list_files(storage.join(root, "missing")) == []


def _race(uri: str, writers: int) -> list[bool]:
    results: list[bool] = [False] * writers
    barrier = threading.Barrier(writers)

    def go(i: int) -> None:
        barrier.wait()
        results[i] = storage.commit_if_absent(uri, f"writer-{i}".encode())

    threads = [threading.Thread(target=go, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_local_commit_race_exactly_one_wins(tmp_path: Path) -> None:
    uri = storage.join(storage.validate_uri(str(tmp_path)), "_MANIFEST.json")
    results = _race(uri, 8)
    assert sum(results) == 1
    assert storage.read_bytes(uri) == f"writer-{results.index(True)}".encode()


@pytest.mark.integration
def test_s3_commit_race_exactly_one_wins(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/run/step/_MANIFEST.json"
    results = _race(uri, 8)
    assert sum(results) == 1
    assert storage.read_bytes(uri) == f"writer-{results.index(True)}".encode()
    assert storage.commit_if_absent(uri, b"late") is False  # a later writer is refused too


@pytest.mark.integration
def test_s3_parquet_roundtrip_and_listing(s3_bucket: str) -> None:
    table = pa.table({"x": list(range(100))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(f"{s3_bucket}/d/part-0.parquet", sink.getvalue().to_pybytes())
    assert storage.list_files(f"{s3_bucket}/d") == [f"{s3_bucket}/d/part-0.parquet"]
    with storage.open_input(f"{s3_bucket}/d/part-0.parquet") as f:
        assert pq.read_table(f).equals(table)
    storage.delete(f"{s3_bucket}/d/part-0.parquet")
    assert not storage.exists(f"{s3_bucket}/d/part-0.parquet")
