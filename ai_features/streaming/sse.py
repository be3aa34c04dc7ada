"""Server-Sent Events on the wire: one pure encoder and the heartbeat wrapper, shared by both adapters."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing

import orjson

from .events import ContentEvent, ReplyEvent

HEARTBEAT = b": ping\n\n"

# No compression and no proxy buffering: each event must leave the server as it is produced.
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def encode_event(event: ReplyEvent) -> bytes:
    # JSON escapes newlines, so the payload is always exactly one `data:` line. The spacing is
    # API.md's, byte for byte: scripts match on `"type": "content"`.
    if type(event) is ContentEvent:
        # Once per token per watcher: only the text needs escaping, and orjson does that several
        # times faster than json.dumps (same escapes; a test holds them equal).
        return b'id: %d\ndata: {"type": "content", "content": %b}\n\n' % (event.id, orjson.dumps(event.content))
    return f"id: {event.id}\ndata: {encode_payload(event)}\n\n".encode()


def encode_payload(event: ReplyEvent) -> str:
    return json.dumps(event.payload(), ensure_ascii=False, separators=(", ", ": "))


async def sse_bytes(batches: AsyncIterator[list[ReplyEvent]]) -> AsyncIterator[bytes]:
    """Encode a watcher's batches, each as one write; an empty batch becomes a heartbeat comment."""
    async with aclosing(batches):
        async for batch in batches:
            yield b"".join(map(encode_event, batch)) if batch else HEARTBEAT
