"""A fault-injecting HTTP proxy on loopback, in front of an S3 API server (moto in the tests).

Every request is forwarded to the upstream endpoint unless a rule of the seeded schedule fires on it; then
the client gets, instead of the clean response:

- `500`: a 500 InternalError, the request never reaches the server;
- `500-after`: the request is applied by the server, then the client gets a 500 (a PUT that "failed" but
  landed: the case an idempotent retry must handle);
- `503`: a 503 SlowDown, the request never reaches the server;
- `reset`: the request is applied, the response headers and half the body are sent, then the socket is
  reset (RST); an empty-bodied response (PUT, HEAD, DELETE) is reset before its first byte;
- `truncate`: the request is applied, the headers (with the original Content-Length) and half the body are
  sent, then the connection is closed cleanly (FIN): the client sees a short read, not an error status;
- `slow`: the response is delayed by `delay` seconds before its headers and trickled in pieces with pauses
  (a `delay` longer than a client's timeouts is a stall the client must give up on).

Rules match request kinds (GET, PUT, HEAD, LIST, MULTIPART, DELETE, POST), optionally a path, and fire
with a probability (seeded) or on every n-th matching request, up to an optional limit. The proxy counts
what it injected, per fault and kind, and logs every request with the client that sent it (`User-Agent`:
boto3, or the AWS C++ SDK that pyarrow uses) and the SDK's `amz-sdk-request: attempt=N; max=M` header: a
retry shows as an attempt > 1, and its layer by the client that sent it. It also counts the requests the
upstream server holds at once (`max_in_flight`), exactly, where sampling a server's gauge can miss a
short batch. Standard library only.
"""

from __future__ import annotations

import http.client
import io
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

KINDS = ("GET", "PUT", "HEAD", "LIST", "MULTIPART", "DELETE", "POST")
FAULTS = ("500", "500-after", "503", "reset", "truncate", "slow")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ATTEMPT = re.compile(r"attempt=(\d+)(?:;\s*max=(\d+))?")


@dataclass
class Rule:
    """Inject `fault` on requests of the given `kinds`: with probability `p`, or on every `every`-th match."""

    fault: str
    kinds: frozenset[str] = frozenset(KINDS)
    p: float = 0.0
    every: int = 0
    limit: int | None = None  # at most this many injections by this rule
    delay: float = 0.5  # `slow` only: seconds before the headers (and spread over the body)
    path: str = ""  # only requests whose path contains this (e.g. "/raw/": the input files)
    matched: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {FAULTS}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown request kinds {sorted(unknown)}; of {KINDS}")


@dataclass
class Logged:
    """One request as the proxy saw it."""

    kind: str
    method: str
    path: str
    client: str  # "boto3", "pyarrow" (the AWS C++ SDK) or "other"
    attempt: int  # the SDK's own attempt number (1 for a first try)
    max_attempts: int | None
    fault: str | None


@dataclass
class Schedule:
    """The seeded fault schedule: the first rule that fires on a request decides its fault."""

    rules: list[Rule] = field(default_factory=list)
    seed: int = 0
    enabled: bool = True

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def decide(self, kind: str, path: str = "") -> Rule | None:
        """The rule that fires on a request of `kind` for `path`, or None (thread-safe; deterministic for a seed
        and an order of requests)."""
        with self._lock:
            if not self.enabled:
                return None
            for r in self.rules:
                if kind not in r.kinds or r.path not in path or (r.limit is not None and r.fired >= r.limit):
                    continue
                r.matched += 1
                hit = (r.every > 0 and r.matched % r.every == 0) or (r.p > 0 and self._rng.random() < r.p)
                if hit:
                    r.fired += 1
                    return r
            return None


def request_kind(method: str, target: str) -> str:
    """Classify an S3 request: LIST (a bucket GET), MULTIPART (an upload's create, part or complete), ..."""
    parts = urlsplit(target)
    q = parse_qs(parts.query, keep_blank_values=True)
    key = parts.path.lstrip("/").partition("/")[2]
    if "uploads" in q or "uploadId" in q or "partNumber" in q:
        return "MULTIPART"
    if method == "GET":
        return "LIST" if not key or "list-type" in q or "prefix" in q or "delimiter" in q else "GET"
    if method in ("PUT", "HEAD", "DELETE", "POST"):
        return "DELETE" if method == "POST" and "delete" in q else method
    return "GET"


def _client(user_agent: str) -> str:
    ua = user_agent.lower()
    if "aws-sdk-cpp" in ua:
        return "pyarrow"
    if "boto3" in ua or "botocore" in ua:
        return "boto3"
    return "other"


def _read_chunked(rfile: io.BufferedIOBase) -> bytes:
    """The raw bytes of a chunked request body, trailers included (forwarded verbatim: S3's aws-chunked
    uploads carry signatures and checksums in them)."""
    raw = bytearray()
    while True:
        line = rfile.readline()
        raw += line
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the empty line
                t = rfile.readline()
                raw += t
                if t in (b"\r\n", b"\n", b""):
                    return bytes(raw)
        raw += rfile.read(size + 2)


