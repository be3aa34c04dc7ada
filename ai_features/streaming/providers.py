"""Model providers: the official `openai` SDK against any OpenAI-compatible server, and an offline demo.

A provider turns the context into an async stream of `Delta`s and reports failures as
`ProviderError` with a code for machines and a message fit for a person.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx2
import openai
import orjson

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "c3-demo-offline"
# One upstream connection per reply being generated: the sidecar holds thousands of streams.
MAX_UPSTREAM_CONNECTIONS = 10_000


@dataclass(frozen=True, slots=True)
class Delta:
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finished: bool = False  # the model said why it stopped (finish_reason)


class ProviderError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Provider(Protocol):
    model: str
    is_demo: bool

    def stream(self, messages: Sequence[dict[str, str]]) -> AsyncIterator[Delta]: ...

    async def aclose(self) -> None: ...


_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


async def _sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The payload of each `data:` line of a Server-Sent Events byte stream.

    Lines are split on raw bytes, one C-level split per network read, instead of going through the
    SDK's text decoder and line iterator (several generator hops per token). Any SSE line end is
    accepted (LF, CRLF, CR); only LF takes the fastest path. A CR at the end of one read and an LF at
    the start of the next make an extra empty line, which SSE ignores.
    """
    pending = b""
    async for data in chunks:
        text = pending + data if pending else data
        lines = _LINE_BREAK.split(text) if b"\r" in text else text.split(b"\n")
        pending = lines.pop()  # an incomplete line waits for the next read
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if pending.startswith(b"data:"):  # the stream ended without a final line break
        yield pending[5:].strip()


def _parse_chunk(payload: bytes) -> tuple[object, str | None]:
    """The chunk, and what its strings may hold of a character the server split between two deltas:
    None (nothing: orjson read it), "bytes" (the payload is not valid UTF-8: its stray bytes are kept
    as surrogateescape characters) or "escapes" (lone UTF-16 surrogates from \\u escapes).

    orjson refuses both. Some servers cut a character's UTF-8 bytes between two events, others an
    emoji's UTF-16 pair (\\ud83d in one delta, \\ude00 in the next). Neither half has a UTF-8 form
    (the SSE encoder and both databases refuse it), but joined they are the character:
    `_SplitCharacters` joins them."""
    try:
        return orjson.loads(payload), None
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(payload.decode("utf-8")), "escapes"
    except UnicodeDecodeError:
        return json.loads(payload.decode("utf-8", "surrogateescape")), "bytes"


_OTHER_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")
_HIGH_SURROGATE = re.compile("[\ud800-\udbff]")


class _SplitCharacters:
    """Joins, across the deltas of one reply, a character the model server split between two of
    them; what cannot be joined becomes U+FFFD, as the SDK's own decoding would make it.

    Only text from the slow parse (`_parse_chunk`'s "bytes" or "escapes"), or following a held
    half, comes here: text orjson read is whole, and costs one attribute check per delta."""

    def __init__(self) -> None:
        self._bytes = codecs.getincrementaldecoder("utf-8")("replace")  # the start of a UTF-8 sequence
        self._high = ""  # a high surrogate waiting for its low half
        self.holding = False

    def join(self, text: str, mode: str | None) -> str:
        if mode == "bytes":
            # The stray bytes go back to bytes (any other lone surrogate has no byte form: U+FFFD),
            # after the start of a sequence the last delta left.
            text = self._bytes.decode(_OTHER_SURROGATE.sub("\ufffd", text).encode("utf-8", "surrogateescape"))
        elif self._bytes.getstate()[0]:
            # Valid UTF-8 (or it would be "bytes") cannot finish the sequence the last delta began.
            text = self._bytes.decode(b"", final=True) + text
            self._bytes.reset()
        if mode == "escapes" or self._high:
            text = self._high + text
            self._high = ""
            if text and _HIGH_SURROGATE.match(text[-1]):
                text, self._high = text[:-1], text[-1]
            # A high and a low surrogate side by side become their character; a lone one, U+FFFD.
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        self.holding = bool(self._high or self._bytes.getstate()[0])
        return text

    def end(self) -> str:
        """What is still held when the reply ends: half a character, so U+FFFD."""
        rest = self._bytes.decode(b"", final=True) + ("\ufffd" if self._high else "")
        self._bytes.reset()
        self._high, self.holding = "", False
        return rest


def _token_count(value) -> int | None:
    """A usage count the database can store (a non-negative 32-bit integer), else None: the model
    server's JSON is input like any other, and a bad count must not cost the reply its text."""
    return value if type(value) is int and 0 <= value < 2**31 else None


