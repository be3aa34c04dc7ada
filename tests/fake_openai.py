"""A local, stdlib-only, OpenAI-compatible Chat Completions server for tests and benchmarks.

It speaks the genuine OpenAI wire format (SSE over chunked HTTP/1.1, keep-alive), so the
real ``openai`` SDK works against it unmodified::

    with FakeOpenAI() as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="test")

Behaviour is chosen per request: if the last ``user`` message starts with ``#fake {json}``
(see :func:`scenario`) that JSON object is the scenario; otherwise the server profile applies.

Scenario keys (all optional): ``reply``, ``chunk_chars``, ``chunks``, ``first_delay_ms``,
``delay_ms``, ``jitter``, ``status``, ``error_message``, ``drop_after``, ``hang``,
``finish_reason``, ``usage`` (false: no usage chunk; an object: that usage, as given), ``end_delay_ms`` (the chunked body's end follows ``[DONE]`` after
this delay), ``chunks_hex`` (each delta's content as raw bytes, given in hex and written into the
JSON string as they are: a server that splits a character's UTF-8 bytes between deltas). A directive with neither ``reply`` nor ``chunks`` replies
with a short fixed text (or nothing at all when ``hang`` is set).

CLI: ``python -m tests.fake_openai --host 127.0.0.1 --port 0 --profile default [--api-key K]``
prints ``READY <port>`` once listening and runs until SIGTERM/SIGINT.

This module must not import Django.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

__all__ = ["FakeOpenAI", "RequestRecord", "scenario", "PROFILES", "main"]

DIRECTIVE_PREFIX = "#fake "
DEFAULT_DIRECTIVE_REPLY = "Hello from the fake OpenAI server."
_WORD_RE = re.compile(r"\S+\s*|\s+")
_MAX_HEADER_BYTES = 64 * 1024
_MAX_BODY_BYTES = 32 * 1024 * 1024
_WRITE_HIGH_WATER = 64 * 1024

_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
    422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}
# status -> (error type, error code)
_ERROR_KINDS = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}

_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat"
).split()

# Server-level default scenarios. ``echo`` means "reply 'You said: <content>'".
PROFILES: dict[str, dict[str, Any]] = {
    "default": {"echo": True},
    # 64 deltas of exactly 16 ASCII bytes each ("w000 lorem ipsu "), 20 ms apart.
    "bench-64x16": {"chunks": [f"w{i:03d} lorem ipsu " for i in range(64)], "delay_ms": 20},
    "realistic": {
        "chunks": [_LOREM[i % len(_LOREM)] + " " for i in range(300)],
        "first_delay_ms": 300,
        "delay_ms": 25,
        "jitter": 0.3,
    },
    "instant": {"chunks": [f"w{i:03d} lorem ipsu " for i in range(64)]},
    # One delta at once: what a stream costs apart from its tokens (auth, rows, connections).
    "instant-1": {"chunks": ["w000 lorem ipsu "]},
    # bench-64x16 ten times as long: what a paced token costs, with each reply's own cost spread
    # over 640 tokens.
    "bench-640x16": {"chunks": [f"w{i:03d} lorem ipsu " for i in range(640)], "delay_ms": 20},
    "silent": {"chunks": [], "hang": True},
}


def scenario(**keys: Any) -> str:
    """Build the user-message text that selects a scenario, e.g. ``scenario(reply="hi", delay_ms=5)``."""
    return DIRECTIVE_PREFIX + json.dumps(keys, separators=(",", ":"))


# --------------------------------------------------------------------------- records


@dataclass(eq=False)
class RequestRecord:
    body: Any
    headers: dict[str, str]
    started_at: float
    first_byte_at: float | None = None
    finished_at: float | None = None
    client_closed_at: float | None = None
    deltas_sent: int = 0
    outcome: str | None = None  # "completed" | "client_closed" | "dropped" | "error_status"
    status: int | None = None
    conn_id: int = 0  # server-side connection number (same value => same keep-alive connection)
    path: str = ""

    def __post_init__(self) -> None:
        self._done = threading.Event()  # not a dataclass field, so dataclasses.asdict() works

    def wait_finished(self, timeout: float | None = 5.0) -> bool:
        """Block until the server finished handling this request (any outcome)."""
        return self._done.wait(timeout)

    def wait_closed(self, timeout: float | None = 5.0) -> bool:
        """Block until the request finished; True if the client closed it before completion."""
        self._done.wait(timeout)
        return self.client_closed_at is not None

    @property
    def finished(self) -> bool:
        return self._done.is_set()


class _HTTPError(Exception):
    pass


class _Conn:
    __slots__ = ("reader", "writer", "buf", "conn_id", "task", "client_closed", "response_complete",
                 "record", "eof")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_id: int):
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.conn_id = conn_id
        self.task: asyncio.Task | None = None
        self.client_closed = False
        self.response_complete = False
        self.record: RequestRecord | None = None
        self.eof = False

    async def fill(self) -> bool:
        if self.eof:
            return False
        data = await self.reader.read(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def read_head(self) -> bytes | None:
        start = 0
        while True:
            idx = self.buf.find(b"\r\n\r\n", start)
            if idx >= 0:
                head = bytes(self.buf[:idx])
                del self.buf[: idx + 4]
                return head
            if len(self.buf) > _MAX_HEADER_BYTES:
                raise _HTTPError("headers too large")
            start = max(0, len(self.buf) - 3)
            if not await self.fill():
                if self.buf.strip():
                    raise _HTTPError("incomplete request")
                return None

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self.fill():
                raise _HTTPError("incomplete body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_line(self) -> bytes:
        while True:
            idx = self.buf.find(b"\r\n")
            if idx >= 0:
                line = bytes(self.buf[:idx])
                del self.buf[: idx + 2]
                return line
            if len(self.buf) > _MAX_HEADER_BYTES or not await self.fill():
                raise _HTTPError("bad chunked body")

    async def read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int((await self.read_line()).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await self.read_line():  # trailers
                    pass
                return bytes(out)
            out += await self.read_exact(size)
            await self.read_line()
            if len(out) > _MAX_BODY_BYTES:
                raise _HTTPError("body too large")


# --------------------------------------------------------------------------- helpers


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


# What a JSON string cannot hold as it is: the quote, the backslash and the control characters.
_JSON_ESCAPES = re.compile(rb'["\\\x00-\x1f]')


def _event(obj_json: bytes) -> bytes:
    return _chunk(b"data: " + obj_json + b"\n\n")


_DONE_EVENT = _chunk(b"data: [DONE]\n\n")
_LAST_CHUNK = b"0\r\n\r\n"
_DONE = _DONE_EVENT + _LAST_CHUNK


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return ""


def _count_prompt_tokens(messages: Iterable[Any]) -> int:
    total = 0
    for m in messages:
        if isinstance(m, dict):
            total += len(_text_of(m.get("content")).split())
    return total


def _split_reply(text: str, chunk_chars: int | None) -> list[str]:
    if chunk_chars:
        n = int(chunk_chars)
        return [text[i : i + n] for i in range(0, len(text), n)]
    return _WORD_RE.findall(text)


def _error_body(status: int, message: str, code: str | None = None, etype: str | None = None) -> bytes:
    dtype, dcode = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return _dumps({"error": {"message": message, "type": etype or dtype, "param": None, "code": code or dcode}})


# --------------------------------------------------------------------------- server


class FakeOpenAI:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        profile: str = "default",
        api_key: str | None = None,
        models: Iterable[str] = ("gpt-4o-mini", "c3-fake"),
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
        self.host = host
        self.port = port
        self.profile = profile
        self.api_key = api_key
        self.models = tuple(models)
        self.requests: list[RequestRecord] = []
        self._cond = threading.Condition()
        self._rng = random.Random()
        self._conn_ids = itertools.count(1)
        self._conns: set[_Conn] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._auth_expected = f"Bearer {api_key}" if api_key else None
        self._models_body = _dumps(
            {"object": "list",
             "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake-openai"}
                      for m in self.models]}
        )
        self._profile_scenario = PROFILES[profile]
        # Pre-encoded JSON for the profile's fixed deltas.
        self._delta_json_cache: dict[str, bytes] = {}

    # ----------------------------------------------------------------- public API

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "FakeOpenAI":
        """Run the server on its own event loop in a daemon thread; return once listening."""
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # pragma: no cover - bind failures
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_until_complete(self._stopping.wait())
                loop.run_until_complete(self._shutdown())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-openai-{self.profile}", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:
                pass
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def serve_forever(self, ready: Callable[[int], None] | None = None) -> None:
        """Serve inside the running loop until cancelled. ``ready(port)`` is called once listening."""
        if self._server is None:
            await self._listen()
        if ready is not None:
            ready(self.port)
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RequestRecord]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {n} requests, got {len(self.requests)}")
                self._cond.wait(remaining)
            return list(self.requests)

    def clear(self) -> None:
        with self._cond:
            del self.requests[:]

    # ----------------------------------------------------------------- internals

    async def _listen(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, backlog=4096, limit=_MAX_HEADER_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        conns = list(self._conns)
        for c in conns:
            c.writer.transport.abort()
            if c.task is not None and not c.task.done():
                c.task.cancel()
        tasks = [c.task for c in conns if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), 2)
            except (asyncio.TimeoutError, Exception):
                pass

    def _add_record(self, rec: RequestRecord) -> None:
        with self._cond:
            self.requests.append(rec)
            self._cond.notify_all()

    @staticmethod
    def _finish(rec: RequestRecord, outcome: str) -> None:
        if rec.outcome not in ("client_closed", "dropped"):
            rec.outcome = outcome
        rec.finished_at = time.monotonic()
        rec._done.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer, next(self._conn_ids))
        conn.task = asyncio.current_task()
        self._conns.add(conn)
        try:
            while True:
                keep_alive = await self._serve_one(conn)
                if not keep_alive:
                    break
        except asyncio.CancelledError:
            # Client closed mid-response (watcher) or server shutdown. Not re-raised: asyncio's
            # StreamReaderProtocol would log a cancelled client_connected_cb task as an error.
            pass
        except (_HTTPError, ValueError):
            try:
                self._write_simple(conn, 400, _error_body(400, "Malformed HTTP request"), keep_alive=False)
            except Exception:
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(conn)
            rec = conn.record
            if rec is not None and not rec._done.is_set():
                if conn.client_closed:
                    self._finish(rec, "client_closed")
                else:
                    self._finish(rec, rec.outcome or "client_closed")
            if not writer.transport.is_closing():
                writer.close()

    async def _serve_one(self, conn: _Conn) -> bool:
        head = await conn.read_head()
        if head is None:
            return False
        started = time.monotonic()
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            raise _HTTPError("bad request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        conn_hdr = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            keep_alive = "keep-alive" in conn_hdr
        else:
            keep_alive = "close" not in conn_hdr

        if "chunked" in headers.get("transfer-encoding", "").lower():
            raw = await conn.read_chunked()
        else:
            length = int(headers.get("content-length", "0") or 0)
            if length > _MAX_BODY_BYTES:
                raise _HTTPError("body too large")
            raw = await conn.read_exact(length) if length else b""

        path = target.split("?", 1)[0]
        if path.startswith("http://") or path.startswith("https://"):
            path = "/" + path.split("/", 3)[-1]
        path = path.rstrip("/") or "/"

        is_chat = path in ("/v1/chat/completions", "/chat/completions")
        body: Any = None
        rec: RequestRecord | None = None
        if is_chat and method == "POST":
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            rec = RequestRecord(body=body, headers=headers, started_at=started,
                                conn_id=conn.conn_id, path=path)
            conn.record = rec
            conn.response_complete = False
            self._add_record(rec)

        if self._auth_expected is not None and headers.get("authorization") != self._auth_expected:
            return self._error(conn, rec, 401, "Incorrect API key provided.", keep_alive, code="invalid_api_key")

        if rec is not None:
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                return self._error(conn, rec, 400, "Invalid request body: 'messages' is required.", keep_alive,
                                   code="invalid_request_body")
            return await self._chat(conn, rec, body, keep_alive)
        if path in ("/v1/models", "/models") and method == "GET":
            self._write_simple(conn, 200, self._models_body, keep_alive)
            return keep_alive
        if path.startswith("/v1/models/") and method == "GET":
            mid = path[len("/v1/models/"):]
            if mid in self.models:
                self._write_simple(conn, 200, _dumps({"id": mid, "object": "model", "created": 1700000000,
                                                      "owned_by": "fake-openai"}), keep_alive)
                return keep_alive
            return self._error(conn, None, 404, f"The model '{mid}' does not exist", keep_alive,
                               code="model_not_found")
        return self._error(conn, None, 404, f"Invalid URL ({method} {target})", keep_alive, code="unknown_url")

    # ----------------------------------------------------------------- responses

    def _write_simple(self, conn: _Conn, status: int, body: bytes, keep_alive: bool,
                      extra: str = "") -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"x-request-id: req_{secrets.token_hex(8)}\r\n{extra}"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        ).encode("latin-1")
        conn.writer.write(head + body)

    def _error(self, conn: _Conn, rec: RequestRecord | None, status: int, message: str, keep_alive: bool,
               code: str | None = None) -> bool:
        extra = "retry-after: 1\r\n" if status == 429 else ""
        if rec is not None:
            rec.status = status
            rec.first_byte_at = time.monotonic()
        self._write_simple(conn, status, _error_body(status, message, code), keep_alive, extra)
        if rec is not None:
            conn.response_complete = True
            self._finish(rec, "error_status")
        return keep_alive

    def _resolve_scenario(self, body: dict) -> dict[str, Any]:
        messages = body["messages"]
        last_user = ""
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                last_user = _text_of(m.get("content"))
                break
        if last_user.startswith(DIRECTIVE_PREFIX):
            first_line = last_user[len(DIRECTIVE_PREFIX):].split("\n", 1)[0]
            try:
                sc = json.loads(first_line)
            except ValueError:
                sc = None
            if not isinstance(sc, dict):
                raise ValueError("the '#fake' directive must be followed by a JSON object on the first line")
            sc = dict(sc)
            if "chunks" not in sc and "reply" not in sc:
                sc["chunks"] = [] if sc.get("hang") else _split_reply(DEFAULT_DIRECTIVE_REPLY, sc.get("chunk_chars"))
            return sc
        sc = self._profile_scenario
        if sc.get("echo"):
            return {"reply": f"You said: {last_user}"}
        return sc

    def _deltas(self, sc: dict[str, Any]) -> list[Any]:
        if "contents" in sc:  # each delta's `content` as given, any JSON value: a malformed server
            return list(sc["contents"])
        if "chunks_hex" in sc:
            return [bytes.fromhex(c) for c in sc["chunks_hex"]]
        chunks = sc.get("chunks")
        if chunks is not None:
            return [str(c) for c in chunks]
        return _split_reply(str(sc.get("reply", "")), sc.get("chunk_chars"))

    def _delta_json(self, text: Any) -> bytes:
        if isinstance(text, bytes):  # raw bytes in a JSON string; only what JSON must escape is escaped
            return b'"' + _JSON_ESCAPES.sub(lambda m: b"\\u%04x" % m[0][0], text) + b'"'
        if not isinstance(text, str):
            return _dumps(text)
        cached = self._delta_json_cache.get(text)
        if cached is None:
            try:
                cached = _dumps(text)
            except UnicodeEncodeError:
                # A lone surrogate has no UTF-8 form: escape it, as JavaScript's JSON.stringify does
                # (a server that splits an emoji's UTF-16 pair between two deltas sends this).
                cached = json.dumps(text, separators=(",", ":")).encode()
            if len(self._delta_json_cache) < 4096:
                self._delta_json_cache[text] = cached
        return cached

    async def _watch(self, conn: _Conn, rec: RequestRecord) -> None:
        """Read from the connection while the response is produced; react to EOF at once."""
        try:
            while True:
                data = await conn.reader.read(65536)
                if not data:
                    break
                conn.buf += data  # pipelined bytes are kept for the next request
        except asyncio.CancelledError:
            return
        except (ConnectionError, OSError):
            pass
        conn.eof = True
        if conn.response_complete:
            return
        rec.client_closed_at = time.monotonic()
        rec.outcome = "client_closed"
        conn.client_closed = True
        if conn.task is not None:
            conn.task.cancel()

    async def _chat(self, conn: _Conn, rec: RequestRecord, body: dict, keep_alive: bool) -> bool:
        try:
            sc = self._resolve_scenario(body)
        except ValueError as exc:
            return self._error(conn, rec, 400, str(exc), keep_alive, code="invalid_fake_directive")
        status = sc.get("status")
        if status is not None and int(status) >= 400:
            status = int(status)
            return self._error(conn, rec, status, str(sc.get("error_message") or f"Fake error {status}"),
                               keep_alive)
        watcher = asyncio.get_running_loop().create_task(self._watch(conn, rec)) if not conn.eof else None
        try:
            if body.get("stream"):
                ok = await self._stream(conn, rec, body, sc, keep_alive)
            else:
                ok = await self._complete(conn, rec, body, sc, keep_alive)
        finally:
            if watcher is not None and not watcher.done():
                watcher.cancel()
                # Let the watcher leave reader.read() before the next request is parsed
                # (StreamReader allows only one waiting reader).
                await asyncio.wait((watcher,))
        return ok and keep_alive and not conn.eof

    async def _pause(self, ms: float, jitter: float) -> None:
        if ms > 0:
            if jitter:
                ms *= 1.0 + self._rng.uniform(-jitter, jitter)
            await asyncio.sleep(ms / 1000.0)

    async def _drop(self, conn: _Conn, rec: RequestRecord) -> bool:
        """Abort the connection abruptly, but only after everything already written left the process."""
        transport = conn.writer.transport
        if transport.get_write_buffer_size():
            transport.set_write_buffer_limits(high=0)  # drain() now waits for an empty buffer
            await conn.writer.drain()
        rec.outcome = "dropped"
        transport.abort()
        self._finish(rec, "dropped")
        return False

    async def _hang(self, conn: _Conn) -> None:
        await conn.writer.drain()
        await asyncio.get_running_loop().create_future()  # until the watcher cancels us

    async def _send_deltas(self, conn: _Conn, rec: RequestRecord, deltas: list[str], limit: int,
                           first_delay: float, delay: float, jitter: float, pre: bytes, post: bytes) -> int:
        """Write ``deltas[:limit]`` as SSE chunks; returns the number sent.

        Timed deltas are written from plain timer callbacks (no task wake-up per delta), which
        keeps the CPU cost per delta to roughly one timer plus one send(); the task only wakes
        up at the end or when the socket's write buffer needs draining.
        """
        writer = conn.writer
        transport = writer.transport
        delta_json = self._delta_json
        sent = 0
        if first_delay <= 0 and delay <= 0:
            for text in deltas[:limit]:
                transport.write(_event(pre + delta_json(text) + post))
                sent += 1
                rec.deltas_sent = sent
                await writer.drain()
            return sent

        loop = asyncio.get_running_loop()
        rng = self._rng
        fut: asyncio.Future | None = None
        handle: asyncio.TimerHandle | None = None

        def next_delay() -> float:
            d = first_delay if sent == 0 else delay
            if jitter and sent:
                d *= 1.0 + rng.uniform(-jitter, jitter)
            return d / 1000.0 if d > 0 else 0.0

        def tick() -> None:
            nonlocal sent, handle
            handle = None
            if fut is None or fut.done():
                return
            if transport.is_closing():
                fut.set_result(None)
                return
            transport.write(_event(pre + delta_json(deltas[sent]) + post))
            sent += 1
            rec.deltas_sent = sent
            if sent >= limit or transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                fut.set_result(None)
            else:
                handle = loop.call_later(next_delay(), tick)

        try:
            while sent < limit:
                fut = loop.create_future()
                handle = loop.call_later(next_delay(), tick)
                await fut
                await writer.drain()
                if transport.is_closing():
                    break
        finally:
            if handle is not None:
                handle.cancel()
        return sent

    async def _stream(self, conn: _Conn, rec: RequestRecord, body: dict, sc: dict, keep_alive: bool) -> bool:
        writer = conn.writer
        model = body.get("model") or self.models[0]
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        deltas = self._deltas(sc)
        delay = float(sc.get("delay_ms") or 0)
        first_delay = float(sc.get("first_delay_ms") or 0)
        jitter = float(sc.get("jitter") or 0)
        drop_after = sc.get("drop_after")
        drop_after = int(drop_after) if drop_after is not None else None
        hang = bool(sc.get("hang"))
        cid = "chatcmpl-" + secrets.token_hex(12)
        usage_tail = b',"usage":null}' if include_usage else b"}"
        common = (b'{"id":"' + cid.encode() + b'","object":"chat.completion.chunk","created":'
                  + str(int(time.time())).encode() + b',"model":' + _dumps(model)
                  + b',"system_fingerprint":"fp_fake","choices":')
        pre = common + b'[{"index":0,"delta":{"content":'
        post = b'},"logprobs":null,"finish_reason":null}]' + usage_tail

        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            "Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n"
            f"x-request-id: req_{secrets.token_hex(8)}\r\nopenai-processing-ms: 1\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        ).encode("latin-1")
        role = _event(common + b'[{"index":0,"delta":{"role":"assistant","content":""},'
                      b'"logprobs":null,"finish_reason":null}]' + usage_tail)
        rec.status = 200
        writer.write(head + role)
        rec.first_byte_at = time.monotonic()
        await writer.drain()

        limit = len(deltas) if drop_after is None else min(len(deltas), max(drop_after, 0))
        sent = await self._send_deltas(conn, rec, deltas, limit, first_delay, delay, jitter, pre, post)
        if drop_after is not None and sent >= drop_after:
            return await self._drop(conn, rec)
        if hang:
            await self._hang(conn)

        finish = sc.get("finish_reason") or "stop"
        out = _event(common + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
                     + _dumps(finish) + b"}]" + usage_tail)
        if include_usage and sc.get("usage", True):
            p = _count_prompt_tokens(body.get("messages") or [])
            usage = sc["usage"] if isinstance(sc.get("usage"), dict) else {  # a dict: sent as given
                "prompt_tokens": p, "completion_tokens": sent, "total_tokens": p + sent}
            out += _event(common + b'[],"usage":' + _dumps(usage) + b"}")
        end_delay = float(sc.get("end_delay_ms") or 0)
        if end_delay > 0:
            # [DONE] now, the end of the chunked body later, as when they cross a real network in
            # separate packets: a client must read on past [DONE] to keep the connection.
            writer.write(out + _DONE_EVENT)
            await writer.drain()
            await asyncio.sleep(end_delay / 1000)
            writer.write(_LAST_CHUNK)
        else:
            writer.write(out + _DONE)
        conn.response_complete = True
        self._finish(rec, "completed")
        await writer.drain()
        return True

    async def _complete(self, conn: _Conn, rec: RequestRecord, body: dict, sc: dict, keep_alive: bool) -> bool:
        deltas = self._deltas(sc)
        delay = float(sc.get("delay_ms") or 0)
        first_delay = float(sc.get("first_delay_ms") or 0)
        jitter = float(sc.get("jitter") or 0)
        drop_after = sc.get("drop_after")
        for i in range(len(deltas)):
            await self._pause(first_delay if i == 0 else delay, jitter if i else 0.0)
            rec.deltas_sent = i + 1
            if drop_after is not None and i + 1 >= int(drop_after):
                return await self._drop(conn, rec)
        if drop_after is not None and int(drop_after) <= 0:
            return await self._drop(conn, rec)
        if sc.get("hang"):
            await self._hang(conn)
        p = _count_prompt_tokens(body.get("messages") or [])
        c = len(deltas)
        payload = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.models[0],
            "system_fingerprint": "fp_fake",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "".join(d.decode("utf-8", "replace") if isinstance(d, bytes) else d for d in deltas), "refusal": None},
                "logprobs": None,
                "finish_reason": sc.get("finish_reason") or "stop",
            }],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        }
        rec.status = 200
        rec.first_byte_at = time.monotonic()
        self._write_simple(conn, 200, _dumps(payload), keep_alive)
        conn.response_complete = True
        self._finish(rec, "completed")
        await conn.writer.drain()
        return True


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_openai", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES))
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)

    async def run() -> None:
        server = FakeOpenAI(host=args.host, port=args.port, profile=args.profile, api_key=args.api_key)
        loop = asyncio.get_running_loop()
        serve = loop.create_task(server.serve_forever(
            ready=lambda port: (sys.stdout.write(f"READY {port}\n"), sys.stdout.flush())))

        def on_signal() -> None:
            if server._stopping is not None:
                server._stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-POSIX
                pass
        await serve

    try:
        asyncio.run(run())
    except KeyboardInterrupt:  # pragma: no cover
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
