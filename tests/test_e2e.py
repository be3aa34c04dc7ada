"""End to end over real sockets: gunicorn, the sidecar started by start_stream.sh, the model server."""

from __future__ import annotations

from http import HTTPStatus

import httpx
import pytest

from tests.fake_openai import scenario
from tests.sse_client import SSEParser
from tests.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack():
    with Stack() as running:
        yield running


def test_log_in_take_a_token_and_stream_through_the_sidecar(stack):
    browser = stack.login()
    token = stack.stream_token(browser)

    with httpx.Client(base_url=stack.sidecar_url(), timeout=30) as sidecar:
        # The page's preflight, as a browser would send it from the main app's origin.
        preflight = sidecar.options(
            "/api/ai/chat/stream/",
            headers={
                "Origin": stack.django_url,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == HTTPStatus.OK
        assert preflight.headers["access-control-allow-origin"] == stack.django_url
        assert preflight.headers["access-control-allow-credentials"] == "true"

        parser = SSEParser()
        with sidecar.stream(
            "POST", "/api/ai/chat/stream/",
            json={"message": scenario(chunks=["Hello ", "from ", "the ", "sidecar"], delay_ms=10)},
            headers={"Authorization": f"Bearer {token}", "Origin": stack.django_url},
        ) as response:
            assert response.status_code == HTTPStatus.OK
            assert response.headers["access-control-allow-origin"] == stack.django_url
            assert "origin" in response.headers["vary"].lower()
            for chunk in response.iter_raw():
                parser.feed(chunk)

    payloads = [event.json for event in parser.events]
    assert [p["type"] for p in payloads][0] == "start" and payloads[-1]["type"] == "done"
    text = "".join(p["content"] for p in payloads if p["type"] == "content")
    assert text == "Hello from the sidecar"

    # The main app shows it in the history, as stored by the sidecar.
    conversation_id = payloads[0]["conversation_id"]
    history = browser.get(f"/api/ai/conversations/{conversation_id}/messages/").json()
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
    assert history["messages"][1]["content"] == text
    assert history["messages"][1]["status"] == "completed"
    assert browser.get("/ai/chat/").status_code == HTTPStatus.OK


def test_the_token_dies_with_logout(stack):
    browser = stack.login()
    token = stack.stream_token(browser)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    csrf = browser.cookies["csrftoken"]
    logout = browser.post("/accounts/logout/", headers={"X-CSRFToken": csrf, "Referer": f"{stack.django_url}/"})
    assert logout.status_code == 302

    answer = httpx.post(f"{stack.sidecar_url()}/api/ai/chat/stream/", json={"message": "hi"}, headers=headers)

    assert answer.status_code == HTTPStatus.UNAUTHORIZED


def test_health_endpoints(stack):
    assert httpx.get(f"{stack.django_url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{stack.sidecar_url()}/healthz").json()["status"] == "ok"
