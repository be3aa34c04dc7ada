"""Who is calling the stream endpoints: the Django session cookie, or a short-lived stream token.

A stream token exists because `*.onrender.com` is on the Public Suffix List: the page's session
cookie never reaches the sidecar's host. The token names its session by a digest of the key (never
the key), so it dies with the session: logout deletes the row, a password change cycles the key,
and Django's session-hash check runs on every use (`_session_user`).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model, load_backend
from django.core.exceptions import ValidationError
from django.utils.crypto import constant_time_compare
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from .sessions import SessionStore, session_key_digest

TOKEN_SALT = "c3.stream-token"
_NOT_LOADED = object()


def _serializer() -> URLSafeTimedSerializer:
    # itsdangerous takes keys oldest first and signs with the last: SECRET_KEY_FALLBACKS keep
    # tokens minted before a key rotation valid until they expire.
    keys = [*reversed(settings.SECRET_KEY_FALLBACKS), settings.SECRET_KEY]
    return URLSafeTimedSerializer(keys, salt=TOKEN_SALT)


def mint_stream_token(*, user, session_key: str) -> tuple[str, int]:
    token = _serializer().dumps({"u": user.pk, "s": session_key_digest(session_key)})
    return token, settings.STREAM_TOKEN_TTL_SECONDS


def user_from_session_key(session_key: str | None):
    """The active user of a live session: the session cookie, when the sidecar shares the app's site."""
    if not session_key:
        return None
    return _session_user(SessionStore(session_key=session_key))


def user_from_stream_token(token: str | None):
    if not token:
        return None
    try:
        claims = _serializer().loads(token, max_age=settings.STREAM_TOKEN_TTL_SECONDS)
    except (SignatureExpired, BadSignature):
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("s"), str) or type(claims.get("u")) is not int:
        return None
    found = SessionStore.with_user_by_key_digest(claims["s"], claims["u"])
    if found is None:
        return None
    store, user = found
    # The callers use only the user's pk: its other fields are deferred, and loading one on the
    # event loop would raise SynchronousOnlyOperation.
    return _session_user(store, preloaded=user, expected_id=claims["u"])


# The backend whose get_user() is a primary-key lookup and an is_active check, which a user row
# loaded with the session (a stream token names both) answers without a query of its own.
_MODEL_BACKEND = "django.contrib.auth.backends.ModelBackend"


def _session_user(store: SessionStore, *, preloaded=_NOT_LOADED, expected_id: int | None = None):
    """The active user a session is logged in as, checked as Django's get_user() checks a request's
    session: a configured backend, a user it returns, and the session hash (password changes log
    sessions out), with SECRET_KEY_FALLBACKS. For a stream token, `expected_id` is the user it
    names and `preloaded` that user's row, loaded with the session (None: deleted), which stands in
    for ModelBackend's own lookup.

    It differs from get_user() in what it writes: nothing. On a hash that only a fallback key
    verifies, get_user() cycles the session key, saving a new session and deleting the one the
    person's cookie names; the sidecar's new cookie never reaches the page, so the first stream
    after a key rotation would log the person out. On a hash that fails, get_user() deletes the
    session; it is refused here, and the app deletes it on the person's next page.
    """
    try:
        user_id = get_user_model()._meta.pk.to_python(store[SESSION_KEY])
        backend_path = store[BACKEND_SESSION_KEY]
    except (KeyError, ValidationError):
        return None
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    if expected_id is not None and user_id != expected_id:
        return None
    if preloaded is not _NOT_LOADED and backend_path == _MODEL_BACKEND:
        user = preloaded
    else:
        user = load_backend(backend_path).get_user(user_id)
    if user is None or not getattr(user, "is_active", True):
        return None
    if expected_id is not None and user.pk != expected_id:  # a backend that maps ids
        return None
    if hasattr(user, "get_session_auth_hash"):
        session_hash = store.get(HASH_SESSION_KEY)
        if not session_hash or not (
            constant_time_compare(session_hash, user.get_session_auth_hash())
            or any(constant_time_compare(session_hash, fallback) for fallback in user.get_session_auth_fallback_hash())
        ):
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
