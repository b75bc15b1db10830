"""Reliability: Phase 1 steps on s3:// through a fault-injecting proxy, compared with a clean run.

    python bench/flaky_storage.py [--records 600] [--rounds 2] [--rate 0.1] [--seed 11] [--no-dead-ends]

A moto S3 server runs on loopback with the proxy of `tests/reliability/fault_proxy.py` in front of it;
every S3 request of the platform goes through the proxy. The pipeline (ingest from raw JSONL on S3, then
filter, then exact_dedup, a step with map and reduce stages) runs once with faults off (the reference),
then once per fault scenario (500s, 500s after the server applied the write, 503 SlowDown, resets mid-body,
truncated bodies, slow responses, stalls longer than the clients' timeouts, all of them mixed), each with a
seeded schedule. Every faulted run must either finish with output identical to the reference (record ids
per shard from the manifests, and the stats) or fail with an error within a bounded time, and never leave
a manifest that lists a missing file. Runs where faults never stop (every GET fails, a dead endpoint)
must fail, clearly and in bounded time, and commit no step manifest; endless stalls on each client's
requests measure the longest time each takes to give up.

The proxy logs each request's client (boto3 or pyarrow's AWS C++ SDK) and the SDK's attempt number, so
the figures say whose retries did the work. Prints LAST one JSON line with the figures; the default test
(tests/reliability/test_flaky_storage.py) uses the same harness at a tiny size.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_json_line, write_instruction_corpus
from tests.reliability.fault_proxy import KINDS, FaultProxy, Rule, Schedule

# Small parts and shards, so that each step makes many requests of every kind (several shards, parts each).
COMMON: dict[str, Any] = {"max_part_rows": 40, "batch_rows": 64}
PIPELINE: list[tuple[str, dict[str, Any]]] = [
    ("ingest", {"source_name": "flaky", "target_shard_bytes": 120_000}),
    ("filter", {"languages": [], "target_shard_bytes": 60_000}),
    ("exact_dedup", {"target_shard_bytes": 60_000}),
]
VOLATILE_STATS = ("seconds", "peak_rss_mb")  # differ run to run by nature
ALL = frozenset(KINDS)
WRITES = frozenset({"PUT", "MULTIPART", "DELETE"})
BODIES = frozenset({"GET", "LIST"})
STALL_S = 4.0  # longer than pyarrow's 3 s stall limit: the SDK must give up on the request and retry it


def scenarios(rate: float) -> dict[str, list[Rule]]:
    """Survivable fault schedules, by name: each fault at `rate` of the requests it can hit."""
    return {
        "500": [Rule("500", ALL, p=rate)],
        "500-after": [Rule("500-after", WRITES, p=rate)],
        "503": [Rule("503", ALL, p=rate)],
        "reset": [Rule("reset", ALL, p=rate)],
        "truncate": [Rule("truncate", BODIES, p=2 * rate)],
        "slow": [Rule("slow", ALL, p=rate, delay=0.05)],
        "stall": [Rule("slow", frozenset({"GET"}), every=25, limit=2, delay=STALL_S)],
        "mixed": [Rule("500", ALL, p=rate / 3), Rule("503", ALL, p=rate / 3), Rule("reset", ALL, p=rate / 3),
                  Rule("500-after", WRITES, p=rate / 3), Rule("truncate", BODIES, p=rate / 2),
                  Rule("slow", ALL, p=rate / 3, delay=0.05)],
    }


def hopeless() -> dict[str, tuple[list[Rule], str | None]]:
    """Schedules no retry can get through, by name: (rules, the step they start at; None: from the start).

    Each must fail within a bounded time and commit no step manifest from its first failing step on."""
    return {
        # The raw input files only: ingest must fail, not quarantine an unreadable file as a corrupt one.
        "every raw GET resets": ([Rule("reset", frozenset({"GET"}), every=1, path="/raw/")], None),
        "every raw GET truncated": ([Rule("truncate", frozenset({"GET"}), every=1, path="/raw/")], None),
        "every request 503": ([Rule("503", ALL, every=1)], "filter"),
        "every write 500": ([Rule("500", WRITES, every=1)], "exact_dedup"),
    }


def dead_ends() -> dict[str, tuple[list[Rule], str | None]]:
    """Stalls that never end, on each client's requests (bench only: they measure each client's longest
    time to give up, up to minutes): pyarrow's reads, and boto3's conditional commits (PUT)."""
    return {
        "every GET stalls": ([Rule("slow", frozenset({"GET"}), every=1, delay=STALL_S)], "filter"),
        "every commit stalls": ([Rule("slow", frozenset({"PUT"}), every=1, delay=25.0)], "filter"),
    }


@dataclass
class Outcome:
    """What one pipeline run under a schedule did."""

    scenario: str
    finished: bool
    identical: bool | None  # None: it did not finish
    error: str | None
    seconds: float
    injected: dict[str, int]
    retries_by_client: dict[str, int]  # requests an SDK sent again itself (boto3, pyarrow)
    ours: int  # recoveries by operators/core/storage.py: a body read again, a retried commit found to be ours
    max_attempts: dict[str, int]  # the retry budget an SDK announced in its attempt header
    problems: list[str] = field(default_factory=list)


class _Recoveries(logging.Handler):
    """Counts the warnings operators/core/storage.py logs when its own retry logic saves a request."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@contextmanager
