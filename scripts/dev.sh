#!/usr/bin/env bash
# Run c3 chat locally: both services on this machine, SQLite, and the offline demo model unless
# OPENAI_API_KEY is set (in the environment or in .env).
#   main app  http://localhost:8000   (gunicorn)
#   sidecar   http://localhost:8001   (uvicorn, start_stream.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt

export DEBUG="${DEBUG:-1}"
export STREAM_API_URL="${STREAM_API_URL:-http://localhost:8001}"
export PYTHON=.venv/bin/python

.venv/bin/python manage.py migrate --noinput -v 0

# A first user to log in with (only when there is none yet).
if [ "$(.venv/bin/python manage.py shell -c 'from django.contrib.auth import get_user_model; print(get_user_model().objects.exists())' 2>/dev/null | tail -n 1)" != "True" ]; then
  password="$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(12))')"
  DJANGO_SUPERUSER_USERNAME=demo DJANGO_SUPERUSER_PASSWORD="$password" DJANGO_SUPERUSER_EMAIL=demo@example.com \
    .venv/bin/python manage.py createsuperuser --noinput >/dev/null
  printf 'username: demo\npassword: %s\n' "$password" > .dev-login
  chmod 600 .dev-login
fi

PORT=8001 ./start_stream.sh --log-level warning &
sidecar=$!
trap 'kill $sidecar 2>/dev/null || true' EXIT INT TERM

echo
echo "c3 chat: open http://localhost:8000 and log in with the account in .dev-login:"
cat .dev-login 2>/dev/null || echo "(your existing user; create another with: .venv/bin/python manage.py createsuperuser)"
[ -z "${OPENAI_API_KEY:-}" ] && ! grep -qs '^OPENAI_API_KEY=.' .env && echo "No OPENAI_API_KEY: the offline demo model answers."
echo

PORT=8000 .venv/bin/python -m gunicorn c3_app.wsgi:application --workers 2 --threads 8
