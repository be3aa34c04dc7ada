// c3 chat — the chat page. Plain ES module, no build step.
//
// Pieces: sse.js (SSE parser over fetch bodies), api.js (tokens, stream + history calls),
// markdown.js (safe markdown rendering), this file (UI state and DOM).

import { readSSE } from './sse.js';
import { createApi } from './api.js';
import { renderMarkdownInto, copyText, flashCopied, COPY_ICON } from './markdown.js';

const config = JSON.parse(document.getElementById('c3-config').textContent || '{}');
const CHAT_URL = String(config.chatUrl || '/ai/chat/').replace(/\/?$/, '/');
const MAX_CHARS = Number(config.maxMessageChars) > 0 ? Number(config.maxMessageChars) : 0;
const LOGIN_URL = config.loginUrl || '/accounts/login/';
const RECONNECT_DELAYS = [250, 750, 1500]; // ms between automatic re-attach attempts
const STOP_GRACE_MS = 4000; // after Stop answered, how long to wait for the stream's terminal event

const api = createApi(config, { onAuthLost });

// ---------------------------------------------------------------------------------------
// DOM handles

const $ = (id) => document.getElementById(id);
const els = {
  app: $('app'),
  sidebar: $('sidebar'),
  backdrop: $('sidebar-backdrop'),
  menuButton: $('menu-button'),
  sidebarClose: $('sidebar-close'),
  newChat: $('new-chat'),
  list: $('conversation-list'),
  listStatus: $('conversation-list-status'),
  loadMore: $('conversation-load-more'),
  title: $('conversation-title'),
  errorBanner: $('error-banner'),
  errorText: $('error-banner-text'),
  errorAction: $('error-banner-action'),
  errorDismiss: $('error-banner-dismiss'),
  scroller: $('messages-scroll'),
  messages: $('messages'),
  empty: $('empty-state'),
  jump: $('jump-latest'),
  composer: $('composer'),
  input: $('composer-input'),
  send: $('send-button'),
  stop: $('stop-button'),
  counter: $('char-counter'),
};

const state = {
  conversationId: null,      // open conversation; null = a new, unsaved chat
  conversations: [],         // sidebar data, newest first
  nextPage: null,
  run: null,                 // the ReplyRun shown in this view, while it streams
  navToken: 0,               // bumps on every navigation, to drop stale async results
  retryView: null,           // the one message currently offering Retry
  stick: true,               // auto-scroll follows new content
  lastScrollTop: 0,
};

// ---------------------------------------------------------------------------------------
// Small helpers

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const idEq = (a, b) => a !== null && a !== undefined && b !== null && b !== undefined && String(a) === String(b);
const charCount = (s) => { let n = 0; for (const _ of s) n++; return n; }; // code points, like the server

