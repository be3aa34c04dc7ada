// Server-Sent Events parser for a fetch() response body.
//
// The browser's EventSource cannot send an Authorization header or a POST body, so the
// chat page reads `response.body` itself. This module implements the event-stream
// interpretation rules of the HTML standard (§9.2.6) on top of raw bytes:
//
//   * bytes are decoded with one TextDecoder in streaming mode, so a multi-byte UTF-8
//     character split across network chunks is decoded correctly (a leading BOM is dropped);
//   * lines end with "\r\n", "\n" or "\r" — also when the "\r" and the "\n" of one line
//     ending arrive in different chunks;
//   * lines starting with ":" are comments (heartbeats such as ": ping") and are ignored;
//   * "data:" lines are joined with "\n"; "id:" sets the last event id (kept across events,
//     ignored when it contains NUL); "event:" sets the type; "retry:" is parsed;
//   * an event is dispatched at a blank line, and only when it has data;
//   * whatever is left when the stream ends without a blank line is discarded.
//
// Usage:
//   const parser = new SSEParser();
//   for (const ev of parser.feed(uint8ArrayChunk)) { JSON.parse(ev.data) ... }
//   parser.end();
// or, with a callback:  new SSEParser((ev) => ...).feed(chunk)
// or, over a whole body: for await (const ev of readSSE(response)) { ... }
//
// Each event is {type, event, data, id, lastEventId, retry}: `type`/`event` is the event
// name ("message" when absent), `id`/`lastEventId` the last event id in effect (a string,
// "" if none was ever set) and `hasId` whether this very event carried an id: line.

export class SSEParser {
  constructor(onEvent = null) {
    this.onEvent = typeof onEvent === 'function' ? onEvent : null;
    this._decoder = new TextDecoder('utf-8');
    this._buffer = '';          // undecoded-line text carried over between chunks
    this._pendingCR = false;    // last chunk ended with "\r": swallow a leading "\n" next
    this._data = [];
    this._eventType = '';
    this._eventHadId = false;
    this._ended = false;
    this.lastEventId = '';
    this.retry = null;
  }

  /** Feed a chunk (Uint8Array, ArrayBuffer, DataView or string). Returns the events it completed. */
  feed(chunk) {
    if (this._ended) throw new Error('SSEParser: feed() after end()');
    let text;
    if (chunk == null) return [];
    if (typeof chunk === 'string') {
      text = chunk;
    } else if (chunk instanceof ArrayBuffer || ArrayBuffer.isView(chunk)) {
      text = this._decoder.decode(chunk, { stream: true });
    } else {
      throw new TypeError('SSEParser.feed expects bytes or a string');
    }
    return this._consume(text);
  }

  /** The stream ended: flush the decoder; an unterminated event is discarded (per spec). */
  end() {
    if (this._ended) return [];
    const tail = this._decoder.decode();
    const events = tail ? this._consume(tail) : [];
    this._ended = true;
    this._buffer = '';
    this._data = [];
    this._eventType = '';
    return events;
  }

  // Aliases, for callers that prefer other verbs.
  push(chunk) { return this.feed(chunk); }
  write(chunk) { return this.feed(chunk); }
  flush() { return this.end(); }
  close() { return this.end(); }

  /** True when a partial line or an undispatched event is buffered. */
  get hasPending() {
    return this._buffer.length > 0 || this._data.length > 0;
  }

  _consume(text) {
    const events = [];
    if (!text) return events;
    if (this._pendingCR) {
      this._pendingCR = false;
      if (text.charCodeAt(0) === 10 /* \n */) text = text.slice(1);
    }
    let buf = this._buffer + text;
    let start = 0;
    const len = buf.length;
    for (let i = 0; i < len; i++) {
      const c = buf.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = buf.slice(start, i);
      if (c === 13) {
        if (i + 1 < len) {
          if (buf.charCodeAt(i + 1) === 10) i++;
        } else {
          this._pendingCR = true;
        }
      }
      start = i + 1;
      this._line(line, events);
    }
    this._buffer = buf.slice(start);
    return events;
  }

  _line(line, events) {
    if (line === '') {
      this._dispatch(events);
      return;
    }
    if (line.charCodeAt(0) === 58 /* : */) return; // comment / heartbeat
    const colon = line.indexOf(':');
    let field;
    let value;
    if (colon === -1) {
      field = line;
      value = '';
    } else {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 32 /* space */) value = value.slice(1);
    }
    switch (field) {
      case 'data':
        this._data.push(value);
        break;
      case 'event':
        this._eventType = value;
        break;
      case 'id':
        if (value.indexOf('\u0000') === -1) {
          this.lastEventId = value;
          this._eventHadId = true;
        }
        break;
      case 'retry':
        if (/^[0-9]+$/.test(value)) this.retry = parseInt(value, 10);
        break;
      default:
        break; // unknown fields are ignored
    }
  }

  _dispatch(events) {
    const hadId = this._eventHadId;
    this._eventHadId = false;
    if (this._data.length === 0) {
      this._eventType = '';
      return;
    }
    const type = this._eventType || 'message';
    const ev = {
      type,
      event: type,
      data: this._data.join('\n'),
      id: this.lastEventId,
      lastEventId: this.lastEventId,
      hasId: hadId,
      retry: this.retry,
    };
    this._data = [];
    this._eventType = '';
    events.push(ev);
    if (this.onEvent) this.onEvent(ev);
  }
}

/** Parse a complete list of chunks (byte arrays or strings) and return every event. */
export function parseSSE(chunks) {
  const parser = new SSEParser();
  const out = [];
  for (const chunk of (Array.isArray(chunks) ? chunks : [chunks])) out.push(...parser.feed(chunk));
  out.push(...parser.end());
  return out;
}

/**
 * Async iterator over the events of a fetch Response (or a ReadableStream of bytes).
 * Throws what the reader throws (network errors, AbortError). `signal` aborts reading.
 * The loop finishing without throwing means the body ended cleanly (which says nothing
 * about whether a terminal event arrived: that is the caller's protocol).
 */
export async function* readSSE(source, { signal } = {}) {
  const stream = source && source.body !== undefined && typeof source.getReader !== 'function'
    ? source.body : source;
  if (!stream || typeof stream.getReader !== 'function') throw new TypeError('readSSE: no readable body');
  const reader = stream.getReader();
  const parser = new SSEParser();
  const onAbort = () => { reader.cancel().catch(() => {}); };
  if (signal) {
    if (signal.aborted) onAbort();
    else signal.addEventListener('abort', onAbort, { once: true });
  }
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (signal && signal.aborted) {
        throw signal.reason instanceof Error ? signal.reason : new DOMException('Aborted', 'AbortError');
      }
      if (done) break;
      for (const ev of parser.feed(value)) yield ev;
    }
    finished = true;
    for (const ev of parser.end()) yield ev;
  } finally {
    if (signal) signal.removeEventListener('abort', onAbort);
    if (!finished) reader.cancel().catch(() => {}); // consumer stopped early or an error
    try { reader.releaseLock(); } catch (_) { /* still reading: cancelled above */ }
  }
}

export default SSEParser;
