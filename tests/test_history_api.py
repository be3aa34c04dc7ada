"""The history JSON API, the pages and the admin, through Django's test client."""

from __future__ import annotations

import json
from http import HTTPStatus

import pytest
from django.test import Client

from ai_features.models import Conversation, Message

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation_of():
    def make(user, title="A chat", replies=("hello", "hi there")):
        conversation = Conversation.objects.create(user=user, title=title)
        for index, text in enumerate(replies):
            role = Message.Role.USER if index % 2 == 0 else Message.Role.ASSISTANT
            Message.objects.create(conversation=conversation, user=user, role=role, content=text, model="gpt-4o-mini")
        return conversation

    return make


@pytest.fixture
def browser(user) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf_headers(client: Client) -> dict:
    client.get("/ai/chat/")  # the page sets the CSRF cookie, as in a real visit
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def test_conversations_are_listed_most_recent_first_and_paginated(browser, user, other_user, conversation_of):
    for index in range(35):
        conversation_of(user, title=f"chat {index}")
    conversation_of(other_user, title="not yours")

    first = browser.get("/api/ai/conversations/").json()
    second = browser.get(first["next"]).json()

    titles = [c["title"] for c in first["results"] + second["results"]]
    assert titles == [f"chat {index}" for index in reversed(range(35))]
    assert second["next"] is None
    assert set(first["results"][0]) == {"id", "title", "created_at", "updated_at"}


def test_messages_come_oldest_first_with_metadata(browser, user, conversation_of):
    conversation = conversation_of(user)
    body = browser.get(f"/api/ai/conversations/{conversation.pk}/messages/").json()
    assert body["conversation"]["id"] == conversation.pk
    assert [m["content"] for m in body["messages"]] == ["hello", "hi there"]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
    assert set(body["messages"][1]["metadata"]) == {"model", "prompt_tokens", "completion_tokens", "ttft_ms", "duration_ms"}


def test_rename_and_delete(browser, user, conversation_of):
    conversation = conversation_of(user)
    headers = csrf_headers(browser)

    renamed = browser.patch(
        f"/api/ai/conversations/{conversation.pk}/", data=json.dumps({"title": "  Better  "}),
        content_type="application/json", **headers,
    )
    assert renamed.status_code == HTTPStatus.OK and renamed.json()["title"] == "Better"

    message = conversation.messages.first()
    gone = browser.delete(f"/api/ai/conversations/{conversation.pk}/messages/{message.pk}/", **headers)
    assert gone.status_code == HTTPStatus.NO_CONTENT
    assert not Message.objects.filter(pk=message.pk).exists()

    deleted = browser.delete(f"/api/ai/conversations/{conversation.pk}/", **headers)
    assert deleted.status_code == HTTPStatus.NO_CONTENT
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()


@pytest.mark.parametrize("title", ["", "   ", None, 5, "x" * 201, "a\x00b", "a\ud83db"])
def test_a_bad_title_is_400(browser, user, conversation_of, title):
    conversation = conversation_of(user, title="Keep me")
    answer = browser.patch(
        f"/api/ai/conversations/{conversation.pk}/", data=json.dumps({"title": title}),
        content_type="application/json", **csrf_headers(browser),
    )
    assert answer.status_code == HTTPStatus.BAD_REQUEST
    assert "error" in answer.json()
    conversation.refresh_from_db()
    assert conversation.title == "Keep me"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"title": ' + b"9" * 5000 + b"}",  # json.loads: a bare ValueError (integer too long)
        b'{"title": "x", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",  # a RecursionError
        b"\xff\xfe",
    ],
)
def test_a_malformed_body_is_a_400_json_error(browser, user, conversation_of, body):
    conversation = conversation_of(user, title="Keep me")
    answer = browser.patch(
        f"/api/ai/conversations/{conversation.pk}/", data=body, content_type="application/json",
        **csrf_headers(browser),
    )
    assert answer.status_code == HTTPStatus.BAD_REQUEST
    assert answer.json()["error"] == "The request body is not valid JSON."
    conversation.refresh_from_db()
    assert conversation.title == "Keep me"


