"""What steps call: a backend behind a result cache, token/cost accounting and structured output.

`run_task` is the distilabel-style typed call: render a versioned prompt per row, generate in batches,
parse the first JSON value out of each answer, normalize it (a task-specific hook, e.g. mapping near-miss
labels onto the taxonomy), validate it against the prompt's schema, and ask once more with a repair prompt
that quotes the error. A row that still fails gets a failure reason; it never silently disappears.
Retrying transient failures is the job of the backend that talks to the network (`openai` retries with
backoff and jitter); whatever failure reaches the client fails the rows of that batch with `llm_error`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

from operators.llm.backends import make_backend
from operators.llm.base import (
    Backend,
    Generation,
    LLMConfig,
    LLMError,
    LossScore,
    Message,
    SamplingConfig,
    request_key,
)
from operators.llm.cache import ResultCache
from operators.llm.prompts import PromptTask

log = logging.getLogger(__name__)

REPAIR = ("Your reply could not be used: {error}. Reply again with only one JSON object matching this "
          "JSON schema, nothing else:\n{schema}")


@dataclass
class StructuredResult:
    """The outcome of one typed request: a validated value, or a failure reason, plus the raw text."""

    value: Any
    raw: str
    failure: str | None = None
    repaired: bool = False


class OutputInvalid(ValueError):
    """An answer that does not parse or does not match the schema (the message goes into the repair prompt)."""


def extract_json(text: str) -> Any:
    """The first JSON object or array in `text` (tolerates prose and ``` fences around it, and an answer
    cut off by the token limit: its last complete element is kept and the brackets are closed)."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch not in "{[":
            continue
        try:
            value, _ = decoder.raw_decode(text, i)
            return value
        except json.JSONDecodeError:
            closed = close_truncated(text[i:])
            if closed is not None:
                try:
                    return json.loads(closed)
                except json.JSONDecodeError:
                    pass
    raise OutputInvalid("no JSON object found")


def close_truncated(fragment: str) -> str | None:
    """`fragment` (JSON cut off mid-way) trimmed to its last complete value with its brackets closed."""
    stack: list[str] = []
    in_str = esc = expect_key = False
    last_safe = -1  # index just after the last complete value
    safe_stack: list[str] = []
    for i, ch in enumerate(fragment):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                if not (stack and stack[-1] == "}" and expect_key):  # a key alone is not a value
                    last_safe, safe_stack = i + 1, list(stack)
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
            expect_key = ch == "{"
        elif ch in "}]":
            if not stack:
                return None
            stack.pop()
            last_safe, safe_stack = i + 1, list(stack)
        elif ch == ",":
            expect_key = bool(stack) and stack[-1] == "}"
        elif ch == ":":
            expect_key = False
        elif ch.isdigit() or ch in "el":  # the end of a number, true, false or null
            last_safe, safe_stack = i + 1, list(stack)
    if in_str is False and not stack:
        return None
    if last_safe < 0 or not safe_stack:
        return None
    return fragment[:last_safe].rstrip().rstrip(",") + "".join(reversed(safe_stack))


class LLMClient:
    """A backend with caching, batching, retries and accounting; one per task process."""

    def __init__(self, cfg: LLMConfig, cache: ResultCache | None = None, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.cache = cache or ResultCache()
        self._backend = backend
        self._owns_backend = backend is None  # a shared backend is closed by its owner
        self.usage: Counter[str] = Counter()

    @property
    def backend(self) -> Backend:
        """The backend, started on first use (loading a model is not free)."""
        if self._backend is None:
            t0 = time.perf_counter()
            self._backend = make_backend(self.cfg)
            log.info("llm: %s backend with %s ready in %.1fs", self.cfg.backend, self.cfg.model,
                     time.perf_counter() - t0)
        return self._backend

    def close(self) -> None:
        """Flush the cache and release the backend."""
        self.cache.flush()
        if self._backend is not None and self._owns_backend:
            self._backend.close()
        self._backend = None

    def model_id(self) -> str:
        """Identity of the weights for cache keys; avoids starting the backend when a spec is stable."""
        return self.backend.model_id

    # -- chat --------------------------------------------------------------------------------------
    def chat(self, requests: list[list[Message]], sampling: SamplingConfig, prompt_version: str,
             json_schema: dict[str, Any] | None = None) -> list[Generation]:
        """One generation per request; cached ones cost nothing, the rest go to the backend in batches."""
        model = self.model_id()
        keys = [request_key(model, sampling, prompt_version, m, json_schema) for m in requests]
        out: list[Generation | None] = [self.cache.get_chat(k) for k in keys]
        todo = [i for i, g in enumerate(out) if g is None]
        self.usage["cache_hits"] += len(requests) - len(todo)
        for start in range(0, len(todo), self.cfg.batch_size):
            idx = todo[start:start + self.cfg.batch_size]
            gens = self.backend.chat([requests[i] for i in idx], sampling, json_schema)
            for i, g in zip(idx, gens, strict=True):
                out[i] = g
                self.cache.put_chat(keys[i], g)
                self._account(g)
            self.cache.flush()  # paid-for results survive a crash of this task
        self.usage["requests"] += len(requests)
        return [g for g in out if g is not None]

    def _account(self, g: Generation) -> None:
        self.usage["prompt_tokens"] += g.prompt_tokens
        self.usage["completion_tokens"] += g.completion_tokens
        self.usage["backend_requests"] += 1

    # -- loss ----------------------------------------------------------------------------------------
    def score_loss(self, prompts: list[list[Message]], answers: list[str]) -> list[LossScore]:
        """Mean answer loss per (prompt, answer); an empty prompt scores the answer alone."""
        model = self.model_id()
        loss_sampling = SamplingConfig(max_tokens=1)
        keys = [request_key(model, loss_sampling, "answer_loss", [*p, {"role": "assistant", "content": a}])
                for p, a in zip(prompts, answers, strict=True)]
        out: list[LossScore | None] = [self.cache.get_loss(k) for k in keys]
        todo = [i for i, s in enumerate(out) if s is None]
        self.usage["cache_hits"] += len(keys) - len(todo)
        for start in range(0, len(todo), self.cfg.batch_size):
            idx = todo[start:start + self.cfg.batch_size]
            scores = self.backend.score_loss([prompts[i] for i in idx], [answers[i] for i in idx])
            for i, s in zip(idx, scores, strict=True):
                out[i] = s
                self.cache.put_loss(keys[i], s)
                self.usage["scored_tokens"] += s.answer_tokens
            self.cache.flush()
        return [s for s in out if s is not None]

    # -- typed tasks -----------------------------------------------------------------------------------
    def run_task(self, task: PromptTask, rows: list[dict[str, str]],
                 normalize: Callable[[Any], Any] | None = None,
                 sampling: SamplingConfig | None = None) -> list[StructuredResult]:
        """Ask `task` once per row of template values; parse, normalize and validate each answer."""
        sampling = sampling or task.sampling
        messages = [task.render(r) for r in rows]
        try:
            gens = self.chat(messages, sampling, task.cache_version, task.output_schema)
        except LLMError as e:
            self.usage["llm_errors"] += len(rows)
            return [StructuredResult(None, "", f"llm_error: {e}") for _ in rows]
        results = [self._parse(task, g.text, normalize) for g in gens]
        if task.output_schema is None:
            return results
        bad = [i for i, r in enumerate(results) if r.failure]
        if bad:
            schema = json.dumps(task.output_schema)
            asked = [m[:-1] if task.response_prefix else m for m in messages]  # without the prefix turn
            repairs = [[*asked[i], {"role": "assistant", "content": results[i].raw},
                        {"role": "user", "content": REPAIR.format(error=results[i].failure, schema=schema)},
                        *([{"role": "assistant", "content": task.response_prefix}] if task.response_prefix else [])]
                       for i in bad]
            self.usage["repair_requests"] += len(bad)
            try:
                fixed = self.chat(repairs, sampling, task.cache_version + ":repair", task.output_schema)
            except LLMError as e:
                fixed = [Generation(text="", prompt_tokens=0, completion_tokens=0, finish_reason=f"error {e}")
                         for _ in bad]
            for i, g in zip(bad, fixed, strict=True):
                second = self._parse(task, g.text, normalize)
                if second.failure is None:
                    second.repaired = True
                    self.usage["repaired"] += 1
                    results[i] = second
                else:
                    results[i].failure = f"invalid_output: {results[i].failure}; after repair: {second.failure}"
        self.usage["valid"] += sum(r.failure is None for r in results)
        self.usage["invalid"] += sum(r.failure is not None for r in results)
        return results

    def _parse(self, task: PromptTask, text: str, normalize: Callable[[Any], Any] | None) -> StructuredResult:
        raw = task.response_prefix + text
        if task.output_schema is None:
            return StructuredResult(raw.strip(), raw)
        try:
            value = extract_json(raw)
            if normalize is not None:
                value = normalize(value)
            jsonschema.validate(value, task.output_schema)
        except OutputInvalid as e:
            return StructuredResult(None, raw, str(e))
        except jsonschema.ValidationError as e:
            return StructuredResult(None, raw, f"schema: {e.message[:200]}")
        return StructuredResult(value, raw)

    def drain_counters(self, prefix: str = "llm.") -> dict[str, float]:
        """Token, cost and cache figures since the last call, for a batch's stats (additive across shards)."""
        out = {f"{prefix}{k}": float(v) for k, v in self.usage.items()}
        cost = (self.usage["prompt_tokens"] * self.cfg.cost_per_1k_prompt_tokens
                + self.usage["completion_tokens"] * self.cfg.cost_per_1k_completion_tokens) / 1000
        out[f"{prefix}cost_usd"] = round(cost, 6)
        self.usage.clear()
        return out
