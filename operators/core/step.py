"""What a step is: a validated config, a planner over input files, a reader, and a pure transform.

The transform sees one Arrow record batch and returns the records it keeps and the records it drops,
each dropped record with a `reason` (and a human-readable `detail`). It does no I/O and knows nothing of
Airflow or storage, so it can be tested on in-memory batches and run anywhere.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeAlias, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from operators.core import storage
from operators.core.manifest import Manifest, read_manifest, read_off, step_manifest_uri
from operators.core.writer import part_shard

REASON = "reason"
DETAIL = "detail"


class StepConfig(BaseModel):
    """Base of every step's config: unknown fields are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_part_rows: int = Field(500_000, ge=1, description="Rows per output Parquet part, at most.")
    max_part_bytes: int = Field(
        64 << 20, ge=1 << 10, description="Approximate bytes per output part (a part is buffered in memory).")
    batch_rows: int = Field(8192, ge=1, description="Records per batch handed to the transform.")
    target_shard_bytes: int = Field(
        1 << 30, ge=1, description="Input files are grouped into shards of about this many bytes."
    )
    shard_multiple: int = Field(
        0, ge=0, description="The pods a wave runs on: a shard count past one round of them is rounded up to a "
        "multiple of this, so that no wave ends with a few tasks on an otherwise idle cluster; the files are then "
        "regrouped, in order, into that many shards of about equal bytes (never more shards than files). A "
        "count within one round stays (its wave is one round already). 0: off.")


C = TypeVar("C", bound=StepConfig)


