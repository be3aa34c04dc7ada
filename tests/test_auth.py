"""Who may stream: session cookies, stream tokens bound to their session, CORS and Origin rules."""

from __future__ import annotations

import time
from http import HTTPStatus

import httpx
import pytest
from django.test import Client

from ai_features import stream_auth
from ai_features.sessions import SessionStore, session_key_digest
from tests.conftest import PASSWORD, login_session

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_token_is_minted_for_the_logged_in_session(user):
    client = Client()
    client.force_login(user)
    body = client.get("/api/ai/stream-token/").json()
    assert body["expires_in"] == 300
    assert stream_auth.user_from_stream_token(body["token"]) == user
    assert client.get("/api/ai/stream-token/")["Cache-Control"].startswith("max-age=0")


def test_a_token_stops_working_at_logout(user):
    client = Client()
    client.login(username=user.username, password=PASSWORD)
    token = client.get("/api/ai/stream-token/").json()["token"]
    client.post("/accounts/logout/")
    assert stream_auth.user_from_stream_token(token) is None


def test_a_token_stops_working_when_the_password_changes(user):
    session_key = login_session(user)
    token, _ = stream_auth.mint_stream_token(user=user, session_key=session_key)
    user.set_password("a-brand-new-password-42")
    user.save()
    assert stream_auth.user_from_stream_token(token) is None
    assert stream_auth.user_from_session_key(session_key) is None


def test_a_token_expires(user, settings):
    session_key = login_session(user)
    token, _ = stream_auth.mint_stream_token(user=user, session_key=session_key)
    settings.STREAM_TOKEN_TTL_SECONDS = 1
    time.sleep(2.1)
    assert stream_auth.user_from_stream_token(token) is None


def test_a_token_survives_a_secret_key_rotation_but_not_a_forgery(user, settings):
    session_key = login_session(user)
    token, _ = stream_auth.mint_stream_token(user=user, session_key=session_key)
    settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
    settings.SECRET_KEY = "a-new-secret-key-after-rotation-" + "x" * 30
    assert stream_auth.user_from_stream_token(token) == user
    assert stream_auth.user_from_session_key(session_key) == user
    # Verifying writes nothing: Django's get_user() would have cycled the session key here (a new
    # row, the cookie's deleted), and the sidecar's new cookie never reaches the page.
    assert SessionStore().exists(session_key)
    settings.SECRET_KEY_FALLBACKS = []
    assert stream_auth.user_from_stream_token(token) is None
    assert stream_auth.user_from_session_key(session_key) is None  # its hash was made with the removed key
    assert stream_auth.user_from_stream_token(token[:-2] + "AA") is None


def test_a_token_of_an_expired_session_is_refused(user):
    session_key = login_session(user)
    token, _ = stream_auth.mint_stream_token(user=user, session_key=session_key)
    store = SessionStore(session_key=session_key)
    store.set_expiry(-1)
    store.save()
    assert stream_auth.user_from_stream_token(token) is None


