// The manager's web UI: a left nav, one page at a time (hash routes), live updates from
// GET /v1/events (server-sent events), falling back to polling while the stream is down.
//
// Wanted from the API (see manager/API.md), noted here for the manager's authors:
// nothing beyond the contract is used; every action button comes from an `actions` map.

import { h, fill } from './lib.js';
import * as volumes from './volumes.js';
import * as volume from './volume.js';
import * as backups from './backups.js';
import * as settings from './settings.js';

const routes = [
  [/^#\/volumes\/([^/]+)$/, volume, 'volumes'],
  [/^#\/volumes$/, volumes, 'volumes'],
  [/^#\/backups\/([^/]+)$/, backups, 'backups'],
  [/^#\/backups$/, backups, 'backups'],
  [/^#\/settings$/, settings, 'settings'],
];

const main = document.getElementById('main');
let page = null;

function route() {
  const hash = location.hash || '#/volumes';
  const hit = routes.find(([re]) => re.test(hash));
  if (!hit) {
    location.hash = '#/volumes';
    return;
  }
  const [re, mod, nav] = hit;
  const args = re.exec(hash).slice(1).map(decodeURIComponent);
  document.querySelectorAll('nav a').forEach((a) => a.classList.toggle('active', a.dataset.nav === nav));
  if (page && page.dispose) page.dispose();
  fill(main);
  page = mod.render(main, ...args) || null;
}

// ---- live updates ----

const status = document.getElementById('live');
let es = null;
let poll = null;

function setLive(state) {
  status.dataset.state = state;
  fill(status, h('span.dot'), state === 'live' ? 'live' : state === 'polling' ? 'polling' : 'connecting');
}

function deliver(ev) {
  if (page && page.onEvent) page.onEvent(ev);
}

function connect() {
  setLive('connecting');
  es = new EventSource('/v1/events');
  es.onopen = () => {
    setLive('live');
    if (poll) {
      clearInterval(poll);
      poll = null;
    }
    deliver({ type: 'refresh' });
  };
  es.onmessage = (m) => {
    let ev;
    try {
      ev = JSON.parse(m.data);
    } catch {
      return;
    }
    deliver(ev);
  };
  es.onerror = () => {
    // EventSource retries by itself; meanwhile pages refresh every 2 s.
    if (es.readyState === EventSource.CLOSED) {
      es = null;
      setTimeout(connect, 2000);
    }
    setLive('polling');
    if (!poll) poll = setInterval(() => deliver({ type: 'refresh' }), 2000);
  };
}

window.addEventListener('hashchange', route);
route();
connect();
