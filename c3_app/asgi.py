"""ASGI entry point for Django itself (optional; production streams go through asgi_stream.py)."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "c3_app.settings")

application = get_asgi_application()