def s3_behind_proxy() -> Iterator[tuple[FaultProxy, str]]:
    """A moto S3 server on loopback, the proxy in front of it, the env pointing the platform at the proxy,
    and a fresh bucket; yields (proxy, bucket URI)."""
    import boto3

    from tests.conftest import free_port, wait_for_port

    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    old = dict(os.environ)
    try:
        wait_for_port(port)
        upstream = f"http://127.0.0.1:{port}"
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
        bucket = f"flaky-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=upstream, region_name="us-east-1").create_bucket(Bucket=bucket)
        with FaultProxy(upstream, Schedule(enabled=False)) as proxy:
            os.environ["S3_ENDPOINT_URL"] = proxy.endpoint
            yield proxy, f"s3://{bucket}"
    finally:
        os.environ.clear()
        os.environ.update(old)
        proc.terminate()
        proc.wait(timeout=10)


def upload_corpus(directory: Path, uri: str) -> None:
    """Copy the raw JSONL files under `directory` to `uri` (call with faults off)."""
    from operators.core import storage

    for p in sorted(directory.iterdir()):
        storage.write_bytes(storage.join(uri, p.name), p.read_bytes())


def run_pipeline(src: str, root: str, first: str | None = None, stop: str | None = None,
                 common: dict[str, Any] | None = None) -> None:
    """Run the pipeline's steps in this process (plan, every stage and shard, reduce), each on the previous
    one's output under `root`: from step `first` (earlier ones already under `root`) up to, not including,
    step `stop`. `common` replaces COMMON (sizes for every step) and may hold per-step settings under a
    step's name."""
    from operators.cli import build_step
    from operators.core import storage
    from operators.core.runner import run_all

    names = [s for s, _ in PIPELINE]
    i, j = names.index(first) if first else 0, names.index(stop) if stop else len(names)
    prev = src if i == 0 else storage.join(root, names[i - 1])
    for step, cfg in PIPELINE[i:j]:
        out = storage.join(root, step)
        sizes = {k: v for k, v in (COMMON if common is None else common).items() if k not in names}
        run_all(build_step(step, {**sizes, **cfg, **(common or {}).get(step, {})}), [prev], out)
        prev = out


def _ids(uri: str) -> list[str]:
    import pyarrow.parquet as pq

    from operators.core import storage

    with storage.open_input(uri) as fh:
        return [str(i) for i in pq.read_table(fh, columns=["id"]).column("id").to_pylist()]


def snapshot(root: str) -> dict[str, Any]:
    """Per step under `root`: the record ids of each committed shard (data files, in manifest order) and the
    step's stats less the volatile fields; a step with no step manifest is absent."""
    import json

    from operators.core import storage
    from operators.core.manifest import STATS_NAME, read_manifest, shard_manifest_uri, step_manifest_uri
    from operators.core.runner import load_plan

    out: dict[str, Any] = {}
    for step, _ in PIPELINE:
        sdir = storage.join(root, step)
        if read_manifest(step_manifest_uri(sdir)) is None:
            continue
        ids: dict[int, list[str]] = {}
        for spec in load_plan(sdir).shards:
            m = read_manifest(shard_manifest_uri(sdir, spec.index))
            ids[spec.index] = [] if m is None else [i for f in m.data_files() for i in _ids(storage.join(sdir, f.path))]
        stats = json.loads(storage.read_bytes(storage.join(sdir, STATS_NAME)))
        out[step] = {"ids": ids, "stats": {k: v for k, v in stats.items() if k not in VOLATILE_STATS}}
    return out