def _body_reads(response: httpx2.Response) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive. A body sent with no content coding (as model servers send
    their streams) is read raw: httpx's decoding layer would cost ~2.5 µs per token for nothing
    (bench/pipeline.py). A compressed one (a proxy may gzip it) is decoded."""
    if response.headers.get("content-encoding", "identity").strip().lower() in ("", "identity"):
        return response.aiter_raw()
    return response.aiter_bytes()


# How long to wait after [DONE] for the rest of the body (the chunked terminator), as the SDK does.
DRAIN_SECONDS = 0.1


async def _read_to_the_end(rest: AsyncIterator[bytes]) -> None:
    """Read what follows [DONE]: an HTTP/1.1 connection goes back to the pool only once its body has
    ended, else it is closed and the next reply pays for a new connection (and TLS handshake). The
    reply is already complete, so a slow or broken end of the body is simply given up on."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in rest:
                pass
    except Exception:  # noqa: BLE001 - a timeout or a transport error: the reply is complete anyway
        pass


def _timed_out(exc: BaseException) -> bool:
    """Whether a failure of the SDK's aiohttp transport was a timeout (connect, pool or read).

    That transport reports a refused or reset connection as ConnectTimeout too, so the chain of
    causes decides: aiohttp's timeouts are TimeoutErrors somewhere in it, connection errors are
    OSErrors with no timeout in the chain."""
    link = exc.__cause__ or exc.__context__
    while link is not None:
        if isinstance(link, TimeoutError):
            return True
        link = link.__cause__ or link.__context__
    return False


def _status_error(status: int) -> ProviderError:
    if status in (401, 403):
        return ProviderError("upstream_auth", "The AI service rejected our credentials. Please tell the site operator.")
    if status == 429:
        return ProviderError("upstream_rate_limited", "The AI service is busy right now (rate limited). Please try again shortly.")
    if status == 404:
        return ProviderError("upstream_not_found", "The configured AI model is not available.")
    if 400 <= status < 500:
        return ProviderError("upstream_rejected", "The AI service could not process this request.")
    return ProviderError("upstream_unavailable", "The AI service had an internal problem. Please try again.")


