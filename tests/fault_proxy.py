"""A loopback HTTP proxy in front of the S3-compatible test server that injects faults on chosen requests:
503/500 answers, connection resets mid-body, truncated bodies (correct Content-Length, fewer bytes),
latency, and outages (every request refused for a while)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class Fault:
    kind: str
    """503, 500, reset, truncate, latency"""
    method: str | None = None
    path: str | None = None
    """Regex matched against the request path (bucket/key)."""
    times: int = 1
    """How many matching requests get the fault."""
    delay_s: float = 2.0
    hits: int = 0


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    outage_until: float = 0.0
    injected: dict[str, int] = field(default_factory=dict)
    url: str = ""

    def start(self) -> FaultProxy:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve():
            asyncio.set_event_loop(self._loop)
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            port = site._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
            self._session = aiohttp.ClientSession(loop=self._loop, auto_decompress=False)
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        async def close():
            await self._session.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def outage(self, seconds: float) -> None:
        self.outage_until = time.time() + seconds

    def _pick(self, request: web.Request) -> Fault | None:
        for fault in self.faults:
            if fault.hits >= fault.times:
                continue
            if fault.method and fault.method != request.method:
                continue
            if fault.path and not re.search(fault.path, request.path):
                continue
            fault.hits += 1
            self.injected[fault.kind] = self.injected.get(fault.kind, 0) + 1
            return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if time.time() < self.outage_until:
            self.injected["outage"] = self.injected.get("outage", 0) + 1
            request.transport.close()
            return web.Response(status=503)
        fault = self._pick(request)
        if fault is not None and fault.kind in ("503", "500"):
            code = "SlowDown" if fault.kind == "503" else "InternalError"
            body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
            return web.Response(status=int(fault.kind), text=body, content_type="application/xml")
        if fault is not None and fault.kind == "latency":
            await asyncio.sleep(fault.delay_s)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body, allow_redirects=False) as upstream:
            payload = await upstream.read()
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if fault is not None and fault.kind in ("reset", "truncate") and len(payload) > 1:
                response = web.StreamResponse(status=upstream.status, headers=out_headers)
                response.content_length = len(payload)
                await response.prepare(request)
                await response.write(payload[: len(payload) // 2])
                if fault.kind == "reset":
                    request.transport.abort()
                else:
                    request.transport.close()
                return response
            if request.method == "HEAD":  # no body, but the object's length must reach the client
                response = web.StreamResponse(status=upstream.status, headers=out_headers)
                if "Content-Length" in upstream.headers:
                    response.content_length = int(upstream.headers["Content-Length"])
                await response.prepare(request)
                return response
            return web.Response(status=upstream.status, headers=out_headers, body=payload)
