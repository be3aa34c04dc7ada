"""Who is calling the stream endpoints: the Django session cookie, or a short-lived stream token.

A stream token exists because `*.onrender.com` is on the Public Suffix List: the page's session
cookie never reaches the sidecar's host. The token names its session by a digest of the key (never
the key), so it dies with the session: logout deletes the row, a password change cycles the key,
and Django's own session-hash check runs on every use.
"""

from __future__ import annotations

from types import SimpleNamespace

from django.conf import settings
from django.contrib.auth import get_user
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from .sessions import SessionStore, session_key_digest

TOKEN_SALT = "c3.stream-token"


def _serializer() -> URLSafeTimedSerializer:
    # itsdangerous takes keys oldest first and signs with the last: SECRET_KEY_FALLBACKS keep
    # tokens minted before a key rotation valid until they expire.
    keys = [*reversed(settings.SECRET_KEY_FALLBACKS), settings.SECRET_KEY]
    return URLSafeTimedSerializer(keys, salt=TOKEN_SALT)


def mint_stream_token(*, user, session_key: str) -> tuple[str, int]:
    token = _serializer().dumps({"u": user.pk, "s": session_key_digest(session_key)})
    return token, settings.STREAM_TOKEN_TTL_SECONDS


def user_from_session_key(session_key: str | None):
    """The active user of a live session, checked exactly as Django checks a request's session."""
    if not session_key:
        return None
    return _active_user(SessionStore(session_key=session_key))


def _active_user(store: SessionStore | None):
    if store is None:
        return None
    user = get_user(SimpleNamespace(session=store))  # Django's checks: backend, user, session hash
    return user if user.is_authenticated and user.is_active else None


def user_from_stream_token(token: str | None):
    if not token:
        return None
    try:
        claims = _serializer().loads(token, max_age=settings.STREAM_TOKEN_TTL_SECONDS)
    except (SignatureExpired, BadSignature):
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("s"), str):
        return None
    user = _active_user(SessionStore.from_key_digest(claims["s"]))
    if user is None or user.pk != claims.get("u"):
        return None
    return user


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def authenticate_stream_caller(*, authorization: str | None, session_key: str | None):
    """A bearer token when one is sent (and then only it), else the session cookie. None: 401."""
    if authorization is not None:
        return user_from_stream_token(bearer_token(authorization))
    return user_from_session_key(session_key)
