"""Django views: the chat page, the history JSON API, stream tokens, health, and the fallback stream.

The fallback stream endpoints are thin adapters over `streaming.service`, exactly like the sidecar.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from http import HTTPStatus

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import RequestDataTooBig
from django.core.paginator import EmptyPage, PageNotAnInteger, Paginator
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware, get_token
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.csrf import csrf_failure as html_csrf_failure
from django.views.defaults import page_not_found as html_page_not_found

from . import selectors, services, stream_auth
from .models import Conversation, Message
from .streaming import service
from .streaming.background import background_runtime
from .streaming.sse import SSE_HEADERS
from .streaming.validation import ApiError, parse_json_object, refuse_unstorable_text, require_json

CONVERSATIONS_PER_PAGE = 30


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JsonResponse:
    return JsonResponse({"error": message}, status=status, headers=headers)


def api_methods(*methods: str) -> Callable[[Callable], Callable]:
    """Like require_http_methods, but another method gets 405 JSON (with Allow) instead of an empty
    HTML page: every error of the API is `{"error": ...}`."""

    def decorator(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs):
            if request.method not in methods:
                return error_response(HTTPStatus.METHOD_NOT_ALLOWED, f"Use {' or '.join(methods)}.",
                                      headers={"Allow": ", ".join(methods)})
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF_FAILURE_VIEW: a JSON 403 for the API (the page's scripts show its message), Django's own
    page elsewhere."""
    if request.path.startswith("/api/"):
        return error_response(HTTPStatus.FORBIDDEN, "CSRF verification failed. Reload the page and try again.")
    return html_csrf_failure(request, reason)


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler404: a JSON 404 under /api/ (an unknown path, or a reply id that is not a number)."""
    if request.path.startswith("/api/"):
        return error_response(HTTPStatus.NOT_FOUND, "Not found.")
    return html_page_not_found(request, exception)


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


def _request_body(request: HttpRequest) -> bytes:
    """The body, or ApiError 413 (JSON, like every API error) past DATA_UPLOAD_MAX_MEMORY_SIZE, where
    Django itself would answer with an HTML 400."""
    try:
        return request.body
    except RequestDataTooBig:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "The request body is too large.") from None


def _json_body(request: HttpRequest) -> dict:
    require_json(request.content_type)
    return parse_json_object(_request_body(request))


@api_methods("GET")
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


@api_methods("GET", "PATCH", "DELETE")
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


@api_methods("GET")
@api_login_required
def message_list(request: HttpRequest, conversation_id: int) -> JsonResponse:
    conversation = selectors.conversation_get(user=request.user, conversation_id=conversation_id)
    if conversation is None:
        return error_response(HTTPStatus.NOT_FOUND, "Conversation not found.")
    messages = selectors.message_list(conversation=conversation)
    return JsonResponse({"conversation": conversation_json(conversation), "messages": [message_json(m) for m in messages]})


@api_methods("DELETE")
@api_login_required
def message_detail(request: HttpRequest, conversation_id: int, message_id: int) -> HttpResponse:
    if not services.message_delete(user=request.user, conversation_id=conversation_id, message_id=message_id):
        return error_response(HTTPStatus.NOT_FOUND, "Message not found.")
    return HttpResponse(status=HTTPStatus.NO_CONTENT)


@api_methods("GET")
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


@api_methods("POST")
@stream_endpoint
def chat_stream(request: HttpRequest, user) -> HttpResponse:
    runtime = background_runtime()
    body = runtime.call(
        service.start_reply_stream(
            runtime.runtime, caller=user, body=_request_body(request), content_type=request.content_type
        )
    )
    return sse_response(body)


@api_methods("GET")
@stream_endpoint
def chat_stream_resume(request: HttpRequest, user, message_id: int) -> HttpResponse:
    runtime = background_runtime()
    body = runtime.call(
        service.resume_reply_stream(
            runtime.runtime, user=user, message_id=message_id, last_event_id=request.headers.get("Last-Event-ID")
        )
    )
    return sse_response(body)


@api_methods("POST")
@stream_endpoint
def chat_stream_stop(request: HttpRequest, user, message_id: int) -> JsonResponse:
    runtime = background_runtime()
    result = runtime.call(
        service.stop_reply(runtime.runtime, user=user, message_id=message_id, content_type=request.content_type)
    )
    return JsonResponse(result)