class ShardSpec(BaseModel):
    """One unit of parallel work: a few input files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    uris: list[str]
    bytes: int


class Plan(BaseModel):
    """The shards a step will run, fixed before any shard starts so every task agrees on them."""

    model_config = ConfigDict(extra="forbid")

    step: str
    config_hash: str
    config: dict[str, Any]
    inputs: list[str]
    shards: list[ShardSpec]
    # Identity of the step's code and config without its inputs: a shard's content key builds on it, so a
    # shard whose own input files are unchanged keeps its key when other shards are added (`shard_key`).
    base_hash: str = ""


def shard_key(plan: Plan, spec: ShardSpec, what: str, digest: str) -> str:
    """Content key of one unit of a shard's work: the step's code and config (`plan.base_hash`), the shard's
    own input files with their sizes, which work (`what`: the transform or a map stage) and a `digest` of the
    global results that work reads (a drop list, a fitted model). Equal keys mean an equal output. Pure."""
    import hashlib

    # A shard records its files and their total bytes; with committed upstream files (immutable, with an
    # attempt id in their names) that identifies its input.
    payload = "\n".join([plan.base_hash, what, digest, str(spec.bytes), *spec.uris])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def table_digest(table: pa.Table | None) -> str:
    """A short digest of a table's content (column names, types and values): equal tables, equal digests.
    For the small global results a transform reads (drop lists, decisions), to tell whether they changed."""
    import hashlib

    h = hashlib.sha256()
    if table is None:
        return "none"
    for name in table.column_names:
        col = table.column(name)
        h.update(f"{name}:{col.type}:{len(col)}".encode())
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
            h.update(col.to_numpy(zero_copy_only=False).tobytes())
        else:
            h.update("\x00".join(map(str, col.to_pylist())).encode())
    return h.hexdigest()[:24]


def balanced_groups(files: list[tuple[str, int]], n: int) -> list[ShardSpec]:
    """`files`, in order, as `n` contiguous shards of about equal bytes (each holds at least one file;
    `n <= len(files)`)."""
    out: list[ShardSpec] = []
    cur: list[str] = []
    cur_bytes = 0
    remaining = sum(size for _, size in files)
    for i, (uri, size) in enumerate(files):
        cur.append(uri)
        cur_bytes += size
        groups_left, files_left = n - len(out), len(files) - i - 1
        if groups_left > 1 and (files_left == groups_left - 1 or cur_bytes >= remaining / groups_left):
            out.append(ShardSpec(index=len(out), uris=cur, bytes=cur_bytes))
            remaining -= cur_bytes
            cur, cur_bytes = [], 0
    out.append(ShardSpec(index=len(out), uris=cur, bytes=cur_bytes))
    return out


def aligned_groups(files: list[tuple[str, int]], n: int) -> list[ShardSpec]:
    """`n` shards of an upstream step's part files, shard k holding the parts upstream shard k wrote (part
    names carry their shard: `operators.core.writer.part_name`), in order; a shard that kept nothing is empty."""
    groups: list[list[tuple[str, int]]] = [[] for _ in range(n)]
    for uri, size in files:
        k = part_shard(uri)
        if not 0 <= k < n:
            raise ValueError(f"part {uri} names shard {k}, outside the upstream's {n} shard(s)")
        groups[k].append((uri, size))
    return [ShardSpec(index=k, uris=[u for u, _ in g], bytes=sum(b for _, b in g)) for k, g in enumerate(groups)]


def extend_shards(previous: list[ShardSpec], files: list[tuple[str, int]],
                  group: Callable[[list[tuple[str, int]]], list[ShardSpec]]) -> list[ShardSpec] | None:
    """The previous plan's shards, unchanged and at their indices, then new shards for the files none of
    them holds; None when a previous shard lost a file or changed size (then the caller regroups).

    Keeping the old shards' indices is what lets a night with new input files reuse every old shard's
    committed output: the shard key and the record keys (shard << 32 | row) of old shards do not move."""
    sizes = dict(files)
    kept: list[ShardSpec] = []
    held: set[str] = set()
    for spec in previous:
        if not spec.uris or any(u not in sizes for u in spec.uris) or \
                sum(sizes[u] for u in spec.uris) != spec.bytes:
            return None
        kept.append(spec)
        held.update(spec.uris)
    rest = [(u, n) for u, n in files if u not in held]
    if not rest:
        return kept
    return kept + [ShardSpec(index=len(kept) + s.index, uris=s.uris, bytes=s.bytes) for s in group(rest)]


@dataclass
class BatchResult:
    """What a transform returns for one input batch."""

    kept: pa.Table
    dropped: pa.Table
    counters: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """An auxiliary stage that runs before a step's record transform.

    `map` stages run per shard over the records and emit side tables (keys, counts, signatures);
    `reduce` stages run once over all map outputs and emit one table per target shard (keep-lists,
    drop-lists) plus a JSON summary (global models). The record transform then reads them via `bind`.

    A map stage may also shuffle: returning ``{SHARD_ROWS: own_rows, k: rows_for_partition_k, ...}``
    writes each partition's rows apart (under ``p<k>/`` in the stage folder), so a later stage reads one
    partition from every shard (`Artifacts.shuffled`) without reading the others.

    `partition` stages are the reduce side of such a shuffle, split into parallel tasks: task k (one per
    shard, so an orchestrator maps it like a map stage) handles the shuffle partitions ``p`` with
    ``p % num_shards == k`` (`slot_partitions`) and emits its own rows, read later with `iter_tables`.
    A task then holds one partition's rows, about corpus / partitions, never the whole corpus.

    `grouped`: a light per-shard stage (seconds per shard at any corpus size). A DAG runs it in at most as many
    tasks as it runs at once, each task doing several shards' work one after another (`slot_members`), instead
    of one task, pod start and scheduling round per shard.
    """

    name: str
    kind: Literal["map", "reduce", "partition"]
    grouped: bool = False


@dataclass
class StageOutput:
    """What a reduce stage returns: per-shard tables and a small JSON-able summary."""

    partitions: dict[int, pa.Table] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


# Key of a shuffling map stage's output dict that holds the shard's own rows (not shuffled).
SHARD_ROWS = -1

# What a map or partition stage emits: its own rows, or {SHARD_ROWS: own rows, k: rows for partition k}.
StageRows: TypeAlias = pa.Table | dict[int, pa.Table]


@dataclass
class PartitionResult:
    """What a partition stage returns for one shuffle partition: rows (own or shuffled on), how many shuffled
    rows it read, and counters summed into the step's stats."""

    rows: StageRows
    rows_in: int = 0
    counters: dict[str, float] = field(default_factory=dict)


def concat_or_empty(tables: Iterable[pa.Table], schema: pa.Schema) -> pa.Table:
    """`tables` as one table; with none, an empty table of `schema`, so its columns can still be read.

    `schema` may name only the columns a reader needs: the tables may carry more (fixed-size lists whose
    width the reader does not know, for example)."""
    return pa.concat_tables([schema.empty_table(), *tables], promote_options="default")


