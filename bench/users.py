"""Many bench users, each logged in, each with a stream token.

Logging 1,000 users in through the form would cost a PBKDF2 hash each (~0.5 s here), so the
sessions are created server-side with the product's own session engine, exactly as
`django.contrib.auth.login` fills them (user id, backend, session auth hash). The stream tokens
are then taken over HTTP from `GET /api/ai/stream-token/` with each user's session cookie, like
the page does. One user per concurrent stream keeps the per-user rate-limit queries (which count
that user's recent messages) as small as they are in real use.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import httpx

_CREATE = r"""
import json
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.auth.hashers import make_password
from ai_features.sessions import SessionStore

User = get_user_model()
prefix, count = PREFIX, COUNT
User.objects.bulk_create(
    [User(username=f"{prefix}{i:05d}", password=make_password(None)) for i in range(count)], batch_size=500
)
keys = []
for user in User.objects.filter(username__startswith=prefix).order_by("username"):
    store = SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.create()
    keys.append(store.session_key)
print("USERS " + json.dumps({"cookie": settings.SESSION_COOKIE_NAME, "keys": keys}))
"""


@dataclass
class BenchUser:
    session_key: str
    token: str
    csrf: str


def create_users(stack, count: int, prefix: str = "bench") -> list[BenchUser]:
    code = _CREATE.replace("PREFIX", repr(prefix)).replace("COUNT", str(count))
    out = stack.manage("shell", "-c", code)
    line = next(line for line in out.splitlines() if line.startswith("USERS "))
    data = json.loads(line[6:])
    cookie_name = data["cookie"]
    users: list[BenchUser] = []
    with httpx.Client(base_url=stack.django_url, timeout=30) as client:
        for key in data["keys"]:
            answer = client.get("/api/ai/stream-token/", headers={"Cookie": f"{cookie_name}={key}"})
            answer.raise_for_status()
            # Django accepts any 32-character alphanumeric CSRF secret sent as cookie and header.
            csrf = secrets.token_hex(16)
            users.append(BenchUser(session_key=key, token=answer.json()["token"], csrf=csrf))
    stack.session_cookie_name = cookie_name
    return users
