"""Flaky storage: Phase 1 steps on s3:// behind a fault-injecting proxy in front of the moto S3 server.

Every S3 request of the platform (pyarrow's and boto3's) goes through `fault_proxy.FaultProxy` on loopback.
Each fault kind (500, 500 after the server applied the request, 503 SlowDown, a reset mid-body, a body cut
short under its original Content-Length, slow responses and a stall past the SDK's timeout) runs the
pipeline ingest (raw JSONL on S3) -> filter -> exact_dedup (map and reduce stages), which must end with
output identical to a clean run through the same proxy: record ids per shard from the manifests, and the
stats. Faults no retry can get through must fail with a clear error, in bounded time, and commit no
manifest that lies. bench/flaky_storage.py is the harness and the longer variant.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from bench._common import write_instruction_corpus
from bench.flaky_storage import (
    ALL,
    BODIES,
    STALL_S,
    WRITES,
    Outcome,
    faulted_run,
    hopeless,
    hopeless_run,
    lying_manifests,
    run_pipeline,
    snapshot,
    upload_corpus,
)
from operators.core import storage
from tests.reliability.fault_proxy import FaultProxy, Rule, Schedule

# Tiny and still several shards per step and several parts per shard (the bench runs bigger).
# exact_dedup's shuffle gets 4 partitions, not its floor of 64: a tenth of the requests, still a shuffle.
COMMON: dict[str, Any] = {"max_part_rows": 60, "batch_rows": 64, "exact_dedup": {"partitions": 4}}
RECORDS = 150
LIMIT_S = 90.0  # a run slower than this counts as hung
FAIL_WITHIN_S = 30.0  # hopeless runs must give up within this (measured: about 1 s)


@pytest.fixture(scope="module")
def proxied(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The proxy in front of the session's moto server, the platform pointed at it, the raw corpus uploaded
    and a clean run's snapshot: {"proxy", "src", "bucket", "clean"}."""
    import uuid

    import boto3

    bucket = f"flaky-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    corpus = tmp_path_factory.mktemp("corpus")
    write_instruction_corpus(corpus, RECORDS, n_files=3, seed=5, malformed_rate=0.03, near_dup_rate=0.05)
    with FaultProxy(s3_server, Schedule(enabled=False)) as proxy:
        os.environ["S3_ENDPOINT_URL"] = proxy.endpoint
        try:
            src = f"s3://{bucket}/raw"
            upload_corpus(corpus, src)
            run_pipeline(src, f"s3://{bucket}/clean", common=COMMON)
            clean = snapshot(f"s3://{bucket}/clean")
            assert set(clean) == {"ingest", "filter", "exact_dedup"}
            assert all(len(s["ids"]) >= 2 for s in clean.values()), "every step should have several shards"
            yield {"proxy": proxy, "src": src, "bucket": f"s3://{bucket}", "clean": clean}
        finally:
            os.environ["S3_ENDPOINT_URL"] = s3_server


FAULT_RUNS: dict[str, list[Rule]] = {
    "500": [Rule("500", ALL, p=0.1)],
    # Writes applied by the server, answered 500: boto3's retried conditional commit meets its own write.
    "500-after": [Rule("500-after", WRITES, p=0.1), Rule("500-after", frozenset({"PUT"}), every=2)],
    "503": [Rule("503", ALL, p=0.1)],
    "reset": [Rule("reset", ALL, p=0.1)],
    "truncate": [Rule("truncate", BODIES, p=0.2)],
    # Slow responses, and a stall longer than the C++ SDK's 3 s low-speed limit.
    "slow": [Rule("slow", frozenset({"GET"}), every=20, limit=1, delay=STALL_S), Rule("slow", ALL, p=0.1, delay=0.03)],
}


@pytest.mark.parametrize("fault", sorted(FAULT_RUNS))
def test_pipeline_under_faults_ends_identical_to_a_clean_run(proxied: dict[str, Any], fault: str) -> None:
    proxy: FaultProxy = proxied["proxy"]
    o: Outcome = faulted_run(proxy, fault, FAULT_RUNS[fault], seed=3, src=proxied["src"],
                             root=f"{proxied['bucket']}/{fault}", clean=proxied["clean"], limit_s=LIMIT_S,
                             common=COMMON)
    print(o)
    assert o.problems == [] and o.error is None
    assert o.finished and o.identical
    # The proxy really fired this fault kind, and the SDKs' retries (not luck) got the run through.
    assert sum(n for k, n in o.injected.items() if k.startswith(fault + ":")) >= 5
    assert sum(o.retries_by_client.values()) > 0
    if fault == "slow":
        assert FAULT_RUNS["slow"][0].fired == 1, "the stall happened (and the SDK gave up on it and retried)"
    if fault == "500-after":
        assert o.injected.get("500-after:PUT", 0) > 0
        assert o.ours > 0, "a retried conditional commit that met its own write must count as committed"


@pytest.mark.parametrize("name", sorted(hopeless()))
def test_faults_no_retry_survives_fail_clearly_in_bounded_time(proxied: dict[str, Any], name: str) -> None:
    proxy: FaultProxy = proxied["proxy"]
    rules, start = hopeless()[name]
    root = f"{proxied['bucket']}/hopeless-{abs(hash(name)) % 10_000}"
    o = hopeless_run(proxy, name, rules, start, seed=3, src=proxied["src"], root=root, clean=proxied["clean"],
                     limit_s=LIMIT_S, common=COMMON)
    print(o)
    assert o.problems == []
    assert not o.finished and o.error is not None
    # Clear: the error names the storage failure (the AWS error the SDK gave up on), not a downstream symptom.
    assert "AWS Error" in o.error, o.error
    assert o.seconds < FAIL_WITHIN_S
    assert sum(o.injected.values()) > 0
    assert lying_manifests(root) == []


