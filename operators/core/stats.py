"""The one stats shape every step reports, and the ledger check that guards it.

Stats are additive: each shard writes its own, a reduce merges them with `merge`. The ledger
`records_in == records_kept + sum(dropped_by_reason)` must hold at every level; a violation means a
step lost or invented records, and fails the step loudly.
"""

from __future__ import annotations

import resource
import sys
from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field


class LedgerError(RuntimeError):
    """A step's records in != kept + dropped: records were lost or invented."""


class StepStats(BaseModel):
    """Counts, sizes and costs of one step run (a shard, or a whole step after a reduce)."""

    model_config = ConfigDict(extra="forbid")

    step: str
    shards: int = 1
    records_in: int = 0
    records_kept: int = 0
    dropped_by_reason: dict[str, int] = Field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    # Step-specific additive figures (tokens, pairs compared, ...). Ratios are derived by the reader.
    counters: dict[str, float] = Field(default_factory=dict)

    @property
    def records_dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    def check_ledger(self) -> None:
        """Raise LedgerError unless in == kept + dropped, naming the numbers."""
        if self.records_in != self.records_kept + self.records_dropped:
            raise LedgerError(
                f"ledger violated in step {self.step!r}: in={self.records_in} but kept={self.records_kept} "
                f"+ dropped={self.records_dropped} {dict(self.dropped_by_reason)} "
                f"= {self.records_kept + self.records_dropped}"
            )

    def add_dropped(self, reasons: Iterable[str]) -> None:
        """Count dropped records by reason."""
        c = Counter(self.dropped_by_reason)
        c.update(reasons)
        self.dropped_by_reason = dict(sorted(c.items()))


def merge(stats: Iterable[StepStats]) -> StepStats:
    """Merge shard stats into step stats: counts and seconds add up, peak memory is the max."""
    items = list(stats)
    if not items:
        raise ValueError("merge() needs at least one StepStats")
    names = {s.step for s in items}
    if len(names) != 1:
        raise ValueError(f"cannot merge stats of different steps: {sorted(names)}")
    dropped: Counter[str] = Counter()
    counters: Counter[str] = Counter()
    for s in items:
        dropped.update(s.dropped_by_reason)
        counters.update(s.counters)
    return StepStats(
        step=items[0].step,
        shards=sum(s.shards for s in items),
        records_in=sum(s.records_in for s in items),
        records_kept=sum(s.records_kept for s in items),
        dropped_by_reason=dict(sorted(dropped.items())),
        bytes_in=sum(s.bytes_in for s in items),
        bytes_out=sum(s.bytes_out for s in items),
        seconds=round(sum(s.seconds for s in items), 3),
        peak_rss_mb=max(s.peak_rss_mb for s in items),
        counters=dict(sorted(counters.items())),
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return round(rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024, 1)
