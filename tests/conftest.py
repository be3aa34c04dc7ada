"""Shared fixtures: users and sessions, the OpenAI-compatible test server, and the two stream
services (the FastAPI sidecar under a real uvicorn, Django's fallback under a real WSGI server),
both reached over real sockets by the same client."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.test import Client

from ai_features.stream_auth import mint_stream_token
from tests.fake_openai import FakeOpenAI
from tests.sse_client import SSEEvent, SSEParser

PASSWORD = "correct-horse-battery-staple"


# --- Settings every test starts from --------------------------------------------------------------


@pytest.fixture(autouse=True)
def _test_settings(settings):
    settings.GENERATION_SHUTDOWN_GRACE_SECONDS = 2
    settings.STREAM_HEARTBEAT_SECONDS = 15
    settings.DEMO_MODEL_DELAY_MS = 1
    settings.CORS_ALLOWED_ORIGINS = ["http://app.test"]
    settings.SECURE_SSL_REDIRECT = False
    return settings


@pytest.fixture(scope="session", autouse=True)
def _background_runtime_stops_before_the_test_database_goes(django_db_setup, django_db_blocker) -> Iterator[None]:
    """The Django fallback's generation runtime (one per process, on a daemon thread) runs its
    maintenance loop until the process exits. Left to its atexit hook, one last tick could meet the
    dropped test database and log the failure to a stream already closed. Stopped here, it ends
    while the database still exists: this fixture needs django_db_setup, so it is torn down first."""
    yield
    from ai_features.streaming import background

    if background._instance is not None:
        with django_db_blocker.unblock():
            background._instance.shutdown()


# --- Users ------------------------------------------------------------------------------------------


@pytest.fixture
def make_user(db):
    created = 0

    def make(username: str | None = None):
        nonlocal created
        created += 1
        name = username or f"user{created}-{secrets.token_hex(3)}"
        return get_user_model().objects.create_user(username=name, password=PASSWORD, email=f"{name}@example.com")

    return make


@pytest.fixture
def user(make_user):
    return make_user("alice")


@pytest.fixture
def other_user(make_user):
    return make_user("mallory")


def login_session(user) -> str:
    """A real Django login session for `user`; returns its session key (the cookie value)."""
    client = Client()
    client.force_login(user)
    return client.cookies[django_settings.SESSION_COOKIE_NAME].value


# --- The model server -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fake_openai_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def model_server(fake_openai_server, settings) -> FakeOpenAI:
    """Point the product at the local OpenAI-compatible server, through the real openai SDK."""
    settings.OPENAI_API_KEY = "sk-test-not-a-real-key"
    settings.OPENAI_BASE_URL = fake_openai_server.base_url
    settings.OPENAI_MODEL = "gpt-4o-mini"
    settings.OPENAI_TIMEOUT_SECONDS = 10
    fake_openai_server.clear()
    return fake_openai_server


# --- The two stream services ------------------------------------------------------------------------


class ThreadedUvicorn:
    """The sidecar app under a real uvicorn server on a free port, in a thread of the test process."""

    def __init__(self, app) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=1, loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedUvicorn:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the sidecar did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture
def sidecar(transactional_db) -> Iterator[ThreadedUvicorn]:
    from asgi_stream import create_app

    with ThreadedUvicorn(create_app()) as server:
        yield server


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    raw: bytes
    events: list[SSEEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> dict:
        import json

        return json.loads(self.raw)

    @property
    def payloads(self) -> list[dict]:
        return [event.json for event in self.events]

    @property
    def text(self) -> str:
        return "".join(p["content"] for p in self.payloads if p["type"] == "content")

    @property
    def terminal(self) -> dict:
        return self.payloads[-1]


class StreamClient:
    """Talks to one stream service as one user, the way the page does."""

    def __init__(self, service: StreamService, user, *, auth: str) -> None:
        self.service = service
        self.user = user
        self.session_key = login_session(user) if user is not None else None
        self.auth = auth
        self.http = httpx.Client(base_url=service.url, timeout=httpx.Timeout(30.0))

    def headers(self, extra: dict | None = None) -> dict:
        headers: dict[str, str] = {}
        cookies: list[str] = []
        if self.session_key and self.auth == "token":
            token, _ = mint_stream_token(user=self.user, session_key=self.session_key)
            headers["Authorization"] = f"Bearer {token}"
        elif self.session_key:
            cookies.append(f"{django_settings.SESSION_COOKIE_NAME}={self.session_key}")
            if self.service.name == "django":
                csrf = secrets.token_hex(16)
                cookies.append(f"{django_settings.CSRF_COOKIE_NAME}={csrf}")
                headers["X-CSRFToken"] = csrf
        if cookies:
            headers["Cookie"] = "; ".join(cookies)
        headers.update(extra or {})
        return headers

    def open(self, method: str, path: str, **kwargs):
        kwargs["headers"] = self.headers(kwargs.get("headers"))
        return self.http.stream(method, path, **kwargs)

    def collect(self, method: str, path: str, **kwargs) -> StreamResult:
        with self.open(method, path, **kwargs) as response:
            parser = SSEParser()
            raw = b""
            for chunk in response.iter_raw():
                raw += chunk
                if response.headers.get("content-type", "").startswith("text/event-stream"):
                    parser.feed(chunk)
            return StreamResult(response.status_code, response.headers, raw, parser.events, parser.comments)

    def send(self, message: str | None = None, *, body=None, **fields) -> StreamResult:
        if body is None:
            body = {"message": message, **fields}
        if isinstance(body, (bytes, str)):
            return self.collect("POST", "/api/ai/chat/stream/", content=body, headers={"Content-Type": "application/json"})
        return self.collect("POST", "/api/ai/chat/stream/", json=body)

    def resume(self, message_id: int, last_event_id: int | None = None) -> StreamResult:
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        return self.collect("GET", f"/api/ai/chat/stream/{message_id}/", headers=headers)

    def stop(self, message_id: int) -> httpx.Response:
        return self.http.post(f"/api/ai/chat/stream/{message_id}/stop/", json={}, headers=self.headers())

    def close(self) -> None:
        self.http.close()


@dataclass
class StreamService:
    name: str
    url: str
    clients: list[StreamClient] = field(default_factory=list)

    def client(self, user, *, auth: str | None = None) -> StreamClient:
        client = StreamClient(self, user, auth=auth or ("token" if self.name == "sidecar" else "cookie"))
        self.clients.append(client)
        return client


@pytest.fixture(params=["sidecar", "django"])
def stream_service(request, transactional_db, live_server) -> Iterator[StreamService]:
    """The same contract, run against both adapters."""
    if request.param == "sidecar":
        server = request.getfixturevalue("sidecar")
        service = StreamService("sidecar", server.url)
    else:
        service = StreamService("django", live_server.url)
    yield service
    for client in service.clients:
        client.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
