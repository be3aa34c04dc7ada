"""Conversations, messages, the event log of each reply, and the session table both services read."""

from __future__ import annotations

from django.conf import settings
from django.contrib.sessions.base_session import AbstractBaseSession
from django.db import models
from django.db.models import Q


class Conversation(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=False)

    class Meta:
        ordering = ["-updated_at", "-id"]
        indexes = [models.Index(fields=["user", "-updated_at"], name="conversation_user_recent")]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"
        SYSTEM = "system", "System"

    class Status(models.TextChoices):
        STREAMING = "streaming", "Streaming"
        COMPLETED = "completed", "Completed"
        ERROR = "error", "Error"
        CANCELLED = "cancelled", "Cancelled"
        INTERRUPTED = "interrupted", "Interrupted"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    # The owner again, so the per-user idempotency key can be a database constraint and every
    # query of a user's messages is one indexed filter.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETED)
    client_message_id = models.CharField(max_length=100, null=True, blank=True)
    # An assistant reply points at the user message that asked for it.
    reply_to = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replies")

    # What the model reported, and how long the reply took.
    model = models.CharField(max_length=100, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.PositiveIntegerField("time to first token (ms)", null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    error_code = models.CharField(max_length=50, blank=True)
    error_message = models.CharField(max_length=500, blank=True)

    # Durable generation: a live reply's process renews the lease; Stop from any process sets
    # stop_requested, which the owning process picks up.
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    stop_requested = models.BooleanField(default=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["conversation", "created_at"], name="message_conversation_time"),
            models.Index(fields=["user", "created_at"], name="message_user_time"),
            models.Index(fields=["status", "lease_expires_at"], name="message_live_lease"),
            # Only the replies still generating: the per-user concurrency limit, checked by every
            # send, reads the sender's own live replies here instead of every live reply of every
            # user (message_live_lease), so its cost does not grow with the number of streams.
            models.Index(
                fields=["user", "lease_expires_at"],
                condition=Q(status="streaming", role="assistant"),
                name="message_user_live",
            ),
            # Only the live replies someone asked to stop: every process polls these ten times a
            # second, and the poll reads just them, however many replies are live.
            models.Index(fields=["id"], condition=Q(stop_requested=True, status="streaming"), name="message_stop_requested"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "client_message_id"],
                condition=Q(client_message_id__isnull=False),
                name="message_unique_client_id_per_user",
            )
        ]

    def __str__(self) -> str:
        preview = (self.content[:60] + "…") if len(self.content) > 60 else self.content
        return f"{self.role} #{self.pk}: {preview}"


class ReplyChunk(models.Model):
    """A batch of consecutive content pieces of one reply: the log that watchers replay.

    Piece number `first_seq + i` is SSE event id `first_seq + i`; the start event is id 0 and the
    terminal event is (number of pieces + 1), both derived from the message row.
    """

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="chunks")
    first_seq = models.PositiveIntegerField()
    pieces = models.JSONField()

    class Meta:
        ordering = ["message", "first_seq"]
        constraints = [models.UniqueConstraint(fields=["message", "first_seq"], name="chunk_unique_seq")]

    def __str__(self) -> str:
        return f"reply {self.message_id} pieces {self.first_seq}–{self.first_seq + len(self.pieces) - 1}"


class ChatSession(AbstractBaseSession):
    """Django's database session plus a digest of its key, so a stream token can name its session
    without carrying the key itself (the token is visible to page scripts; the key is HttpOnly)."""

    key_digest = models.CharField(max_length=64, db_index=True)

    @classmethod
    def get_session_store_class(cls):
        from ai_features.sessions import SessionStore

        return SessionStore


class LiveGeneration(Message):
    """Assistant replies seen as generations (for the admin's live view)."""

    class Meta:
        proxy = True
        verbose_name = "live generation"
        verbose_name_plural = "live generations"
