"""An HTTP proxy that makes a local S3 server answer like a distant one, and counts what it forwards.

Every request (method, path and query, headers, body) is forwarded to the upstream server after a
fixed delay, as a round trip to real object storage would take; the response comes back with its
status, headers and body. Standard library only (``http.server`` and ``http.client``), one thread
per client connection, one kept-alive upstream connection per thread. The counts (requests by
kind, response body bytes) are the benchmark's own, independent of what a client reports.

    python bench/latency_proxy.py --upstream http://127.0.0.1:5000 --latency-ms 20
"""

from __future__ import annotations

import argparse
import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# headers of one hop, not of the message (RFC 9110 §7.6.1): never forwarded
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade"})


def request_kind(method: str, target: str, headers) -> str:
    """``list`` (a ListObjects page), ``ranged-get``, ``get``, ``head`` or the method's name."""
    query = parse_qs(urlsplit(target).query, keep_blank_values=True)
    path = urlsplit(target).path.strip("/")
    if method == "GET" and "/" not in path:   # the bucket itself: a listing or its settings
        return "list" if "list-type" in query or "prefix" in query or not query else "bucket"
    if method == "GET":
        return "ranged-get" if headers.get("Range") else "get"
    return method.lower()


@dataclass
class Traffic:
    """What the proxy forwarded since the last ``take``: requests and response body bytes, by kind."""

    requests: dict[str, int] = field(default_factory=dict)
    response_bytes: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1
            self.response_bytes[kind] = self.response_bytes.get(kind, 0) + nbytes

    def take(self) -> dict:
        """The counts so far, which start again from zero."""
        with self._lock:
            out = {"requests": sum(self.requests.values()), "by_kind": dict(self.requests),
                   "response_bytes": sum(self.response_bytes.values()),
                   "bytes_by_kind": dict(self.response_bytes)}
            self.requests, self.response_bytes = {}, {}
        return out


class LatencyProxy(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, upstream: str, latency_s: float, port: int = 0):
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port or 80)
        self.latency_s = latency_s
        self.traffic = Traffic()
        super().__init__(("127.0.0.1", port), _Forward)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> LatencyProxy:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as S3 clients expect
    disable_nagle_algorithm = True   # headers and body leave in two writes: no 40 ms delayed ACK
    server: LatencyProxy

    def log_message(self, format, *args) -> None:   # noqa: A002 - the base class's name
        pass

    def _upstream(self) -> http.client.HTTPConnection:
        if not hasattr(self, "_conn"):
            self._conn = http.client.HTTPConnection(*self.server.upstream, timeout=120)
        return self._conn

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass   # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _forward(self) -> None:
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        time.sleep(self.server.latency_s)
        try:
            conn = self._upstream()
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            self.send_error(502, f"upstream: {exc}")
            return
        self.server.traffic.add(request_kind(self.command, self.path, self.headers), len(data))
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() in HOP_BY_HOP or (k.lower() == "content-length" and self.command != "HEAD"):
                continue
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    proxy = LatencyProxy(args.upstream, args.latency_ms / 1000, args.port)
    print(proxy.endpoint, flush=True)
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        proxy.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