function uuid() {
  if (window.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function conversationUrl(id) {
  return id === null || id === undefined ? CHAT_URL : `${CHAT_URL}c/${encodeURIComponent(id)}/`;
}

function conversationIdFromLocation() {
  const path = window.location.pathname;
  if (!path.startsWith(CHAT_URL)) return null;
  const m = /^c\/([^/]+)\/?$/.exec(path.slice(CHAT_URL.length));
  if (!m) return null;
  const raw = decodeURIComponent(m[1]);
  return /^\d+$/.test(raw) ? Number(raw) : raw;
}

function displayTitle(c) {
  const t = c && typeof c.title === 'string' ? c.title.trim() : '';
  return t || 'New chat';
}

function setDocumentTitle(text) {
  document.title = text ? `${text} · c3 chat` : 'c3 chat';
}

function icon(path, size = 16) {
  return `<svg viewBox="0 0 24 24" width="${size}" height="${size}" aria-hidden="true" focusable="false">${path}</svg>`;
}
const ICONS = {
  pencil: icon('<path d="M4 20h4L19 9l-4-4L4 16v4z" fill="none" stroke="currentColor" stroke-width="2" stroke-linejoin="round"/>'),
  trash: icon('<path d="M4 7h16M9 7V4h6v3M6 7l1 13h10l1-13" fill="none" stroke="currentColor" stroke-width="2" stroke-linejoin="round"/>'),
  retry: icon('<path d="M4 12a8 8 0 1 0 2.3-5.6M4 4v4h4" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round"/>'),
};

function isDesktopPointer() {
  return window.matchMedia('(pointer: fine)').matches;
}

// ---------------------------------------------------------------------------------------
// Banners

let bannerKind = null;
let probeTimer = null;

function showBanner(message, { kind = 'error', actionLabel = '', action = null } = {}) {
  bannerKind = kind;
  els.errorText.textContent = message;
  els.errorBanner.dataset.kind = kind;
  if (actionLabel && action) {
    els.errorAction.textContent = actionLabel;
    els.errorAction.hidden = false;
    els.errorAction.onclick = action;
  } else {
    els.errorAction.hidden = true;
    els.errorAction.onclick = null;
  }
  els.errorBanner.hidden = false;
}

function hideBanner(kind = null) {
  if (kind && bannerKind !== kind) return;
  els.errorBanner.hidden = true;
  bannerKind = null;
}

function serviceName() {
  return api.sidecar ? 'the stream service' : 'the server';
}

function showUnreachable() {
  const msg = api.sidecar
    ? `Can't reach the stream service (${api.streamBase}). Replies can't be generated until it is back.`
    : "Can't reach the server. Check your connection; replies can't be generated until it is back.";
  showBanner(msg, { kind: 'network', actionLabel: 'Check again', action: () => probeService(true) });
  scheduleProbe();
}

function scheduleProbe() {
  clearTimeout(probeTimer);
  probeTimer = setTimeout(() => probeService(false), 10000);
}

async function probeService(manual) {
  clearTimeout(probeTimer);
  let ok;
  if (api.sidecar) {
    ok = await api.probeStreamService();
  } else {
    try {
      await fetch('/healthz', { cache: 'no-store', credentials: 'same-origin' });
      ok = true; // any answer means the server is reachable
    } catch (_) {
      ok = false;
    }
  }
  if (ok) {
    hideBanner('network');
  } else if (bannerKind === 'network' || manual || !bannerKind) {
    showUnreachable();
  }
  return ok;
}

let authLost = false;
function onAuthLost() {
  if (authLost) return;
  authLost = true;
  const next = encodeURIComponent(window.location.pathname + window.location.search);
  showBanner('Your session has ended. Sign in again to keep chatting.', {
    kind: 'auth',
    actionLabel: 'Sign in',
    action: () => { window.location.href = `${LOGIN_URL}?next=${next}`; },
  });
}

// ---------------------------------------------------------------------------------------
// Messages

function fmtMs(ms) {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

function num(v) {
  const n = Number(v);
  return v === null || v === undefined || v === '' || !Number.isFinite(n) ? null : n;
}

/** metadata {model, prompt_tokens, completion_tokens, ttft_ms, duration_ms, tokens_per_second?} → text */
function formatMeta(meta) {
  if (!meta) return { text: '', title: '' };
  const parts = [];
  const titles = [];
  if (meta.model) { parts.push(String(meta.model)); titles.push(`Model: ${meta.model}`); }
  const pt = num(meta.prompt_tokens);
  const ct = num(meta.completion_tokens);
  if (pt !== null || ct !== null) {
    parts.push(`${pt ?? '–'} → ${ct ?? '–'} tokens`);
    titles.push(`Prompt tokens: ${pt ?? 'unknown'}, completion tokens: ${ct ?? 'unknown'}`);
  }
  const ttft = num(meta.ttft_ms);
  if (ttft !== null) { parts.push(`TTFT ${fmtMs(ttft)}`); titles.push(`Time to first token: ${Math.round(ttft)} ms`); }
  let tps = num(meta.tokens_per_second);
  if (tps === null && ct !== null && ct > 0) {
    const dur = num(meta.duration_ms);
    if (dur !== null) {
      const gen = ttft !== null && dur > ttft ? dur - ttft : dur;
      if (gen > 0) tps = ct / (gen / 1000);
    }
  }
  if (tps !== null && Number.isFinite(tps) && tps > 0) {
    parts.push(`${tps >= 100 ? Math.round(tps) : tps.toFixed(1)} tok/s`);
    titles.push(`Completion tokens per second after the first token: ${tps.toFixed(1)}`);
  }
  // No-break spaces inside each part: a narrow footer wraps between the parts, never inside one.
  return { text: parts.map((part) => part.replace(/ /g, '\u00a0')).join(' · '), title: titles.join('\n') };
}

const STATUS_NOTES = {
  cancelled: 'Stopped.',
  interrupted: 'Interrupted — the reply was cut off. The text above is what arrived.',
  error: 'The reply failed.',
};

class MessageView {
  constructor({ role, id = null, content = '', status = 'completed', metadata = null }) {
    this.role = role;
    this.text = content || '';
    this.status = status;
    this.metadata = metadata;
    this._raf = 0;

    const el = document.createElement('article');
    el.className = `message message-${role === 'user' ? 'user' : 'assistant'}`;
    el.setAttribute('data-testid', 'message');
    el.dataset.role = role;
    el.setAttribute('aria-label', role === 'user' ? 'You said' : 'Assistant replied');
    this.el = el;

    const body = document.createElement('div');
    body.className = 'message-body';
    el.appendChild(body);

    this.contentEl = document.createElement('div');
    this.contentEl.className = role === 'user' ? 'message-content plain' : 'message-content markdown';
    this.contentEl.setAttribute('data-testid', 'message-content');
    body.appendChild(this.contentEl);

    this.noteEl = document.createElement('p');
    this.noteEl.className = 'message-note';
    this.noteEl.hidden = true;
    body.appendChild(this.noteEl);

    if (role !== 'user') {
      const footer = document.createElement('div');
      footer.className = 'message-footer';
      this.metaEl = document.createElement('span');
      this.metaEl.className = 'message-meta';
      this.metaEl.setAttribute('data-testid', 'message-meta');
      footer.appendChild(this.metaEl);

      const actions = document.createElement('span');
      actions.className = 'message-actions';
      this.actionsEl = actions;
      this.retryBtn = null; // created only while Retry is offered (one on the page at most)

      this.copyBtn = document.createElement('button');
      this.copyBtn.type = 'button';
      this.copyBtn.className = 'icon-button message-copy';
      this.copyBtn.dataset.label = 'Copy reply';
      this.copyBtn.setAttribute('aria-label', 'Copy reply');
      this.copyBtn.title = 'Copy reply (markdown)';
      this.copyBtn.innerHTML = COPY_ICON;
      this.copyBtn.addEventListener('click', async () => {
        if (this.text && await copyText(this.text)) flashCopied(this.copyBtn);
      });
      actions.appendChild(this.copyBtn);
      footer.appendChild(actions);
      body.appendChild(footer);
    }

    if (id !== null && id !== undefined) this.setId(id);
    this.setStatus(status);
    this.renderNow();
    if (metadata) this.setMeta(metadata);
  }

  setId(id) {
    if (id === null || id === undefined) return;
    this.id = id;
    this.el.dataset.messageId = String(id);
  }

  setStatus(status) {
    this.status = status;
    this.el.dataset.status = status;
    const streaming = status === 'streaming';
    this.el.classList.toggle('is-streaming', streaming);
    if (streaming) this.el.setAttribute('aria-busy', 'true');
    else this.el.removeAttribute('aria-busy');
    if (this.copyBtn) this.copyBtn.hidden = streaming || !this.text;
  }

  setText(text) {
    this.text = text;
    this.scheduleRender();
  }

  append(piece) {
    this.text += piece;
    this.scheduleRender();
  }

  scheduleRender() {
    if (this._raf) return;
    this._raf = requestAnimationFrame(() => {
      this._raf = 0;
      this.renderNow();
    });
  }

  renderNow() {
    if (this._raf) { cancelAnimationFrame(this._raf); this._raf = 0; }
    if (this.role === 'user') {
      this.contentEl.textContent = this.text; // user text is never interpreted
    } else {
      renderMarkdownInto(this.contentEl, this.text);
      if (this.status === 'streaming') this._addCursor();
    }
    if (this.copyBtn) this.copyBtn.hidden = this.status === 'streaming' || !this.text;
    onMessagesChanged();
  }

  _addCursor() {
    if (!this.text) {
      const dots = document.createElement('span');
      dots.className = 'typing-indicator';
      dots.setAttribute('role', 'img');
      dots.setAttribute('aria-label', 'Assistant is typing');
      dots.append(document.createElement('span'), document.createElement('span'), document.createElement('span'));
      this.contentEl.appendChild(dots);
      return;
    }
    // Put the blinking caret at the end of the last text block (inside p / li / heading …).
    let target = this.contentEl;
    for (;;) {
      const last = target.lastElementChild;
      if (last && /^(P|UL|OL|LI|BLOCKQUOTE|H[1-6]|TABLE|TBODY|TR|TD|DIV)$/.test(last.tagName)
          && !last.classList.contains('code-block')) {
        target = last;
      } else break;
    }
    const caret = document.createElement('span');
    caret.className = 'stream-caret';
    caret.setAttribute('aria-hidden', 'true');
    target.appendChild(caret);
  }

  /** Final state: render the final text first, then publish the status (data-status). */
  finalize(status) {
    this.status = status;
    this.renderNow();
    this.setStatus(status);
  }

  setNote(text, kind = 'info') {
    if (!text) {
      this.noteEl.hidden = true;
      this.noteEl.textContent = '';
      return;
    }
    this.noteEl.textContent = text;
    this.noteEl.dataset.kind = kind;
    this.noteEl.hidden = false;
  }

  setMeta(meta) {
    if (!this.metaEl) return;
    this.metadata = meta;
    const { text, title } = formatMeta(meta);
    this.metaEl.textContent = text;
    if (title) this.metaEl.title = title; else this.metaEl.removeAttribute('title');
  }

  offerRetry(handler) {
    if (!this.actionsEl) return;
    if (state.retryView && state.retryView !== this) state.retryView.clearRetry();
    state.retryView = this;
    if (!this.retryBtn) {
      this.retryBtn = document.createElement('button');
      this.retryBtn.type = 'button';
      this.retryBtn.className = 'retry-button';
      this.retryBtn.setAttribute('data-testid', 'retry-button');
      this.retryBtn.innerHTML = `${ICONS.retry}<span>Retry</span>`;
      this.actionsEl.prepend(this.retryBtn);
    }
    this.retryBtn.onclick = () => {
      if (state.run) return;
      this.clearRetry();
      els.input.focus({ preventScroll: true }); // the button is gone: keep focus somewhere useful
      handler();
    };
  }

  clearRetry() {
    if (this.retryBtn) {
      this.retryBtn.remove();
      this.retryBtn = null;
    }
    if (state.retryView === this) state.retryView = null;
  }
}

function appendMessage(view) {
  els.messages.appendChild(view.el);
  els.empty.hidden = true;
  return view;
}

function clearMessages() {
  els.messages.replaceChildren();
  state.retryView = null;
}

// ---------------------------------------------------------------------------------------
// Scrolling: follow new content unless the person scrolled up; then offer "Jump to latest".

function distanceFromBottom() {
  const s = els.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight;
}

function scrollToBottom(smooth = false) {
  const s = els.scroller;
  if (smooth && !window.matchMedia('(prefers-reduced-motion: reduce)').matches) {
    s.scrollTo({ top: s.scrollHeight, behavior: 'smooth' });
  } else {
    s.scrollTop = s.scrollHeight;
  }
}

function updateJumpButton() {
  const far = distanceFromBottom() > 80;
  els.jump.hidden = !(far && !state.stick && els.messages.childElementCount > 0);
}

function onMessagesChanged() {
  if (state.stick) scrollToBottom(false);
  updateJumpButton();
}

function unstick() {
  if (distanceFromBottom() > 2) state.stick = false;
}

els.scroller.addEventListener('scroll', () => {
  const top = els.scroller.scrollTop;
  const d = distanceFromBottom();
  if (d <= 4) state.stick = true;
  else if (top < state.lastScrollTop - 1) state.stick = false; // moved up: the person is reading
  state.lastScrollTop = top;
  updateJumpButton();
}, { passive: true });
els.scroller.addEventListener('wheel', (e) => { if (e.deltaY < 0) state.stick = false; }, { passive: true });
els.scroller.addEventListener('touchmove', () => { unstick(); }, { passive: true });
els.scroller.addEventListener('keydown', (e) => {
  if (['ArrowUp', 'PageUp', 'Home'].includes(e.key)) state.stick = false;
});
els.jump.addEventListener('click', () => {
  state.stick = true;
  scrollToBottom(true);
  els.jump.hidden = true;
});
if ('ResizeObserver' in window) {
  new ResizeObserver(() => onMessagesChanged()).observe(els.messages);
}

// ---------------------------------------------------------------------------------------
// Streaming a reply

function setActiveRun(run) {
  state.run = run;
  document.body.dataset.streaming = run ? '1' : '0';
  els.stop.hidden = !run;
  els.stop.disabled = false;
  els.stop.querySelector('.label').textContent = 'Stop';
  updateComposer();
}

/**
 * One assistant reply being received: either a new send (POST) or an attach to a reply that is
 * already generating (GET). Re-attaches with Last-Event-ID when the connection drops.
 */
class ReplyRun {
  constructor({ mode, view, userView = null, text = '', clientMessageId = null, conversationId = null, assistantId = null }) {
    this.mode = mode;
    this.view = view;
    this.userView = userView;
    this.userText = text;
    this.clientMessageId = clientMessageId;
    this.conversationId = conversationId;
    this.assistantId = assistantId;
    this.lastEventId = null;
    this.gotStart = mode === 'attach';
    this.terminal = false;
    this.detached = false;
    this.stopRequested = false;
    this.stopSent = false;
    this.controller = null;
    this.resetOnFirstEvent = mode === 'attach'; // a full replay replaces the stored partial text
    this.tSend = performance.now();
    this.tFirst = null;
    this.sawNetworkError = false;
    this.drops = 0; // connections that ended without a terminal event
  }

  get active() {
    return !this.terminal && !this.detached;
  }

  async start() {
    setActiveRun(this);
    this.view.setStatus('streaming');
    this.view.setNote('');
    this.view.clearRetry();
    try {
      let outcome;
      if (this.mode === 'send') {
        outcome = await this._open(() => api.streamFetch('/api/ai/chat/stream/', {
          method: 'POST',
          body: {
            message: this.userText,
            conversation_id: this.conversationId ?? null,
            include_history: true,
            client_message_id: this.clientMessageId,
          },
          signal: this.controller.signal,
        }));
      } else {
        outcome = await this._attach();
      }
      let attempt = 0;
      while (this.active && outcome !== 'fatal') {
        if (!this.assistantId) {
          this._fail('interrupted', 'The connection was lost before the reply started.');
          break;
        }
        if (attempt >= RECONNECT_DELAYS.length) {
          this._fail('interrupted', this.sawNetworkError
            ? `Lost the connection to ${serviceName()}. The text above is what arrived; the reply may still be finishing on the server — reopen the conversation to check.`
            : STATUS_NOTES.interrupted);
          break;
        }
        this.drops++;
        this.view.setNote('Connection lost — reconnecting…', 'info');
        await sleep(RECONNECT_DELAYS[attempt++]);
        if (!this.active) break;
        const before = this.lastEventId;
        outcome = await this._attach();
        if (this.lastEventId !== before) attempt = 0; // made progress: start counting again
      }
    } finally {
      if (state.run === this) setActiveRun(null);
    }
  }

  detach() {
    // The person navigated away: stop listening. The server keeps generating (only Stop stops it).
    this.detached = true;
    if (this.controller) this.controller.abort();
  }

  _attach() {
    // Without an event id to resume from, the server replays the reply from its start.
    if (this.lastEventId === null) this.resetOnFirstEvent = true;
    return this._open(() => api.streamFetch(`/api/ai/chat/stream/${encodeURIComponent(this.assistantId)}/`, {
      method: 'GET',
      lastEventId: this.lastEventId,
      signal: this.controller.signal,
    }));
  }

  /** Open one connection and read it. Returns 'terminal' | 'dropped' | 'fatal'. */
  async _open(makeRequest) {
    this.controller = new AbortController();
    let res;
    try {
      res = await makeRequest();
    } catch (err) {
      if (!this.active) return 'fatal';
      if (err && err.network) {
        this.sawNetworkError = true;
        showUnreachable();
        if (!this.gotStart) {
          this._fail('error', `Couldn't reach ${serviceName()}. Check your connection and try again.`);
          return 'fatal';
        }
        return 'dropped';
      }
      if (err && err.code === 'auth') {
        this._fail('error', 'Your session has ended. Sign in again, then retry.');
        return 'fatal';
      }
      this._fail('error', (err && err.message) || 'The request failed.');
      return 'fatal';
    }
    if (!this.active) return 'fatal';
    if (!res.ok) {
      let message = '';
      try {
        const body = await res.json();
        message = body && typeof body.error === 'string' ? body.error : '';
      } catch (_) { /* not JSON */ }
      if (res.status >= 500 && this.gotStart) {
        return 'dropped'; // the service hiccuped: try to re-attach
      }
      if (res.status === 502 || res.status === 503 || res.status === 504) showUnreachable();
      if (res.status === 401) message = 'Your session has ended. Sign in again, then retry.';
      if (res.status === 404 && this.assistantId) message = message || 'This reply is no longer available.';
      message = message || `The request failed (HTTP ${res.status}).`;
      // A reply whose connection broke and could not be resumed was interrupted, not failed.
      this._fail(this.drops > 0 ? 'interrupted' : 'error',
        this.drops > 0 ? `The connection was lost and could not be resumed: ${message}` : message);
      return 'fatal';
    }
    hideBanner('network');
    try {
      for await (const ev of readSSE(res, { signal: this.controller.signal })) {
        if (!this.active) return 'fatal';
        this._onEvent(ev);
        if (this.terminal) return 'terminal';
      }
    } catch (err) {
      if (!this.active) return 'fatal';
      if (err && err.name !== 'AbortError') this.sawNetworkError = true;
    }
    if (!this.active) return this.terminal ? 'terminal' : 'fatal';
    return 'dropped'; // the body ended (or broke) without a terminal event
  }

  _onEvent(ev) {
    if (ev.hasId) {
      const id = Number(ev.id);
      const last = Number(this.lastEventId);
      if (this.lastEventId !== null && Number.isFinite(id) && Number.isFinite(last) && id <= last) return; // already seen
      this.lastEventId = ev.id;
    }
    if (!this.view.noteEl.hidden && this.view.noteEl.dataset.kind === 'info') this.view.setNote(''); // reconnected
    let msg;
    try { msg = JSON.parse(ev.data); } catch (_) { return; }
    if (!msg || typeof msg !== 'object') return;
    switch (msg.type) {
      case 'start': this._onStart(msg); break;
      case 'content': this._onContent(msg); break;
      case 'done': this._onDone(msg); break;
      case 'error': this._onError(msg); break;
      default: break;
    }
  }

  _onStart(msg) {
    this.gotStart = true;
    if (this.resetOnFirstEvent) {
      this.resetOnFirstEvent = false;
      this.view.setText('');
    }
    if (msg.assistant_message_id !== undefined && msg.assistant_message_id !== null) {
      this.assistantId = msg.assistant_message_id;
      this.view.setId(msg.assistant_message_id);
    }
    if (this.userView && msg.user_message_id !== undefined) this.userView.setId(msg.user_message_id);
    if (msg.conversation_id !== undefined && msg.conversation_id !== null) {
      this.conversationId = msg.conversation_id;
      adoptConversation(msg.conversation_id, this);
    }
    if (this.mode === 'send') {
      broadcast({ type: 'reply-started', conversationId: this.conversationId, assistantId: this.assistantId });
    }
    if (this.stopRequested) this._sendStop();
  }

  _onContent(msg) {
    if (this.resetOnFirstEvent) {
      this.resetOnFirstEvent = false;
      this.view.text = '';
    }
    if (this.tFirst === null) this.tFirst = performance.now();
    const piece = typeof msg.content === 'string' ? msg.content : '';
    if (piece) this.view.append(piece);
  }

  _onDone(msg) {
    this.terminal = true;
    const tEnd = performance.now();
    const status = msg.status === 'cancelled' ? 'cancelled' : 'completed';
    if (msg.message_id !== undefined && msg.message_id !== null) this.view.setId(msg.message_id);
    const usage = msg.usage || {};
    const meta = {
      model: msg.model || (this.view.metadata && this.view.metadata.model) || config.modelName || '',
      prompt_tokens: usage.prompt_tokens,
      completion_tokens: usage.completion_tokens,
    };
    // Client-side timing is only meaningful for a reply this page asked for and saw from the start.
    if (this.mode === 'send' && this.tFirst !== null) {
      meta.ttft_ms = this.tFirst - this.tSend;
      meta.duration_ms = tEnd - this.tSend;
    }
    this.view.setMeta(meta);
    this.view.setNote(status === 'cancelled' ? STATUS_NOTES.cancelled : '', 'muted');
    this.view.finalize(status);
    if (state.run === this) setActiveRun(null);
    onReplyFinished(this);
  }

  _onError(msg) {
    this.terminal = true;
    const status = msg.code === 'interrupted' ? 'interrupted' : 'error';
    const text = typeof msg.content === 'string' && msg.content.trim() ? msg.content : STATUS_NOTES[status];
    this._fail(status, text, { fromEvent: true });
    onReplyFinished(this);
  }

  /** Mark the reply failed: keep the partial text, show why, offer Retry. */
  _fail(status, note, { fromEvent = false } = {}) {
    this.terminal = true;
    if (this.controller && !fromEvent) this.controller.abort();
    this.view.setNote(note, 'error');
    this.view.finalize(status);
    if (state.run === this) setActiveRun(null);
    const retry = this.gotStart
      ? () => sendMessage(this.userText) // a new send of the same text
      : () => retrySameSend(this);        // nothing was started: same client_message_id
    if (this.userText) {
      this.view.offerRetry(retry);
    } else {
      // An attached reply (opened from history): re-send the question it answered.
      const question = previousUserText(this.view);
      if (question) this.view.offerRetry(() => sendMessage(question));
    }
  }

  async stop() {
    if (!this.active || this.stopRequested) return;
    this.stopRequested = true;
    els.stop.disabled = true;
    els.stop.querySelector('.label').textContent = 'Stopping…';
    if (this.assistantId !== null && this.assistantId !== undefined) await this._sendStop();
    // else: sent as soon as the start event names the reply
  }

  async _sendStop() {
    if (this.stopSent || this.terminal) return;
    this.stopSent = true;
    try {
      const res = await api.streamFetch(`/api/ai/chat/stream/${encodeURIComponent(this.assistantId)}/stop/`, {
        method: 'POST',
        body: {},
        accept: 'application/json',
      });
      if (!res.ok) {
        let message = '';
        try { message = (await res.json()).error || ''; } catch (_) { /* ignore */ }
        throw new Error(message || `HTTP ${res.status}`);
      }
      let final = 'cancelled';
      try { final = (await res.json()).status || final; } catch (_) { /* ignore */ }
      // The stream normally ends with done/cancelled by itself; do not wait forever for it.
      setTimeout(() => {
        if (!this.active) return;
        this.terminal = true;
        if (this.controller) this.controller.abort();
        const status = ['completed', 'cancelled', 'error', 'interrupted'].includes(final) ? final : 'cancelled';
        this.view.setNote(STATUS_NOTES[status] || '', status === 'completed' ? 'muted' : 'error');
        this.view.finalize(status);
        if (state.run === this) setActiveRun(null);
        onReplyFinished(this);
      }, STOP_GRACE_MS);
    } catch (err) {
      this.stopSent = false;
      this.stopRequested = false;
      if (state.run === this) {
        els.stop.disabled = false;
        els.stop.querySelector('.label').textContent = 'Stop';
      }
      if (err && err.network) showUnreachable();
      else showBanner(`Couldn't stop the reply: ${(err && err.message) || 'unknown error'}.`, { kind: 'error' });
    }
  }
}

function previousUserText(view) {
  let el = view.el.previousElementSibling;
  while (el) {
    if (el.dataset.role === 'user') return el._view ? el._view.text : el.querySelector('[data-testid="message-content"]').textContent;
    el = el.previousElementSibling;
  }
  return '';
}

function sendMessage(text) {
  if (state.run || !text) return;
  if (state.retryView) state.retryView.clearRetry();
  const userView = appendMessage(new MessageView({ role: 'user', content: text, status: 'completed' }));
  userView.el._view = userView;
  const view = appendMessage(new MessageView({ role: 'assistant', status: 'streaming' }));
  state.stick = true;
  scrollToBottom(false);
  const run = new ReplyRun({
    mode: 'send',
    view,
    userView,
    text,
    clientMessageId: uuid(),
    conversationId: state.conversationId,
  });
  run.start();
}

function retrySameSend(failed) {
  if (state.run) return;
  // Nothing had started on the server: send again with the same client_message_id (idempotent),
  // reusing the same bubbles.
  failed.view.setText('');
  failed.view.setMeta(null);
  const run = new ReplyRun({
    mode: 'send',
    view: failed.view,
    userView: failed.userView,
    text: failed.userText,
    clientMessageId: failed.clientMessageId,
    conversationId: failed.conversationId ?? state.conversationId,
  });
  state.stick = true;
  run.start();
}

function attachToReply(view, assistantId) {
  const run = new ReplyRun({ mode: 'attach', view, assistantId, conversationId: state.conversationId });
  run.start();
}

function adoptConversation(id, run) {
  if (state.run !== run) return;
  if (state.conversationId === null) {
    state.conversationId = id;
    history.pushState({ conversationId: id }, '', conversationUrl(id));
    const title = run.userText.replace(/\s+/g, ' ').trim().slice(0, 60);
    if (!state.conversations.some((c) => idEq(c.id, id))) {
      state.conversations.unshift({ id, title, provisional: true });
    }
    renderConversationList();
    setTitle(title || 'New chat');
    refreshConversations();
  } else if (idEq(state.conversationId, id)) {
    // Existing conversation: it is now the most recently active one.
    const i = state.conversations.findIndex((c) => idEq(c.id, id));
    if (i > 0) {
      const [c] = state.conversations.splice(i, 1);
      state.conversations.unshift(c);
      renderConversationList();
    }
  }
}

async function onReplyFinished(run) {
  refreshConversations();
  broadcast({ type: 'conversations-changed' });
  // Prefer the server's stored metadata (ttft/duration measured where the model ran).
  const convId = run.conversationId;
  const mid = run.view.id;
  if (convId === null || convId === undefined || mid === undefined) return;
  const token = state.navToken;
  // The row may be finalised a moment after the terminal event: look twice at most.
  for (const delay of [150, 1500]) {
    await sleep(delay);
    if (token !== state.navToken) return;
    let m;
    try {
      const data = await api.getMessages(convId);
      m = ((data && data.messages) || []).find((x) => idEq(x.id, mid));
    } catch (_) {
      return; // keep the client-side numbers
    }
    if (token !== state.navToken || !m || !m.metadata) return;
    const merged = { ...(run.view.metadata || {}) };
    for (const [k, v] of Object.entries(m.metadata)) if (v !== null && v !== undefined && v !== '') merged[k] = v;
    run.view.setMeta(merged);
    if (num(m.metadata.ttft_ms) !== null && num(m.metadata.duration_ms) !== null) return;
  }
}

// ---------------------------------------------------------------------------------------
// Conversations (sidebar)

function setTitle(text) {
  els.title.textContent = text;
  setDocumentTitle(text === 'New chat' ? '' : text);
}

function renderConversationList() {
  const frag = document.createDocumentFragment();
  for (const c of state.conversations) frag.appendChild(conversationItem(c));
  els.list.replaceChildren(frag);
  els.listStatus.hidden = state.conversations.length > 0;
  els.listStatus.textContent = state.conversations.length ? '' : 'No conversations yet.';
  els.loadMore.hidden = !state.nextPage;
}


function iconButton(testId, title, icon, label, onClick, extraClass = '') {
  const button = document.createElement('button');
  button.type = 'button';
  button.className = `icon-button ${extraClass}`.trim();
  button.setAttribute('data-testid', testId);
  button.setAttribute('aria-label', label);
  button.title = title;
  button.innerHTML = icon; // our own SVG constants, never model output
  button.addEventListener('click', onClick);
  return button;
}

function conversationItem(c) {
  const li = document.createElement('li');
  li.className = 'conversation-item';
  li.setAttribute('data-testid', 'conversation-item');
  li.dataset.conversationId = String(c.id);
  const current = idEq(c.id, state.conversationId);
  li.classList.toggle('active', current);

  const link = document.createElement('a');
  link.className = 'conversation-link';
  link.href = conversationUrl(c.id);
  if (current) link.setAttribute('aria-current', 'page');
  const title = document.createElement('span');
  title.className = 'conversation-title';
  title.textContent = displayTitle(c);
  link.title = displayTitle(c);
  link.appendChild(title);
  link.addEventListener('click', (e) => {
    if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return; // new tab etc.
    e.preventDefault();
    closeSidebar();
    if (!idEq(c.id, state.conversationId)) openConversation(c.id, { push: true });
  });
  li.appendChild(link);

  const actions = document.createElement('div');
  actions.className = 'conversation-actions';
  const rename = iconButton('conversation-rename', 'Rename', ICONS.pencil, `Rename “${displayTitle(c)}”`,
    () => startRename(li, c));
  const del = iconButton('conversation-delete', 'Delete', ICONS.trash, `Delete “${displayTitle(c)}”`,
    () => deleteConversation(c), 'danger');
  actions.append(rename, del);
  li.appendChild(actions);
  return li;
}

function startRename(li, c) {
  if (li.querySelector('input')) return;
  const link = li.querySelector('.conversation-link');
  const input = document.createElement('input');
  input.type = 'text';
  input.className = 'conversation-rename-input';
  input.value = c.title || '';
  input.maxLength = 200;
  input.setAttribute('aria-label', 'Conversation title');
  input.placeholder = 'Conversation title';
  link.hidden = true;
  li.classList.add('renaming');
  li.insertBefore(input, link);
  input.focus();
  input.select();
  let finished = false;
  const finish = async (save) => {
    if (finished) return;
    finished = true;
    const value = input.value.replace(/\s+/g, ' ').trim();
    input.remove();
    link.hidden = false;
    li.classList.remove('renaming');
    if (!save || !value || value === (c.title || '')) {
      link.focus();
      return;
    }
    const old = c.title;
    c.title = value;
    renderConversationList();
    if (idEq(c.id, state.conversationId)) setTitle(value);
    focusConversationLink(c.id);
    try {
      const updated = await api.renameConversation(c.id, value);
      if (updated && typeof updated.title === 'string') c.title = updated.title;
      renderConversationList();
      if (idEq(c.id, state.conversationId)) setTitle(displayTitle(c));
      broadcast({ type: 'conversations-changed' });
    } catch (err) {
      c.title = old;
      renderConversationList();
      if (idEq(c.id, state.conversationId)) setTitle(displayTitle(c));
      if (err && err.network) showUnreachable();
      else showBanner(`Couldn't rename the conversation: ${err.message}`, { kind: 'error' });
    }
  };
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') { e.preventDefault(); finish(true); }
    else if (e.key === 'Escape') { e.preventDefault(); finish(false); }
  });
  input.addEventListener('blur', () => finish(true));
}

function focusConversationLink(id) {
  const li = [...els.list.children].find((x) => idEq(x.dataset.conversationId, id));
  if (li) li.querySelector('.conversation-link').focus();
}

async function deleteConversation(c) {
  // A plain, native confirmation: keyboard- and screen-reader-friendly everywhere.
  if (!window.confirm(`Delete “${displayTitle(c)}”? This removes the conversation and all its messages.`)) return;
  try {
    await api.deleteConversation(c.id);
  } catch (err) {
    if (err && err.status === 404) {
      // Already gone (another tab?): fall through and drop it from the list.
    } else {
      if (err && err.network) showUnreachable();
      else showBanner(`Couldn't delete the conversation: ${err.message}`, { kind: 'error' });
      return;
    }
  }
  state.conversations = state.conversations.filter((x) => !idEq(x.id, c.id));
  renderConversationList();
  broadcast({ type: 'conversations-changed', deleted: c.id });
  if (idEq(c.id, state.conversationId)) newChat({ push: true });
}

async function loadConversations() {
  try {
    const data = await api.listConversations();
    state.conversations = (data && data.results) || [];
    state.nextPage = (data && data.next) || null;
    // A conversation just created by this page may not be on the server's first page yet.
    if (state.conversationId !== null && !state.conversations.some((c) => idEq(c.id, state.conversationId))) {
      try {
        const conv = await api.getConversation(state.conversationId);
        if (conv && conv.id !== undefined) state.conversations.unshift(conv);
      } catch (_) { /* not important */ }
    }
    renderConversationList();
  } catch (err) {
    els.listStatus.hidden = false;
    els.listStatus.textContent = "Couldn't load conversations.";
    if (err && err.network) showUnreachable();
  }
}

let refreshTimer = null;
function refreshConversations() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(async () => {
    try {
      const data = await api.listConversations();
      const first = (data && data.results) || [];
      const seen = new Set(first.map((c) => String(c.id)));
      const rest = state.conversations.filter((c) => !seen.has(String(c.id)) && !c.provisional);
      // Keep a provisional entry until the server lists it.
      const provisional = state.conversations.filter((c) => c.provisional && !seen.has(String(c.id)));
      state.conversations = [...provisional, ...first, ...rest];
      if (rest.length === 0) state.nextPage = (data && data.next) || null; // else keep the page cursor
      renderConversationList();
      const cur = state.conversations.find((c) => idEq(c.id, state.conversationId));
      if (cur) setTitle(displayTitle(cur));
    } catch (_) { /* the list stays as it was */ }
  }, 200);
}

