"""Server-Sent Events on the wire: one pure encoder and the heartbeat wrapper, shared by both adapters."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from .events import ReplyEvent

HEARTBEAT = b": ping\n\n"

# No compression and no proxy buffering: each event must leave the server as it is produced.
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def encode_event(event: ReplyEvent) -> bytes:
    # json.dumps escapes newlines, so the payload is always exactly one `data:` line.
    data = json.dumps(event.payload(), ensure_ascii=False, separators=(", ", ": "))
    return f"id: {event.id}\ndata: {data}\n\n".encode()


async def sse_bytes(events: AsyncIterator[ReplyEvent | None]) -> AsyncIterator[bytes]:
    """Encode a watcher's events; `None` from a watcher means "silent for a heartbeat interval"."""
    async for event in events:
        yield HEARTBEAT if event is None else encode_event(event)
