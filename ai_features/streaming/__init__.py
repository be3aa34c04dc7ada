"""The streaming core: framework-free (no django.http, no fastapi).

`runtime` generates replies as tasks and lets any number of watchers follow them; `service`
is what both HTTP adapters (the FastAPI sidecar and Django's fallback view) call; `sse` turns
events into bytes; `providers` talk to the model.
"""
