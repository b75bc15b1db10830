"""The exports opened by their consumers: the Hugging Face folder with `datasets.load_dataset`, and the ShareGPT
JSONL read back line by line; both hold exactly the committed records, with the replay split apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.cli import build_step
from operators.core import storage
from operators.core.runner import read_step_table, run_all
from operators.schema import CANONICAL_SCHEMA
from tests.conftest import run_cli

SCHEMA = CANONICAL_SCHEMA.append(pa.field("domain", pa.string())).append(pa.field("dsir_key", pa.float64()))
PUBLISHED = ["id", "conversations", "label", "langdetect", "source", "reward"]


def pool(n: int) -> list[dict[str, Any]]:
    """Records with every canonical field filled in, some optional ones missing, and non-ASCII text."""
    rng = np.random.default_rng(4)
    out = []
    for i in range(n):
        turns = [{"from": "human", "value": f"Question {i}: ¿qué es {i} × 2? 数学"},
                 {"from": "gpt", "value": f"{2 * i}."}]
        if i % 5 == 0:
            turns = [{"from": "system", "value": "Be brief."}, *turns, {"from": "human", "value": "Why?"},
                     {"from": "gpt", "value": "Because."}]
        label = None if i % 7 == 0 else {"ability_en": [f"tag{i % 3}"], "ability_zh": ["标签"],
                                         "cate_ability_en": ["math"], "cate_ability_zh": ["数学"]}
        out.append({"id": f"id{i:04d}", "conversations": turns, "label": label, "langdetect": "en",
                    "source": f"src{i % 2}", "reward": None if i % 3 == 0 else float(i) / 10,
                    "origin": {"file": "f", "line": i, "id": None, "source": None, "format": "sharegpt"},
                    "domain": ["math", "code", "general"][i % 3], "dsir_key": float(rng.normal())})
    return out


def published(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in PUBLISHED}


def test_exports_open_in_their_consumers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder needs no Hub; nothing may download here
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    src = tmp_path / "in"
    src.mkdir()
    rows = pool(300)
    for f in range(3):
        pq.write_table(pa.Table.from_pylist(rows[f::3], schema=SCHEMA), src / f"p{f}.parquet")
    sel = storage.validate_uri(str(tmp_path / "select"))
    run_all(build_step("select", {"budgets": {"math": 60, "code": 0.5}, "target_shard_bytes": 1}), [str(src)], sel)
    table = read_step_table(sel)
    canonical = sorted(table.select(CANONICAL_SCHEMA.names).to_pylist(), key=lambda r: r["id"])
    expected = [published(r) for r in canonical]
    replay = sorted(r["id"] for r in table.to_pylist() if r["replay"])
    assert 0 < len(replay) < len(expected) < 300  # the fixture really has both splits, and a selection

    out = tmp_path / "export"
    r = run_cli("export", "--input", sel, "--output", str(out), "--name", "demo")
    assert r.returncode == 0, r.stderr[-3000:]

    # Hugging Face: the folder alone, as a user without this project would open it (offline, own cache).
    ds = datasets.load_dataset(str(out / "hf"), cache_dir=str(tmp_path / "hf-cache"))
    assert set(ds) == {"train", "replay"}
    assert ds["train"].column_names == CANONICAL_SCHEMA.names  # the published schema plus `origin` lineage
    train = sorted(ds["train"].to_list(), key=lambda r: r["id"])
    assert train == canonical  # every field, nested turns and labels, nulls and non-ASCII text intact
    assert sorted(ds["replay"]["id"]) == replay

    # ShareGPT JSONL: one JSON object per line, the same records in the published fields.
    def read_jsonl(split: str) -> list[dict[str, Any]]:
        lines = [line for p in sorted((out / "sharegpt").glob(f"{split}-*.jsonl"))
                 for line in p.read_text(encoding="utf-8").splitlines()]
        return sorted((json.loads(line) for line in lines), key=lambda r: r["id"])

    assert read_jsonl("train") == expected
    assert [r["id"] for r in read_jsonl("replay")] == replay
