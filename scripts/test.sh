#!/usr/bin/env bash
# Run the test suite (arguments go to pytest). SQLite by default; PostgreSQL when DATABASE_URL
# points at one, e.g. DATABASE_URL=postgres://postgres@127.0.0.1:5432/c3 scripts/test.sh
# Browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt

exec .venv/bin/python -m pytest "$@"
