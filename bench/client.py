"""A low-overhead asyncio load client: HTTP/1.1 keep-alive connections and an SSE stamper.

Why not httpx.AsyncClient: per received chunk httpx runs httpcore + h11 state machines, its
decoders and an async-iterator chain (several coroutine switches). Here each connection is a
bare `asyncio.Protocol` on uvloop: `data_received()` takes one clock reading, de-chunks the body
in place and recognises events by byte search (no JSON parsing per token), so the client costs
a few microseconds per event and its timestamps are taken the moment the bytes leave the socket.

Two wire formats are recognised:
- "openai": the mock's own stream (arms A and B) — a content token is a chunk whose delta holds
  non-empty `content`; the stream ends with `data: [DONE]`.
- "c3": the product's stream (arms C and D) — `{"type": "content"}` events; `start`, `done`,
  `error` and `: ping` heartbeats are recorded too.

Metric definitions follow vLLM's benchmark_serving: TTFT = request sent → first content token;
ITL = gaps between consecutive content tokens (pooled over all streams); TPOT = (E2E − TTFT) /
(tokens − 1) per stream; E2E = request sent → end of the response.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

now = time.perf_counter


@dataclass(slots=True)
class Sample:
    """One request/stream as the client saw it. Times are perf_counter seconds."""

    arm: str
    concurrency: int
    worker: int
    t_send: float = 0.0
    t_headers: float | None = None
    t_first: float | None = None  # first content token
    t_end: float | None = None
    status: int = 0
    tokens: int = 0
    token_times: list[float] = field(default_factory=list)
    heartbeats: int = 0
    heartbeat_times: list[float] = field(default_factory=list)
    started: bool = False  # c3: saw the `start` event
    t_start: float | None = None  # c3: when the `start` event arrived (auth + reply stored)
    done: bool = False  # saw the terminal event ([DONE] or c3 `done` completed)
    error: str | None = None
    message_id: int | None = None
    body_bytes: int = 0


class HTTPConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._sse = bytearray()
        self._state = "idle"  # idle | head | chunk-size | chunk-data | chunk-crlf | length | done
        self._remaining = 0
        self._close_after = False
        self._chunked = False
        self.sample: Sample | None = None
        self._waiter: asyncio.Future | None = None
        self._err_body = bytearray()

    # asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.sample is not None and self._state != "done":
            if self.sample.error is None:
                self.sample.error = "disconnected"
            self._finish(now())

    def data_received(self, data: bytes) -> None:
        t = now()
        sample = self.sample
        if sample is None:
            return
        sample.body_bytes += len(data)
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state == "head":
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                head = bytes(buf[:i]).decode("latin-1").split("\r\n")
                del buf[: i + 4]
                sample.t_headers = t
                try:
                    sample.status = int(head[0].split(" ", 2)[1])
                except (IndexError, ValueError):
                    sample.error = "bad-status-line"
                    self._finish(t)
                    self.close()
                    return
                headers = {}
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip().lower()
                self._close_after = headers.get("connection") == "close"
                if "chunked" in headers.get("transfer-encoding", ""):
                    self._state = "chunk-size"
                else:
                    self._remaining = int(headers.get("content-length", "0") or 0)
                    self._state = "length"
                if sample.status != 200 and sample.error is None:
                    sample.error = f"http-{sample.status}"
            elif state == "chunk-size":
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                size = int(bytes(buf[:i]).split(b";", 1)[0], 16)
                del buf[: i + 2]
                if size == 0:
                    # Last chunk: skip (empty) trailers.
                    j = buf.find(b"\r\n")
                    if j < 0:
                        self._state = "trailers"
                        return
                    del buf[: j + 2]
                    self._finish(t)
                    return
                self._remaining = size
                self._state = "chunk-data"
            elif state == "chunk-data":
                if not buf:
                    return
                take = min(self._remaining, len(buf))
                self._body(buf[:take], t)
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "chunk-crlf"
            elif state == "chunk-crlf":
                if len(buf) < 2:
                    return
                del buf[:2]
                self._state = "chunk-size"
            elif state == "trailers":
                j = buf.find(b"\r\n")
                if j < 0:
                    return
                del buf[: j + 2]
                self._finish(t)
                return
            elif state == "length":
                take = min(self._remaining, len(buf))
                if take:
                    self._body(buf[:take], t)
                    del buf[:take]
                    self._remaining -= take
                if self._remaining == 0:
                    self._finish(t)
                return
            else:
                return

    # Body and events ------------------------------------------------------------------------------

    def _body(self, piece: bytearray, t: float) -> None:
        sample = self.sample
        if sample.status != 200:
            self._err_body += piece
            return
        sse = self._sse
        sse += piece
        start = 0
        while True:
            i = sse.find(b"\n\n", start)
            if i < 0:
                break
            self._event(bytes(sse[start:i]), t, sample)
            start = i + 2
        if start:
            del sse[:start]

    def _event(self, event: bytes, t: float, sample: Sample) -> None:
        if self.fmt == "openai":
            if b'"delta":{"content":"' in event and b'"delta":{"content":""' not in event:
                if sample.t_first is None:
                    sample.t_first = t
                sample.tokens += 1
                sample.token_times.append(t)
            elif event.startswith(b"data: [DONE]"):
                sample.done = True
            return
        # c3
        if event.startswith(b":"):
            sample.heartbeats += 1
            sample.heartbeat_times.append(t)
        elif b'"type": "content"' in event:
            if sample.t_first is None:
                sample.t_first = t
            sample.tokens += 1
            sample.token_times.append(t)
        elif b'"type": "start"' in event:
            sample.started = True
            sample.t_start = t
            try:
                payload = json.loads(event[event.index(b"data: ") + 6 :])
                sample.message_id = payload.get("assistant_message_id")
            except ValueError:
                pass
        elif b'"type": "done"' in event:
            if b'"status": "completed"' in event:
                sample.done = True
            elif sample.error is None:
                sample.error = "cancelled"
        elif b'"type": "error"' in event:
            if sample.error is None:
                try:
                    payload = json.loads(event[event.index(b"data: ") + 6 :])
                    sample.error = f"sse-error:{payload.get('code')}"
                except ValueError:
                    sample.error = "sse-error"

    def _finish(self, t: float) -> None:
        sample = self.sample
        self._state = "done"
        if sample is not None:
            sample.t_end = t
            if sample.error is None and not sample.done:
                sample.error = "incomplete"
            if sample.error and sample.error.startswith("http-") and self._err_body:
                sample.error += ":" + bytes(self._err_body[:120]).decode("utf-8", "replace")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._close_after:
            self.close()

    # Requests -------------------------------------------------------------------------------------

    def request(self, raw: bytes, sample: Sample) -> asyncio.Future:
        self.sample = sample
        self._buf.clear()
        self._sse.clear()
        self._err_body.clear()
        self._state = "head"
        self._close_after = False
        self._waiter = asyncio.get_running_loop().create_future()
        sample.t_send = now()
        self.transport.write(raw)
        return self._waiter

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


async def connect(host: str, port: int, fmt: str) -> HTTPConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: HTTPConn(fmt), host, port)
    return proto


# What a body holds where each request needs an id of its own (the page's client_message_id): as
# long as a uuid4's hex, so the prebuilt request keeps its Content-Length.
FRESH_ID = b"#" * 32


def fresh_ids(raw: bytes) -> bytes:
    return raw.replace(FRESH_ID, uuid.uuid4().hex.encode()) if FRESH_ID in raw else raw


def build_request(method: str, host: str, port: int, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Target:
    """Where an arm sends its requests and how to read the answer."""

    arm: str
    host: str
    port: int
    path: str
    fmt: str
    bodies: list[bytes]  # one per user (cycled); FRESH_ID in a body becomes a new id per request
    headers: list[dict[str, str]]  # one per user (cycled)


async def run_step(
    target: Target,
    concurrency: int,
    requests_per_worker: int,
    *,
    step_seconds: float,
    request_timeout: float,
    ramp_seconds: float,
) -> tuple[list[Sample], float, float]:
    """Closed loop: `concurrency` workers, each sends its next request as soon as the previous
    stream ended, until it has sent `requests_per_worker` or `step_seconds` have passed. Worker
    starts are spread evenly over `ramp_seconds` so the streams are not all in phase.
    Returns the samples and the wall-clock start/end of the step."""
    samples: list[Sample] = []
    t0 = now()
    deadline = t0 + step_seconds
    raw_requests = [
        build_request("POST", target.host, target.port, target.path, target.headers[i % len(target.headers)],
                      target.bodies[i % len(target.bodies)])
        for i in range(min(concurrency, max(len(target.headers), len(target.bodies))))
    ]

    async def worker(index: int) -> None:
        if ramp_seconds > 0 and concurrency > 1:
            await asyncio.sleep(ramp_seconds * index / concurrency)
        raw = raw_requests[index % len(raw_requests)]
        conn: HTTPConn | None = None
        for _ in range(requests_per_worker):
            if now() >= deadline:
                break
            sample = Sample(target.arm, concurrency, index)
            try:
                if conn is None or conn.closed:
                    conn = await asyncio.wait_for(connect(target.host, target.port, target.fmt), 10)
                waiter = conn.request(fresh_ids(raw), sample)
                await asyncio.wait_for(waiter, request_timeout)
            except (TimeoutError, asyncio.TimeoutError):
                sample.error = sample.error or "timeout"
                sample.t_end = now()
                if conn is not None:
                    conn.sample = None
                    conn.close()
                conn = None
            except OSError as exc:
                sample.error = f"connect:{exc.__class__.__name__}"
                sample.t_send = sample.t_send or now()
                sample.t_end = now()
                conn = None
                await asyncio.sleep(0.05)
            samples.append(sample)
            if conn is not None and conn.closed:
                conn = None
        if conn is not None:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return samples, t0, now()


# --- Statistics -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(samples: list[Sample], pacing_ms: float | None) -> dict:
    """Per-arm figures in milliseconds (vLLM definitions) plus errors and stalls."""
    ok = [s for s in samples if s.error is None and s.t_first is not None]
    errors: dict[str, int] = {}
    for s in samples:
        if s.error is not None:
            key = s.error.split(":", 1)[0] if not s.error.startswith("http-") else s.error[:8]
            errors[key] = errors.get(key, 0) + 1
    ttft = [(s.t_first - s.t_send) * 1000 for s in ok]
    # c3 only: request → `start` event (auth, rate limits, rows stored) and `start` → first token
    # (the upstream request through the provider, the first delta relayed).
    to_start = [(s.t_start - s.t_send) * 1000 for s in ok if s.t_start is not None]
    start_to_first = [(s.t_first - s.t_start) * 1000 for s in ok if s.t_start is not None]
    e2e = [(s.t_end - s.t_send) * 1000 for s in ok]
    tpot = [((s.t_end - s.t_first) * 1000) / (s.tokens - 1) for s in ok if s.tokens > 1]
    itl: list[float] = []
    stall_threshold = 2 * pacing_ms if pacing_ms else None
    stalled_streams = 0
    stall_gaps = 0
    max_gap = 0.0
    for s in ok:
        times = s.token_times
        gaps = [(b - a) * 1000 for a, b in zip(times, times[1:])]
        itl.extend(gaps)
        if gaps:
            max_gap = max(max_gap, max(gaps))
        if stall_threshold is not None:
            n = sum(1 for g in gaps if g > stall_threshold)
            stall_gaps += n
            stalled_streams += 1 if n else 0
    tokens = sum(s.tokens for s in samples)

    def pcts(values: list[float]) -> dict:
        return {f"p{q}": percentile(values, q) for q in (50, 90, 95, 99)} | {
            "mean": (sum(values) / len(values)) if values else None,
            "max": max(values) if values else None,
            "n": len(values),
        }

    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "tokens": tokens,
        "ttft_ms": pcts(ttft),
        "to_start_ms": pcts(to_start) if to_start else None,
        "start_to_first_ms": pcts(start_to_first) if start_to_first else None,
        "itl_ms": pcts(itl),
        "tpot_ms": pcts(tpot),
        "e2e_ms": pcts(e2e),
        "stall_threshold_ms": stall_threshold,
        "stalled_streams": stalled_streams if stall_threshold else None,
        "stall_gaps": stall_gaps if stall_threshold else None,
        "max_gap_ms": max_gap,
    }
