from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

from ai_features.views import healthz, not_found

urlpatterns = [
    path("", RedirectView.as_view(url="/ai/chat/", permanent=False)),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("", include("ai_features.urls")),
]

handler404 = not_found  # JSON under /api/, Django's page elsewhere
