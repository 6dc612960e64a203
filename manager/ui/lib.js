// Small helpers shared by the pages: building elements (text only: every server string
// goes in through textContent or an attribute, never as HTML), calling the API, and
// showing its errors next to the field they name.

/** h('tag.class#id', {attr: v, onclick: f}, ...children): children are nodes or text. */
export function h(spec, attrs, ...kids) {
  const [sel, id] = spec.split('#');
  const [tag, ...classes] = sel.split('.');
  const el = document.createElement(tag || 'div');
  if (classes.length) el.className = classes.join(' ');
  if (id) el.id = id;
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    kids.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, kids);
  return el;
}

function append(el, kids) {
  for (const k of kids) {
    if (k === undefined || k === null || k === false) continue;
    if (Array.isArray(k)) append(el, k);
    else el.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
}

/** Replaces the children of `el`. */
export function fill(el, ...kids) {
  el.replaceChildren();
  append(el, kids);
  return el;
}

/** An error from the API: status, message and the field it names (if any). */
export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.field = (body && body.field) || fieldInMessage(this.message);
    this.body = body;
  }
}

// The engine's validation messages say `field "cron": ...`; the API's errors carry
// `field`. Either way the UI finds the field to put the message next to.
function fieldInMessage(msg) {
  const m = /field "([A-Za-z]+)"/.exec(msg || '');
  return m ? m[1] : '';
}

/** The path and query of a link the server gave (links.self, actions), so requests go
 * to the page's own origin whatever host name the server put in its links. */
export function local(url) {
  try {
    const u = new URL(url, location.href);
    return u.pathname + u.search;
  } catch {
    return url;
  }
}

/** fetch + JSON; throws ApiError on a non-2xx answer. */
export async function api(method, url, body) {
  const opts = { method, headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(local(url), opts);
  } catch (e) {
    throw new ApiError(0, { message: `cannot reach the manager: ${e.message}` });
  }
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { message: text.slice(0, 300) };
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

/** POSTs one of a resource's actions (the URL from its `actions` map). */
export function act(resource, action, body = {}) {
  const url = resource && resource.actions && resource.actions[action];
  if (!url) return Promise.reject(new ApiError(409, { message: `${action} is not allowed now` }));
  return api('POST', url, body);
}

export const can = (resource, action) => !!(resource && resource.actions && resource.actions[action]);

// ---- formatting ----

export function bytes(v) {
  const n = Number(v);
  if (v === '' || v === null || v === undefined || !Number.isFinite(n)) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let x = n;
  while (x >= 1024 && i < units.length - 1) {
    x /= 1024;
    i++;
  }
  return `${i ? x.toFixed(x < 10 ? 2 : 1).replace(/\.0+$/, '') : x} ${units[i]}`;
}

export function when(t) {
  if (!t) return '';
  const d = new Date(t);
  if (isNaN(d)) return String(t);
  return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

const PILL = {
  attached: 'ok', healthy: 'ok', rw: 'ok', completed: 'ok', running: 'ok',
  detached: 'off', unknown: 'off',
  degraded: 'warn', wo: 'warn', creating: 'warn', attaching: 'warn', detaching: 'warn',
  in_progress: 'warn', inprogress: 'warn', pending: 'warn', new: 'warn',
  faulted: 'bad', err: 'bad', error: 'bad',
};

export function pill(text, extra = {}) {
  const t = String(text || 'unknown');
  return h(`span.pill.${PILL[t.toLowerCase()] || 'off'}`, extra, t);
}

export function progress(pct, label = '') {
  const p = Math.max(0, Math.min(100, Number(pct) || 0));
  return h('span.progress', { role: 'progressbar', 'aria-valuenow': p, title: `${p}%` },
    h('span.bar', { style: `width:${p}%` }), h('span.pct', `${label}${p}%`));
}

export function labels(obj) {
  const ks = Object.keys(obj || {});
  return ks.length ? h('span.labels', ks.map((k) => h('span.label', `${k}=${obj[k]}`))) : '';
}

/** Parses "k=v, k2=v2" into a map; throws naming the bad pair. */
export function parseLabels(s) {
  const out = {};
  for (const part of s.split(',').map((x) => x.trim()).filter(Boolean)) {
    const i = part.indexOf('=');
    if (i <= 0) throw new ApiError(400, { message: `label "${part}" is not key=value`, field: 'labels' });
    out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return out;
}

// ---- feedback ----

/** Shows a message in the top bar for a few seconds (errors stay until closed). */
export function toast(msg, kind = 'info') {
  const box = document.getElementById('toasts');
  const t = h(`div.toast.${kind}`, { role: kind === 'error' ? 'alert' : 'status' },
    h('span', msg), h('button.x', { title: 'close', onclick: () => t.remove() }, '×'));
  box.append(t);
  if (kind !== 'error') setTimeout(() => t.remove(), 4000);
}

/** Runs an API call from a button: disables it meanwhile, reports errors. */
export async function run(button, fn, done) {
  if (button) button.disabled = true;
  try {
    const r = await fn();
    if (done) toast(done);
    return r;
  } catch (e) {
    toast(e.message, 'error');
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

/** A form whose fields show the server's errors next to them.
 * fields: [{name, label, input: element, hint}]; submit(values) may throw ApiError. */
export function form(id, fields, submitLabel, submit) {
  const errs = {};
  const general = h('div.err.general', { 'data-error-for': '' });
  const rows = fields.map((f) => {
    errs[f.name] = h('div.err', { 'data-error-for': f.name, id: `${id}-${f.name}-err` });
    f.input.name = f.name;
    f.input.id = `${id}-${f.name}`;
    f.input.setAttribute('aria-describedby', `${id}-${f.name}-err`);
    return h('div.field', { 'data-field': f.name },
      h('label', { for: f.input.id }, f.label), f.input,
      f.hint ? h('div.hint', f.hint) : null, errs[f.name]);
  });
  const btn = h('button.primary', { type: 'submit' }, submitLabel);
  const el = h('form.form', { id, novalidate: true }, rows, general, h('div.buttons', btn));
  const clear = () => {
    for (const e of [general, ...Object.values(errs)]) e.textContent = '';
    el.querySelectorAll('.invalid').forEach((x) => x.classList.remove('invalid'));
  };
  el.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clear();
    const vals = {};
    for (const f of fields) vals[f.name] = f.input.value;
    btn.disabled = true;
    try {
      await submit(vals);
    } catch (e) {
      const key = e.field && Object.keys(errs).find((k) => k === e.field || String(e.field).split(/[.\[\]]/).includes(k));
      if (key) {
        errs[key].textContent = e.message;
        fields.find((f) => f.name === key).input.classList.add('invalid');
      } else {
        general.textContent = e.message;
      }
    } finally {
      btn.disabled = false;
    }
  });
  el.clearErrors = clear;
  return el;
}

/** A modal dialog holding `body`; returns a close function. */
export function modal(title, body) {
  const close = () => dlg.remove();
  const dlg = h('div.modal-bg', { onclick: (e) => e.target === dlg && close() },
    h('div.modal', { role: 'dialog', 'aria-label': title },
      h('div.modal-head', h('h3', title), h('button.x', { type: 'button', title: 'close', onclick: close }, '×')),
      body));
  document.body.append(dlg);
  const first = dlg.querySelector('input,select');
  if (first) first.focus();
  return close;
}

export const input = (attrs = {}) => h('input', { type: 'text', ...attrs });
export function select(options, value) {
  return h('select', options.map(([v, t]) => h('option', { value: v, selected: v === value }, t)));
}
