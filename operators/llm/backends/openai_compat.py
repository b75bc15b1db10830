"""Backend for any OpenAI-compatible server (production: the vLLM server deployment of helm/iip).

Requests run concurrently on a thread pool (at most `max_concurrency` in flight) over one pooled `httpx`
client. Timeouts, connection failures, 429 and 5xx are retried with capped exponential backoff and full
jitter (honouring `Retry-After`), then raise `TransientLLMError`; other 4xx raise `LLMError` at once with
the server's message. The API key is read from the environment variable the config names, sent only as
a Bearer header, and scrubbed from every message this module produces.

Loss scoring lays the answer out as `operators.llm.scoring` says (the same span every backend scores).
It uses two vLLM extensions: `/tokenize` (the server's own chat template and tokenizer, so no local copy
of the model is needed) and `prompt_logprobs` on `/v1/completions`. Servers without them fall back to a
local tokenizer (the model folder, when it resolves here) and `echo` + `logprobs`, which OpenAI's legacy
completions API defines.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from operators.llm.base import (
    Backend,
    Generation,
    LLMConfig,
    LLMError,
    LossScore,
    Message,
    SamplingConfig,
    TransientLLMError,
)
from operators.llm.scoring import scoring_ids

log = logging.getLogger(__name__)

T = TypeVar("T")
# 408 is the server's own request timeout: retried like a client-side timeout.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_ERROR_CHARS = 500


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix: where the answer starts when the prompt's ids prefix the conversation's."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _NoTokenizeEndpoint(Exception):
    """The server has no vLLM-style /tokenize endpoint."""


class OpenAICompatBackend(Backend):
    """Chat and loss scoring against an OpenAI-compatible HTTP server, concurrently and with retries."""

    name = "openai"

    def __init__(self, cfg: LLMConfig) -> None:
        if not cfg.base_url:
            raise LLMError("the openai backend needs base_url (e.g. http://vllm:8000/v1)")
        self.cfg = cfg
        parts = urlsplit(cfg.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LLMError("base_url must be an http(s) URL")
        # Never keep credentials that may sit in the URL's user-info part: rebuild it from host and port.
        hostport = parts.hostname + (f":{parts.port}" if parts.port else "")
        self._host = hostport
        self._base = f"{parts.scheme}://{hostport}{parts.path.rstrip('/')}"
        # vLLM serves /tokenize at the root, next to /v1.
        root_path = parts.path.rstrip("/")
        root_path = root_path[: -len("/v1")] if root_path.endswith("/v1") else root_path
        self._root = f"{parts.scheme}://{hostport}{root_path}"
        self._key: str | None = None
        if cfg.api_key_env:
            self._key = os.environ.get(cfg.api_key_env) or None
            if self._key is None:
                raise LLMError(f"environment variable {cfg.api_key_env} (the API key) is not set")
        self.retry_base_s = cfg.retry_base_s
        self.retry_max_s = cfg.retry_max_s
        self._client = httpx.Client(
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.max_concurrency,
                                max_keepalive_connections=cfg.max_concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="llm-http")
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self._has_tokenize: bool | None = None
        self._prompt_logprobs: bool | None = None
        self.retries = 0  # transient failures retried so far (for stats and tests)
        self._retries_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAICompatBackend(model={self.cfg.model!r}, base_url={self._base!r})"

    @property
    def model_id(self) -> str:
        """Served model name at this host: the same name on another server may be other weights."""
        return f"{self.cfg.model}@{self._host}"

    # ---- HTTP with retries ----

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        """Full-jitter exponential backoff, or the server's Retry-After when it says (both capped)."""
        if retry_after:
            try:
                return min(self.retry_max_s, max(0.0, float(retry_after)))
            except ValueError:
                try:
                    wait = parsedate_to_datetime(retry_after).timestamp() - time.time()
                    return min(self.retry_max_s, max(0.0, wait))
                except (TypeError, ValueError):
                    pass
        return random.uniform(0, min(self.retry_max_s, self.retry_base_s * 2 ** attempt))

    def _post(self, url: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        """POST `body` as JSON; retry transient failures; return the decoded JSON object."""
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            try:
                resp = self._client.post(url, json=body, headers=self._headers())
            except httpx.TimeoutException as e:
                last = f"timed out after {self.cfg.timeout_s:g} s ({type(e).__name__})"
            except httpx.TransportError as e:
                last = f"connection failed ({type(e).__name__}: {self._scrub(str(e))[:MAX_ERROR_CHARS]})"
            else:
                if resp.status_code == 404 and url.endswith("/tokenize"):
                    raise _NoTokenizeEndpoint
                if resp.status_code < 400:
                    try:
                        data = resp.json()
                    except ValueError:
                        data = None
                    if isinstance(data, dict):
                        return data
                    last = f"HTTP {resp.status_code} with a body that is not a JSON object"
                else:
                    message = self._server_message(resp)
                    if resp.status_code not in RETRY_STATUS:
                        raise LLMError(f"{what}: HTTP {resp.status_code} from {self._host}: {message}")
                    last = f"HTTP {resp.status_code}: {message}"
                    retry_after = resp.headers.get("retry-after")
            if attempt < self.cfg.max_retries:
                delay = self._backoff(attempt, retry_after)
                with self._retries_lock:  # pool threads retry concurrently
                    self.retries += 1
                log.warning("%s: %s; retry %d/%d in %.2f s", what, last, attempt + 1, self.cfg.max_retries, delay)
                time.sleep(delay)
        raise TransientLLMError(f"{what}: gave up after {self.cfg.max_retries + 1} attempts: {last}")

    def _server_message(self, resp: httpx.Response) -> str:
        try:
            data = resp.json()
        except ValueError:
            text = resp.text
        else:
            err = data.get("error", data) if isinstance(data, dict) else data
            text = str(err.get("message", err)) if isinstance(err, dict) else str(err)
            if isinstance(data, dict) and "detail" in data and not isinstance(err, str):
                text = str(data["detail"])
        return self._scrub(text)[:MAX_ERROR_CHARS]

    def _map(self, fn: Callable[[int], T], n: int) -> list[T]:
        """Run fn(0..n-1) on the pool (bounded concurrency); results in order; first failure raised after all end."""
        futures = [self._pool.submit(fn, i) for i in range(n)]
        results: list[T] = []
        error: BaseException | None = None
        for i, fut in enumerate(futures):
            try:
                results.append(fut.result())
            except LLMError as e:
                if error is None:
                    error = type(e)(f"row {i}: {e}")
            except Exception as e:  # a malformed response: permanent for this row, never a crash of the batch
                if error is None:
                    error = LLMError(f"row {i}: {type(e).__name__}: {self._scrub(str(e))[:MAX_ERROR_CHARS]}")
        if error is not None:
            raise error
        return results

    # ---- generation ----

    def chat(self, requests: list[list[Message]], sampling: SamplingConfig,
             json_schema: dict[str, Any] | None = None) -> list[Generation]:
        """One /chat/completions request per conversation, at most `max_concurrency` in flight."""
        base: dict[str, Any] = {"model": self.cfg.model, "temperature": sampling.temperature, "top_p": sampling.top_p,
                                "max_tokens": sampling.max_tokens, "seed": sampling.seed, "n": 1}
        if sampling.stop:
            base["stop"] = list(sampling.stop)
        if json_schema is not None:
            base["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": json_schema, "strict": True}}

        def one(i: int) -> Generation:
            data = self._post(f"{self._base}/chat/completions", {**base, "messages": requests[i]}, "chat")
            try:
                choice = data["choices"][0]
                usage = data.get("usage") or {}
                return Generation(text=choice["message"].get("content") or "",
                                  prompt_tokens=int(usage.get("prompt_tokens", 0)),
                                  completion_tokens=int(usage.get("completion_tokens", 0)),
                                  finish_reason=choice.get("finish_reason") or "stop")
            except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
                raise LLMError(f"chat: unexpected response shape ({type(e).__name__}: {e})") from e

        return self._map(one, len(requests))

    # ---- loss scoring ----

    def _local_tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                from operators.llm.models import resolve_model

                self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.cfg.model))
            return self._tokenizer

    def _tokenize(self, body: dict[str, Any]) -> list[int]:
        data = self._post(f"{self._root}/tokenize", {"model": self.cfg.model, **body}, "tokenize")
        return [int(t) for t in data["tokens"]]

    def _span(self, prompt: Sequence[Message], answer: str) -> tuple[list[int], int]:
        """Token ids and scored start, by the server's tokenizer when it has /tokenize, else a local one."""
        if self._has_tokenize is not False:
            try:
                if not prompt:
                    ids = self._tokenize({"prompt": answer, "add_special_tokens": False})
                    self._has_tokenize = True
                    return ids, 1
                msgs = [dict(m) for m in prompt]
                head = self._tokenize({"messages": msgs, "add_generation_prompt": True})
                full = self._tokenize({"messages": [*msgs, {"role": "assistant", "content": answer}],
                                       "add_generation_prompt": False})
                self._has_tokenize = True
                return full, max(1, _common_prefix(head, full))
            except _NoTokenizeEndpoint:
                log.info("%s has no /tokenize; scoring with the local tokenizer of %s", self._host, self.cfg.model)
                self._has_tokenize = False
        return scoring_ids(self._local_tokenizer(), [dict(m) for m in prompt], answer)

    def _token_logprobs(self, ids: list[int], use_echo: bool = False) -> list[float | None]:
        """Log-probability of each token of `ids` given those before it (None for the first)."""
        body: dict[str, Any] = {"model": self.cfg.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
        if use_echo:
            body.update(echo=True, logprobs=0)
        else:
            body["prompt_logprobs"] = 0  # vLLM extension: each prompt token's own log-probability
        data = self._post(f"{self._base}/completions", body, "score")
        choice = data["choices"][0]
        plp = choice.get("prompt_logprobs")
        if not use_echo and plp is None:
            return self._token_logprobs(ids, use_echo=True)  # not vLLM: try OpenAI's echo
        if use_echo:
            echoed = (choice.get("logprobs") or {}).get("token_logprobs") or []
            if len(echoed) < len(ids):
                raise LLMError("score: the server returned no prompt log-probabilities (needs prompt_logprobs or echo)")
            return [None if v is None else float(v) for v in echoed[: len(ids)]]
        out: list[float | None] = []
        for i, entry in enumerate(plp[: len(ids)]):
            if entry is None:
                out.append(None)
                continue
            hit = entry.get(str(ids[i]))
            out.append(None if hit is None else float(hit["logprob"]))
        return out

    def score_loss(self, prompts: list[list[Message]], answers: list[str]) -> list[LossScore]:
        """Mean NLL of each answer given its prompt, from the server's prompt log-probabilities."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")

        def one(i: int) -> LossScore:
            ids, start = self._span(prompts[i], answers[i])
            # Score what fits, as the other backends do; one slot stays free for the generated token.
            ids = ids[: self.cfg.max_model_len - 1]
            if start >= len(ids):
                return LossScore(loss=math.nan, answer_tokens=0)
            scored = self._token_logprobs(ids)[start:]
            if any(v is None for v in scored):
                raise LLMError("score: the server left answer tokens without a log-probability")
            return LossScore(loss=-sum(v for v in scored if v is not None) / len(scored), answer_tokens=len(scored))

        return self._map(one, len(prompts))

    def close(self) -> None:
        """Wait for requests in flight, then close the connections."""
        self._pool.shutdown(wait=True)
        self._client.close()
