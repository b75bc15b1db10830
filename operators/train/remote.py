"""Training output on object storage: checkpoints, the final model and the eval report on `s3://`.

DeepSpeed and the Trainer write with plain file I/O, so a run whose output is `s3://...` writes into a local
scratch folder (the pod's emptyDir or local disk: `IIP_TRAIN_SCRATCH`) and this module moves files between
that folder and the bucket:

- **publish**: upload files while computing their sha256, then write a completion marker listing every file
  with its checksum and size. The marker is a conditional write (`storage.commit_if_absent`: If-None-Match on
  S3, a link locally), made only after every upload finished, so a crash mid-upload leaves files without a
  marker, which every reader ignores and the next run deletes.
- **fetch**: read a marker, download the files it lists and check each checksum (a mismatch fails).
- checkpoints are folders `checkpoints/checkpoint-N/` with the marker `_COMPLETE`. ZeRO-3 writes one shard of
  the model and optimizer state per rank (`zero_pp_rank_R_...`, and `rng_state_R.pth`); each rank uploads
  and downloads only its own shard files, and local rank 0 of each node the shared files.

Only `operators.core.storage` touches storage: its conditional create is the one commit primitive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from operators.core import storage

log = logging.getLogger("operators.train.remote")

COMPLETE_MARKER = "_COMPLETE"
SCRATCH_ENV = "IIP_TRAIN_SCRATCH"
CHUNK = 8 << 20
# ZeRO shard files and per-process RNG states carry their rank in the name; everything else in a checkpoint
# (trainer state, `latest`, config, tokenizer) is written once, by rank 0.
_RANK_FILE = re.compile(r"(?:^|/)(?:[a-z0-9]+_)?zero_pp_rank_(\d+)_|(?:^|/)rng_state_(\d+)\.pth$")
# The consolidated weights the Trainer also puts into each checkpoint are not needed to resume (the ZeRO
# shards hold the trained parameters; frozen ones come from the starting model): they are not uploaded.
_CONSOLIDATED = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


class RemoteError(RuntimeError):
    """A marker or a file on storage is missing or does not match its checksum."""


def is_remote(uri: str) -> bool:
    """True for output that lives on object storage rather than a (mounted) file system."""
    return storage.validate_uri(uri).startswith("s3://")


def scratch_dir(output: str) -> Path:
    """The local folder a run with remote `output` works in (one per output URI, on this node's disk)."""
    base = os.environ.get(SCRATCH_ENV, "").strip() or os.path.join(tempfile.gettempdir(), "iip-train")
    return Path(base) / hashlib.sha256(storage.validate_uri(output).encode()).hexdigest()[:16]


def file_rank(rel: str) -> int | None:
    """The rank whose shard a checkpoint file is, or None for a file every rank shares."""
    m = _RANK_FILE.search(rel)
    if m is None:
        return None
    return int(m.group(1) or m.group(2))


def owned_files(rels: Iterable[str], rank: int) -> list[str]:
    """The files of a checkpoint that `rank` uploads: its own shards, plus the shared ones on rank 0."""
    mine = [r for r in rels if file_rank(r) == rank or (file_rank(r) is None and rank == 0)]
    return sorted(r for r in mine if not _CONSOLIDATED.match(r) and not r.endswith(COMPLETE_MARKER))


def needed_files(rels: Iterable[str], rank: int, local_rank: int) -> list[str]:
    """The files of a checkpoint `rank` downloads: its own shards, plus the shared ones on local rank 0."""
    return sorted(r for r in rels if file_rank(r) == rank or (file_rank(r) is None and local_rank == 0))


def local_files(folder: Path) -> list[str]:
    """Every file under `folder`, relative to it (POSIX separators)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _pipe(src: Any, out: Any | None = None) -> dict[str, Any]:
    """Stream `src` into `out` (when given) in chunks; returns {sha256, size} of the bytes that passed."""
    h, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
        if out is not None:
            out.write(chunk)
    return {"sha256": h.hexdigest(), "size": size}


def upload(folder: Path, rels: Iterable[str], dest: str) -> dict[str, dict[str, Any]]:
    """Upload `folder/rel` to `dest/rel` for each rel, streaming; returns {rel: {sha256, size}}."""
    fs, root = storage.filesystem(dest)
    entries: dict[str, dict[str, Any]] = {}
    for rel in rels:
        target = f"{root}/{rel}"
        if dest.startswith("file://"):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            with open(folder / rel, "rb") as src, fs.open_output_stream(target) as out:
                entries[rel] = _pipe(src, out)
        except OSError as e:
            if not storage.is_no_space(e):
                raise
            # No marker lists it, so no reader takes it; removed so that it does not hold the freed space.
            with contextlib.suppress(OSError):
                fs.delete_file(target)
            raise storage.no_space(target, (folder / rel).stat().st_size) from e
    return entries


def checksum(folder: Path, rels: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{rel: {sha256, size}} of local files (a checkpoint on a mounted volume is committed with these)."""
    entries: dict[str, dict[str, Any]] = {}
    for rel in rels:
        with open(folder / rel, "rb") as f:
            entries[rel] = _pipe(f)
    return entries


def commit(dest: str, files: dict[str, dict[str, Any]], marker: str = COMPLETE_MARKER, **meta: Any) -> bool:
    """Write `dest/<marker>` listing `files` (conditional create); False if a marker was already there."""
    body = json.dumps({**meta, "files": dict(sorted(files.items()))}, indent=1).encode()
    return storage.commit_if_absent(storage.join(dest, marker), body)


def read_marker(dest: str, marker: str = COMPLETE_MARKER) -> dict[str, Any] | None:
    """The completion marker of `dest`, or None when it is absent (never written, or a crash before it)."""
    uri = storage.join(dest, marker)
    if not storage.exists(uri):
        return None
    return dict(json.loads(storage.read_bytes(uri)))


def download(src: str, files: dict[str, dict[str, Any]], rels: Iterable[str], folder: Path) -> None:
    """Download `src/rel` into `folder/rel` for each rel, checking the marker's sha256 (temp file, rename)."""
    fs, root = storage.filesystem(src)
    for rel in rels:
        want = files[rel]
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        try:
            with fs.open_input_stream(f"{root}/{rel}") as inp, open(tmp, "wb") as out:
                got = _pipe(inp, out)["sha256"]
            if got != want["sha256"]:
                raise RemoteError(f"{src}/{rel}: sha256 {got} != {want['sha256']} in the marker")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def delete_tree(uri: str, marker_first: bool = True) -> None:
    """Delete everything under `uri`, its completion marker first (so it is never half a complete folder)."""
    if marker_first:
        storage.delete(storage.join(uri, COMPLETE_MARKER))
    fs, path = storage.filesystem(uri)
    try:
        fs.delete_dir(path)  # on S3 also the empty "directory" objects that deleting single files leaves
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------------------------------
# Whole folders: the final model, the eval report


def publish(folder: Path, dest: str, rels: Iterable[str] | None = None, marker: str = COMPLETE_MARKER,
            **meta: Any) -> dict[str, Any]:
    """Upload `folder` (or the given files of it) to `dest`, then mark it complete. A marker left by an
    earlier attempt is removed before the upload, so readers never pair it with the new files."""
    storage.delete(storage.join(dest, marker))
    files = upload(folder, local_files(folder) if rels is None else rels, dest)
    if not commit(dest, files, marker, **meta):
        raise RemoteError(f"{dest}: another writer marked it complete during this upload")
    log.info("published %d files (%.1f MiB) to %s", len(files), sum(f["size"] for f in files.values()) / 2**20,
             dest)
    return files


def fetch(src: str, folder: Path) -> Path:
    """A local copy of the complete folder `src` (checked against its marker); reused when already there."""
    marker = read_marker(src)
    if marker is None:
        raise RemoteError(f"{src} has no {COMPLETE_MARKER} marker: not (completely) published")
    stamp = folder / ".fetched.json"
    files = marker["files"]
    if stamp.is_file() and json.loads(stamp.read_text()) == files:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    download(src, files, files, folder)
    stamp.write_text(json.dumps(files))
    return folder


def local_model(spec: str) -> str:
    """A model spec usable by `resolve_model`: a remote model folder is fetched into the scratch cache."""
    if "://" not in spec or not is_remote(spec):
        return spec[len("file://"):] if spec.startswith("file://") else spec
    return str(fetch(spec, scratch_dir(spec) / "model"))


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_steps(ckpt_uri: str) -> dict[int, bool]:
    """{step: complete} of every `checkpoint-N` folder under `ckpt_uri`."""
    steps: dict[int, bool] = {}
    prefix = ckpt_uri.rstrip("/") + "/"
    for f in storage.list_files(ckpt_uri):
        head, _, rest = f[len(prefix):].partition("/")
        num = head.rsplit("-", 1)[-1]
        if head.startswith("checkpoint-") and num.isdigit():
            steps[int(num)] = steps.get(int(num), False) or rest == COMPLETE_MARKER
    return steps


def discard_incomplete(ckpt_uri: str) -> list[int]:
    """Delete checkpoint folders without a marker (a run died while uploading them); returns their steps."""
    gone = [s for s, ok in sorted(checkpoint_steps(ckpt_uri).items()) if not ok]
    for s in gone:
        log.warning("deleting incomplete checkpoint-%d under %s (the run died while uploading it)", s, ckpt_uri)
        delete_tree(storage.join(ckpt_uri, f"checkpoint-{s}"), marker_first=False)
    return gone


def prune(ckpt_uri: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints (and anything older); returns deleted steps."""
    steps = checkpoint_steps(ckpt_uri)
    complete = sorted(s for s, ok in steps.items() if ok)
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep]
    gone = sorted(s for s in steps if s < oldest_kept)
    for s in gone:
        delete_tree(storage.join(ckpt_uri, f"checkpoint-{s}"))
    return gone


def latest_complete(ckpt_uri: str) -> tuple[int, dict[str, Any]] | None:
    """(step, marker) of the newest complete checkpoint under `ckpt_uri`, or None."""
    complete = [s for s, ok in checkpoint_steps(ckpt_uri).items() if ok]
    if not complete:
        return None
    step = max(complete)
    marker = read_marker(storage.join(ckpt_uri, f"checkpoint-{step}"))
    assert marker is not None
    return step, marker
