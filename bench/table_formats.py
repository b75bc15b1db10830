"""Table formats on S3, measured: our folder + pointer vs Delta Lake (deltalake) vs Apache Iceberg (pyiceberg).

Everything runs against a loopback S3 API (moto's server, started as a child process on 127.0.0.1 with a free
port, the same way `tests/conftest.py` does). Data: `--rows` records of an int64 `id` and two string columns
(`instruction`, `response`), written as Parquet (zstd) in files of about `--rows-per-file` rows.

For each format, `--rounds` times (medians reported), on a fresh prefix:

1. first commit (version 1) and second commit (version 2 = version 1 minus 1% of its rows plus 1% new rows,
   like a nightly refresh; written as a full replacement: our new folder, Delta `mode="overwrite"`, Iceberg
   `overwrite`); for Delta and Iceberg also an *incremental* version 2 (delete the 1% by id, append the 1%),
   with the removed rows scattered over all files and, separately, clustered in one file (Delta: a `delete` commit
   then an `append` commit; Iceberg: both in one transaction, one catalog commit);
2. a time-travel read of version 1 after version 2 exists (row count checked);
3. two writers racing from the same base version (threads at a barrier): exactly one should win; the loser's
   exception class is recorded (ours: `storage.compare_and_swap` returns False);
4. bytes stored under the prefix after two versions (listing the bucket).

Then, once per round, whether a table format can sit on top of our version folders without copying them:
Iceberg `add_files` of the folder's Parquet files (one snapshot per folder version) and Delta
`convert_to_deltalake` of the folder (in place; writes `_delta_log/` into it). Finally which readers work offline:
DuckDB's `iceberg`/`delta` extensions (downloaded on first use, so they fail without network) and DuckDB over the
Arrow data the formats' own Python APIs return.

"Ours" is an emulation of `operators.datasets.versions`' protocol, using its storage primitives: the version
folder is written with pyarrow's S3 filesystem, `_claims/vN` and `_VERSION.json` with `storage.commit_if_absent`
(`PUT If-None-Match: *`), `LATEST` moved with `storage.compare_and_swap` (`PUT If-Match: <etag>`). It does not call
`versions.publish`, which needs a committed pipeline step (ids index, card, lineage), so its times are a lower bound
of a real publish.

pyiceberg and deltalake are not project dependencies; install them aside and pass the folder:

    .venv/bin/pip install --no-deps --target /tmp/tf-libs pyiceberg==0.12.0 deltalake==1.6.6 duckdb==2.0.1 \\
        arro3-core==0.9.1 mmh3==5.3.1 pyroaring==1.2.0 strictyaml==1.7.3 zstandard==0.25.0
    .venv/bin/python bench/table_formats.py --libs /tmp/tf-libs --rows 100000 --rounds 3

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PIP_HINT = (".venv/bin/pip install --no-deps --target /tmp/tf-libs pyiceberg==0.12.0 deltalake==1.6.6 duckdb==2.0.1 "
            "arro3-core==0.9.1 mmh3==5.3.1 pyroaring==1.2.0 strictyaml==1.7.3 zstandard==0.25.0")
REGION = "us-east-1"
KEY = "testing"
SCHEMA = pa.schema([("id", pa.int64()), ("instruction", pa.string()), ("response", pa.string())])

# ----------------------------------------------------------------------------------------------------
# Setup: optional libraries, the loopback S3 server, data


def load_libs(libs: str | None) -> dict[str, Any]:
    """Import pyiceberg, deltalake (and duckdb if present) with `libs` first on sys.path; exit 2 if missing."""
    if libs:
        sys.path.insert(0, libs)
    mods: dict[str, Any] = {}
    for name in ("pyiceberg", "deltalake"):
        try:
            mods[name] = importlib.import_module(name)
        except ImportError as e:
            print(f"{name} is not importable ({e}). Install it aside (not into the project) and pass --libs:\n"
                  f"  {PIP_HINT}\n  .venv/bin/python bench/table_formats.py --libs /tmp/tf-libs", file=sys.stderr)
            sys.exit(2)
    try:
        mods["duckdb"] = importlib.import_module("duckdb")
    except ImportError:
        mods["duckdb"] = None
    return mods


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on loopback (child process, like tests/conftest.py); yields the endpoint, env set."""
    port = _free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    old = dict(os.environ)
    try:
        deadline = time.time() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.time() > deadline:
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update({"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": KEY,
                           "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"})
        yield endpoint
    finally:
        os.environ.clear()
        os.environ.update(old)
        proc.terminate()
        proc.wait(timeout=10)


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)


