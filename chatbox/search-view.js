// Message search, above the conversations list: a search box that asks
// `GET /api/v1/chat/search` as the reader types (debounced, and a newer
// query cancels the request of an older one), and the hits: conversation,
// sender, time and the snippet with the matched words marked. The snippet
// is built from text nodes and <mark>, never HTML. Choosing a hit opens its
// conversation at the message.

import { listTime } from './state.js';
import { snippetSegments } from './lifecycle.js';
import { button, el, hidden, searchIcon } from './dom.js';

const SEARCH_DEBOUNCE_MS = 250;
/** The server refuses longer queries (422 invalid_query). */
const MAX_QUERY = 200;

export class SearchView {
  /**
   * @param {object} o
   * @param {(q: string, o: {cursor?: string, signal: AbortSignal}) => Promise<{hits: object[], next_cursor: string|null}>} o.run
   * @param {string} o.query the query to start with (kept by the controller across views)
   * @param {(q: string) => void} o.onQuery the query changed
   * @param {(hit: object) => void} o.onHit a hit was chosen
   * @param {(active: boolean) => void} o.onActive results are shown (true) or the box is empty again
   */
  constructor({ run, query = '', onQuery, onHit, onActive }) {
    this.run = run;
    this.onQuery = onQuery ?? (() => {});
    this.onHit = onHit;
    this.onActive = onActive ?? (() => {});
    this.timer = null;
    this.controller = null;
    this.generation = 0;
    this.cursor = null;
    this.query = '';

    this.element = el('div', { class: 'vc-searchbar', role: 'search' });
    const field = el('div', { class: 'vc-search-field' });
    field.append(searchIcon());
    this.input = el('input', { type: 'search', class: 'vc-search', placeholder: 'Search messages', 'aria-label': 'Search messages', autocomplete: 'off', maxlength: String(MAX_QUERY) });
    field.append(this.input);
    this.element.append(field);
    this.results = el('div', { class: 'vc-results', hidden: true });
    this.status = el('p', { class: 'vc-hint vc-search-status', role: 'status' });
    this.list = el('ul', { class: 'vc-list vc-hits', 'aria-label': 'Messages found' });
    this.more = button('More results', { class: 'vc-secondary vc-search-more', hidden: true }, () => this.search(this.query, this.cursor));
    this.results.append(this.status, this.list, this.more);

    this.input.addEventListener('input', () => this.typed());
    this.input.addEventListener('keydown', (e) => {
      // Escape empties the box (the browser's own), not the whole panel.
      if (e.key === 'Escape' && this.input.value) e.stopPropagation();
    });
    if (query) {
      this.input.value = query;
      this.typed(0);
    }
  }

  get active() {
    return Boolean(this.query);
  }

  typed(delay = SEARCH_DEBOUNCE_MS) {
    const q = this.input.value.trim();
    clearTimeout(this.timer);
    this.onQuery(this.input.value);
    if (q === this.query && (q || this.results.hidden)) return;
    this.query = q;
    this.controller?.abort();
    this.generation += 1;
    if (!q) {
      this.results.hidden = true;
      this.onActive(false);
      return;
    }
    this.results.hidden = false;
    this.onActive(true);
    this.status.textContent = 'Searching…';
    this.timer = setTimeout(() => this.search(q, null), delay);
  }

  /** One page of hits for `q`: the first (a fresh list) or the next (`cursor`). */
  async search(q, cursor) {
    this.controller?.abort();
    const controller = new AbortController();
    this.controller = controller;
    const generation = cursor ? this.generation : ++this.generation;
    this.more.disabled = true;
    let page;
    try {
      page = await this.run(q, { cursor, signal: controller.signal });
    } catch (e) {
      if (e.code === 'aborted' || generation !== this.generation) return;
      this.status.textContent = e.code === 'invalid_query' ? 'Try other words.' : `Search failed: ${e.message}`;
      this.more.disabled = false;
      return;
    }
    if (generation !== this.generation || q !== this.query) return;
    if (!cursor) this.list.replaceChildren();
    this.list.append(...page.hits.map((hit) => this.row(hit)));
    this.cursor = page.next_cursor ?? null;
    this.more.hidden = !this.cursor;
    this.more.disabled = false;
    const n = this.list.children.length;
    this.status.textContent = n ? `${n}${this.cursor ? '+' : ''} ${n === 1 ? 'message' : 'messages'} found` : `No messages match “${q}”.`;
  }

  row(hit) {
    const li = el('li');
    const b = button(null, { class: 'vc-row vc-hit', 'data-conversation-id': String(hit.conversation_id), 'data-seq': String(hit.seq) }, () => this.onHit(hit));
    const title = el('span', { class: 'vc-row-title' }, hit.conversation_name || 'Conversation');
    const meta = el('span', { class: 'vc-row-meta' }, listTime(new Date(hit.created_at)));
    const line = el('span', { class: 'vc-row-preview vc-snippet' });
    line.append(el('span', { class: 'vc-hit-sender' }, `${hit.sender_name || 'Someone'}: `));
    for (const part of snippetSegments(hit.snippet)) line.append(part.hit ? el('mark', {}, part.text) : document.createTextNode(part.text));
    b.append(title, meta, hidden(' '), line);
    li.append(b);
    return li;
  }

  destroy() {
    clearTimeout(this.timer);
    this.controller?.abort();
  }
}
