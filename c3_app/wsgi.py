"""WSGI entry point for gunicorn: pages, login, history API, admin and the fallback stream."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "c3_app.settings")

application = get_wsgi_application()
