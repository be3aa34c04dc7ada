"""Django views: the chat page, the history JSON API, stream tokens, health, and the fallback stream.

The fallback stream endpoints are thin adapters over `streaming.service`, exactly like the sidecar.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from http import HTTPStatus

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.paginator import EmptyPage, PageNotAnInteger, Paginator
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware, get_token
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import selectors, services, stream_auth
from .models import Conversation, Message
from .streaming import service
from .streaming.background import background_runtime
from .streaming.sse import SSE_HEADERS
from .streaming.validation import ApiError, refuse_unstorable_text

CONVERSATIONS_PER_PAGE = 30


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JsonResponse:
    return JsonResponse({"error": message}, status=status, headers=headers)


def api_login_required(view: Callable) -> Callable:
    """Like login_required, but an anonymous API call gets 401 JSON instead of a redirect."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs):
        if not request.user.is_authenticated:
            return error_response(HTTPStatus.UNAUTHORIZED, "You are not logged in.")
        return view(request, *args, **kwargs)

    return wrapper


# --- Pages -------------------------------------------------------------------------------------


@login_required
@never_cache
def chat_page(request: HttpRequest, conversation_id: int | None = None) -> HttpResponse:
    provider_is_demo = not settings.OPENAI_API_KEY
    config = {
        "streamBaseUrl": settings.STREAM_API_URL,
        "streamTokenUrl": "/api/ai/stream-token/",
        "apiBase": "/api/ai/",
        "chatUrl": "/ai/chat/",
        "initialConversationId": conversation_id,
        "csrfToken": get_token(request),
        "demoModel": provider_is_demo,
        "modelName": "offline demo model" if provider_is_demo else settings.OPENAI_MODEL,
        "maxMessageChars": settings.MAX_MESSAGE_CHARS,
        "username": request.user.get_username(),
        "logoutUrl": "/accounts/logout/",
    }
    return render(request, "ai_features/chat.html", {"config": config})


def healthz(request: HttpRequest) -> JsonResponse:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:  # noqa: BLE001 - any database failure means "not healthy"
        return JsonResponse({"status": "unavailable", "database": "unreachable"}, status=HTTPStatus.SERVICE_UNAVAILABLE)
    return JsonResponse({"status": "ok"})


# --- History API -------------------------------------------------------------------------------


def conversation_json(conversation: Conversation) -> dict:
    return {
        "id": conversation.pk,
        "title": conversation.title,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
    }


def message_json(message: Message) -> dict:
    return {
        "id": message.pk,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "created_at": message.created_at.isoformat(),
        "error_code": message.error_code,
        "metadata": {
            "model": message.model,
            "prompt_tokens": message.prompt_tokens,
            "completion_tokens": message.completion_tokens,
            "ttft_ms": message.ttft_ms,
            "duration_ms": message.duration_ms,
        },
    }


def _json_body(request: HttpRequest) -> dict:
    if request.content_type != "application/json":
        raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Send the request as Content-Type: application/json.")
    try:
        data = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(HTTPStatus.BAD_REQUEST, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "The request body must be a JSON object.")
    return data


@require_GET
@api_login_required
def conversation_list(request: HttpRequest) -> JsonResponse:
    paginator = Paginator(selectors.conversation_list(user=request.user), CONVERSATIONS_PER_PAGE)
    try:
        page = paginator.page(request.GET.get("page", 1))
    except PageNotAnInteger:
        return error_response(HTTPStatus.BAD_REQUEST, "`page` must be a positive integer.")
    except EmptyPage:
        return error_response(HTTPStatus.NOT_FOUND, "No such page.")
    next_url = f"{request.path}?page={page.next_page_number()}" if page.has_next() else None
    return JsonResponse({"results": [conversation_json(c) for c in page.object_list], "next": next_url})


