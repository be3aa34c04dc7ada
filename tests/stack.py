"""The whole product as real processes: gunicorn (Django), one or more sidecars (start_stream.sh)
and the OpenAI-compatible test server, sharing a fresh database. Used by the end-to-end and
browser tests and by the benchmark.

The database is a temporary SQLite file, or a fresh PostgreSQL database when DATABASE_URL points
at a PostgreSQL server (the database named there is only used to reach the server).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy in {timeout}s")


def postgres_url() -> str | None:
    """The suite's PostgreSQL server when DATABASE_URL names one, else None (the suite runs on SQLite)."""
    base = os.environ.get("DATABASE_URL", "")
    return base if base.startswith(("postgres://", "postgresql://")) else None


class ScratchPostgres:
    """A throwaway database on the PostgreSQL server (and as the user) that `base_url` names."""

    def __init__(self, base_url: str, *, prefix: str) -> None:
        parts = urlsplit(base_url)
        self.name = f"{prefix}_{secrets.token_hex(4)}"
        self.url = urlunsplit(parts._replace(path=f"/{self.name}"))
        self.admin_url = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
        self._admin(f'CREATE DATABASE "{self.name}"')

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement)

    def drop(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@dataclass
class Stack:
    """Start with `with Stack(...) as stack:`; every process is stopped and the database dropped on exit."""

    sidecars: int = 1
    model_profile: str = "default"
    extra_env: dict[str, str] = field(default_factory=dict)
    stream_api: bool = True  # False: the page uses Django's fallback endpoint
    username: str = "alice"
    password: str = "e2e-" + secrets.token_hex(8)

    def __post_init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="c3-stack-"))
        self.processes: dict[str, subprocess.Popen] = {}
        self.django_port = free_port()
        self.sidecar_ports = [free_port() for _ in range(self.sidecars)]
        self._pg: ScratchPostgres | None = None

    # URLs ------------------------------------------------------------------------------------------

    @property
    def django_url(self) -> str:
        return f"http://127.0.0.1:{self.django_port}"

    def sidecar_url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.sidecar_ports[index]}"

    # Life cycle ------------------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        self.model_port = self._start_model_server()
        self.env = self._environment()
        self.manage("migrate", "--noinput", "-v", "0")
        self.manage("createsuperuser", "--noinput", env={
            "DJANGO_SUPERUSER_USERNAME": self.username,
            "DJANGO_SUPERUSER_PASSWORD": self.password,
            "DJANGO_SUPERUSER_EMAIL": f"{self.username}@example.com",
        })
        self.start_django()
        for index in range(self.sidecars):
            self.start_sidecar(index)

    def _start_model_server(self) -> int:
        process = subprocess.Popen(
            [PYTHON, "-m", "tests.fake_openai", "--port", "0", "--profile", self.model_profile],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(self.workdir / "model.log", "wb"), text=True,
        )
        self.processes["model"] = process
        line = process.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"the model server did not start: {line!r}")
        return int(line.split()[1])

    def _database_url(self) -> str:
        base = postgres_url()
        if base is None:
            return f"sqlite:///{self.workdir / 'stack.sqlite3'}"
        self._pg = ScratchPostgres(base, prefix="c3_stack")
        return self._pg.url

    def _environment(self) -> dict[str, str]:
        django_origin = self.django_url
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DJANGO_", "PYTEST"))},
            "DEBUG": "0",
            "SECRET_KEY": secrets.token_urlsafe(40),
            "SECURE_SSL_REDIRECT": "0",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "CSRF_TRUSTED_ORIGINS": django_origin,
            "CORS_ALLOWED_ORIGINS": django_origin,
            "DATABASE_URL": self._database_url(),
            "STREAM_API_URL": self.sidecar_url(0) if (self.stream_api and self.sidecars) else "",
            "OPENAI_API_KEY": "sk-e2e-not-a-real-key",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.model_port}/v1",
            "OPENAI_MODEL": "gpt-4o-mini",
            "WEB_CONCURRENCY": "2",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.extra_env)
        return env

    def manage(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [PYTHON, "manage.py", *args], cwd=ROOT, env={**self.env, **(env or {})},
            capture_output=True, text=True, timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def start_django(self) -> None:
        log = open(self.workdir / "django.log", "ab")
        process = subprocess.Popen(
            [PYTHON, "-m", "gunicorn", "c3_app.wsgi:application", "--bind", f"127.0.0.1:{self.django_port}"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.processes["django"] = process
        wait_healthy(self.django_url, process)

    def start_sidecar(self, index: int = 0, extra_env: dict[str, str] | None = None) -> None:
        log = open(self.workdir / f"sidecar{index}.log", "ab")
        env = {**self.env, "PORT": str(self.sidecar_ports[index]), "PYTHON": PYTHON, **(extra_env or {})}
        process = subprocess.Popen(
            ["bash", str(ROOT / "start_stream.sh"), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.processes[f"sidecar{index}"] = process
        wait_healthy(self.sidecar_url(index), process)

    def signal_sidecar(self, index: int, sig: int) -> None:
        """Send a signal to the sidecar's process group (uvicorn and its workers)."""
        process = self.processes[f"sidecar{index}"]
        os.killpg(process.pid, sig)

    def wait_exit(self, name: str, timeout: float = 30.0) -> int:
        return self.processes[name].wait(timeout=timeout)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for name, process in list(self.processes.items()):
            if process.poll() is None:
                try:
                    if name == "model":
                        process.terminate()
                    else:
                        os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        if self._pg is not None:
            self._pg.drop()
            self._pg = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    # Acting as a person ----------------------------------------------------------------------------

    def login(self) -> httpx.Client:
        """Log in through the real login form; returns a client holding the session cookie."""
        client = httpx.Client(base_url=self.django_url, timeout=30, follow_redirects=False)
        page = client.get("/accounts/login/")
        page.raise_for_status()
        csrf = client.cookies["csrftoken"]
        answer = client.post(
            "/accounts/login/",
            data={"username": self.username, "password": self.password, "csrfmiddlewaretoken": csrf},
            headers={"Referer": f"{self.django_url}/accounts/login/"},
        )
        if answer.status_code != 302:
            raise RuntimeError(f"login failed: {answer.status_code}")
        return client

    def stream_token(self, client: httpx.Client) -> str:
        answer = client.get("/api/ai/stream-token/")
        answer.raise_for_status()
        return answer.json()["token"]
