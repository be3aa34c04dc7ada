// Network layer of the chat page: stream tokens, the stream endpoints (sidecar or Django
// fallback) and the history API. No DOM here.

export class ApiError extends Error {
  constructor(message, { status = 0, code = '', network = false } = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.network = network;
  }
}

const STATUS_MESSAGES = {
  400: 'The request was rejected.',
  401: 'Your session has ended. Please sign in again.',
  403: 'The request was refused.',
  404: 'Not found.',
  413: 'The message is too long.',
  415: 'The request was refused (unsupported content type).',
  429: 'Too many requests. Please wait a moment and try again.',
  500: 'The server hit an error.',
  502: 'The stream service is unavailable.',
  503: 'The service is temporarily unavailable.',
  504: 'The stream service timed out.',
};

/** Build an ApiError from a non-OK response whose body should be JSON {"error": "..."}. */
export async function errorFromResponse(res) {
  let message = '';
  try {
    const type = res.headers.get('Content-Type') || '';
    if (type.includes('json')) {
      const body = await res.json();
      if (body && typeof body.error === 'string') message = body.error;
      else if (body && typeof body.detail === 'string') message = body.detail;
    }
  } catch (_) { /* not JSON */ }
  if (!message) message = STATUS_MESSAGES[res.status] || `Request failed (HTTP ${res.status}).`;
  return new ApiError(message, { status: res.status });
}

function isAbort(err) {
  return err && (err.name === 'AbortError' || err.name === 'TimeoutError');
}

/** fetch() that turns network failures into ApiError{network: true}; aborts are rethrown as-is. */
async function netFetch(url, init) {
  try {
    return await fetch(url, init);
  } catch (err) {
    if (isAbort(err)) throw err;
    throw new ApiError('The network request failed.', { network: true });
  }
}

/**
 * Short-lived bearer tokens for the stream sidecar (see API.md: the sidecar's host never
 * receives the main app's session cookie on *.onrender.com). Fetched before first use,
 * renewed at 80 % of their lifetime, and fetched afresh after a 401. Never put in a URL.
 */
class StreamTokens {
  constructor(url, onAuthLost) {
    this.url = url;
    this.onAuthLost = onAuthLost;
    this.token = null;
    this.refreshAt = 0;
    this.pending = null;
    this.timer = null;
  }

  async get(force = false) {
    if (!force && this.token && Date.now() < this.refreshAt) return this.token;
    if (!this.pending) {
      this.pending = this._fetch().finally(() => { this.pending = null; });
    }
    return this.pending;
  }

  invalidate() {
    this.token = null;
    this.refreshAt = 0;
  }

  async _fetch() {
    const res = await netFetch(this.url, {
      credentials: 'same-origin',
      cache: 'no-store',
      headers: { Accept: 'application/json' },
    });
    if (res.status === 401) {
      this.invalidate();
      this.onAuthLost();
      throw new ApiError(STATUS_MESSAGES[401], { status: 401, code: 'auth' });
    }
    if (!res.ok) throw await errorFromResponse(res);
    const body = await res.json();
    if (!body || typeof body.token !== 'string' || !body.token) {
      throw new ApiError('The server did not return a stream token.', { status: res.status });
    }
    const ttl = Number(body.expires_in) > 0 ? Number(body.expires_in) : 300;
    this.token = body.token;
    this.refreshAt = Date.now() + ttl * 800; // 80 % of the lifetime
    clearTimeout(this.timer);
    // Renew ahead of expiry while the page is in view, so a send never waits for a token.
    this.timer = setTimeout(() => {
      if (document.visibilityState === 'visible') this.get(true).catch(() => {});
    }, ttl * 800);
    return this.token;
  }
}

