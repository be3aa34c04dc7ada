"""A spec-following Server-Sent Events parser for the tests (WHATWG HTML, "Parsing an event stream").

It works on raw bytes exactly as they arrive, so the tests check what is really on the wire:
fields split over network chunks, CRLF or LF line ends, comments, `id:` and multi-line `data:`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class SSEEvent:
    data: str
    id: str | None
    event: str | None = None

    @property
    def json(self) -> dict:
        return json.loads(self.data)

    @property
    def type(self) -> str:
        return self.json["type"]


@dataclass
class SSEParser:
    events: list[SSEEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str | None = None
    _id: str | None = None
    _has_id: bool = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Feed raw bytes; returns the events completed by them."""
        before = len(self.events)
        self._buffer += chunk
        while True:
            # A line ends at CRLF, LF or CR (a CR at the very end may be half of a CRLF).
            positions = [p for p in (self._buffer.find(b"\r\n"), self._buffer.find(b"\n"), self._buffer.find(b"\r")) if p >= 0]
            if not positions:
                break
            end = min(positions)
            if self._buffer[end : end + 1] == b"\r" and end == len(self._buffer) - 1:
                break
            width = 2 if self._buffer[end : end + 2] == b"\r\n" else 1
            line, self._buffer = self._buffer[:end], self._buffer[end + width :]
            self._line(line.decode("utf-8"))
        return self.events[before:]

    def _line(self, line: str) -> None:
        if line == "":
            if self._data:
                self.events.append(SSEEvent("\n".join(self._data), self._id if self._has_id else None, self._event))
            self._data, self._event = [], None
            return
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id, self._has_id = value, True
        elif name == "event":
            self._event = value


def parse_all(chunks: Iterable[bytes]) -> SSEParser:
    parser = SSEParser()
    for chunk in chunks:
        parser.feed(chunk)
    return parser

