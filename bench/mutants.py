"""Deliberately broken protocols: each mutant breaks one promise the platform makes, and the tests that guard
that promise must fail against it. A test that still passes against its mutant guards nothing.

    python bench/mutants.py [--mutant NAME ...] [--list]

Each mutant is applied in every Python process of its test run (pytest, the step processes the tests start,
Airflow's task processes) by a `sitecustomize` module on PYTHONPATH that calls `apply(IIP_MUTANT)` here before
any other import. Per mutant the script runs the named tests, expects them to fail, and prints a row: mutant,
what it breaks, the tests, "caught" or "NOT CAUGHT", and the seconds. The last line is JSON. It also runs the
same tests without a mutant first, so that a failure is the mutant's and not the test's own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

ENV = "IIP_MUTANT"


def _write_in_place() -> None:
    """A write that is not atomic: the bytes go straight to the target, so a reader (or a full disk) can meet
    a partial file under the final name."""
    import pyarrow.fs as pafs

    from operators.core import storage

    original = storage.write_bytes

    def write_bytes(uri: str, data: Any) -> None:
        fs, path = storage.filesystem(uri)
        if not isinstance(fs, pafs.LocalFileSystem):
            return original(uri, data)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return None

    storage.write_bytes = write_bytes


def _commit_overwrites() -> None:
    """A commit point that is not exclusive: the second writer overwrites the first and also believes it won."""
    from operators.core import storage

    def commit_if_absent(uri: str, data: bytes) -> bool:
        storage.write_bytes(uri, data)
        return True

    storage.commit_if_absent = commit_if_absent


def _no_cleanup_when_full() -> None:
    """A full disk leaves the failed attempt's part files behind (they hold the space the retry needs)."""
    from operators.core import runner

    @contextlib.contextmanager
    def keep_parts(folder: str, attempt: str, what: str) -> Iterator[None]:
        yield

    runner._parts_freed_when_full = keep_parts


def _no_time_limit() -> None:
    """No task has an execution timeout: a stuck step holds its worker slot forever."""
    from operators.orchestration import settings

    settings.step_timeout_s = lambda *a, **kw: None


def _hash_ignores_inputs() -> None:
    """A plan's hash covers code and config but not its input files: a step over changed inputs looks up to date
    and keeps its old output."""
    from operators.core import runner

    original = runner.config_hash
    runner.config_hash = lambda step, version, config, inputs: original(step, version, config, [])


@dataclass(frozen=True)
class Mutant:
    breaks: str
    apply: Callable[[], None]
    tests: tuple[str, ...]
    timeout_s: int = 900  # per test: a mutant that hangs a test is caught by the time limit


MUTANTS: dict[str, Mutant] = {
    "write-in-place": Mutant(
        "writes are atomic (temp file, fsync, rename)", _write_in_place,
        ("tests/reliability/test_disk_full.py::"
         "test_a_step_that_fills_the_disk_fails_clearly_commits_nothing_and_its_retry_completes",)),
    "commit-overwrites": Mutant(
        "a commit is exclusive: of two writers exactly one wins", _commit_overwrites,
        ("tests/test_storage.py", "tests/test_datasets.py")),
    "no-cleanup-when-full": Mutant(
        "a full disk leaves no part of the failed attempt", _no_cleanup_when_full,
        ("tests/reliability/test_disk_full.py::"
         "test_a_step_that_fills_the_disk_fails_clearly_commits_nothing_and_its_retry_completes",)),
    "no-time-limit": Mutant(
        "every step task has an execution timeout", _no_time_limit,
        ("tests/test_step_timeouts.py::test_a_stuck_step_is_stopped_at_its_limit_and_its_retry_commits",),
        timeout_s=90),
    "hash-ignores-inputs": Mutant(
        "a step over changed inputs recomputes", _hash_ignores_inputs,
        ("tests/test_incremental.py::test_a_night_with_new_files_reuses_old_shards_and_equals_a_full_run",
         "tests/integration/test_concurrent_dag_runs.py")),
}


def apply(name: str) -> None:
    """Break the protocol `name` names in this process (called from the generated sitecustomize)."""
    if name not in MUTANTS:
        raise SystemExit(f"{ENV}={name!r}: no such mutant (known: {', '.join(MUTANTS)})")
    MUTANTS[name].apply()


SITECUSTOMIZE = f"""import os, sys
if os.environ.get({ENV!r}):
    sys.path.insert(0, {str(ROOT)!r})
    from bench.mutants import apply
    apply(os.environ[{ENV!r}])
"""


def run_tests(tests: tuple[str, ...], mutant: str | None, site: Path, timeout_s: int) -> tuple[int, float, str]:
    """pytest over `tests` with `mutant` applied everywhere (or none); exit code, seconds, the output's tail."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    if mutant:
        env[ENV] = mutant
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        f"--timeout={timeout_s}", *tests], cwd=ROOT, env=env, capture_output=True, text=True)
    return r.returncode, time.monotonic() - t0, (r.stdout + r.stderr)[-1500:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutant", action="append", choices=list(MUTANTS))
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, m in MUTANTS.items():
            print(f"{name}: breaks '{m.breaks}'; tests {', '.join(m.tests)}")
        return
    from bench._common import print_json_line

    rows = []
    with tempfile.TemporaryDirectory(prefix="mutants-") as t:
        site = Path(t)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        for name in args.mutant or list(MUTANTS):
            m = MUTANTS[name]
            clean_rc, clean_s, clean_tail = run_tests(m.tests, None, site, m.timeout_s)
            if clean_rc != 0:
                rows.append({"mutant": name, "verdict": "tests fail without the mutant", "tail": clean_tail})
                print(f"{name}: the tests fail WITHOUT the mutant:\n{clean_tail}", flush=True)
                continue
            rc, secs, tail = run_tests(m.tests, name, site, m.timeout_s)
            verdict = "caught" if rc != 0 else "NOT CAUGHT"
            failed = [x.split(" - ")[0] for x in tail.splitlines() if x.startswith(("FAILED", "ERROR"))]
            rows.append({"mutant": name, "breaks": m.breaks, "tests": list(m.tests), "verdict": verdict,
                         "seconds": round(secs, 1), "clean_seconds": round(clean_s, 1), "failed": failed})
            print(f"{name} ({m.breaks}): {verdict} in {secs:.1f} s by {failed or m.tests}", flush=True)
    print_json_line({"mutants": rows, "all_caught": all(r["verdict"] == "caught" for r in rows)})
    sys.exit(0 if all(r["verdict"] == "caught" for r in rows) else 1)


if __name__ == "__main__":
    main()