class OpenAIProvider:
    """One shared AsyncOpenAI client per event loop (its connection pool belongs to that loop)."""

    is_demo = False

    def __init__(self, *, api_key: str, base_url: str | None, model: str, timeout_seconds: float) -> None:
        self.model = model
        # No retries: a retried stream would repeat tokens the person already saw; a failure is
        # reported and the page offers Retry. The read timeout bounds a model gone silent.
        self.client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=openai.Timeout(timeout_seconds, connect=min(10.0, timeout_seconds)),
            # The SDK's aiohttp transport (the `openai[aiohttp]` extra): aiohttp parses HTTP in C,
            # where the default transport parses every chunk of every stream in pure Python (h11).
            # Its default pool (the SDK's 1,000 connections) would queue replies beyond that.
            http_client=openai.DefaultAioHttpClient(
                limits=httpx2.Limits(max_connections=MAX_UPSTREAM_CONNECTIONS)
            ),
        )

    async def stream(self, messages: Sequence[dict[str, str]]) -> AsyncIterator[Delta]:
        try:
            # The official SDK's own POST with stream=True: it sends the request with the client's
            # base URL, key, timeouts and headers and raises APIStatusError for an error status, but
            # we build the JSON body ourselves and read the raw bytes. `chat.completions.create`
            # would first walk every message through each of the SDK's message TypedDicts
            # (~150 µs of event-loop CPU per message of context, openai-python #3616), and then build
            # a pydantic ChatCompletionChunk per token (~60-130 µs each); a chat message here is only
            # ever {"role", "content"} strings, which need neither. The body goes as ready JSON
            # bytes (the `content` of the request): given a dict, the SDK deep-copies it with its
            # request options and serializes it with json.dumps, both per message of the context.
            # Closing the stream (also when this generator is cancelled by Stop) closes the
            # upstream connection, so the model stops generating.
            stream = await self.client.post(
                "/chat/completions",
                content=orjson.dumps({
                    "model": self.model,
                    "messages": list(messages),
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }),
                cast_to=object,
                options={"security": {"bearer_auth": True}},  # the API key only, as create() sends
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
            async with stream:
                finished = done = False
                split = _SplitCharacters()
                payloads = _sse_data(_body_reads(stream.response))
                async for payload in payloads:
                    if payload == b"[DONE]":
                        done = True
                        break
                    chunk, mode = _parse_chunk(payload)
                    if not isinstance(chunk, dict):
                        continue
                    if chunk.get("error"):  # an error reported inside the stream (OpenAI does this)
                        logger.warning("model server sent an error event: %.500r", chunk["error"])
                        raise ProviderError("upstream_unavailable", "The AI service reported an error mid-reply.")
                    usage = chunk.get("usage")
                    if usage and isinstance(usage, dict):
                        yield Delta(
                            prompt_tokens=_token_count(usage.get("prompt_tokens")),
                            completion_tokens=_token_count(usage.get("completion_tokens")),
                        )
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta")
                        text = delta.get("content") if delta else None
                        if text is not None and type(text) is not str:
                            # Model output is input like any other: a list or an object here would
                            # be stored as a piece that the reply's text (and the reaper's) cannot join.
                            logger.warning("model server sent content that is not a string: %.200r", text)
                            raise ProviderError("upstream_malformed", "The AI service sent a reply this service cannot read.")
                        if text and (mode or split.holding):
                            text = split.join(text, mode)
                        if text:
                            if "\x00" in text:
                                # Model output is untrusted input, and PostgreSQL refuses NUL in text
                                # and jsonb: one such piece would fail every log flush of the process
                                # (all live replies share it) and the reply's final write.
                                text = text.replace("\x00", "\ufffd")
                            yield Delta(text=text)
                        if choice.get("finish_reason"):
                            finished = True
                if not finished:
                    raise ProviderError("upstream_incomplete", "The AI service ended the reply unexpectedly.")
                if split.holding:
                    yield Delta(text=split.end())
                yield Delta(finished=True)
                if done:  # only after the reply is reported complete: tidying up must not delay or undo it
                    await _read_to_the_end(payloads)
        except ProviderError:
            raise
        except openai.APIStatusError as exc:
            logger.warning("model server answered %s: %s", exc.status_code, exc.message)
            raise _status_error(exc.status_code) from None
        except (openai.APITimeoutError, httpx2.TimeoutException) as exc:
            if not _timed_out(exc):
                logger.warning("model server connection failed: %r", exc.__cause__)
                raise ProviderError("upstream_disconnected", "The connection to the AI service was lost.") from None
            raise ProviderError("upstream_timeout", "The AI service took too long to answer.") from None
        except Exception as exc:  # noqa: BLE001 - CancelledError (Stop) is a BaseException and passes
            # A connection refused, reset or dropped midway, or a malformed chunk.
            logger.warning("model server connection failed: %r", exc)
            raise ProviderError("upstream_disconnected", "The connection to the AI service was lost.") from None

    async def aclose(self) -> None:
        await self.client.close()


class DemoProvider:
    """An offline model so that a fresh clone works with no key: it streams a Markdown reply at a
    human pace. The page labels it as the demo."""

    is_demo = True
    model = DEMO_MODEL_NAME

    def __init__(self, *, delay_seconds: float) -> None:
        self.delay_seconds = delay_seconds

    async def stream(self, messages: Sequence[dict[str, str]]) -> AsyncIterator[Delta]:
        question = messages[-1]["content"] if messages else ""
        reply = demo_reply(question, turn=sum(1 for m in messages if m["role"] == "user"))
        pieces = re.findall(r"\S+\s*|\s+", reply)
        for piece in pieces:
            await asyncio.sleep(self.delay_seconds)
            yield Delta(text=piece)
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        yield Delta(prompt_tokens=prompt_tokens, completion_tokens=len(pieces), finished=True)

    async def aclose(self) -> None:
        return None


def demo_reply(question: str, *, turn: int) -> str:
    quoted = " ".join(question.split())
    if len(quoted) > 120:
        quoted = quoted[:117] + "…"
    return (
        f"This is the **offline demo model** (turn {turn}), so I cannot really think about "
        f"“{quoted}”. I can show you how c3 chat streams and renders a reply, though.\n\n"
        "### What you are seeing\n\n"
        "- Each word arrives as its own event from the streaming service.\n"
        "- The reply is stored as it streams: reload the page and it picks up where it was.\n"
        "- Press **Stop** and the server stops generating; the text so far is kept.\n\n"
        "```python\n"
        "def greet(name: str) -> str:\n"
        "    return f\"Hello, {name}!\"\n"
        "```\n\n"
        "| setting | what it does |\n"
        "|---|---|\n"
        "| `OPENAI_API_KEY` | use a real model |\n"
        "| `OPENAI_BASE_URL` | any OpenAI-compatible server |\n\n"
        "Set `OPENAI_API_KEY` to talk to a real model."
    )