def lying_manifests(root: str) -> list[str]:
    """Every committed manifest under `root` (step, shard, stage) whose listed files are missing or of
    another size: what a reader would trust and trip on."""
    from operators.core import storage
    from operators.core.manifest import MANIFEST_NAME, SHARDS_DIR, read_manifest

    files = storage.list_files(root)
    sizes = {u: storage.file_size(u) for u in files if "/part-" in u}
    out = []
    for uri in files:
        parent, _, name = uri.rpartition("/")
        if name != MANIFEST_NAME and not (parent.endswith("/" + SHARDS_DIR) and name.endswith(".json")):
            continue
        m = read_manifest(uri)
        base = parent if name == MANIFEST_NAME else parent.rpartition("/")[0]
        for f in m.files if m else []:
            if sizes.get(storage.join(base, f.path)) != f.bytes:
                out.append(f"{uri} lists {f.path}, missing or not {f.bytes} bytes")
    return out


def bounded(fn: Callable[[], None], limit_s: float) -> tuple[BaseException | None, float, bool]:
    """Run `fn` in a thread; (its exception, seconds, whether it hung past `limit_s`). A hung run is left
    behind as a daemon thread: the caller reports it and must not reuse the state it touches."""
    box: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # reported to the caller, whatever it is
            box.append(e)

    t0 = time.perf_counter()
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit_s)
    return (box[0] if box else None), round(time.perf_counter() - t0, 2), t.is_alive()


def faulted_run(proxy: FaultProxy, name: str, rules: list[Rule], seed: int, src: str, root: str,
                clean: dict[str, Any], limit_s: float, start: str | None = None,
                common: dict[str, Any] | None = None) -> Outcome:
    """Run the pipeline under `rules`, then (faults off) compare with `clean` and look for lying manifests."""
    proxy.reset_counts()
    proxy.schedule.rules, proxy.schedule.seed, proxy.schedule.enabled = rules, seed, True
    proxy.schedule.__post_init__()  # a fresh seeded generator per run
    for r in rules:
        r.matched = r.fired = 0
    ours = _Recoveries()
    logging.getLogger("operators.core.storage").addHandler(ours)
    try:
        err, seconds, hung = bounded(lambda: run_pipeline(src, root, first=start, common=common), limit_s)
    finally:
        proxy.schedule.enabled = False
        logging.getLogger("operators.core.storage").removeHandler(ours)
    injected = {f"{f}:{k}": n for (f, k), n in sorted(proxy.injected.items())}
    retries, budget = dict(proxy.retries()), proxy.max_attempts_seen()
    problems = [f"hung: still running after {limit_s} s"] if hung else []
    if hung:
        return Outcome(name, False, None, None, seconds, injected, retries, ours.count, budget, problems)
    problems += lying_manifests(root)
    got = snapshot(root)
    done = err is None
    identical = None
    if done:
        identical = got == clean
        if not identical:
            bad = [s for s in clean if got.get(s) != clean[s]]
            problems.append(f"finished but differs from the clean run in {bad}")
    error = None if err is None else f"{type(err).__name__}: {str(err)[:300]}"
    return Outcome(name, done, identical, error, seconds, injected, retries, ours.count, budget, problems)


def describe_outcome(o: Outcome) -> str:
    """One line for a run: scenario, time, faults, retries by layer, verdict."""
    verdict = "identical" if o.identical else "DIFFERS" if o.finished else f"FAILED: {o.error}"
    return (f"{o.scenario:22} {o.seconds:6.1f}s injected={sum(o.injected.values()):4d} "
            f"retries={o.retries_by_client} ours={o.ours} {verdict[:160]}")