def slot_partitions(slot: int, num_shards: int, partitions: int) -> list[int]:
    """The shuffle partitions that task `slot` of a `partition` stage handles (round robin over shards)."""
    return list(range(slot, partitions, max(1, num_shards)))


def slot_members(slot: int, slots: int, num_shards: int) -> list[int]:
    """The shards that task `slot` of a grouped wave of `slots` tasks handles: every `slots`-th shard from `slot`.

    A wave over `num_shards` shards has min(slots, num_shards) tasks (Airflow zips the shard list with the slot
    list), so with at least as many slots as shards each task has exactly its own shard, as an ungrouped wave."""
    if slots < 1 or slot < 0:
        raise ValueError(f"task {slot} of {slots}: need slots >= 1 and a slot >= 0")
    tasks = min(slots, num_shards)
    if slot >= tasks:
        raise ValueError(f"task {slot} of a wave of {tasks} task(s) over {num_shards} shard(s) does not exist")
    return list(range(slot, num_shards, tasks))


def shuffle_partitions(configured: int | None, num_shards: int, floor: int = 64) -> int:
    """How many partitions a shuffle uses: the configured number, else about one per shard (the next power of
    two), but at least `floor`.

    One per shard keeps a partition task's memory at about one shard's worth of rows as the corpus grows;
    the floor keeps small runs from putting everything into one partition. Powers of two keep the count, and
    with it every partition's contents and index (`partition_index`), unchanged while a night's few new
    shards are added; it changes only when the corpus doubles."""
    return configured if configured is not None else max(floor, 1 << max(0, num_shards - 1).bit_length())


def shuffle_dir(partition: int) -> str:
    """Subfolder of a stage folder holding the rows every shard shuffled to `partition`."""
    return f"p{partition:05d}"


def partition_by_shard(table: pa.Table) -> dict[int, pa.Table]:
    """Split a table with a `shard` column into one table per shard, as reduce stages emit them."""
    import numpy as np

    return {int(s): table.filter(pc.equal(table["shard"], int(s))) for s in np.unique(table["shard"].to_numpy())}


