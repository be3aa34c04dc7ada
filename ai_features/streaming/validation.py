"""Validation of a stream request: bytes and a content type in, a `ReplyRequest` or an `ApiError` out."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from http import HTTPStatus


class ApiError(Exception):
    """An error answered before any byte of a stream: a status and a message for a person."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.message}


@dataclass(frozen=True, slots=True)
class ReplyRequest:
    message: str
    include_history: bool = True
    conversation_id: int | None = None
    client_message_id: str | None = None


def require_json(content_type: str | None) -> None:
    # A cross-site form or text/plain POST needs no preflight; demanding JSON forces one.
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Send the request as Content-Type: application/json.")


# Half of a UTF-16 surrogate pair: JSON can escape one alone (\\ud83d), but no UTF-8 text holds it.
SURROGATE = re.compile("[\ud800-\udfff]")


def refuse_unstorable_text(value: str, name: str) -> None:
    """JSON can carry text that no database stores, so it is refused up front with a clear 400, on
    every database, before anything is stored: a NUL character (\\u0000), which PostgreSQL refuses
    in text, and a lone surrogate, which has no UTF-8 form (both drivers refuse to encode it)."""
    if "\x00" in value:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"`{name}` must not contain NUL characters.")
    if not value.isascii() and SURROGATE.search(value):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"`{name}` must be valid Unicode text (it holds half of a surrogate pair).")


def parse_json_object(body: bytes) -> dict:
    """A request body that must hold one JSON object, or ApiError 400.

    Besides malformed JSON and bytes that are not UTF-8 (ValueErrors), json.loads refuses an integer
    of more than 4,300 digits with a bare ValueError and overflows the stack on a few thousand
    nested arrays (RecursionError): both fit in a small body, and both must be a 400, not a 500."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(HTTPStatus.BAD_REQUEST, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "The request body must be a JSON object.")
    return data


def parse_reply_request(body: bytes, content_type: str | None, *, max_chars: int, max_bytes: int) -> ReplyRequest:
    require_json(content_type)
    if len(body) > max_bytes:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"The request body is larger than {max_bytes} bytes.")
    data = parse_json_object(body)

    message = data.get("message")
    if not isinstance(message, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, "`message` is required and must be a string.")
    if not message.strip():
        raise ApiError(HTTPStatus.BAD_REQUEST, "`message` must not be empty.")
    if len(message) > max_chars:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"`message` is longer than {max_chars} characters.")
    refuse_unstorable_text(message, "message")

    include_history = data.get("include_history", True)
    if not isinstance(include_history, bool):
        raise ApiError(HTTPStatus.BAD_REQUEST, "`include_history` must be true or false.")

    conversation_id = data.get("conversation_id")
    if conversation_id is not None and (isinstance(conversation_id, bool) or not isinstance(conversation_id, int)):
        raise ApiError(HTTPStatus.BAD_REQUEST, "`conversation_id` must be an integer or null.")
    if conversation_id is not None and conversation_id <= 0:
        raise ApiError(HTTPStatus.NOT_FOUND, "Conversation not found.")

    client_message_id = data.get("client_message_id")
    if client_message_id is not None:
        if not isinstance(client_message_id, str) or not (1 <= len(client_message_id) <= 100):
            raise ApiError(HTTPStatus.BAD_REQUEST, "`client_message_id` must be a string of 1 to 100 characters or null.")
        refuse_unstorable_text(client_message_id, "client_message_id")

    return ReplyRequest(
        message=message,
        include_history=include_history,
        conversation_id=conversation_id,
        client_message_id=client_message_id,
    )


def parse_last_event_id(raw: str | None) -> int:
    """The id after which a resume starts; -1 (replay everything, start event included) when absent."""
    if raw is None or raw.strip() == "":
        return -1
    digits = raw.strip()
    if digits.startswith("-") and digits[1:].isascii() and digits[1:].isdigit():
        raise ApiError(HTTPStatus.BAD_REQUEST, "Last-Event-ID must not be negative.")
    # Only the ids this service sends: ASCII digits. int() would also take "+1", "1_000" or
    # non-ASCII digits.
    if not (digits.isascii() and digits.isdigit()):
        raise ApiError(HTTPStatus.BAD_REQUEST, "Last-Event-ID must be a decimal integer.")
    return int(digits)