def hopeless_run(proxy: FaultProxy, name: str, rules: list[Rule], start: str | None, seed: int, src: str,
                 root: str, clean: dict[str, Any], limit_s: float, common: dict[str, Any] | None = None) -> Outcome:
    """Run the steps before `start` clean, then the rest under `rules`: the run must fail, and the step it
    failed in must have no step manifest."""
    if start is not None:
        proxy.schedule.enabled = False
        run_pipeline(src, root, stop=start, common=common)
    o = faulted_run(proxy, name, rules, seed, src, root, clean, limit_s, start, common)
    first = start or PIPELINE[0][0]
    if o.finished:
        o.problems.append("finished although no request of the kind could succeed")
    elif first in snapshot(root):
        o.problems.append(f"failed but committed a step manifest for {first}")
    return o


def run(records: int, rounds: int, seed: int, rate: float, work: Path, limit_s: float = 300.0,
        dead: bool = True) -> dict[str, Any]:
    """The whole experiment; figures, with `problems` empty when every run was identical or failed clearly."""
    corpus = work / "corpus"
    write_instruction_corpus(corpus, records, n_files=4, seed=seed, malformed_rate=0.02, near_dup_rate=0.05)
    outcomes: list[Outcome] = []
    with s3_behind_proxy() as (proxy, bucket):
        src = f"{bucket}/raw"
        upload_corpus(corpus, src)
        t0 = time.perf_counter()
        run_pipeline(src, f"{bucket}/clean")
        clean_s = time.perf_counter() - t0
        clean = snapshot(f"{bucket}/clean")
        clean_requests = len(proxy.log)
        for rnd in range(rounds):
            for name, rules in scenarios(rate).items():
                outcomes.append(faulted_run(proxy, name, rules, seed * 1000 + rnd, src,
                                            f"{bucket}/{name}-{rnd}", clean, limit_s))
                print(describe_outcome(outcomes[-1]), flush=True)
        for name, (rules, start) in {**hopeless(), **(dead_ends() if dead else {})}.items():
            outcomes.append(hopeless_run(proxy, name, rules, start, seed, src, f"{bucket}/hopeless-{len(outcomes)}",
                                         clean, limit_s))
            print(describe_outcome(outcomes[-1]), flush=True)
    survivable = [o for o in outcomes if not o.scenario.startswith("every")]
    hopeless_runs = [o for o in outcomes if o.scenario.startswith("every")]
    injected: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    max_attempts: dict[str, int] = {}
    for o in outcomes:
        injected.update(o.injected)
        retries.update(o.retries_by_client)
        for client, n in o.max_attempts.items():
            max_attempts[client] = max(max_attempts.get(client, 0), n)
    failed = [o for o in outcomes if not o.finished]
    return {
        "records": records, "steps": [s for s, _ in PIPELINE], "rate": rate, "rounds": rounds,
        "clean_seconds": round(clean_s, 2), "clean_requests": clean_requests,
        "runs": len(outcomes), "faults_injected": sum(injected.values()),
        "faults_by_kind": dict(sorted(injected.items())),
        "runs_identical": sum(bool(o.identical) for o in outcomes),
        "survivable_runs": len(survivable), "survivable_identical": sum(bool(o.identical) for o in survivable),
        "failed_clearly": sum(not o.finished and not o.problems for o in outcomes),
        "hopeless_runs": len(hopeless_runs),
        "max_seconds_to_fail": max((o.seconds for o in failed), default=0.0),
        "max_seconds_faulted_run": max((o.seconds for o in outcomes), default=0.0),
        "sdk_retries_by_client": dict(retries), "sdk_max_attempts_announced": max_attempts,
        "our_recoveries": sum(o.ours for o in outcomes),
        "outcomes": [asdict(o) for o in outcomes],
        "problems": [f"{o.scenario}: {p}" for o in outcomes for p in o.problems],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2, help="seeded rounds of every survivable scenario")
    ap.add_argument("--rate", type=float, default=0.1, help="share of the requests a fault hits")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--no-dead-ends", action="store_true", help="skip the endless stalls (minutes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flaky-") as d:
        result = run(args.records, args.rounds, args.seed, args.rate, Path(d), dead=not args.no_dead_ends)
    for p in result["problems"]:
        print("PROBLEM:", p)
    print_json_line({k: v for k, v in result.items() if k != "outcomes"})
    sys.exit(1 if result["problems"] else 0)


if __name__ == "__main__":
    main()