export function createApi(config, { onAuthLost = () => {} } = {}) {
  const streamBase = String(config.streamBaseUrl || '').replace(/\/+$/, '');
  const sidecar = streamBase !== '';
  const apiBase = String(config.apiBase || '/api/ai/').replace(/\/?$/, '/');
  const tokens = sidecar ? new StreamTokens(config.streamTokenUrl || '/api/ai/stream-token/', onAuthLost) : null;

  /**
   * Call a stream endpoint (`path` starts with /api/ai/chat/stream/). With a sidecar: its
   * origin, `Authorization: Bearer <token>` and credentials: 'include' (the cookie also works
   * when both services are the same site); one retry with a fresh token after a 401.
   * Without: Django's same-origin fallback with the session cookie and X-CSRFToken.
   */
  async function streamFetch(path, { method = 'GET', body, lastEventId = null, signal, accept = 'text/event-stream' } = {}) {
    const url = (sidecar ? streamBase : '') + path;
    const attempt = async (freshToken) => {
      const headers = { Accept: accept };
      if (body !== undefined) headers['Content-Type'] = 'application/json';
      if (lastEventId !== null && lastEventId !== undefined && lastEventId !== '') {
        headers['Last-Event-ID'] = String(lastEventId);
      }
      if (sidecar) {
        headers.Authorization = 'Bearer ' + await tokens.get(freshToken);
      } else if (method !== 'GET' && method !== 'HEAD') {
        headers['X-CSRFToken'] = config.csrfToken || '';
      }
      return netFetch(url, {
        method,
        headers,
        body: body !== undefined ? JSON.stringify(body) : undefined,
        credentials: sidecar ? 'include' : 'same-origin',
        cache: 'no-store',
        signal,
      });
    };
    let res = await attempt(false);
    if (sidecar && res.status === 401) {
      tokens.invalidate();
      res = await attempt(true);
    }
    if (res.status === 401) onAuthLost();
    return res;
  }

  /** Cheap reachability probe of the sidecar (no CORS needed: an opaque answer is enough). */
  async function probeStreamService() {
    if (!sidecar) return true;
    try {
      await fetch(streamBase + '/healthz', { mode: 'no-cors', cache: 'no-store', credentials: 'omit' });
      return true;
    } catch (_) {
      return false;
    }
  }

  function sameOriginUrl(url) {
    // Pagination `next` may be absolute (and, behind a TLS proxy, even http://): keep it same-origin.
    const u = new URL(url, window.location.href);
    return u.origin === window.location.origin ? u.href : u.pathname + u.search;
  }

  async function json(method, pathOrUrl, body) {
    const url = /^https?:|^\//.test(pathOrUrl) ? sameOriginUrl(pathOrUrl) : apiBase + pathOrUrl;
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (method !== 'GET') headers['X-CSRFToken'] = config.csrfToken || '';
    const res = await netFetch(url, {
      method,
      headers,
      body: body !== undefined ? JSON.stringify(body) : undefined,
      credentials: 'same-origin',
      cache: 'no-store',
    });
    if (res.status === 401) {
      onAuthLost();
      throw new ApiError(STATUS_MESSAGES[401], { status: 401, code: 'auth' });
    }
    if (!res.ok) throw await errorFromResponse(res);
    if (res.status === 204) return null;
    const text = await res.text();
    return text ? JSON.parse(text) : null;
  }

  const enc = encodeURIComponent;
  return {
    sidecar,
    streamBase,
    streamFetch,
    probeStreamService,
    prefetchToken: () => (tokens ? tokens.get().catch(() => null) : Promise.resolve(null)),
    listConversations: (nextUrl) => json('GET', nextUrl || 'conversations/'),
    getConversation: (id) => json('GET', `conversations/${enc(id)}/`),
    getMessages: (id) => json('GET', `conversations/${enc(id)}/messages/`),
    renameConversation: (id, title) => json('PATCH', `conversations/${enc(id)}/`, { title }),
    deleteConversation: (id) => json('DELETE', `conversations/${enc(id)}/`),
    deleteMessage: (id, mid) => json('DELETE', `conversations/${enc(id)}/messages/${enc(mid)}/`),
  };
}
