"""The typed events of a reply, as every watcher sees them.

Ids: the start event is 0, content piece n is n (from 1), the terminal event is pieces + 1.
A replay from the log produces the same ids with the same pieces as the live stream did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


@dataclass(frozen=True, slots=True)
class StartEvent:
    conversation_id: int
    user_message_id: int
    assistant_message_id: int
    id: int = 0

    def payload(self) -> dict[str, Any]:
        return {
            "type": "start",
            "content": "",
            "conversation_id": self.conversation_id,
            "user_message_id": self.user_message_id,
            "assistant_message_id": self.assistant_message_id,
        }


@dataclass(frozen=True, slots=True)
class ContentEvent:
    id: int
    content: str

    def payload(self) -> dict[str, Any]:
        return {"type": "content", "content": self.content}


@dataclass(frozen=True, slots=True)
class DoneEvent:
    id: int
    status: str  # "completed" or "cancelled"
    message_id: int
    model: str
    usage: dict[str, int | None] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {
            "type": "done",
            "content": "",
            "status": self.status,
            "message_id": self.message_id,
            "model": self.model,
            "usage": self.usage,
        }


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    id: int
    content: str  # for a person: never a traceback, a key or upstream internals
    code: str
    message_id: int | None = None

    def payload(self) -> dict[str, Any]:
        return {"type": "error", "content": self.content, "code": self.code, "message_id": self.message_id}


ReplyEvent = Union[StartEvent, ContentEvent, DoneEvent, ErrorEvent]
TerminalEvent = Union[DoneEvent, ErrorEvent]


@dataclass(frozen=True, slots=True)
class ReplyOutcome:
    """How a reply ended: enough to build its terminal event, live or from the stored row."""

    message_id: int
    status: str
    model: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_code: str = ""
    error_message: str = ""

    def terminal_event(self, event_id: int) -> TerminalEvent:
        if self.status in ("completed", "cancelled"):
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
            return DoneEvent(event_id, self.status, self.message_id, self.model, usage)
        if self.status == "interrupted":
            message = self.error_message or INTERRUPTED_MESSAGE
            return ErrorEvent(event_id, message, "interrupted", self.message_id)
        return ErrorEvent(event_id, self.error_message or "The reply failed.", self.error_code or "error", self.message_id)


INTERRUPTED_MESSAGE = "The reply was interrupted because the server generating it stopped. The text so far is kept."