async function loadMoreConversations() {
  if (!state.nextPage || els.loadMore.disabled) return;
  els.loadMore.disabled = true;
  try {
    const data = await api.listConversations(state.nextPage);
    const have = new Set(state.conversations.map((c) => String(c.id)));
    for (const c of (data && data.results) || []) if (!have.has(String(c.id))) state.conversations.push(c);
    state.nextPage = (data && data.next) || null;
    renderConversationList();
  } catch (err) {
    if (err && err.network) showUnreachable();
  } finally {
    els.loadMore.disabled = false;
  }
}
els.loadMore.addEventListener('click', loadMoreConversations);
if ('IntersectionObserver' in window) {
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting) && !els.loadMore.hidden) loadMoreConversations();
  }, { root: els.list.closest('.sidebar-scroll') }).observe(els.loadMore);
}

// ---------------------------------------------------------------------------------------
// Navigation

function leaveCurrent() {
  state.navToken++;
  if (state.run) {
    const run = state.run;
    run.detach();
    setActiveRun(null);
  }
  clearMessages();
}

function newChat({ push = true } = {}) {
  leaveCurrent();
  state.conversationId = null;
  if (push && window.location.pathname !== CHAT_URL) history.pushState({ conversationId: null }, '', CHAT_URL);
  els.empty.hidden = false;
  setTitle('New chat');
  renderConversationList();
  state.stick = true;
  updateJumpButton();
  if (isDesktopPointer()) els.input.focus();
}