def test_a_token_does_not_carry_the_session_key(user):
    session_key = login_session(user)
    token, _ = stream_auth.mint_stream_token(user=user, session_key=session_key)
    assert session_key not in token
    import base64
    import zlib

    payload = token.lstrip(".").split(".")[0]
    raw = zlib.decompress(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert session_key.encode() not in raw


def test_a_token_costs_one_query_and_checks_what_django_checks(user, django_assert_num_queries):
    session_key = login_session(user)
    token, _ = stream_auth.mint_stream_token(user=user, session_key=session_key)
    with django_assert_num_queries(1):  # the session and the user row together
        found = stream_auth.user_from_stream_token(token)
    assert found == user and found.is_active is True
    assert found.username == user.username  # the fields not loaded load on use


def test_a_token_naming_another_user_than_its_session_is_refused(user, other_user):
    # Even when both share a password hash, so that the session-hash check alone would pass.
    other_user.password = user.password
    other_user.save()
    token, _ = stream_auth.mint_stream_token(user=other_user, session_key=login_session(user))
    assert stream_auth.user_from_stream_token(token) is None


@pytest.mark.parametrize("claim", [float, str, lambda pk: None, lambda pk: [pk]])
def test_a_token_whose_user_is_not_an_integer_is_refused(user, claim):
    # Only the server signs tokens, but their claims are still checked: 5.0 == 5 in Python.
    token = stream_auth._serializer().dumps({"u": claim(user.pk), "s": session_key_digest(login_session(user))})
    assert stream_auth.user_from_stream_token(token) is None


def test_a_token_of_a_deleted_user_is_refused(user):
    token, _ = stream_auth.mint_stream_token(user=user, session_key=login_session(user))
    user.delete()
    assert stream_auth.user_from_stream_token(token) is None


def test_a_session_of_a_backend_no_longer_configured_is_refused(user, settings):
    session_key = login_session(user)
    token, _ = stream_auth.mint_stream_token(user=user, session_key=session_key)
    settings.AUTHENTICATION_BACKENDS = ["django.contrib.auth.backends.AllowAllUsersModelBackend"]
    assert stream_auth.user_from_stream_token(token) is None
    assert stream_auth.user_from_session_key(session_key) is None


def test_a_session_without_its_hash_is_refused(user):
    session_key = login_session(user)
    token, _ = stream_auth.mint_stream_token(user=user, session_key=session_key)
    store = SessionStore(session_key=session_key)
    del store["_auth_user_hash"]
    store.save()
    assert stream_auth.user_from_stream_token(token) is None
    assert stream_auth.user_from_session_key(session_key) is None


def test_an_inactive_user_is_refused(user):
    session_key = login_session(user)
    token, _ = stream_auth.mint_stream_token(user=user, session_key=session_key)
    user.is_active = False
    user.save()
    assert stream_auth.user_from_stream_token(token) is None
    assert stream_auth.user_from_session_key(session_key) is None


# --- The sidecar's HTTP rules ------------------------------------------------------------------------


def test_the_sidecar_never_reads_a_token_from_the_query_string(sidecar, user):
    token, _ = stream_auth.mint_stream_token(user=user, session_key=login_session(user))
    answer = httpx.post(f"{sidecar.url}/api/ai/chat/stream/?token={token}", json={"message": "hi"})
    assert answer.status_code == HTTPStatus.UNAUTHORIZED


def test_cors_preflight_allows_exactly_the_configured_origin(sidecar):
    allowed = httpx.options(
        f"{sidecar.url}/api/ai/chat/stream/",
        headers={"Origin": "http://app.test", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )
    assert allowed.status_code == HTTPStatus.OK
    assert allowed.headers["access-control-allow-origin"] == "http://app.test"
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "origin" in allowed.headers["vary"].lower()

    for origin in ["http://evil.test", "http://app.test.evil.test", "null", "https://app.test"]:
        refused = httpx.options(
            f"{sidecar.url}/api/ai/chat/stream/",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert refused.headers.get("access-control-allow-origin") is None, origin


def test_a_simple_cross_site_post_is_refused_before_anything_happens(sidecar, user):
    """A form or text/plain POST from another site (no preflight) carries the cookie where the
    browser allows it: the Origin check refuses it and nothing is stored."""
    from ai_features.models import Message

    session_key = login_session(user)
    answer = httpx.post(
        f"{sidecar.url}/api/ai/chat/stream/", content=b'{"message": "hi"}',
        headers={"Origin": "http://evil.test", "Content-Type": "text/plain", "Cookie": f"sessionid={session_key}"},
    )
    assert answer.status_code == HTTPStatus.FORBIDDEN
    assert answer.headers.get("access-control-allow-origin") is None
    assert Message.objects.count() == 0


def test_sidecar_health(sidecar):
    answer = httpx.get(f"{sidecar.url}/healthz")
    assert answer.status_code == HTTPStatus.OK and answer.json()["status"] == "ok"
