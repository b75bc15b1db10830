"""What exact and near-duplicate removal share: a reduce stage decides which rows of each shard to drop
(and which record each duplicates), and the record transform drops exactly those rows."""

from __future__ import annotations

from typing import ClassVar, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from operators.core.step import Artifacts, BatchResult, Step, StepConfig, dropped_table

C = TypeVar("C", bound=StepConfig)


class DropListStep(Step[C]):
    """A step whose reduce stage `resolve` lists (shard, row, kept_id) to drop with reason `drop_reason`.

    Rows are numbered per shard in read order, which is deterministic, so the map stage and the
    transform agree on them.
    """

    drop_reason: ClassVar[str]
    detail_prefix: ClassVar[str]  # "duplicate of" -> detail "duplicate of <kept id>"

    def __init__(self, config: C) -> None:
        super().__init__(config)
        self._row = 0
        self._drops: dict[int, str] = {}

    def begin_shard(self, shard: int) -> None:
        self._row = 0

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        t = artifacts.partition("resolve", shard)
        self._drops = {} if t is None else dict(zip(t["row"].to_pylist(), t["kept_id"].to_pylist(), strict=True))

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        rows = range(self._row, self._row + table.num_rows)
        self._row += table.num_rows
        mask = pa.array([r in self._drops for r in rows], pa.bool_())
        details = [f"{self.detail_prefix} {self._drops[r]}" for r in rows if r in self._drops]
        return BatchResult(kept=table.filter(pc.invert(mask)),
                           dropped=dropped_table(table.filter(mask), [self.drop_reason] * len(details), details))