async function openConversation(id, { push = false, quiet = false } = {}) {
  leaveCurrent();
  state.conversationId = id;
  if (push) history.pushState({ conversationId: id }, '', conversationUrl(id));
  const token = state.navToken;
  const known = state.conversations.find((c) => idEq(c.id, id));
  setTitle(known ? displayTitle(known) : 'Loading…');
  renderConversationList();
  els.empty.hidden = true;
  els.scroller.setAttribute('aria-busy', 'true');
  let data;
  try {
    data = await api.getMessages(id);
  } catch (err) {
    if (token !== state.navToken) return;
    els.scroller.removeAttribute('aria-busy');
    if (err && err.status === 404) {
      history.replaceState({ conversationId: null }, '', CHAT_URL);
      newChat({ push: false });
      if (!quiet) showBanner('That conversation does not exist or was deleted.', { kind: 'error' });
      return;
    }
    if (err && err.network) showUnreachable();
    const p = document.createElement('div');
    p.className = 'load-error';
    p.textContent = `Couldn't load this conversation: ${err.message} `;
    const again = document.createElement('button');
    again.type = 'button';
    again.className = 'link-button';
    again.textContent = 'Try again';
    again.addEventListener('click', () => openConversation(id));
    p.appendChild(again);
    els.messages.replaceChildren(p);
    return;
  }
  if (token !== state.navToken) return;
  els.scroller.removeAttribute('aria-busy');
  const conv = data && data.conversation;
  if (conv) {
    setTitle(displayTitle(conv));
    const i = state.conversations.findIndex((c) => idEq(c.id, id));
    if (i >= 0) state.conversations[i] = { ...state.conversations[i], ...conv, provisional: false };
  }
  const messages = (data && data.messages) || [];
  state.stick = true;
  let lastAssistant = null;
  for (const m of messages) {
    if (m.role !== 'user' && m.role !== 'assistant') continue; // system prompts are not shown
    const view = new MessageView({
      role: m.role,
      id: m.id,
      content: m.content || '',
      status: m.status || 'completed',
      metadata: m.role === 'assistant' ? m.metadata : null,
    });
    view.el._view = view;
    appendMessage(view);
    if (m.role === 'assistant') {
      lastAssistant = { view, m };
      if (STATUS_NOTES[m.status]) view.setNote(STATUS_NOTES[m.status], m.status === 'cancelled' ? 'muted' : 'error');
    }
  }
  els.empty.hidden = els.messages.childElementCount > 0;
  scrollToBottom(false);
  renderConversationList();
  if (lastAssistant && lastAssistant.view.el === els.messages.lastElementChild) {
    const { view, m } = lastAssistant;
    if (m.status === 'streaming') {
      attachToReply(view, m.id); // still generating: re-attach and follow it live
    } else if (m.status === 'error' || m.status === 'interrupted') {
      const question = previousUserText(view);
      if (question) view.offerRetry(() => sendMessage(question));
    }
  }
  updateComposer();
}

