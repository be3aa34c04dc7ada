"""What both HTTP adapters call. Each function either raises `ApiError` before any byte is sent, or
returns the SSE body (an async iterator of bytes) / a JSON-able result.

The FastAPI sidecar awaits these on its own loop; Django's fallback view runs them on a
background loop (see `background.py`). Neither adapter holds any streaming logic of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser

from .. import selectors, services, stream_auth
from .runtime import GenerationRuntime, run_db
from .sse import sse_bytes
from .validation import ApiError, parse_last_event_id, parse_reply_request, require_json


def check_origin(origin: str | None, allowed: list[str]) -> None:
    """A credentialed unsafe request from a page we do not serve is refused (CSRF defence: CORS
    headers alone do not stop the request from running)."""
    if origin is not None and origin not in allowed:
        raise ApiError(HTTPStatus.FORBIDDEN, "This origin is not allowed to use the stream service.")


def unauthorized() -> ApiError:
    """The 401 of every stream endpoint, on both adapters."""
    return ApiError(
        HTTPStatus.UNAUTHORIZED,
        "You are not logged in, or your stream token expired.",
        headers={"WWW-Authenticate": "Bearer"},
    )


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a sidecar request presents: a bearer stream token, or else the session cookie."""

    authorization: str | None
    session_key: str | None

    def require_any(self) -> None:
        """401 at once, with no database work, for a request that presents no credentials at all."""
        if not self.authorization and not self.session_key:
            raise unauthorized()

    def user(self):
        """The caller, or ApiError 401. Runs on a database thread."""
        user = stream_auth.authenticate_stream_caller(authorization=self.authorization, session_key=self.session_key)
        if user is None:
            raise unauthorized()
        return user


async def authenticate(credentials: Credentials):
    return await run_db(credentials.user)


async def start_reply_stream(
    runtime: GenerationRuntime,
    *,
    caller: Credentials | AbstractBaseUser,
    body: bytes,
    content_type: str | None,
    body_error: ApiError | None = None,
) -> AsyncIterator[bytes]:
    """Store a new reply, start generating it, and return its first watcher.

    `caller` is a user Django already authenticated, or the sidecar's `Credentials`: then checking
    them happens in the same unit of database work as storing the reply, one trip through the
    database threads instead of two (under load each trip waits in their queue). The errors keep
    their order either way: 401, the body's own (`body_error`: 413; then 415, 400), 503, 404/429.
    """
    # No provider (and no new client) once the runtime has begun shutting down: that is a 503.
    provider = runtime.provider() if runtime.accepting else None

    def authenticate_and_store() -> services.ReplyStart:
        user = caller.user() if isinstance(caller, Credentials) else caller
        if body_error is not None:
            raise body_error
        request = parse_reply_request(
            body, content_type, max_chars=settings.MAX_MESSAGE_CHARS, max_bytes=settings.MAX_REQUEST_BYTES
        )
        if provider is None or not runtime.accepting:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "The stream service is restarting. Please try again.",
                           headers={"Retry-After": "2"})
        return services.reply_start(user=user, request=request, model=provider.model)

    started = await run_db(authenticate_and_store)
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
