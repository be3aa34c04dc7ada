// Markdown rendering for model output.
//
// Model output is UNTRUSTED. The pipeline is:
//   1. marked (GFM) turns markdown into HTML. Raw HTML written by the model is NOT passed
//      through: the `html` renderer escapes it, so "<script>" or "<img onerror=…>" shows up
//      as literal text.
//   2. Images are never loaded: markdown images are rendered as a plain link to the image
//      ("Image: alt text") when the URL is http(s), or as their alt text otherwise. A remote
//      image would leak the reader's IP address and the fact that the message was viewed to
//      whoever the model (or a prompt injection) chose; it could also be used for tracking
//      or to exfiltrate conversation data through the URL.
//   3. DOMPurify sanitises the result with a small allow-list of tags and attributes (no
//      <img>, <svg>, <iframe>, <form>, <style>, no style= or on*= attributes), and only
//      http:, https:, mailto: and #fragment links survive (no javascript:, data:, vbscript:).
//      Links open in a new tab with rel="noopener noreferrer nofollow".
//   4. Code blocks are highlighted with highlight.js (which escapes its input) before
//      sanitising; after sanitising, a copy button and language label are added in the DOM.
//
// The sanitiser parses inside an inert document, so nothing in the untrusted HTML is fetched
// or run before it has been cleaned.

import { Marked } from './vendor/marked/marked.esm.js';
import DOMPurify from './vendor/dompurify/purify.es.mjs';
import hljs from './vendor/highlightjs/highlight.min.js';

const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
export function escapeHtml(s) {
  return String(s ?? '').replace(/[&<>"']/g, (c) => ESC[c]);
}

const SAFE_URL = /^(?:(?:https?|mailto):|#)/i;

function safeLang(lang) {
  const first = String(lang || '').trim().split(/\s+/)[0].toLowerCase();
  return /^[a-z0-9_+#.-]{1,32}$/.test(first) ? first : '';
}

// Highlighting the same finished code block on every streamed frame would be wasteful:
// keep a small cache keyed by language + code.
const hlCache = new Map();
const HL_CACHE_MAX = 200;
function highlight(code, lang) {
  if (!lang || !hljs.getLanguage(lang)) return null;
  const key = lang + '\u0000' + code;
  let html = hlCache.get(key);
  if (html === undefined) {
    try {
      html = hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
    } catch (_) {
      html = null;
    }
    if (hlCache.size >= HL_CACHE_MAX) hlCache.delete(hlCache.keys().next().value);
    hlCache.set(key, html);
  }
  return html;
}

const marked = new Marked({ gfm: true, breaks: false, async: false });
marked.use({
  renderer: {
    // Raw HTML from the model is shown as text, never interpreted.
    html({ text }) {
      return escapeHtml(text);
    },
    code({ text, lang }) {
      const language = safeLang(lang);
      const code = String(text ?? '').replace(/\n$/, '');
      const highlighted = highlight(code, language);
      const cls = 'hljs' + (language ? ' language-' + language : '');
      return `<pre data-lang="${escapeHtml(language)}"><code class="${cls}">${highlighted ?? escapeHtml(code)}</code></pre>\n`;
    },
    // Remote images are not loaded (see the header comment).
    image({ href, text }) {
      const alt = text ? String(text) : 'image';
      if (href && /^https?:/i.test(href)) {
        return `<a href="${escapeHtml(href)}" class="md-image-link">Image: ${escapeHtml(alt)}</a>`;
      }
      return `<span class="md-image-alt">[${escapeHtml(alt)}]</span>`;
    },
    checkbox({ checked }) {
      return `<span class="md-task" aria-label="${checked ? 'done' : 'not done'}">${checked ? '☑' : '☐'}</span> `;
    },
  },
});

const PURIFY_CONFIG = {
  ALLOWED_TAGS: [
    'a', 'p', 'br', 'hr', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'strong', 'b', 'em', 'i', 'del', 's',
    'code', 'pre', 'blockquote', 'ul', 'ol', 'li', 'table', 'thead', 'tbody', 'tr', 'th', 'td',
    'span', 'sup', 'sub', 'kbd',
  ],
  ALLOWED_ATTR: ['href', 'title', 'class', 'start', 'align', 'data-lang', 'aria-label'],
  ALLOWED_URI_REGEXP: SAFE_URL,
  // With a strict URI regexp, DOMPurify also applies it to attribute values it does not know
  // to be URI-safe; these carry plain words/numbers (and are never URLs).
  ADD_URI_SAFE_ATTR: ['data-lang', 'start', 'align', 'aria-label'],
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  KEEP_CONTENT: true,
  RETURN_TRUSTED_TYPE: false,
};

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.nodeName === 'A') {
    const href = node.getAttribute('href');
    if (!href || !SAFE_URL.test(href.trim())) {
      node.removeAttribute('href');
    } else if (!href.startsWith('#')) {
      node.setAttribute('target', '_blank');
      node.setAttribute('rel', 'noopener noreferrer nofollow');
    }
  }
});

/** Markdown source → sanitised HTML string. */
export function markdownToSafeHtml(src) {
  let html;
  try {
    html = marked.parse(String(src ?? ''));
  } catch (_) {
    html = `<p>${escapeHtml(src)}</p>`;
  }
  return DOMPurify.sanitize(html, PURIFY_CONFIG);
}

const COPY_ICON = '<svg viewBox="0 0 24 24" width="16" height="16" aria-hidden="true" focusable="false"><rect x="9" y="9" width="11" height="11" rx="2" fill="none" stroke="currentColor" stroke-width="2"/><path d="M5 15V5a2 2 0 0 1 2-2h10" fill="none" stroke="currentColor" stroke-width="2"/></svg>';
const CHECK_ICON = '<svg viewBox="0 0 24 24" width="16" height="16" aria-hidden="true" focusable="false"><path d="M5 12.5l4.5 4.5L19 7.5" fill="none" stroke="currentColor" stroke-width="2.2" stroke-linecap="round" stroke-linejoin="round"/></svg>';
export { COPY_ICON, CHECK_ICON };

/** Copy text to the clipboard (falls back to execCommand outside secure contexts). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (_) { /* fall through */ }
  }
  const ta = document.createElement('textarea');
  ta.value = text;
  ta.setAttribute('readonly', '');
  ta.style.position = 'fixed';
  ta.style.opacity = '0';
  document.body.appendChild(ta);
  ta.select();
  let ok = false;
  try { ok = document.execCommand('copy'); } catch (_) { ok = false; }
  ta.remove();
  return ok;
}