window.addEventListener('popstate', () => {
  const id = conversationIdFromLocation();
  if (id === null) {
    if (state.conversationId !== null) newChat({ push: false });
  } else if (!idEq(id, state.conversationId)) {
    openConversation(id, { push: false });
  }
});

els.newChat.addEventListener('click', (e) => {
  if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  e.preventDefault();
  closeSidebar();
  newChat({ push: true });
});

// ---------------------------------------------------------------------------------------
// Composer

function updateComposer() {
  const value = els.input.value;
  const trimmed = value.trim();
  const count = MAX_CHARS ? charCount(value) : 0;
  const over = MAX_CHARS > 0 && charCount(trimmed) > MAX_CHARS;
  if (MAX_CHARS > 0 && count >= Math.floor(MAX_CHARS * 0.8)) {
    els.counter.hidden = false;
    els.counter.textContent = over
      ? `${count.toLocaleString()} / ${MAX_CHARS.toLocaleString()} — ${(charCount(trimmed) - MAX_CHARS).toLocaleString()} over the limit`
      : `${count.toLocaleString()} / ${MAX_CHARS.toLocaleString()}`;
    els.counter.classList.toggle('over', over);
  } else {
    els.counter.hidden = true;
    els.counter.classList.remove('over');
  }
  els.input.setAttribute('aria-invalid', over ? 'true' : 'false');
  els.send.disabled = !trimmed || over || !!state.run;
  els.send.title = state.run ? 'Wait for the reply to finish (or stop it)' : over ? 'Message is too long' : 'Send (Enter)';
}

