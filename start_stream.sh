#!/usr/bin/env bash
# Start the streaming sidecar (FastAPI under uvicorn). Extra arguments go to uvicorn.
set -euo pipefail
cd "$(dirname "$0")"
# Each stream holds two sockets (the browser's and the model's): lift the soft descriptor limit to
# the hard one so that thousands of streams do not hit the usual default of 1,024.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec "$PYTHON" -m uvicorn asgi_stream:app \
  --host 0.0.0.0 \
  --port "${PORT:-8001}" \
  --timeout-keep-alive 300 \
  --timeout-graceful-shutdown "${STREAM_GRACEFUL_SHUTDOWN_SECONDS:-25}" \
  --workers "${STREAM_WORKERS:-1}" \
  --proxy-headers --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-127.0.0.1}" \
  "$@"