def bytes_under(endpoint: str, bucket: str, prefix: str) -> tuple[int, int]:
    """(total bytes, object count) of everything under `prefix` in `bucket`."""
    total = count = 0
    for page in s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            total += int(obj["Size"])
            count += 1
    return total, count


def make_rows(ids: np.ndarray, seed: int) -> pa.Table:
    """Deterministic synthetic records: ~20-word instruction, ~80-word response from a 4000-word vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i:x}{'abcdefgh'[i % 8] * (1 + i % 5)}" for i in range(4000)])
    ins = rng.integers(0, len(vocab), size=(len(ids), 20))
    res = rng.integers(0, len(vocab), size=(len(ids), 80))
    return pa.table([pa.array(ids, pa.int64()), pa.array([" ".join(r) for r in vocab[ins]]),
                     pa.array([" ".join(r) for r in vocab[res]])], schema=SCHEMA)


def refresh(v1: pa.Table, clustered: bool, seed: int) -> tuple[pa.Table, np.ndarray, pa.Table]:
    """(version 2, ids removed, rows added): 1% of v1's rows removed (scattered, or a run of ids), 1% new ones."""
    n = v1.num_rows
    k = max(1, n // 100)
    ids = v1["id"].to_numpy()
    # clustered: a run of ids near the start, inside the first data file of every format here
    rng = np.random.default_rng(seed)
    removed = ids[k: 2 * k] if clustered else np.sort(rng.choice(ids, size=k, replace=False))
    added = make_rows(np.arange(ids.max() + 1, ids.max() + 1 + k), seed + 1)
    keep = pa.array(~np.isin(ids, removed))
    return pa.concat_tables([v1.filter(keep), added]), removed, added


def key_of(uri: str) -> str:
    """`s3://bucket/a/b` -> `a/b`."""
    return uri.split("/", 3)[3].rstrip("/")


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def race(fns: list[Callable[[], Any]]) -> tuple[int, list[str]]:
    """Run `fns` in threads released together; (how many won, the losers' outcomes). A call wins when it returns
    without raising and does not return False (our compare-and-swap returns False when it loses)."""
    barrier = threading.Barrier(len(fns))
    outcomes: list[Any] = [None] * len(fns)

    def go(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = fns[i]()
        except Exception as e:  # the loser's exception class is the result
            outcomes[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lost = [o is False or isinstance(o, Exception) for o in outcomes]
    losers = [type(o).__name__ if isinstance(o, Exception) else repr(o) for o, x in zip(outcomes, lost, strict=True)
              if x]
    wins = lost.count(False)
    return wins, losers


# ----------------------------------------------------------------------------------------------------
# Ours: version folders + LATEST by conditional PUT


class Ours:
    """The folder + pointer protocol of operators.datasets.versions, on its storage primitives."""

    def __init__(self, base: str, rows_per_file: int) -> None:
        from operators.core import storage

        self.storage = storage
        self.base = base  # s3://bucket/datasets/<name>
        self.rows_per_file = rows_per_file

    def folder(self, version: int) -> str:
        return f"{self.base}/v{version:04d}/hf/data"

    def files(self, version: int) -> list[str]:
        return sorted(u for u in self.storage.list_files(self.folder(version)) if u.endswith(".parquet"))

    def _write_version(self, table: pa.Table, expected: str | None) -> tuple[int, str | None]:
        """Claim the next number, write the folder and its manifest; (version, LATEST token read at start)."""
        st = self.storage
        version = 1
        while not st.commit_if_absent(f"{self.base}/_claims/v{version:04d}", b"claimed"):
            version += 1
        fs, path = st.filesystem(self.folder(version))
        for i, start in enumerate(range(0, table.num_rows, self.rows_per_file)):
            pq.write_table(table.slice(start, self.rows_per_file), f"{path}/train-{i:05d}.parquet",
                           filesystem=fs, compression="zstd")
        manifest = json.dumps({"version": version, "rows": table.num_rows}).encode()
        assert st.commit_if_absent(f"{self.base}/v{version:04d}/_VERSION.json", manifest)
        return version, expected

    def publish(self, table: pa.Table) -> bool:
        """A whole publish: read LATEST, write the version, move LATEST by compare-and-swap."""
        _, token = self.storage.read_versioned(f"{self.base}/LATEST")
        version, _ = self._write_version(table, token)
        return self.move(version, token)

    def move(self, version: int, token: str | None) -> bool:
        return bool(self.storage.compare_and_swap(f"{self.base}/LATEST", token,
                                                  json.dumps({"version": version}).encode()))

    def read(self, version: int | None = None) -> pa.Table:
        if version is None:
            data, _ = self.storage.read_versioned(f"{self.base}/LATEST")
            assert data is not None
            version = int(json.loads(data)["version"])
        fs, path = self.storage.filesystem(self.folder(version))
        return pads.dataset(path, filesystem=fs, format="parquet").to_table()

    def race(self, table: pa.Table) -> tuple[int, list[str]]:
        """Two publishers that read the same LATEST, each with a complete version, swap at once."""
        _, token = self.storage.read_versioned(f"{self.base}/LATEST")
        a, _ = self._write_version(table, token)
        b, _ = self._write_version(table, token)
        return race([lambda: self.move(a, token), lambda: self.move(b, token)])


# ----------------------------------------------------------------------------------------------------
# Delta and Iceberg


def delta_options(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": KEY,
            "AWS_REGION": REGION, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}


def iceberg_catalog(sqlite_path: str, warehouse: str, endpoint: str) -> Any:
    from pyiceberg.catalog.sql import SqlCatalog

    return SqlCatalog("bench", uri=f"sqlite:///{sqlite_path}", warehouse=warehouse,
                      **{"s3.endpoint": endpoint, "s3.access-key-id": KEY, "s3.secret-access-key": KEY,
                         "s3.region": REGION, "py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO"})


def iceberg_delete_ids(removed: np.ndarray) -> Any:
    from pyiceberg.expressions import In

    return In("id", {int(x) for x in removed})


def delta_delete_predicate(removed: np.ndarray) -> str:
    return "id in (" + ",".join(str(int(x)) for x in removed) + ")"


# ----------------------------------------------------------------------------------------------------
# One round


def run_round(r: int, endpoint: str, bucket: str, rows: int, rows_per_file: int, tmp: str,
              mods: dict[str, Any]) -> dict[str, Any]:
    from deltalake import DeltaTable, WriterProperties, convert_to_deltalake, write_deltalake

    out: dict[str, Any] = {}
    seed = 1000 * r
    v1 = make_rows(np.arange(rows), seed)
    v2, removed, added = refresh(v1, clustered=False, seed=seed + 7)
    v2c, removed_c, added_c = refresh(v1, clustered=True, seed=seed + 7)

    # ---- ours
    ours = Ours(f"s3://{bucket}/r{r}/ours/datasets/bench", rows_per_file)
    out["ours_first_commit_s"], ok1 = timed(lambda: ours.publish(v1))
    out["ours_second_commit_s"], ok2 = timed(lambda: ours.publish(v2))
    assert ok1 and ok2
    out["ours_time_travel_s"], t = timed(lambda: ours.read(1))
    out["ours_time_travel_rows_ok"] = t.num_rows == v1.num_rows
    out["ours_bytes"], out["ours_objects"] = bytes_under(endpoint, bucket, f"r{r}/ours/")
    out["ours_files_per_version"] = len(ours.files(1))
    file_bytes = out["ours_bytes"] // max(1, 2 * out["ours_files_per_version"])
    wins, losers = ours.race(v2)
    out["ours_race_winners"] = wins
    out["ours_race_loser"] = "cas->False" if losers == ["False"] else (losers or ["-"])[0]

    # ---- Delta
    opts = delta_options(endpoint)
    wp = WriterProperties(compression="ZSTD")

    def delta_write(uri: str | Any, data: pa.Table, mode: str) -> None:
        write_deltalake(uri, data, mode=mode, storage_options=opts, writer_properties=wp,
                        target_file_size=file_bytes)

    duri = f"s3://{bucket}/r{r}/delta/overwrite"
    out["delta_first_commit_s"], _ = timed(lambda: delta_write(duri, v1, "error"))
    out["delta_second_commit_s"], _ = timed(lambda: delta_write(duri, v2, "overwrite"))
    out["delta_time_travel_s"], t = timed(
        lambda: DeltaTable(duri, version=0, storage_options=opts).to_pyarrow_table())
    out["delta_time_travel_rows_ok"] = t.num_rows == v1.num_rows
    out["delta_bytes"], out["delta_objects"] = bytes_under(endpoint, bucket, f"r{r}/delta/overwrite/")
    out["delta_files_per_version"] = len(DeltaTable(duri, version=0, storage_options=opts).file_uris())
    for kind, (data2, rm, add) in {"scattered": (v2, removed, added), "clustered": (v2c, removed_c, added_c)}.items():
        iuri = f"s3://{bucket}/r{r}/delta/incr-{kind}"
        delta_write(iuri, v1, "error")

        def incr(uri: str = iuri, rm: np.ndarray = rm, add: pa.Table = add) -> None:
            DeltaTable(uri, storage_options=opts).delete(delta_delete_predicate(rm), writer_properties=wp)
            delta_write(uri, add, "append")

        out[f"delta_incr_{kind}_second_commit_s"], _ = timed(incr)
        got = DeltaTable(iuri, storage_options=opts).to_pyarrow_table()
        out[f"delta_incr_{kind}_rows_ok"] = got.num_rows == data2.num_rows
        out[f"delta_incr_{kind}_bytes"], _ = bytes_under(endpoint, bucket, f"r{r}/delta/incr-{kind}/")
    # race: two writers load the same version, both replace it (a publish); also both append
    for mode in ("overwrite", "append"):
        ruri = f"s3://{bucket}/r{r}/delta/race-{mode}"
        delta_write(ruri, v1, "error")
        a, b = DeltaTable(ruri, storage_options=opts), DeltaTable(ruri, storage_options=opts)
        wins, losers = race([partial(delta_write, a, v2, mode), partial(delta_write, b, v2, mode)])
        out[f"delta_race_{mode}_winners"], out[f"delta_race_{mode}_loser"] = wins, (losers or ["-"])[0]

    # ---- Iceberg

    db = os.path.join(tmp, f"iceberg-r{r}.db")
    cat = iceberg_catalog(db, f"s3://{bucket}/r{r}/iceberg", endpoint)
    cat.create_namespace("bench")
    # pyiceberg bin-packs by in-memory Arrow size: aim at the same number of files per version as ours
    arrow_bytes = int(v1.nbytes / max(1, out["ours_files_per_version"]) * 1.02)
    props = {"write.target-file-size-bytes": str(arrow_bytes), "write.parquet.compression-codec": "zstd"}

    def ice_create(name: str) -> Any:
        return cat.create_table(f"bench.{name}", schema=SCHEMA, properties=props)

    tbl = ice_create("overwrite")
    out["iceberg_first_commit_s"], _ = timed(lambda: tbl.append(v1))
    snap1 = tbl.current_snapshot().snapshot_id
    out["iceberg_second_commit_s"], _ = timed(lambda: tbl.overwrite(v2))
    out["iceberg_time_travel_s"], t = timed(lambda: tbl.scan(snapshot_id=snap1).to_arrow())
    out["iceberg_time_travel_rows_ok"] = t.num_rows == v1.num_rows
    out["iceberg_bytes"], out["iceberg_objects"] = bytes_under(endpoint, bucket, key_of(tbl.location()) + "/")
    out["iceberg_files_per_version"] = len(list(tbl.scan(snapshot_id=snap1).plan_files()))
    for kind, (data2, rm, add) in {"scattered": (v2, removed, added), "clustered": (v2c, removed_c, added_c)}.items():
        it = ice_create(f"incr_{kind}")
        it.append(v1)

        def ice_incr(it: Any = it, rm: np.ndarray = rm, add: pa.Table = add) -> None:
            with it.transaction() as tx:
                tx.delete(iceberg_delete_ids(rm))
                tx.append(add)

        out[f"iceberg_incr_{kind}_second_commit_s"], _ = timed(ice_incr)
        out[f"iceberg_incr_{kind}_rows_ok"] = it.scan().to_arrow().num_rows == data2.num_rows
        out[f"iceberg_incr_{kind}_bytes"], _ = bytes_under(endpoint, bucket, key_of(it.location()) + "/")
    # race: two catalog connections load the same snapshot, both replace it; with pyiceberg's default commit
    # retries (it revalidates and may re-apply) and with retries off (the catalog's compare-and-swap alone)
    for label, extra in (("", {}), ("_noretry", {"commit.retry.num-retries": "0"})):
        name = f"race{label}"
        cat.create_table(f"bench.{name}", schema=SCHEMA, properties={**props, **extra}).append(v1)
        cats = [iceberg_catalog(db, f"s3://{bucket}/r{r}/iceberg", endpoint) for _ in range(2)]
        racers = [c.load_table(f"bench.{name}") for c in cats]
        wins, losers = race([partial(t.overwrite, v2) for t in racers])
        out[f"iceberg_race{label}_winners"], out[f"iceberg_race{label}_loser"] = wins, (losers or ["-"])[0]
        out[f"iceberg_race{label}_snapshots"] = len(cat.load_table(f"bench.{name}").history())
    out["iceberg_catalog_sqlite_bytes"] = os.path.getsize(db)

    # ---- a table format on top of our folders, no copy
    before = dict(_sizes(endpoint, bucket, f"r{r}/ours/"))
    files1 = ours.files(1)
    reg = cat.create_table("bench.on_ours", schema=SCHEMA, location=f"s3://{bucket}/r{r}/iceberg-on-ours")
    out["iceberg_add_files_s"], _ = timed(lambda: reg.add_files(files1))
    s1 = reg.current_snapshot().snapshot_id

    from pyiceberg.expressions import AlwaysTrue

    def add_v2() -> None:
        with reg.transaction() as tx:  # version 2 replaces version 1: drop its files (metadata only), add v2's
            tx.delete(AlwaysTrue())
            tx.add_files(ours.files(2))

    out["iceberg_add_files_v2_s"], _ = timed(add_v2)
    t1 = reg.scan(snapshot_id=s1).to_arrow()
    t2 = reg.scan().to_arrow()
    out["iceberg_add_files_rows_ok"] = (sorted(t1["id"].to_pylist()) == sorted(v1["id"].to_pylist())
                                        and sorted(t2["id"].to_pylist()) == sorted(v2["id"].to_pylist()))
    paths = {f.file.file_path for f in reg.scan(snapshot_id=s1).plan_files()}
    out["iceberg_add_files_no_copy"] = paths == set(files1) and bytes_under(
        endpoint, bucket, f"r{r}/iceberg-on-ours/data/")[0] == 0
    out["iceberg_add_files_meta_bytes"], _ = bytes_under(endpoint, bucket, f"r{r}/iceberg-on-ours/")

    conv = ours.folder(1)
    out["delta_convert_s"], _ = timed(lambda: convert_to_deltalake(conv, storage_options=opts))
    dt = DeltaTable(conv, storage_options=opts)
    out["delta_convert_rows_ok"] = sorted(dt.to_pyarrow_table()["id"].to_pylist()) == sorted(v1["id"].to_pylist())
    out["delta_convert_no_copy"] = {u.rsplit("/", 1)[1] for u in dt.file_uris()} == {
        u.rsplit("/", 1)[1] for u in files1}
    out["delta_convert_log_bytes"], _ = bytes_under(endpoint, bucket, key_of(conv) + "/_delta_log/")
    after = {f: s for f, s in _sizes(endpoint, bucket, f"r{r}/ours/") if "/_delta_log/" not in f}
    out["ours_files_untouched"] = after == before
    out["ours_folder_still_reads"] = ours.read(1).num_rows == v1.num_rows

    if r == 0:
        out.update(hf_after_convert(tmp, v1))
    paths2 = {f.file.file_path for f in reg.scan().plan_files()}
    out["iceberg_add_files_v2_paths_ok"] = paths2 == set(ours.files(2))

    # ---- readers
    duck = mods.get("duckdb")
    if duck is not None:
        con = duck.connect()
        con.register("arrow_ice", reg.scan(snapshot_id=s1).to_arrow())
        con.register("arrow_delta", DeltaTable(duri, version=0, storage_options=opts).to_pyarrow_dataset())
        for fmt_, view in (("iceberg", "arrow_ice"), ("delta", "arrow_delta")):
            out[f"duckdb_over_arrow_{fmt_}_rows_ok"] = con.sql(f"select count(*) from {view}").fetchall()[0][0] == rows
        if r == 0:
            for ext in ("iceberg", "delta"):
                try:
                    con.execute(f"INSTALL {ext}")
                    con.execute(f"LOAD {ext}")
                    out[f"duckdb_{ext}_extension"] = "loaded"
                except Exception as e:  # the reason is the result
                    out[f"duckdb_{ext}_extension"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out


def hf_after_convert(tmp: str, table: pa.Table) -> dict[str, Any]:
    """Local disk: a version's `hf/` folder (card with `configs`, as card.py writes), converted in place to Delta;
    does `datasets.load_dataset` still read it (with the card, and a bare `data/` folder without one)?"""
    import datasets
    from deltalake import convert_to_deltalake

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.disable_progress_bars()
    hf = Path(tmp) / "hf-convert" / "hf"
    (hf / "data").mkdir(parents=True)
    for i, start in enumerate(range(0, table.num_rows, max(1, table.num_rows // 4))):
        pq.write_table(table.slice(start, max(1, table.num_rows // 4)), hf / "data" / f"train-{i:05d}.parquet")
    (hf / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                  "    path: data/train-*\n---\n")
    convert_to_deltalake(str(hf / "data"))
    out: dict[str, Any] = {}
    cache = str(Path(tmp) / "hf-cache")
    for label, path in (("card", hf), ("bare_data_dir", hf / "data")):
        try:
            ds = datasets.load_dataset(str(path), split="train", cache_dir=cache)
            out[f"hf_load_after_convert_{label}"] = "ok" if len(ds) == table.num_rows else f"rows {len(ds)}"
        except Exception as e:  # the failure is the result
            out[f"hf_load_after_convert_{label}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return out


def _sizes(endpoint: str, bucket: str, prefix: str) -> list[tuple[str, int]]:
    got: list[tuple[str, int]] = []
    for page in s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        got += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
    return got


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows-per-file", type=int, default=10_000)
    ap.add_argument("--libs", default=None, help="folder with pyiceberg/deltalake installed aside (pip --target)")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    mods = load_libs(args.libs)
    rounds: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with moto_s3() as endpoint, tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        bucket = f"tf-{uuid.uuid4().hex[:8]}"
        s3_client(endpoint).create_bucket(Bucket=bucket)
        for r in range(args.rounds):
            rounds.append(run_round(r, endpoint, bucket, args.rows, args.rows_per_file, tmp, mods))
            print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    result: dict[str, Any] = {"rows": args.rows, "rounds": args.rounds, "rows_per_file": args.rows_per_file,
                              "loadavg_1m_start": round(load0, 2), "python": platform.python_version(),
                              "pyarrow": pa.__version__, "pyiceberg": mods["pyiceberg"].__version__,
                              "deltalake": mods["deltalake"].__version__,
                              "duckdb": mods["duckdb"].__version__ if mods["duckdb"] else None}
    for key in rounds[0]:
        vals = [rd[key] for rd in rounds if key in rd]
        if all(isinstance(v, bool) for v in vals):
            result[key] = all(vals)
        elif all(isinstance(v, float) for v in vals):
            result[key] = median(vals)
        elif all(isinstance(v, int) for v in vals):
            result[key] = int(statistics.median(vals))
        else:
            result[key] = vals[0] if len(set(map(str, vals))) == 1 else vals
    for f in ("ours", "delta", "iceberg"):
        key = "race_overwrite_winners" if f == "delta" else "race_winners"
        result[f"{f}_race_one_winner"] = all(rd[f"{f}_{key}"] == 1 for rd in rounds)
    result["wall_s"] = round(time.perf_counter() - t0, 1)

    print(f"\n{args.rows} rows, {args.rounds} round(s), medians; moto S3 on loopback; load {load0:.2f} at start")
    fmt = "{:<30} {:>12} {:>12} {:>12}"
    print(fmt.format("", "ours", "delta", "iceberg"))

    def row(label: str, key: str, scale: float = 1.0, nd: int = 3) -> None:
        vals = [result.get(f"{f}_{key}") for f in ("ours", "delta", "iceberg")]
        print(fmt.format(label, *["-" if v is None else (f"{v / scale:.{nd}f}" if isinstance(v, float | int)
                                                         and not isinstance(v, bool) else str(v)) for v in vals]))

    row("first commit s", "first_commit_s")
    row("second commit (replace) s", "second_commit_s")
    row("incr 2nd commit scattered s", "incr_scattered_second_commit_s")
    row("incr 2nd commit clustered s", "incr_clustered_second_commit_s")
    row("time-travel read v1 s", "time_travel_s")
    row("time-travel rows ok", "time_travel_rows_ok")
    row("files per version", "files_per_version", nd=0)
    row("MB after 2 versions (replace)", "bytes", 1e6, 2)
    row("MB incr scattered", "incr_scattered_bytes", 1e6, 2)
    row("MB incr clustered", "incr_clustered_bytes", 1e6, 2)
    row("race: exactly one winner", "race_one_winner")
    print(fmt.format("race loser", result["ours_race_loser"], result["delta_race_overwrite_loser"],
                     result["iceberg_race_loser"]))
    print(f"delta append race winners: {result['delta_race_append_winners']}"
          f" (loser {result['delta_race_append_loser']})")
    print(f"iceberg race with commit retries off: {result['iceberg_race_noretry_winners']} winner(s)"
          f" (loser {result['iceberg_race_noretry_loser']})")
    print(f"iceberg add_files v1 {result['iceberg_add_files_s']:.3f} s, v2 {result['iceberg_add_files_v2_s']:.3f} s,"
          f" rows ok {result['iceberg_add_files_rows_ok']}, no copy {result['iceberg_add_files_no_copy']},"
          f" v2 paths are our v0002 files {result['iceberg_add_files_v2_paths_ok']},"
          f" metadata {result['iceberg_add_files_meta_bytes'] / 1e3:.1f} kB")
    print(f"delta convert {result['delta_convert_s']:.3f} s, rows ok {result['delta_convert_rows_ok']},"
          f" no copy {result['delta_convert_no_copy']}, _delta_log {result['delta_convert_log_bytes'] / 1e3:.1f} kB;"
          f" our files untouched {result['ours_files_untouched']}, folder reads {result['ours_folder_still_reads']}")
    print(f"datasets.load_dataset after convert: with card {result['hf_load_after_convert_card']},"
          f" bare data/ {result['hf_load_after_convert_bare_data_dir']}")
    for ext in ("iceberg", "delta"):
        print(f"duckdb {ext} extension: {result.get(f'duckdb_{ext}_extension', 'duckdb not importable')};"
              f" duckdb over arrow rows ok: {result.get(f'duckdb_over_arrow_{ext}_rows_ok')}")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
