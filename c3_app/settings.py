"""Settings for both services (Django under gunicorn and the FastAPI sidecar).

Everything comes from the environment (a `.env` file is read when present), so the two services
share the database, SECRET_KEY and session engine simply by sharing their environment.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv

BASE_DIR = Path(__file__).resolve().parent.parent
load_dotenv(BASE_DIR / ".env")


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    raw = env_str(name)
    return int(raw) if raw else default


def env_float(name: str, default: float) -> float:
    raw = env_str(name)
    return float(raw) if raw else default


def env_list(name: str, default: list[str] | None = None) -> list[str]:
    raw = env_str(name)
    if not raw:
        return list(default or [])
    return [item.strip() for item in raw.split(",") if item.strip()]


# --- Core -------------------------------------------------------------------------------------

DEBUG = env_bool("DEBUG", False)
TESTING = "pytest" in sys.modules or env_bool("C3_TESTING", False)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if DEBUG or TESTING:
        SECRET_KEY = "django-insecure-dev-only-key-never-use-in-production-c3chat"
    else:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
# Old keys still accepted for sessions, CSRF and stream tokens while a rotation settles.
SECRET_KEY_FALLBACKS = env_list("SECRET_KEY_FALLBACKS")

_local_hosts = ["localhost", "127.0.0.1", "[::1]"]
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", _local_hosts if (DEBUG or TESTING) else [])
# Render tells each service its public host name.
if render_host := env_str("RENDER_EXTERNAL_HOSTNAME"):
    ALLOWED_HOSTS.append(render_host)

_local_origins = [f"http://{host}:{port}" for host in ("localhost", "127.0.0.1") for port in (8000, 8001)]
CSRF_TRUSTED_ORIGINS = [
    o if "://" in o else f"https://{o}" for o in env_list("CSRF_TRUSTED_ORIGINS", _local_origins if DEBUG else [])
]
if render_host:
    CSRF_TRUSTED_ORIGINS.append(f"https://{render_host}")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "ai_features",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "c3_app.urls"
WSGI_APPLICATION = "c3_app.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------------
# DATABASE_URL wins; otherwise the SUPABASE_DB_* variables of the original deploy; otherwise an
# embedded SQLite file so a fresh clone runs with no setup.

# Tests close connections after each unit of work so the test database can be dropped.
DB_CONN_MAX_AGE = env_int("DB_CONN_MAX_AGE", 0 if TESTING else 60)

if database_url := env_str("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(database_url, conn_max_age=DB_CONN_MAX_AGE, conn_health_checks=True)}
elif env_str("SUPABASE_DB_HOST"):
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": env_str("SUPABASE_DB_NAME", "postgres"),
            "USER": env_str("SUPABASE_DB_USER", "postgres"),
            "PASSWORD": env_str("SUPABASE_DB_PASSWORD"),
            "HOST": env_str("SUPABASE_DB_HOST"),
            "PORT": env_str("SUPABASE_DB_PORT", "5432"),
            "CONN_MAX_AGE": DB_CONN_MAX_AGE,
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": {"sslmode": "require"},
        }
    }
else:
    DATABASES = {"default": dj_database_url.parse(f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}

_db = DATABASES["default"]
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # Both services and several threads write the same file: WAL lets readers run beside the
    # writer, IMMEDIATE transactions take the write lock up front instead of failing on upgrade,
    # and the busy timeout waits for the lock rather than raising "database is locked".
    # Connections persist like PostgreSQL's (one per database thread): opening one costs a file
    # open, two PRAGMAs and ~30 function registrations, and closing the last one checkpoints
    # and deletes the WAL, so a fresh connection per unit of work was most of the sidecar's
    # database time. In WAL mode an idle autocommit connection holds no lock.
    _db["CONN_MAX_AGE"] = DB_CONN_MAX_AGE
    # The same backend, but a process's writers queue on a lock instead of in SQLite's busy handler,
    # which sleeps up to 100 ms between tries (c3_app/sqlite_backend/base.py).
    _db["ENGINE"] = "c3_app.sqlite_backend"
    _db.setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file (not :memory:) so that the test server threads and subprocesses see the same data.
    _db["TEST"] = {"NAME": str(BASE_DIR / f"test_db_{os.getpid()}.sqlite3")}
elif _db["ENGINE"] == "django.db.backends.postgresql":
    _db.setdefault("OPTIONS", {})
    # libpq waits for a connection as long as the OS does (minutes) when packets to the database are
    # dropped: /healthz would hang instead of answering 503, and each attempt would hold one of the
    # sidecar's few database threads. A URL's own ?connect_timeout= wins.
    _db["OPTIONS"].setdefault("connect_timeout", env_int("DB_CONNECT_TIMEOUT_SECONDS", 10))
    if env_bool("DB_TRANSACTION_POOLER", False):
        # Supabase/Supavisor transaction mode (port 6543): no server-side prepared statements or cursors.
        _db["OPTIONS"]["prepare_threshold"] = None
        _db["DISABLE_SERVER_SIDE_CURSORS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth and sessions ------------------------------------------------------------------------

# A database-backed engine of our own: the sidecar reads the same rows, and a stream token can be
# bound to its session (see ai_features/sessions.py).
SESSION_ENGINE = "ai_features.sessions"
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/ai/chat/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# --- Security ---------------------------------------------------------------------------------

# TLS ends at Render's edge; the proxy tells us the original scheme.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG and not TESTING)
SESSION_COOKIE_SECURE = SECURE_SSL_REDIRECT
CSRF_COOKIE_SECURE = SECURE_SSL_REDIRECT
CSRF_FAILURE_VIEW = "ai_features.views.csrf_failure"  # JSON for the API, Django's page elsewhere
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 60 * 60 * 24 * 30) if SECURE_SSL_REDIRECT else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_SSL_REDIRECT
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# Preloading is a decision for the owner of a registrable domain (a *.onrender.com host cannot be
# preloaded), so it is opt-in and its deploy-check warning is silenced on purpose.
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # Render's health checker speaks plain http inside its network
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"

# --- Internationalisation and static files ----------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve straight from the apps when collectstatic has not run (dev, tests); production collects.
WHITENOISE_USE_FINDERS = True
warnings.filterwarnings("ignore", message="No directory at")  # WhiteNoise, before collectstatic

# --- Logging ----------------------------------------------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # The HTTP clients log every request at INFO: one line per model call is noise, and a cost, at
    # thousands of replies. Failures are logged by the provider.
    "loggers": {name: {"level": "WARNING"} for name in ("httpx", "httpx2")},
}

# --- c3 chat: streaming -----------------------------------------------------------------------



def as_origin(value: str) -> str:
    """Accept a bare host too (Render's `fromService … property: host` gives one) as https."""
    value = value.strip().rstrip("/")
    return value if "://" in value or not value else f"https://{value}"


# Base URL of the sidecar; empty means the page streams from Django's fallback endpoint.
STREAM_API_URL = as_origin(env_str("STREAM_API_URL"))
# Exact origins the sidecar answers with credentials (never a wildcard).
CORS_ALLOWED_ORIGINS = [as_origin(o) for o in env_list("CORS_ALLOWED_ORIGINS", CSRF_TRUSTED_ORIGINS)]
if any("*" in origin for origin in CORS_ALLOWED_ORIGINS):
    raise ImproperlyConfigured("CORS_ALLOWED_ORIGINS takes exact origins; wildcards are refused.")

STREAM_HEARTBEAT_SECONDS = env_float("STREAM_HEARTBEAT_SECONDS", 15.0)
STREAM_TOKEN_TTL_SECONDS = env_int("STREAM_TOKEN_TTL_SECONDS", 300)

# --- c3 chat: the model -----------------------------------------------------------------------

OPENAI_API_KEY = env_str("OPENAI_API_KEY")
OPENAI_BASE_URL = env_str("OPENAI_BASE_URL") or None
OPENAI_MODEL = env_str("OPENAI_MODEL", "gpt-4o-mini")
# Connect and between-bytes read timeout for the model server; a silent model is ended after this.
OPENAI_TIMEOUT_SECONDS = env_float("OPENAI_TIMEOUT_SECONDS", 60.0)
SYSTEM_PROMPT = env_str("SYSTEM_PROMPT", "You are c3 chat, a helpful assistant. Answer in Markdown when it helps.")
MAX_CHAT_HISTORY = env_int("MAX_CHAT_HISTORY", 14)
# Pace of the offline demo model, so people can watch it stream.
DEMO_MODEL_DELAY_MS = env_int("DEMO_MODEL_DELAY_MS", 35)

# --- c3 chat: limits --------------------------------------------------------------------------

MAX_MESSAGE_CHARS = env_int("MAX_MESSAGE_CHARS", 8000)
MAX_REQUEST_BYTES = env_int("MAX_REQUEST_BYTES", 64 * 1024)
RATE_LIMIT_MESSAGES_PER_MINUTE = env_int("RATE_LIMIT_MESSAGES_PER_MINUTE", 20)
MAX_CONCURRENT_REPLIES_PER_USER = env_int("MAX_CONCURRENT_REPLIES_PER_USER", 3)
MAX_REPLY_SECONDS = env_float("MAX_REPLY_SECONDS", 300.0)
MAX_REPLY_TOKENS = env_int("MAX_REPLY_TOKENS", 4096)

# --- c3 chat: durable generations -------------------------------------------------------------

# A generating process renews its lease; older leases are reaped as "interrupted".
GENERATION_LEASE_SECONDS = env_float("GENERATION_LEASE_SECONDS", 30.0)
# How often buffered pieces are written to the reply's event log (one batched write per tick).
GENERATION_FLUSH_SECONDS = env_float("GENERATION_FLUSH_SECONDS", 0.2)
# How often a process looks for Stop requests made through another process, and how often a
# watcher on another process polls the log.
GENERATION_POLL_SECONDS = env_float("GENERATION_POLL_SECONDS", 0.1)
# On shutdown, how long running replies may take to finish before they are marked interrupted.
GENERATION_SHUTDOWN_GRACE_SECONDS = env_float("GENERATION_SHUTDOWN_GRACE_SECONDS", 20.0)
# Threads (and so at most this many database connections) that run ORM work for the event loop.
DB_THREADS = env_int("DB_THREADS", 8)
