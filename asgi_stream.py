"""The streaming sidecar: FastAPI under uvicorn, holding many reply streams on one event loop.

It loads the same Django settings as the main app (database, SECRET_KEY, session engine), so the
same logged-in user is recognised by the session cookie or by a stream token. All streaming logic
lives in `ai_features.streaming`; this module only adapts HTTP to it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated, Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "c3_app.settings")
django.setup()

from django.conf import settings  # noqa: E402  (Django must be set up first)
from django.db import connection  # noqa: E402
from fastapi import APIRouter, Depends, FastAPI, Request  # noqa: E402
from fastapi.middleware.cors import CORSMiddleware  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402

from ai_features.streaming import service  # noqa: E402
from ai_features.streaming.runtime import GenerationRuntime, run_db  # noqa: E402
from ai_features.streaming.sse import SSE_HEADERS  # noqa: E402
from ai_features.streaming.validation import ApiError  # noqa: E402

def _drain_on_sigterm(runtime: GenerationRuntime) -> None:
    """On SIGTERM, start the runtime's shutdown at once, beside uvicorn's own drain: new streams
    get 503, running replies have GENERATION_SHUTDOWN_GRACE_SECONDS to finish, and the rest end as
    `interrupted` with their text, so their watchers get a terminal event and uvicorn's drain
    (--timeout-graceful-shutdown, a backstop) completes within the platform's kill window."""
    loop = asyncio.get_running_loop()
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:  # not the main thread (tests run uvicorn in a thread)
        return
    if not callable(previous):
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(runtime.begin_shutdown, settings.GENERATION_SHUTDOWN_GRACE_SECONDS)
        previous(signum, frame)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:
        pass


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime = app.state.runtime = GenerationRuntime()
    await runtime.start()
    _drain_on_sigterm(runtime)
    yield
    await runtime.shutdown(settings.GENERATION_SHUTDOWN_GRACE_SECONDS)


def runtime_of(request: Request) -> GenerationRuntime:
    return request.app.state.runtime


def create_app() -> FastAPI:
    app = FastAPI(title="c3 chat stream", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.CORS_ALLOWED_ORIGINS,  # exact origins only; settings refuse wildcards
        allow_credentials=True,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        max_age=600,
    )
    app.add_exception_handler(ApiError, api_error)
    # Every error is {"error": ...}, also those FastAPI and Starlette answer themselves.
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.include_router(router)
    return app


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # A reply id in the path that is not a number names no reply: 404, as for another user's. The
    # routes read their bodies themselves today; anything else FastAPI might validate is a 400.
    if all(error.get("loc", ("",))[0] == "path" for error in exc.errors()):
        return JSONResponse({"error": "Reply not found."}, status_code=HTTPStatus.NOT_FOUND)
    return JSONResponse({"error": "The request is not valid."}, status_code=HTTPStatus.BAD_REQUEST)


def credentials_of(request: Request) -> service.Credentials:
    return service.Credentials(
        authorization=request.headers.get("authorization"),
        session_key=request.cookies.get(settings.SESSION_COOKIE_NAME),
    )


async def current_user(request: Request) -> Any:
    if request.method == "POST":
        service.check_origin(request.headers.get("origin"), settings.CORS_ALLOWED_ORIGINS)
    return await service.authenticate(credentials_of(request))


CurrentUser = Annotated[Any, Depends(current_user)]
router = APIRouter()


async def read_body(request: Request) -> bytes:
    """The request body, refusing to buffer more than MAX_REQUEST_BYTES."""
    limit = settings.MAX_REQUEST_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"The request body is larger than {limit} bytes.")
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"The request body is larger than {limit} bytes.")
    except ClientDisconnect:
        # The client left before sending its whole body: nobody will read the answer, but it must
        # not become a 500 and a traceback in the log.
        raise ApiError(HTTPStatus.BAD_REQUEST, "The request body was not received completely.") from None
    return bytes(body)


def sse_response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, headers=SSE_HEADERS)


@router.post("/api/ai/chat/stream/")
async def chat_stream(request: Request) -> StreamingResponse:
    # No CurrentUser here: the credentials are checked in the same unit of database work that
    # stores the reply. The origin check needs no database and still comes first.
    service.check_origin(request.headers.get("origin"), settings.CORS_ALLOWED_ORIGINS)
    credentials = credentials_of(request)
    credentials.require_any()  # an anonymous body is never read
    try:
        body, body_error = await read_body(request), None
    except ApiError as exc:  # 413, reported once the caller is known, as before
        body, body_error = b"", exc
    return sse_response(
        await service.start_reply_stream(
            runtime_of(request),
            caller=credentials,
            body=body,
            body_error=body_error,
            content_type=request.headers.get("content-type"),
        )
    )


@router.get("/api/ai/chat/stream/{message_id}/")
async def chat_stream_resume(message_id: int, request: Request, user: CurrentUser) -> StreamingResponse:
    last_event_id = request.headers.get("last-event-id")
    return sse_response(
        await service.resume_reply_stream(runtime_of(request), user=user, message_id=message_id, last_event_id=last_event_id)
    )


@router.post("/api/ai/chat/stream/{message_id}/stop/")
async def chat_stream_stop(message_id: int, request: Request, user: CurrentUser) -> dict:
    content_type = request.headers.get("content-type")
    return await service.stop_reply(runtime_of(request), user=user, message_id=message_id, content_type=content_type)


def _database_answers() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    try:
        await run_db(_database_answers)
    except Exception:  # noqa: BLE001 - any database failure means "not healthy"
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ok", "accepting": runtime_of(request).accepting})


app = create_app()

# Everything imported so far (Django, FastAPI, the openai SDK and its types: ~140,000 objects) lives
# as long as the process. Moved out of the collector's reach, it no longer has to be scanned by
# every full collection, which otherwise pauses all streams at once: 100-130 ms at 128 streams,
# 20-50 ms with this (docs/benchmarks.md, round 3).
gc.collect()
gc.freeze()
