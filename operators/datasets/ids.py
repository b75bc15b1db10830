"""Record-id hashes: the id index of a dataset version and the dedup survivors both key records by them."""

from __future__ import annotations

import hashlib
import math

import pyarrow as pa

IDS_PER_BUCKET = 2_000_000  # a diff holds one bucket of both versions' ids in memory at a time
IDS_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                        ("h", pa.uint64())])


def id_hash(ids: list[str]) -> pa.Array:
    """Stable 64-bit hashes of record ids (bucket = hash mod buckets, the same in every version)."""
    return pa.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") for i in ids],
                    pa.uint64())


def id_buckets(records: int, per_bucket: int | None = None) -> int:
    """How many hash buckets an id index of `records` ids has: a power of two, about `per_bucket` ids each."""
    per = IDS_PER_BUCKET if per_bucket is None else per_bucket
    return 1 << max(0, math.ceil(math.log2(max(1, records) / per)))
