"""Reads of a user's data. Every query is scoped by its owner here, in one place: another user's
conversation or message is simply not found (404), never forbidden (403)."""

from __future__ import annotations

from django.db.models import QuerySet

from .models import Conversation, Message


def conversation_list(*, user) -> QuerySet[Conversation]:
    return Conversation.objects.filter(user=user).order_by("-updated_at", "-id")


def conversation_get(*, user, conversation_id: int) -> Conversation | None:
    return Conversation.objects.filter(user=user, pk=conversation_id).first()


def message_list(*, conversation: Conversation) -> QuerySet[Message]:
    return conversation.messages.order_by("created_at", "id")


def reply_get(*, user, message_id: int) -> Message | None:
    return Message.objects.filter(user=user, pk=message_id, role=Message.Role.ASSISTANT).first()