@require_http_methods(["GET", "PATCH", "DELETE"])
@api_login_required
def conversation_detail(request: HttpRequest, conversation_id: int) -> HttpResponse:
    if request.method == "DELETE":
        if not services.conversation_delete(user=request.user, conversation_id=conversation_id):
            return error_response(HTTPStatus.NOT_FOUND, "Conversation not found.")
        return HttpResponse(status=HTTPStatus.NO_CONTENT)
    conversation = selectors.conversation_get(user=request.user, conversation_id=conversation_id)
    if conversation is None:
        return error_response(HTTPStatus.NOT_FOUND, "Conversation not found.")
    if request.method == "PATCH":
        try:
            data = _json_body(request)
            title = data.get("title")
            if not isinstance(title, str) or not title.strip() or len(title.strip()) > 200:
                raise ApiError(HTTPStatus.BAD_REQUEST, "`title` must be a non-empty string of at most 200 characters.")
            refuse_unstorable_text(title, "title")
        except ApiError as exc:
            return error_response(exc.status, exc.message)
        conversation = services.conversation_rename(
            user=request.user, conversation_id=conversation_id, title=title.strip()
        )
    return JsonResponse(conversation_json(conversation))


@require_GET
@api_login_required
def message_list(request: HttpRequest, conversation_id: int) -> JsonResponse:
    conversation = selectors.conversation_get(user=request.user, conversation_id=conversation_id)
    if conversation is None:
        return error_response(HTTPStatus.NOT_FOUND, "Conversation not found.")
    messages = selectors.message_list(conversation=conversation)
    return JsonResponse({"conversation": conversation_json(conversation), "messages": [message_json(m) for m in messages]})


@require_http_methods(["DELETE"])
@api_login_required
def message_detail(request: HttpRequest, conversation_id: int, message_id: int) -> HttpResponse:
    if not services.message_delete(user=request.user, conversation_id=conversation_id, message_id=message_id):
        return error_response(HTTPStatus.NOT_FOUND, "Message not found.")
    return HttpResponse(status=HTTPStatus.NO_CONTENT)


@require_GET
@api_login_required
@never_cache
def stream_token(request: HttpRequest) -> JsonResponse:
    token, expires_in = stream_auth.mint_stream_token(user=request.user, session_key=request.session.session_key)
    return JsonResponse({"token": token, "expires_in": expires_in})


# --- Fallback stream (same contract as the sidecar) --------------------------------------------


def stream_endpoint(view: Callable) -> Callable:
    """Authenticate like the sidecar: a bearer stream token, or the session cookie plus Django's
    CSRF check (which also verifies the Origin) for unsafe methods. Errors are JSON."""

    csrf_check = CsrfViewMiddleware(lambda request: HttpResponse())

    @csrf_exempt
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        try:
            authorization = request.headers.get("Authorization")
            if authorization is not None:
                allowed = [f"{request.scheme}://{request.get_host()}", *settings.CORS_ALLOWED_ORIGINS]
                service.check_origin(request.headers.get("Origin"), allowed)
                user = stream_auth.authenticate_stream_caller(authorization=authorization, session_key=None)
            else:
                user = request.user if request.user.is_authenticated else None
                if user is not None and request.method == "POST":
                    if csrf_check.process_view(request, None, (), {}) is not None:
                        raise ApiError(HTTPStatus.FORBIDDEN, "CSRF verification failed. Reload the page and try again.")
            if user is None:
                raise service.unauthorized()
            return view(request, user, *args, **kwargs)
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.headers)

    return wrapper


def sse_response(body) -> StreamingHttpResponse:
    return StreamingHttpResponse(background_runtime().iterate(body), headers=SSE_HEADERS)


@require_POST
@stream_endpoint
def chat_stream(request: HttpRequest, user) -> HttpResponse:
    runtime = background_runtime()
    body = runtime.call(
        service.start_reply_stream(runtime.runtime, caller=user, body=request.body, content_type=request.content_type)
    )
    return sse_response(body)


@require_GET
@stream_endpoint
def chat_stream_resume(request: HttpRequest, user, message_id: int) -> HttpResponse:
    runtime = background_runtime()
    body = runtime.call(
        service.resume_reply_stream(
            runtime.runtime, user=user, message_id=message_id, last_event_id=request.headers.get("Last-Event-ID")
        )
    )
    return sse_response(body)


@require_POST
@stream_endpoint
def chat_stream_stop(request: HttpRequest, user, message_id: int) -> JsonResponse:
    runtime = background_runtime()
    result = runtime.call(
        service.stop_reply(runtime.runtime, user=user, message_id=message_id, content_type=request.content_type)
    )
    return JsonResponse(result)