export function flashCopied(btn) {
  btn.innerHTML = CHECK_ICON;
  btn.classList.add('copied');
  btn.setAttribute('aria-label', 'Copied');
  clearTimeout(btn._copyTimer);
  btn._copyTimer = setTimeout(() => {
    btn.innerHTML = COPY_ICON;
    btn.classList.remove('copied');
    btn.setAttribute('aria-label', btn.dataset.label || 'Copy');
  }, 1500);
}

// Decorate sanitised content in place: copy buttons on code blocks, scroll wrappers on tables.
// The buttons contain only an SVG icon, so the text of the message stays exactly the reply.
function decorate(root) {
  for (const pre of root.querySelectorAll('pre')) {
    const wrap = document.createElement('div');
    wrap.className = 'code-block';
    const lang = pre.getAttribute('data-lang') || '';
    if (lang) wrap.setAttribute('data-lang', lang);
    pre.replaceWith(wrap);
    wrap.appendChild(pre);
    const btn = document.createElement('button');
    btn.type = 'button';
    btn.className = 'code-copy icon-button';
    btn.dataset.label = 'Copy code';
    btn.setAttribute('aria-label', 'Copy code');
    btn.title = 'Copy code';
    btn.innerHTML = COPY_ICON;
    wrap.appendChild(btn);
  }
  for (const table of root.querySelectorAll('table')) {
    const wrap = document.createElement('div');
    wrap.className = 'table-wrap';
    table.replaceWith(wrap);
    wrap.appendChild(table);
  }
}

/** Render markdown into `el` (replacing its content). */
export function renderMarkdownInto(el, src) {
  el.innerHTML = markdownToSafeHtml(src);
  decorate(el);
}

// One delegated listener handles every code copy button on the page.
document.addEventListener('click', async (e) => {
  const btn = e.target.closest && e.target.closest('.code-copy');
  if (!btn) return;
  const code = btn.parentElement && btn.parentElement.querySelector('pre code');
  if (!code) return;
  if (await copyText(code.textContent)) flashCopied(btn);
});
