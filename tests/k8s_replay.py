"""A loopback HTTP server that answers a scripted Kubernetes API conversation, in order.

No real Kubernetes API server can be had on this machine (see tests/test_job_launcher.py), so tests that drive
the `kubernetes` client (the cncf-kubernetes provider's hooks and operators, our job launcher) point it at this
server instead. Each exchange is the request the client must send (method, path, query) and the response a
Kubernetes API server gives, in its wire format. A request out of script order fails the test: the server answers
599 and records it in `errors`.

Beyond plain JSON answers, a script entry may
- name objects created earlier: `{key}` in a path or query value is filled from `Replay.names` when the request
  arrives (pod names with a random suffix are only known once the client has sent them);
- answer with a callable of the request (e.g. echo a POSTed object with a status);
- answer an exec (`connect_get_namespaced_pod_exec`) with `Exec`: the WebSocket upgrade and the
  `v4.channel.k8s.io` frames a kubelet's exec stream sends through the API server (stdout, then the exit status).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EXEC_PROTOCOL = "v4.channel.k8s.io"


@dataclass(frozen=True)
class Exec:
    """An exec stream's answer: `stdout` on channel 1, then success on the status channel 3, then a close.
    With `stdin`, the server first reads one frame the client writes (recorded in the request's `stdin`)."""

    stdout: str = ""
    stdin: bool = False


class Replay:
    """A loopback HTTP server answering a scripted Kubernetes API conversation, in order."""

    def __init__(self) -> None:
        self.script: list[tuple[str, str, dict[str, str], int, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.names: dict[str, str] = {}
        self.lock = threading.Lock()
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw.strip() else None
                query = dict(parse_qsl(url.query))
                request = {"method": self.command, "path": url.path, "query": query, "body": body}
                with replay.lock:
                    replay.received.append(request)
                    want = replay.script.pop(0) if replay.script else None
                    path = want[1].format(**replay.names) if want is not None else ""
                if want is None or (want[0], path) != (self.command, url.path) or \
                        any(query.get(k) != v.format(**replay.names) for k, v in want[2].items()):
                    replay.errors.append(f"unexpected {self.command} {self.path}; script wanted {want}")
                    status, payload = 599, {"kind": "Status", "message": "out of script"}
                else:
                    status, payload = want[3], want[4]
                    if callable(payload):
                        payload = payload(request)
                if isinstance(payload, Exec):
                    self._exec(payload, request)
                    return
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _exec(self, answer: Exec, request: dict[str, Any]) -> None:
                key = self.headers.get("Sec-WebSocket-Key", "")
                accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
                self.send_response(101, "Switching Protocols")
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.send_header("Sec-WebSocket-Protocol", EXEC_PROTOCOL)
                self.end_headers()
                self.wfile.flush()
                if answer.stdin:
                    request["stdin"] = _read_frame(self.connection)[1:].decode()
                if answer.stdout:
                    _send_frame(self.connection, 0x2, b"\x01" + answer.stdout.encode())
                _send_frame(self.connection, 0x2, b"\x03" + json.dumps({"metadata": {}, "status": "Success"}).encode())
                _send_frame(self.connection, 0x8, struct.pack("!H", 1000))
                self.close_connection = True

            do_GET = do_POST = do_DELETE = do_PATCH = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def expect(self, method: str, path: str, status: int, body: Any | Callable[[dict[str, Any]], Any],
               **query: str) -> None:
        self.script.append((method, path, query, status, body))

    def kubeconfig(self, path: Path, namespace: str) -> str:
        """Write a kubeconfig pointing at this server to `path`; return the Airflow connection (JSON) naming it,
        for `AIRFLOW_CONN_KUBERNETES_DEFAULT`."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "replay",
            "clusters": [{"name": "replay", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "u", "user": {"token": "replay-token"}}],
            "contexts": [{"name": "replay", "context": {"cluster": "replay", "user": "u", "namespace": namespace}}]}))
        return json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": str(path)}})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away (a killed worker): fine
            super().handle_error(request, client_address)


def _send_frame(sock: socket.socket, opcode: int, payload: bytes) -> None:
    """One unmasked, final WebSocket frame (server to client)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    sock.sendall(header + payload)


def _read_frame(sock: socket.socket) -> bytes:
    """The payload of one (masked) WebSocket frame from the client."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("client closed the exec stream")
            data += chunk
        return data

    _, second = exactly(2)
    n = second & 0x7F
    if n == 126:
        n = struct.unpack("!H", exactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", exactly(8))[0]
    mask = exactly(4) if second & 0x80 else b"\0\0\0\0"
    return bytes(b ^ mask[i % 4] for i, b in enumerate(exactly(n)))
