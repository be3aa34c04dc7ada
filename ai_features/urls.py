from django.urls import path

from . import views

app_name = "ai_features"

urlpatterns = [
    path("ai/chat/", views.chat_page, name="chat"),
    path("ai/chat/c/<int:conversation_id>/", views.chat_page, name="chat-conversation"),
    path("api/ai/conversations/", views.conversation_list, name="conversation-list"),
    path("api/ai/conversations/<int:conversation_id>/", views.conversation_detail, name="conversation-detail"),
    path("api/ai/conversations/<int:conversation_id>/messages/", views.message_list, name="message-list"),
    path(
        "api/ai/conversations/<int:conversation_id>/messages/<int:message_id>/",
        views.message_detail,
        name="message-detail",
    ),
    path("api/ai/stream-token/", views.stream_token, name="stream-token"),
    path("api/ai/chat/stream/", views.chat_stream, name="chat-stream"),
    path("api/ai/chat/stream/<int:message_id>/", views.chat_stream_resume, name="chat-stream-resume"),
    path("api/ai/chat/stream/<int:message_id>/stop/", views.chat_stream_stop, name="chat-stream-stop"),
]
