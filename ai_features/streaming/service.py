"""What both HTTP adapters call. Each function either raises `ApiError` before any byte is sent, or
returns the SSE body (an async iterator of bytes) / a JSON-able result.

The FastAPI sidecar awaits these on its own loop; Django's fallback view runs them on a
background loop (see `background.py`). Neither adapter holds any streaming logic of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from http import HTTPStatus

from django.conf import settings

from .. import selectors, services, stream_auth
from .runtime import GenerationRuntime, run_db
from .sse import sse_bytes
from .validation import ApiError, parse_last_event_id, parse_reply_request, require_json


def check_origin(origin: str | None, allowed: list[str]) -> None:
    """A credentialed unsafe request from a page we do not serve is refused (CSRF defence: CORS
    headers alone do not stop the request from running)."""
    if origin is not None and origin not in allowed:
        raise ApiError(HTTPStatus.FORBIDDEN, "This origin is not allowed to use the stream service.")


async def authenticate(*, authorization: str | None, session_key: str | None):
    user = await run_db(stream_auth.authenticate_stream_caller, authorization=authorization, session_key=session_key)
    if user is None:
        raise ApiError(
            HTTPStatus.UNAUTHORIZED,
            "You are not logged in, or your stream token expired.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


async def start_reply_stream(
    runtime: GenerationRuntime, *, user, body: bytes, content_type: str | None
) -> AsyncIterator[bytes]:
    request = parse_reply_request(
        body, content_type, max_chars=settings.MAX_MESSAGE_CHARS, max_bytes=settings.MAX_REQUEST_BYTES
    )
    if not runtime.accepting:
        raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "The stream service is restarting. Please try again.",
                       headers={"Retry-After": "2"})
    provider = runtime.provider()
    started = await run_db(services.reply_start, user=user, request=request, model=provider.model)
    if not started.existing:
        runtime.launch(started.start, started.context, provider)
    # The first response is just the first watcher: one code path serves it and every resume.
    return _sse(runtime, started.start.assistant_message_id, after=-1)


async def resume_reply_stream(
    runtime: GenerationRuntime, *, user, message_id: int, last_event_id: str | None
) -> AsyncIterator[bytes]:
    after = parse_last_event_id(last_event_id)
    if await run_db(selectors.reply_get, user=user, message_id=message_id) is None:
        raise ApiError(HTTPStatus.NOT_FOUND, "Reply not found.")
    return _sse(runtime, message_id, after=after)


async def stop_reply(runtime: GenerationRuntime, *, user, message_id: int, content_type: str | None) -> dict:
    require_json(content_type)
    if await run_db(selectors.reply_get, user=user, message_id=message_id) is None:
        raise ApiError(HTTPStatus.NOT_FOUND, "Reply not found.")
    return {"status": await runtime.stop(message_id)}


def _sse(runtime: GenerationRuntime, message_id: int, *, after: int) -> AsyncIterator[bytes]:
    return sse_bytes(runtime.watch(message_id, after=after))