class FaultProxy:
    """The proxy server: `with FaultProxy(upstream, schedule) as p:` then point clients at `p.endpoint`."""

    def __init__(self, upstream: str, schedule: Schedule | None = None) -> None:
        up = urlsplit(upstream)
        self.upstream_host = up.hostname or "127.0.0.1"
        self.upstream_port = up.port or 80
        self.schedule = schedule or Schedule()
        self.injected: Counter[tuple[str, str]] = Counter()  # (fault, kind) -> count
        self.log: list[Logged] = []
        self.in_flight = 0  # requests forwarded upstream and not yet answered
        self.max_in_flight = 0  # the most the upstream server held at once, as counted at its door
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True  # a stalled response must not hold up shutdown
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        """The proxy's URL (what S3_ENDPOINT_URL should be)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving (stalled handler threads are daemons and die with the process)."""
        self._server.shutdown()
        self._server.server_close()

    def total_injected(self) -> int:
        with self._lock:
            return sum(self.injected.values())

    def retries(self) -> Counter[str]:
        """Requests that an SDK sent as a retry (attempt > 1), per client."""
        with self._lock:
            return Counter(r.client for r in self.log if r.attempt > 1)

    def max_attempts_seen(self) -> dict[str, int]:
        """Per client, the largest `max=` an SDK announced in its attempt header (its retry budget)."""
        out: dict[str, int] = {}
        with self._lock:
            for r in self.log:
                if r.max_attempts is not None:
                    out[r.client] = max(out.get(r.client, 0), r.max_attempts)
        return out

    def reset_counts(self) -> None:
        with self._lock:
            self.injected.clear()
            self.log.clear()

    def _record(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)
            if entry.fault:
                self.injected[(entry.fault, entry.kind)] += 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs expect

            def log_message(self, format: str, *args: object) -> None:
                pass  # the request log is `proxy.log`

            def _any(self) -> None:
                body = self._request_body()
                kind = request_kind(self.command, self.path)
                m = _ATTEMPT.search(self.headers.get("amz-sdk-request", ""))
                rule = proxy.schedule.decide(kind, self.path)
                proxy._record(Logged(kind, self.command, self.path, _client(self.headers.get("User-Agent", "")),
                                     int(m.group(1)) if m else 1, int(m.group(2)) if m and m.group(2) else None,
                                     rule.fault if rule else None))
                fault = rule.fault if rule else None
                if fault in ("500", "503"):
                    self._error(500 if fault == "500" else 503)
                    return
                status, reason, headers, payload = self._forward(body)
                if fault == "500-after":
                    self._error(500)
                    return
                head = self._head(status, reason, headers, payload)
                if fault == "reset":
                    if payload and self.command != "HEAD":
                        self._send(head + payload[: len(payload) // 2])
                    self._reset()
                elif fault == "truncate":
                    if payload and self.command != "HEAD":
                        self._send(head + payload[: len(payload) // 2])
                    else:
                        self._send(head[: len(head) // 2])
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif fault == "slow":
                    assert rule is not None
                    time.sleep(rule.delay)
                    self._send(head)
                    pieces = 4 if len(payload) >= 4 and self.command != "HEAD" else 1
                    step = -(-len(payload) // pieces) if payload else 0
                    for i in range(pieces):
                        if self.command != "HEAD" and payload:
                            self._send(payload[i * step:(i + 1) * step])
                        if i < pieces - 1:
                            time.sleep(rule.delay / pieces)
                else:
                    self._send(head + (b"" if self.command == "HEAD" else payload))

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _any

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass  # the socket was reset or shut down on purpose

            def _request_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    return _read_chunked(self.rfile)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in ("connection", "keep-alive", "proxy-connection"):
                            conn.putheader(k, v)
                    conn.endheaders()
                    if body:
                        conn.send(body)
                    resp = conn.getresponse()
                    payload = resp.read()
                    return resp.status, resp.reason, resp.getheaders(), payload
                finally:
                    conn.close()
                    with proxy._lock:
                        proxy.in_flight -= 1

            def _head(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes) -> bytes:
                lines = [f"HTTP/1.1 {status} {reason}"]
                length = None
                for k, v in headers:
                    if k.lower() in _HOP_BY_HOP:
                        continue
                    if k.lower() == "content-length":
                        length = v
                        continue
                    lines.append(f"{k}: {v}")
                # A HEAD keeps the object's length; a body that came chunked is re-framed by its length.
                lines.append(f"Content-Length: {length if self.command == 'HEAD' and length else len(payload)}")
                return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

            def _error(self, status: int) -> None:
                code, msg = ("InternalError", "We encountered an internal error. Please try again.") \
                    if status == 500 else ("SlowDown", "Please reduce your request rate.")
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>{msg}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
                reason = "Internal Server Error" if status == 500 else "Slow Down"
                head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                        f"Content-Length: {len(xml)}\r\n\r\n").encode()
                self._send(head + (b"" if self.command == "HEAD" else xml))

            def _send(self, data: bytes) -> None:
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except OSError:
                    self.close_connection = True

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout makes close() send RST instead of FIN: a connection reset.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

        return Handler