def test_a_body_past_djangos_upload_limit_is_a_413_json_error(browser, user, conversation_of, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    conversation = conversation_of(user, title="Keep me")
    answer = browser.patch(
        f"/api/ai/conversations/{conversation.pk}/", data=json.dumps({"title": "y" * 5000}),
        content_type="application/json", **csrf_headers(browser),
    )
    assert answer.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert "error" in answer.json()


def test_unsafe_methods_need_the_csrf_token(browser, user, conversation_of):
    conversation = conversation_of(user)
    answer = browser.delete(f"/api/ai/conversations/{conversation.pk}/")
    assert answer.status_code == HTTPStatus.FORBIDDEN
    assert "CSRF" in answer.json()["error"]  # JSON like every API error; the page shows it
    assert Conversation.objects.filter(pk=conversation.pk).exists()


def test_a_wrong_method_or_path_of_the_api_is_a_json_error_and_pages_keep_html(browser, user, conversation_of):
    conversation = conversation_of(user)
    wrong_method = browser.post("/api/ai/conversations/", **csrf_headers(browser))
    assert wrong_method.status_code == HTTPStatus.METHOD_NOT_ALLOWED
    assert wrong_method["Allow"] == "GET" and wrong_method.json()["error"]
    wrong_method = browser.post(f"/api/ai/conversations/{conversation.pk}/", **csrf_headers(browser))
    assert wrong_method.status_code == HTTPStatus.METHOD_NOT_ALLOWED
    assert wrong_method["Allow"] == "GET, PATCH, DELETE"
    unknown = browser.get("/api/ai/conversations/abc/")
    assert unknown.status_code == HTTPStatus.NOT_FOUND and unknown.json()["error"]
    page = browser.get("/no-such-page/")
    assert page.status_code == HTTPStatus.NOT_FOUND and page["Content-Type"].startswith("text/html")


def test_another_users_data_is_404_everywhere(browser, other_user, conversation_of):
    theirs = conversation_of(other_user, title="secret")
    message = theirs.messages.first()
    headers = csrf_headers(browser)
    urls = [
        ("get", f"/api/ai/conversations/{theirs.pk}/"),
        ("get", f"/api/ai/conversations/{theirs.pk}/messages/"),
        ("patch", f"/api/ai/conversations/{theirs.pk}/"),
        ("delete", f"/api/ai/conversations/{theirs.pk}/messages/{message.pk}/"),
        ("delete", f"/api/ai/conversations/{theirs.pk}/"),
    ]
    for method, url in urls:
        body = {} if method == "get" else {"data": json.dumps({"title": "pwned"}), "content_type": "application/json"}
        answer = getattr(browser, method)(url, **body, **headers)
        assert answer.status_code == HTTPStatus.NOT_FOUND, (method, url)
        assert "secret" not in answer.content.decode()
    theirs.refresh_from_db()
    assert theirs.title == "secret" and theirs.messages.count() == 2


def test_anonymous_api_calls_get_401_json_and_pages_redirect_to_login(client):
    for url in ["/api/ai/conversations/", "/api/ai/conversations/1/messages/", "/api/ai/stream-token/"]:
        answer = client.get(url)
        assert answer.status_code == HTTPStatus.UNAUTHORIZED, url
        assert "error" in answer.json()
    page = client.get("/ai/chat/")
    assert page.status_code == HTTPStatus.FOUND and page.url.startswith("/accounts/login/")
    assert client.get("/").url == "/ai/chat/"


def test_the_chat_page_carries_its_configuration(browser, settings):
    settings.STREAM_API_URL = "https://stream.example.com"
    settings.OPENAI_API_KEY = ""
    page = browser.get("/ai/chat/c/12/")
    assert page.status_code == HTTPStatus.OK
    config = page.context["config"]
    assert config["streamBaseUrl"] == "https://stream.example.com"
    assert config["demoModel"] is True
    assert config["initialConversationId"] == 12
    assert b'id="c3-config"' in page.content


def test_logout_is_post_only(browser):
    assert browser.get("/accounts/logout/").status_code == HTTPStatus.METHOD_NOT_ALLOWED


def test_admin_lists_conversations_messages_and_live_generations(admin_client, user, conversation_of):
    conversation = conversation_of(user, title="Support case")
    Message.objects.create(conversation=conversation, user=user, role=Message.Role.ASSISTANT, status="streaming")
    for url in [
        "/admin/ai_features/conversation/",
        f"/admin/ai_features/conversation/{conversation.pk}/change/",
        "/admin/ai_features/message/?status__exact=completed",
        "/admin/ai_features/message/?q=hello",
        "/admin/ai_features/livegeneration/",
    ]:
        answer = admin_client.get(url)
        assert answer.status_code == HTTPStatus.OK, url
    assert b"Support case" in admin_client.get("/admin/ai_features/conversation/?q=Support").content


def test_admin_stop_action_requests_a_stop(admin_client, user, conversation_of):
    conversation = conversation_of(user)
    live = Message.objects.create(conversation=conversation, user=user, role=Message.Role.ASSISTANT, status="streaming")
    answer = admin_client.post(
        "/admin/ai_features/livegeneration/", {"action": "stop_generation", "_selected_action": [live.pk]}
    )
    assert answer.status_code == HTTPStatus.FOUND
    live.refresh_from_db()
    assert live.stop_requested is True


def test_healthz_answers_ok(client):
    answer = client.get("/healthz")
    assert answer.status_code == HTTPStatus.OK and answer.json()["status"] == "ok"


def test_a_bad_page_number_is_400_and_a_page_past_the_end_is_404(browser):
    assert browser.get("/api/ai/conversations/?page=abc").status_code == HTTPStatus.BAD_REQUEST
    assert browser.get("/api/ai/conversations/?page=99").status_code == HTTPStatus.NOT_FOUND


def test_deleting_a_conversation_with_a_reply_still_generating_leaves_nothing_behind(browser, user, conversation_of):
    conversation = conversation_of(user)
    Message.objects.create(conversation=conversation, user=user, role=Message.Role.ASSISTANT, status="streaming")
    assert browser.delete(f"/api/ai/conversations/{conversation.pk}/", **csrf_headers(browser)).status_code == 204
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()