function autosize() {
  const ta = els.input;
  ta.style.height = 'auto';
  ta.style.height = `${Math.min(ta.scrollHeight, Math.round(window.innerHeight * 0.4))}px`;
}

function submit() {
  updateComposer();
  if (els.send.disabled) return;
  const text = els.input.value.trim();
  els.input.value = '';
  autosize();
  updateComposer();
  sendMessage(text);
}

els.composer.addEventListener('submit', (e) => {
  e.preventDefault();
  submit();
});
els.input.addEventListener('input', () => {
  autosize();
  updateComposer();
});
els.input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    submit();
  }
});
els.stop.addEventListener('click', () => {
  if (state.run) state.run.stop();
});

// ---------------------------------------------------------------------------------------
// Sidebar on small screens

function openSidebar() {
  document.body.classList.add('sidebar-open');
  els.menuButton.setAttribute('aria-expanded', 'true');
  els.backdrop.hidden = false;
  const first = els.sidebar.querySelector('a, button');
  if (first) first.focus();
}

function closeSidebar() {
  if (!document.body.classList.contains('sidebar-open')) return;
  document.body.classList.remove('sidebar-open');
  els.menuButton.setAttribute('aria-expanded', 'false');
  els.backdrop.hidden = true;
}

els.menuButton.addEventListener('click', () => {
  if (document.body.classList.contains('sidebar-open')) closeSidebar();
  else openSidebar();
});
els.sidebarClose.addEventListener('click', () => { closeSidebar(); els.menuButton.focus(); });
els.backdrop.addEventListener('click', closeSidebar);
document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && document.body.classList.contains('sidebar-open')) {
    closeSidebar();
    els.menuButton.focus();
  }
});

