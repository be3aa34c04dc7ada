"""Production configuration: Django's deploy checks, the settings contract and the Render blueprint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

PRODUCTION_ENV = {
    "DEBUG": "0",
    "SECRET_KEY": "a-production-secret-key-that-is-long-and-random-" + "q7Z" * 12,
    "ALLOWED_HOSTS": "c3-app.onrender.com",
    "CSRF_TRUSTED_ORIGINS": "https://c3-app.onrender.com",
    "STREAM_API_URL": "c3-app-stream.onrender.com",
}


def run_manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTEST", "DEBUG", "SECRET_KEY"))}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def test_check_deploy_is_clean_with_production_settings():
    result = run_manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_a_secret_key():
    env = {k: v for k, v in PRODUCTION_ENV.items() if k != "SECRET_KEY"}
    result = run_manage("check", env=env)
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_wildcard_cors_origins_are_refused():
    result = run_manage("check", env={**PRODUCTION_ENV, "CORS_ALLOWED_ORIGINS": "https://*.onrender.com"})
    assert result.returncode != 0
    assert "wildcards are refused" in result.stderr


def test_bare_hosts_become_https_origins():
    code = "from django.conf import settings as s; print(s.STREAM_API_URL, s.CORS_ALLOWED_ORIGINS, s.SECURE_SSL_REDIRECT)"
    result = run_manage("shell", "-c", code, env={**PRODUCTION_ENV, "CORS_ALLOWED_ORIGINS": "c3-app.onrender.com"})
    assert result.returncode == 0, result.stderr
    assert "https://c3-app-stream.onrender.com ['https://c3-app.onrender.com'] True" in result.stdout


def test_the_render_blueprint_defines_both_services_sharing_one_secret():
    blueprint = yaml.safe_load((ROOT / "render.yaml").read_text())
    services = {service["name"]: service for service in blueprint["services"]}
    app, sidecar = services["c3-app"], services["c3-app-stream"]
    assert "gunicorn c3_app.wsgi:application" in app["startCommand"]
    assert sidecar["startCommand"] == "./start_stream.sh"
    assert app["healthCheckPath"] == sidecar["healthCheckPath"] == "/healthz"
    group = blueprint["envVarGroups"][0]
    assert {"key": "SECRET_KEY", "generateValue": True} in group["envVars"]
    for service in (app, sidecar):
        assert {"fromGroup": group["name"]} in service["envVars"]
        assert {"key": "DATABASE_URL", "sync": False} in service["envVars"]
    assert (ROOT / "start_stream.sh").stat().st_mode & 0o111


def test_start_stream_binds_the_render_port_with_long_keep_alive():
    script = (ROOT / "start_stream.sh").read_text()
    assert '--port "${PORT:-8001}"' in script and "--host 0.0.0.0" in script
    assert "--timeout-keep-alive 300" in script


def test_postgresql_connections_give_up_after_a_connect_timeout():
    code = "from django.conf import settings as s; print(s.DATABASES['default']['OPTIONS']['connect_timeout'])"
    url = "postgres://u@db.example.com:5432/c3"
    default = run_manage("shell", "-c", code, env={**PRODUCTION_ENV, "DATABASE_URL": url})
    assert default.returncode == 0, default.stderr
    assert default.stdout.splitlines()[-1] == "10"
    own = run_manage("shell", "-c", code, env={**PRODUCTION_ENV, "DATABASE_URL": url + "?connect_timeout=3"})
    assert own.stdout.splitlines()[-1] == "3"
