"""Arm B, the Python floor: a minimal Starlette + httpx-API byte relay in front of the mock model.

No auth, no database, no parsing: the request body goes upstream as it came, and the upstream
SSE bytes come back as they arrive (`aiter_raw`), one `send` per upstream read. It runs under
the same server as the sidecar (uvicorn with its defaults: uvloop + httptools) in its own process:

    RELAY_UPSTREAM=http://127.0.0.1:<mock port> python -m uvicorn bench.relay:app --port <p> \
        --log-level warning --timeout-keep-alive 300

The pool is unbounded (no queueing for a connection, upstream connections kept alive), so this
is the best case for a Python relay on this machine.

HTTP client (`RELAY_HTTP_CLIENT`): `aiohttp`, the default, is the openai SDK's own aiohttp transport
(`openai.DefaultAioHttpClient`: the httpx2 API over aiohttp, which parses HTTP in C), the transport
the sidecar calls the model through, so B and C differ only in what the sidecar adds. Rounds 1-4
of docs/benchmarks.md used `httpx2` (the same API over its pure-Python h11 parser), which costs about
twice as much per token and so made a weaker floor. `httpx` selects httpx 0.28, whose pool
(httpcore 1.x) scans every connection for every request: at 512 concurrent streams that scan took
83 % of the relay's CPU, which measures httpcore, not relaying.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

RELAY_HTTP_CLIENT = os.environ.get("RELAY_HTTP_CLIENT", "aiohttp")
if RELAY_HTTP_CLIENT == "httpx":
    import httpx
else:
    import httpx2 as httpx

UPSTREAM = os.environ.get("RELAY_UPSTREAM", "http://127.0.0.1:9999")
HTTP_CLIENT = f"{httpx.__name__} {httpx.__version__}"
if RELAY_HTTP_CLIENT == "aiohttp":
    import aiohttp
    import openai

    HTTP_CLIENT += f" + aiohttp {aiohttp.__version__} (openai {openai.__version__} DefaultAioHttpClient)"
_client = None


@asynccontextmanager
async def lifespan(app: Starlette):
    global _client
    if RELAY_HTTP_CLIENT == "aiohttp":
        # aiohttp reads max_connections=None as its own default of 100 connections: give it the
        # sidecar's bound instead, so that no stream queues for a connection.
        client_class, max_connections = openai.DefaultAioHttpClient, 10_000
    else:
        client_class, max_connections = httpx.AsyncClient, None
    _client = client_class(
        base_url=UPSTREAM,
        timeout=httpx.Timeout(120.0, connect=10.0),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=None, keepalive_expiry=300),
    )
    yield
    await _client.aclose()


async def relay(request: Request) -> StreamingResponse:
    body = await request.body()
    headers = {"content-type": "application/json"}
    if auth := request.headers.get("authorization"):
        headers["authorization"] = auth
    upstream = await _client.send(
        _client.build_request("POST", "/v1/chat/completions", content=body, headers=headers), stream=True
    )

    async def chunks():
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()

    return StreamingResponse(
        chunks(),
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type", "text/event-stream"),
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "http_client": HTTP_CLIENT})


app = Starlette(
    routes=[Route("/v1/chat/completions", relay, methods=["POST"]), Route("/healthz", healthz)],
    lifespan=lifespan,
)