class Artifacts(Protocol):
    """Read access to committed stage outputs (implemented by the runner over storage)."""

    step_dir: str  # the step's output folder (URI): where a step keeps state across plans (dedup indexes)

    def iter_tables(self, stage: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Every map-stage output part of `stage` (the shards' own rows, not shuffled ones), one at a time;
        only `columns` when given (a reduce that needs ids need not read signatures)."""
        ...

    def partition(self, stage: str, shard: int) -> pa.Table | None:
        """The reduce-stage output of `stage` for `shard`, or None when it has none."""
        ...

    def summary(self, stage: str) -> dict[str, Any]:
        """The reduce-stage summary of `stage`."""
        ...

    def shuffled(self, stage: str, partition: int, shards: Collection[int] | None = None) -> Iterator[pa.Table]:
        """The rows every shard (or only `shards`) of map stage `stage` shuffled to `partition`, one part file
        at a time."""
        ...

    def shard_rows(self, stage: str, shard: int) -> Iterator[pa.Table]:
        """The own rows shard `shard` emitted in map stage `stage`, one part file at a time."""
        ...

    def records_in(self, stage: str) -> int:
        """How many records the committed tasks of map stage `stage` read, over every shard."""
        ...

    def shard_keys(self, stage: str) -> dict[int, str | None]:
        """The content key of each shard's committed output of map stage `stage` (None: computed without one)."""
        ...

    def previous_summary(self, stage: str) -> dict[str, Any] | None:
        """While reduce stage `stage` recomputes: the summary of its last committed output (None: none)."""
        ...

    def previous_partition(self, stage: str, shard: int) -> pa.Table | None:
        """While reduce stage `stage` recomputes: its last committed table for `shard` (None: none)."""
        ...


def keep_all(table: pa.Table, counters: dict[str, float] | None = None) -> BatchResult:
    """The result of a scorer: every record kept (with its new columns), none dropped."""
    empty = table.slice(0, 0).append_column(REASON, pa.array([], pa.string())).append_column(
        DETAIL, pa.array([], pa.string()))
    return BatchResult(kept=table, dropped=empty, counters=counters or {})


def dropped_table(rows: pa.Table, reasons: list[str], details: list[str]) -> pa.Table:
    """Attach `reason` and `detail` columns to rejected rows (rejects keep all their own columns)."""
    return rows.append_column(REASON, pa.array(reasons, pa.string())).append_column(
        DETAIL, pa.array(details, pa.string())
    )


class Step(ABC, Generic[C]):
    """A pipeline step. Subclasses set `name`, `config_model`, and implement `transform`.

    Bump `version` when a code change alters the output for the same config: completed outputs of the
    old version then count as stale and are recomputed.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    config_model: ClassVar[type[StepConfig]]
    # File name suffixes this step accepts when an input URI is a directory.
    input_suffixes: ClassVar[tuple[str, ...]] = (".parquet",)
    # Auxiliary stages that must complete, in order, before the record transform runs.
    stages: ClassVar[tuple[Stage, ...]] = ()
    # Whether the record transform of one shard is light (seconds at any corpus size): a DAG groups its shard
    # tasks like a `grouped` stage's; a fused run (`then`) only when every head it goes on to is light too
    # (`fusion.grouped_run`).
    grouped_run: ClassVar[bool] = False
    # Partition stages whose partitions are the plan's shards (rows gathered back to their own shard): their
    # width follows the shard count, so a night's new shards must not change a first map stage's content key.
    per_shard_partitions: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: C) -> None:
        self.config = config
        # Shards in the plan being run: set by the runner before any stage or shard, so a shuffling
        # stage can size its partitions to the corpus (`shuffle_partitions`).
        self.num_shards = 1

    def is_off(self) -> bool:
        """Whether the config switches this step off (an optional step): then it runs nothing and passes its
        inputs on (`operators.core.manifest.write_off`)."""
        return False

    # -- planning (edge: lists storage) -------------------------------------------------------------
    def resolve_inputs(self, inputs: list[str]) -> list[tuple[str, int]]:
        """Expand input URIs into (file URI, size) pairs: a committed step dir yields its data files."""
        files: list[tuple[str, int]] = []
        committed = 0
        for raw in inputs:
            uri = storage.validate_uri(raw)
            upstream: Manifest | None = read_manifest(step_manifest_uri(uri))
            if upstream is not None:
                committed += 1
                files.extend((storage.join(uri, f.path), f.bytes) for f in upstream.data_files())
                continue
            passed_on = read_off(uri)
            if passed_on is not None:  # an upstream step that is off: read what it would have read
                committed += 1
                files.extend(self.resolve_inputs(passed_on))
                continue
            listed = storage.list_files(uri)
            if listed == [uri]:
                files.append((uri, storage.file_size(uri)))
                continue
            matched = [u for u in listed if u.endswith(self.input_suffixes) and "/_" not in u[len(uri):]]
            files.extend((u, storage.file_size(u)) for u in matched)
            if not listed:
                raise storage.StorageError(f"input {uri} does not exist")
        if not files and committed < len(inputs):
            raise storage.StorageError(
                f"no input files for step {self.name!r} in {inputs} (accepted suffixes: {self.input_suffixes})"
            )
        return files

    def group_shards(self, files: list[tuple[str, int]]) -> list[ShardSpec]:
        """Group files, in order, into shards of about `target_shard_bytes` (a big file is its own shard)."""
        shards: list[ShardSpec] = []
        cur: list[str] = []
        cur_bytes = 0
        for uri, size in files:
            if cur and cur_bytes + size > self.config.target_shard_bytes:
                shards.append(ShardSpec(index=len(shards), uris=cur, bytes=cur_bytes))
                cur, cur_bytes = [], 0
            cur.append(uri)
            cur_bytes += size
        if cur or not shards:
            # A committed but empty upstream (e.g. nothing needed supplementing) still gets one, empty,
            # shard: the step commits an empty output and downstream steps run as usual.
            shards.append(ShardSpec(index=len(shards), uris=cur, bytes=cur_bytes))
        m = self.config.shard_multiple
        if m > 1 and len(shards) > m and len(shards) % m and len(files) > len(shards):
            shards = balanced_groups(files, min(len(files), math.ceil(len(shards) / m) * m))
        return shards

    # -- reading (edge) ------------------------------------------------------------------------------
    def read(self, shard: ShardSpec) -> Iterator[pa.RecordBatch]:
        """Stream the shard's records as batches; the default reads Parquet files."""
        for uri in shard.uris:
            with storage.open_input(uri) as f:
                pf = pq.ParquetFile(f)
                yield from pf.iter_batches(batch_size=self.config.batch_rows)

    # -- multi-stage steps (override when `stages` is non-empty) ---------------------------------------
    def map_input(self, stage: str, artifacts: Artifacts, shard: ShardSpec) -> Iterator[pa.RecordBatch]:
        """What map stage `stage` reads of a shard: its records, or (overridden) an earlier stage's own rows."""
        return self.read(shard)

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> StageRows:
        """Side table for one input batch of `shard` in map stage `stage`. Pure.

        A dict shuffles: key `SHARD_ROWS` holds the shard's own rows, key k >= 0 the rows for partition k."""
        raise NotImplementedError(f"step {self.name} has no map stage {stage!r}")

    def finish_map(self, stage: str, shard: int) -> StageRows | None:
        """Rows map stage `stage` emits once it has seen every batch of `shard` (a per-shard aggregate, such as
        a histogram, that per-batch rows would repeat once per batch); None: nothing more."""
        return None

    def stage_counters(self, stage: str) -> dict[str, float]:
        """Counters of the map stage `stage` that just read a shard (cache hits, say), for its stats; summed
        over shards into the step's stats as ``<stage>.<name>``."""
        return {}

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        """Global decision of reduce stage `stage` over earlier stages' outputs."""
        raise NotImplementedError(f"step {self.name} has no reduce stage {stage!r}")

    def stage_partitions(self, stage: str) -> int:
        """How many shuffle partitions `partition` stage `stage` reads (known once `num_shards` is set)."""
        raise NotImplementedError(f"step {self.name} has no partition stage {stage!r}")

    def partition_stage(self, stage: str, artifacts: Artifacts, partition: int) -> PartitionResult:
        """Rows of `partition` stage `stage` for one shuffle partition (read it with `Artifacts.shuffled`)."""
        raise NotImplementedError(f"step {self.name} has no partition stage {stage!r}")

    def prepare_stage(self, stage: str, artifacts: Artifacts, shard: int) -> None:
        """Load what map stage `stage` of `shard` needs from earlier stages (runs before its batches)."""

    def begin_shard(self, shard: int) -> None:
        """Reset per-shard state (e.g. a row counter) before a map stage or the transform reads a shard."""

    # -- incremental re-runs: when a shard's committed output can be reused ------------------------------
    def transform_digest(self, artifacts: Artifacts, shard: int) -> str | None:
        """What the transform of `shard` reads besides its records and config, as a short string (a digest
        of its drop list, of a fitted model), or None when it cannot say (then the shard is never reused).

        A step without stages reads nothing else: its transform is record-local. A step with stages must
        override this to be reused across plans."""
        return "" if not self.stages else None

    def map_digest(self, stage: str, artifacts: Artifacts, shard: int) -> str | None:
        """Like `transform_digest`, for map stage `stage` of `shard`. The first stage reads only the shard's
        records (plus the number of partitions it shuffles into); a later map stage reads earlier stages and
        is not reused unless a step says so."""
        if not self.stages or stage != self.stages[0].name:
            return None
        widths = []
        for st in self.stages:
            if st.kind == "partition" and st.name not in self.per_shard_partitions:
                widths.append(f"{st.name}={self.stage_partitions(st.name)}")
        return ",".join(widths)

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        """Load what the record transform of `shard` needs from the stages (runs before `transform`)."""

    def open_shard(self, step_dir: str, shard: int, attempt: str) -> None:
        """Acquire what the transform of `shard` talks to (an LLM and its result cache beside the data)."""

    def close_shard(self) -> None:
        """Release what `open_shard` acquired; runs even when the shard fails."""

    def outputs_per_input(self) -> int:
        """Candidates each input record yields (1 for filters and scorers; a generator yields more).

        The ledger then reads: inputs x outputs_per_input = kept + dropped (by reason)."""
        return 1

    # -- the pure part -------------------------------------------------------------------------------
    @abstractmethod
    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        """Split one batch into kept and dropped records. Pure: no I/O, no global state."""
