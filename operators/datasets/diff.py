"""Diff two versions by record id, per source and domain, streamed bucket by bucket.

Each version's id index is partitioned by a stable hash of the id, so bucket k of one version can only match
bucket k of the other: memory holds one bucket of each side at a time, however large the versions are."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from operators.datasets.versions import iter_ids, show


def _bucket_ids(root: str, name: str, version: int, bucket: int, of: int) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for t in iter_ids(root, name, version, bucket, of):
        for i, s, d in zip(t["id"].to_pylist(), t["source"].to_pylist(), t["domain"].to_pylist(), strict=True):
            out[i] = (s, d)
    return out


def diff_versions(root: str, name: str, a: int, b: int) -> Iterator[dict[str, Any]]:
    """Yield `{"change": "added"|"removed", "source", "domain", "ids": [...]}` groups (ids sorted), bucket by
    bucket, then one `{"change": "summary", "counts": [...]}` with the totals per source and domain."""
    of = max(show(root, name, a)["id_buckets"], show(root, name, b)["id_buckets"])  # powers of two: one divides
    totals: dict[tuple[str, str, str], int] = {}
    for k in range(of):
        old, new = _bucket_ids(root, name, a, k, of), _bucket_ids(root, name, b, k, of)
        for change, ids, where in (("added", new.keys() - old.keys(), new), ("removed", old.keys() - new.keys(), old)):
            groups: dict[tuple[str, str], list[str]] = {}
            for i in ids:
                groups.setdefault(where[i], []).append(i)
            for (s, d), g in sorted(groups.items()):
                totals[(change, s, d)] = totals.get((change, s, d), 0) + len(g)
                yield {"change": change, "source": s, "domain": d, "ids": sorted(g)}
    yield {"change": "summary", "from": a, "to": b,
           "counts": [{"change": c, "source": s, "domain": d, "records": n} for (c, s, d), n in sorted(totals.items())]}