def test_a_retried_conditional_commit_that_met_its_own_write_is_a_commit(proxied: dict[str, Any]) -> None:
    """The server applies the PUT and the client gets a 500 (or a reset): botocore's retry then gets 412.
    That is this writer's commit, not a lost race; a second writer still loses."""
    proxy: FaultProxy = proxied["proxy"]
    base = f"{proxied['bucket']}/commits"
    for fault in ("500-after", "reset"):
        proxy.reset_counts()
        proxy.schedule.rules = [Rule(fault, frozenset({"PUT"}), every=1, limit=1)]
        proxy.schedule.enabled = True
        try:
            assert storage.commit_if_absent(f"{base}/{fault}.json", b'{"attempt": "a"}') is True
        finally:
            proxy.schedule.enabled = False
        assert proxy.total_injected() == 1 and proxy.retries()["boto3"] == 1
        assert storage.commit_if_absent(f"{base}/{fault}.json", b'{"attempt": "b"}') is False
        assert storage.read_bytes(f"{base}/{fault}.json") == b'{"attempt": "a"}'
    # The same for a compare-and-swap of a pointer.
    data, token = storage.read_versioned(f"{base}/500-after.json")
    assert data is not None
    proxy.schedule.rules = [Rule("500-after", frozenset({"PUT"}), every=1, limit=1)]
    proxy.schedule.enabled = True
    try:
        assert storage.compare_and_swap(f"{base}/500-after.json", token, b'{"attempt": "c"}') is True
    finally:
        proxy.schedule.enabled = False
    assert storage.compare_and_swap(f"{base}/500-after.json", token, b'{"attempt": "d"}') is False


def test_small_reads_survive_what_the_sdks_do_not_retry(proxied: dict[str, Any]) -> None:
    """Two failures no SDK retries, which storage reads again itself: a boto3 body cut short or reset after
    its headers (pointer reads), and a 5xx on a pyarrow read of an object shorter than the error body (the
    SDK's response buffer overflows: INTERNAL_FAILURE "Failed to flush response stream")."""
    proxy: FaultProxy = proxied["proxy"]
    uri = f"{proxied['bucket']}/pointer.json"
    storage.write_bytes(uri, b"x" * 10_000)
    tiny = f"{proxied['bucket']}/tiny.json"
    storage.write_bytes(tiny, b'{"v": 1}')
    for fault, read, want in (("truncate", lambda: storage.read_versioned(uri)[0], b"x" * 10_000),
                              ("reset", lambda: storage.read_versioned(uri)[0], b"x" * 10_000),
                              ("500", lambda: storage.read_bytes(tiny), b'{"v": 1}'),
                              ("503", lambda: storage.read_bytes(tiny), b'{"v": 1}')):
        proxy.schedule.rules = [Rule(fault, frozenset({"GET"}), every=1, limit=2)]
        proxy.schedule.enabled = True
        try:
            assert read() == want, fault
        finally:
            proxy.schedule.enabled = False
        assert proxy.schedule.rules[0].fired == 2


def test_pyarrow_keeps_retrying_past_its_retry_quota(proxied: dict[str, Any]) -> None:
    """With pyarrow's default strategy (AwsStandardS3RetryStrategy) a filesystem stops retrying after 100
    retries (the SDK's quota, never refunded by pyarrow), and the cached filesystem of a long task would
    then fail on every blip: storage uses a strategy without a quota."""
    proxy: FaultProxy = proxied["proxy"]
    uri = f"{proxied['bucket']}/small.bin"
    storage.write_bytes(uri, b"y" * 1000)
    proxy.reset_counts()
    proxy.schedule.rules = [Rule("503", frozenset({"GET"}), every=2)]  # every read's first attempt fails
    proxy.schedule.enabled = True
    try:
        assert all(storage.read_bytes(uri) == b"y" * 1000 for _ in range(130))
    finally:
        proxy.schedule.enabled = False
    assert proxy.retries()["pyarrow"] > 120  # past the quota's 100 retries (one read's first attempt is clean)


def test_proxy_injects_truncated_bodies_under_the_original_length(proxied: dict[str, Any]) -> None:
    """The proxy itself: a truncated body keeps its Content-Length (a short read), a reset is an RST."""
    import http.client
    from urllib.parse import urlsplit

    proxy: FaultProxy = proxied["proxy"]
    uri = f"{proxied['bucket']}/body.bin"
    storage.write_bytes(uri, b"z" * 4000)
    port = urlsplit(proxy.endpoint).port
    proxy.schedule.rules = [Rule("truncate", frozenset({"GET"}), every=1, limit=1),
                            Rule("reset", frozenset({"GET"}), every=1, limit=1)]
    proxy.schedule.enabled = True
    path = "/" + uri.removeprefix("s3://")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)  # unsigned: moto's server accepts it
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Length") == "4000"
        with pytest.raises(http.client.IncompleteRead):
            r.read()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
            r.read()
    finally:
        proxy.schedule.enabled = False
