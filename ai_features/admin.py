"""Admin for support people: conversations with their messages, every message, and live generations."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count
from django.utils import timezone
from django.utils.text import Truncator

from . import services
from .models import Conversation, LiveGeneration, Message


class MessageInline(admin.TabularInline):
    model = Message
    fields = ("created_at", "role", "status", "short_content", "model", "completion_tokens", "ttft_ms", "duration_ms")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ("created_at", "id")

    @admin.display(description="content")
    def short_content(self, message: Message) -> str:
        return Truncator(message.content).chars(200)

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("title", "user", "message_count", "created_at", "updated_at")
    list_filter = ("created_at", "updated_at")
    search_fields = ("title", "user__username", "user__email", "messages__content")
    readonly_fields = ("user", "created_at", "updated_at")
    list_select_related = ("user",)
    date_hierarchy = "updated_at"
    inlines = [MessageInline]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(message_total=Count("messages"))

    @admin.display(description="messages", ordering="message_total")
    def message_count(self, conversation: Conversation) -> int:
        return conversation.message_total


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("id", "conversation", "user", "role", "status", "short_content", "model", "completion_tokens",
                    "ttft_ms", "created_at")
    list_filter = ("status", "role", "model", "created_at")
    search_fields = ("content", "conversation__title", "user__username", "client_message_id")
    list_select_related = ("conversation", "user")
    date_hierarchy = "created_at"
    readonly_fields = [field.name for field in Message._meta.fields]

    @admin.display(description="content")
    def short_content(self, message: Message) -> str:
        return Truncator(message.content).chars(80)

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(LiveGeneration)
class LiveGenerationAdmin(admin.ModelAdmin):
    """Replies that are generating now, or that ended badly: where an operator looks first."""

    list_display = ("id", "user", "conversation", "status", "lease_state", "stop_requested", "model", "error_code",
                    "created_at")
    list_filter = ("status", "model", "error_code")
    search_fields = ("user__username", "conversation__title")
    list_select_related = ("conversation", "user")
    readonly_fields = [field.name for field in Message._meta.fields]
    actions = ["stop_generation"]

    def get_queryset(self, request):
        statuses = [Message.Status.STREAMING, Message.Status.INTERRUPTED, Message.Status.ERROR]
        return super().get_queryset(request).filter(role=Message.Role.ASSISTANT, status__in=statuses)

    @admin.display(description="lease")
    def lease_state(self, message: Message) -> str:
        if message.lease_expires_at is None:
            return "—"
        seconds = (message.lease_expires_at - timezone.now()).total_seconds()
        return f"renewed, {seconds:.0f}s left" if seconds > 0 else f"expired {-seconds:.0f}s ago"

    @admin.action(description="Stop the selected generations")
    def stop_generation(self, request, queryset) -> None:
        live = list(queryset.filter(status=Message.Status.STREAMING).values_list("pk", flat=True))
        for message_id in live:
            services.reply_request_stop(message_id=message_id)
        self.message_user(request, f"Stop requested for {len(live)} generation(s).", messages.SUCCESS)

    def has_add_permission(self, request) -> bool:
        return False
