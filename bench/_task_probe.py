"""Run one `python -m operators ...` task and write what it cost besides time: storage calls and bytes moved.

    python -m bench._task_probe RESULT.json <operators CLI arguments...>

The task runs exactly as `python -m operators` runs it (same start-up, same exit), in its own interpreter, so
the parent's `os.wait4` still gives its own CPU time and peak RSS (bench._common.run_children). This wrapper
adds what rusage cannot see: how many calls the task made into `operators.core.storage` (each is at least one
request to S3 in production) and the bytes it read and wrote (`/proc/self/io` rchar/wchar, counted from after
start-up, so the interpreter's own imports are mostly excluded). It counts; it changes nothing the task does.
"""

from __future__ import annotations

import functools
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The storage functions that reach the object store (one or more requests each).
STORAGE_CALLS = ("exists", "read_bytes", "open_input", "file_size", "write_bytes", "commit_if_absent",
                 "read_versioned", "compare_and_swap", "delete", "list_files", "iter_chunks")


def _io() -> dict[str, int]:
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def _counted(calls: Counter[str], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def main() -> None:
    """Run the task given on the command line and write its counters to the result file."""
    result_path, argv = Path(sys.argv[1]), sys.argv[2:]
    from operators.core.startup import exit_process, start_process

    start_process()
    from operators.cli import main as cli_main
    from operators.core import storage

    calls: Counter[str] = Counter()
    for name in STORAGE_CALLS:
        setattr(storage, name, _counted(calls, name, getattr(storage, name)))
    before = _io()
    rc = cli_main(argv)
    after = _io()
    result_path.write_text(json.dumps({
        "rc": rc, "storage_calls": sum(calls.values()), "calls": dict(calls),
        "read_bytes": after.get("rchar", 0) - before.get("rchar", 0),
        "written_bytes": after.get("wchar", 0) - before.get("wchar", 0),
    }))
    exit_process(rc)


if __name__ == "__main__":
    main()
