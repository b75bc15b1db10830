"""The quality gate: a clean committed step validates; a broken one fails the CLI, naming each failed expectation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators.cli import build_step
from operators.core import storage
from operators.core.runner import run_all
from operators.schema import CANONICAL_SCHEMA
from tests.conftest import run_cli

SCHEMA = CANONICAL_SCHEMA.append(pa.field("domain", pa.string())).append(pa.field("dsir_key", pa.float64()))
LABEL = {"ability_en": ["x"], "ability_zh": [], "cate_ability_en": ["y"], "cate_ability_zh": []}


def rec(rid: str, turns: list[tuple[str, str]], label: dict[str, Any] | None = LABEL) -> dict[str, Any]:
    return {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns], "label": label,
            "langdetect": "en", "source": "s", "reward": None, "origin": None, "domain": "general", "dsir_key": 0.0}


GOOD = [("human", "What is 2 + 2?"), ("gpt", "4.")]


def committed(tmp_path: Path, files: list[list[dict[str, Any]]]) -> str:
    """A committed `select` output (budget: keep all) holding exactly `files`' records, one part per file."""
    src = tmp_path / "in"
    src.mkdir()
    for i, rows in enumerate(files):
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), src / f"p{i}.parquet")
    out = storage.validate_uri(str(tmp_path / "select"))
    m = run_all(build_step("select", {"target_shard_bytes": 1, "replay_fraction": 0}), [str(src)], out)
    assert m.stats.records_kept == sum(len(rows) for rows in files)
    return out


def test_a_clean_step_validates(tmp_path: Path) -> None:
    out = committed(tmp_path, [[rec("a", GOOD), rec("b", [("system", "Be brief."), *GOOD])], [rec("c", GOOD)]])
    r = run_cli("validate", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "select" / "validation.json").read_text())
    assert report["success"] is True and report["records"] == 3 and report["failures"] == []
    assert "already validated" not in r.stderr


def test_a_commit_is_validated_once_and_a_new_commit_again(tmp_path: Path) -> None:
    """Validating the same commit again reuses its report (a quiet night); a new commit of the step is validated
    afresh, even where an earlier report passed."""
    out = committed(tmp_path, [[rec("a", GOOD)]])
    first = run_cli("validate", "--output", out)
    assert first.returncode == 0 and "already validated" not in first.stderr, first.stderr[-3000:]
    report = (tmp_path / "select" / "validation.json").read_bytes()
    again = run_cli("validate", "--output", out)
    assert again.returncode == 0 and "already validated for this commit" in again.stderr, again.stderr[-3000:]
    assert (tmp_path / "select" / "validation.json").read_bytes() == report
    # A new commit of the same folder (another config): its records are validated, and the report follows it.
    m = run_all(build_step("select", {"target_shard_bytes": 2, "replay_fraction": 0}), [str(tmp_path / "in")], out)
    assert m.stats.records_kept == 1
    third = run_cli("validate", "--output", out)
    assert third.returncode == 0 and "already validated" not in third.stderr, third.stderr[-3000:]
    assert json.loads((tmp_path / "select" / "validation.json").read_text())["commit"] != json.loads(report)["commit"]


def test_a_failing_step_fails_the_cli_naming_every_failed_expectation(tmp_path: Path) -> None:
    """Each record breaks one expectation; the id of part 1 repeats one of part 0 (unique within each part, so
    only the global check can see it). The CLI exits 1 and its message names all five failures."""
    out = committed(tmp_path, [
        [rec("ok", GOOD),
         rec("one-turn", [("human", "Only a question?")]),
         rec("blank", [("human", "Q?"), ("gpt", "   ")]),
         rec("gpt-first", [("gpt", "Hello."), ("human", "Hi.")]),
         rec("unlabelled", GOOD, label=None)],
        [rec("ok", [("human", "Another question?"), ("gpt", "Another answer.")])],
    ])
    r = run_cli("validate", "--output", out)
    assert r.returncode == 1, r.stderr[-3000:]
    message = next(line for line in r.stderr.splitlines() if "validation failed" in line)
    failures = message.split("validation failed:", 1)[1].split("; ")
    named = {
        ("expect_column_values_to_be_between", "n_turns"): "a record with one turn",
        ("expect_column_values_to_be_between", "min_turn_chars"): "a blank turn",
        ("expect_column_values_to_be_in_set", "first_role"): "a conversation opened by the model",
        ("expect_column_values_to_be_in_set", "has_label"): "a record without a label",
        ("ids unique across all parts", ""): "an id repeated across parts",
    }
    for (expectation, column), what in named.items():
        assert any(expectation in f and column in f for f in failures), f"{what}: {expectation} {column} not named"
    assert len(failures) == 5, failures  # nothing else failed: the good records pass every expectation
    # The same commit again: the earlier report answers, and it still fails the task, with the same message.
    again = run_cli("validate", "--output", out)
    assert again.returncode == 1 and "already validated for this commit" in again.stderr
    assert next(line for line in again.stderr.splitlines() if "validation failed" in line).endswith(
        message.split("validation failed:", 1)[1])
