"""Start and end of a step's CLI process: every task of a run pays both, so they stay small.

pyarrow asks, the first time any Python object becomes an Arrow array, whether that object is a pandas one;
to answer, it imports pandas (0.4 s of a step process that otherwise starts in 0.7 s). No step hands pyarrow
a pandas object, so each step process settles that question before its first array: pyarrow is told pandas
is absent, then the import is allowed again. Code that really uses pandas still gets it: `import pandas`
works as usual, and pyarrow retries the import whenever an explicit pandas conversion (`to_pandas`) asks.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import NoReturn


class _NoPandas:
    """A meta-path finder that makes `import pandas` fail while it is installed."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"{name} is hidden during pyarrow's pandas probe", name=name)
        return None


def start_process() -> None:
    """What a step process does before its first import of pyarrow or a step: its memory pool, then pyarrow's
    pandas probe (`python -m operators` and the benchmarks' task probe both start this way)."""
    choose_memory_pool()
    skip_pandas_probe()


def choose_memory_pool() -> None:
    """Have Arrow allocate from jemalloc in this process unless `ARROW_DEFAULT_MEMORY_POOL` says otherwise; call
    it before pyarrow is imported (the variable is read once, at import).

    The wheel's default, mimalloc, keeps much of what a task frees: a step's peak RSS then grows with what it
    read before, not only with what it holds. Measured on 2026-12-06 (2 cores, the same input): `filter` over
    500k records peaked at 344 MiB with mimalloc and 267 MiB with jemalloc, `near_dedup` at 458 and 382 MiB,
    in the same time; `near_dedup`'s resolve at 1M records grew 49 MiB past its links with mimalloc, 10 with
    jemalloc. Pods are sized by that peak (a 2 GiB one-core pod per shard task)."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")


def skip_pandas_probe() -> None:
    """Answer pyarrow's "is this a pandas object?" probe with "pandas is absent", without importing pandas."""
    if "pandas" in sys.modules:  # already paid for: nothing to save
        return
    import pyarrow as pa

    finder = _NoPandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([0])  # the first conversion runs the probe; pyarrow records that pandas is absent
    finally:
        sys.meta_path.remove(finder)


# Modules whose libraries own threads, child processes or device state that their own exit handlers release.
_NEEDS_ORDERLY_EXIT = ("torch", "vllm", "deepspeed", "multiprocessing.pool", "concurrent.futures.process")


def exit_process(rc: int) -> NoReturn:
    """End a finished step process with exit code `rc`, skipping interpreter teardown when that is safe.

    Tearing down pyarrow, numpy and pydantic takes about 0.25 s, a quarter of a small task. A step has
    committed every file it wrote before it returns, so once the logs and stdout are flushed nothing is left
    to do, unless a library that releases threads, children or devices at exit was loaded: then the process
    exits the ordinary way.
    """
    orderly = any(m in sys.modules for m in _NEEDS_ORDERLY_EXIT) or any(
        t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate())
    if orderly:
        sys.exit(rc)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
