"""Fault injection for the crash tests: die like `kill -9` at a named point of the commit protocol.

A timed kill cannot reliably land inside a window that lasts microseconds (between a part's upload and
the manifest that commits it, between a commit's write and its return), so the code calls `point(name)`
at those windows. Nothing happens unless the environment says so:

- `IIP_FAULT=<name>:<n>`: the process exits at once with status 137 (what `kill -9` leaves), without
  running `finally` blocks, atexit handlers or flushing buffers, the n-th time it reaches point `name`.
- `IIP_FAULT=<name>:<n>:hang`: the process stops there instead, sleeping until something kills it (a stuck
  task: what a task's time limit is for).
- `IIP_FAULT_TRACE=<path>`: every point reached is appended to `path`, one name a line (the tests use it
  to learn which windows a task passes through, then pick kills among them).

Points (see the callers): `part.written` (a part file is uploaded, no manifest lists it yet),
`write.temp` (a local write's temp file is durable, not yet renamed into place), `commit.before`
(a manifest is about to be committed), `commit.after` (the manifest is committed, the writer has not
returned), `stage.done` (a stage committed, the next not started), `llm.cache.flushed` (LLM results are
paid for and cached, no output commits them yet). The cost when unset is one environment lookup per
part or commit.
"""

from __future__ import annotations

import os
import time
from collections import Counter

FAULT_ENV = "IIP_FAULT"
TRACE_ENV = "IIP_FAULT_TRACE"
KILLED_STATUS = 137  # 128 + SIGKILL, the status a supervisor sees after kill -9

_hits: Counter[str] = Counter()


def point(name: str) -> None:
    """Mark fault point `name`: trace it, and die here if `IIP_FAULT` targets this hit."""
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, count, action = [*spec.split(":"), ""][:3]
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(count):
        if action == "hang":
            while True:
                time.sleep(3600)
        os._exit(KILLED_STATUS)  # no cleanup of any kind: the closest a process gets to kill -9 on itself