els.errorDismiss.addEventListener('click', () => {
  hideBanner();
  clearTimeout(probeTimer);
});

// ---------------------------------------------------------------------------------------
// Other tabs: a reply started elsewhere in the open conversation is followed here too.

const channel = 'BroadcastChannel' in window ? new BroadcastChannel('c3-chat') : null;
function broadcast(msg) {
  if (channel) channel.postMessage(msg);
}
if (channel) {
  channel.onmessage = (e) => {
    const msg = e.data || {};
    if (msg.type === 'reply-started') {
      if (!state.run && idEq(msg.conversationId, state.conversationId)) {
        openConversation(state.conversationId, { quiet: true });
      }
      refreshConversations();
    } else if (msg.type === 'conversations-changed') {
      if (msg.deleted !== undefined && idEq(msg.deleted, state.conversationId) && !state.run) {
        state.conversations = state.conversations.filter((c) => !idEq(c.id, msg.deleted));
        newChat({ push: true });
      }
      refreshConversations();
    }
  };
}

window.addEventListener('online', () => {
  if (bannerKind === 'network') probeService(false);
});
window.addEventListener('offline', () => {
  showBanner("You're offline. Replies can't be received until the connection is back.", { kind: 'network' });
});

// ---------------------------------------------------------------------------------------
// Boot

function boot() {
  document.body.dataset.streaming = '0';
  updateComposer();
  autosize();
  api.prefetchToken();
  loadConversations();
  const fromUrl = conversationIdFromLocation();
  const initial = config.initialConversationId ?? fromUrl;
  if (initial !== null && initial !== undefined) {
    history.replaceState({ conversationId: initial }, '', conversationUrl(initial));
    openConversation(initial, { push: false });
  } else {
    newChat({ push: false });
  }
  if (api.sidecar) probeService(false);
  if (isDesktopPointer()) els.input.focus();
}

boot();
