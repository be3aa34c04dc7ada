"""The session engine both services use: Django's database sessions with an indexed key digest."""

from __future__ import annotations

import hashlib

from django.contrib.sessions.backends.db import SessionStore as DBStore


def session_key_digest(session_key: str) -> str:
    # Session keys are 32 random characters, so a plain hash cannot be reversed.
    return hashlib.sha256(session_key.encode()).hexdigest()


class SessionStore(DBStore):
    @classmethod
    def get_model_class(cls):
        from ai_features.models import ChatSession

        return ChatSession

    def create_model_instance(self, data):
        instance = super().create_model_instance(data)
        instance.key_digest = session_key_digest(instance.session_key)
        return instance
