// A stand-in for `longhorn manager` for working on the UI without one: serves manager/ui
// and an in-memory imitation of the API in manager/API.md (no data, no processes).
// Usage: node tests/ui/mock.mjs [PORT]   (the real test, story.mjs, runs the real manager)
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ui = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'manager', 'ui');
const port = Number(process.argv[2] || 9599);
const vols = new Map();
const bvols = new Map();
const settings = { 'backup-target': '', 'backup-target-credential-secret': '' };
const secrets = {};
const clients = new Set();
const now = () => new Date().toISOString();
let base = '';

const err = (res, status, message, field) => send(res, status, { type: 'error', status, code: String(status), message, ...(field ? { field } : {}) });
function send(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(body));
}
function emit(ev) {
  for (const c of clients) c.write(`data: ${JSON.stringify(ev)}\n\n`);
}
function view(v) {
  const self = `${base}/v1/volumes/${v.name}`;
  const a = (n) => `${self}?action=${n}`;
  const names = v.state === 'attached'
    ? ['detach', 'snapshotCreate', 'snapshotList', 'snapshotDelete', 'snapshotRevert', 'snapshotPurge', 'snapshotBackup', 'updateReplicaCount', 'replicaRemove']
    : v.state === 'detached' ? ['attach', 'expand'] : [];
  names.push('recurringJobAdd', 'recurringJobDelete', 'recurringJobList');
  const { snaps, ...rest } = v;
  return { type: 'volume', id: v.name, ...rest, links: { self }, actions: Object.fromEntries(names.map((n) => [n, a(n)])) };
}
const changed = (v) => emit({ type: 'volume', id: v.name, data: view(v) });

function body(req) {
  return new Promise((ok) => {
    let s = '';
    req.on('data', (d) => (s += d));
    req.on('end', () => {
      try { ok(s ? JSON.parse(s) : {}); } catch { ok(null); }
    });
  });
}

function action(v, name, b, res) {
  const snap = (n, user, labels = {}) => {
    const head = v.snaps.find((s) => s.name === 'volume-head');
    const s = { type: 'snapshot', id: n, name: n, parent: head.parent, children: ['volume-head'], created: now(), size: '4096', usercreated: user, removed: false, labels };
    const p = v.snaps.find((x) => x.name === head.parent);
    if (p) p.children = p.children.map((c) => (c === 'volume-head' ? n : c));
    head.parent = n;
    v.snaps.splice(v.snaps.length - 1, 0, s);
    return s;
  };
  switch (name) {
    case 'attach':
      v.state = 'attaching'; changed(v);
      setTimeout(() => { v.state = 'attached'; v.robustness = 'healthy'; v.nbdEndpoint = `nbd+unix:///?socket=/run/${v.name}.nbd`; changed(v); }, 500);
      return send(res, 200, view(v));
    case 'detach':
      v.state = 'detached'; v.robustness = 'unknown'; changed(v);
      return send(res, 200, view(v));
    case 'snapshotCreate':
      return send(res, 200, snap(b.name || `snap-${Math.random().toString(16).slice(2, 10)}`, true, b.labels));
    case 'snapshotList':
      return send(res, 200, { type: 'collection', resourceType: 'snapshot', data: v.snaps });
    case 'snapshotDelete': {
      const s = v.snaps.find((x) => x.name === b.name);
      if (!s) return err(res, 404, `snapshot "${b.name}": not found`, 'name');
      s.removed = true;
      return send(res, 200, s);
    }
    case 'snapshotBackup': {
      if (!settings['backup-target']) return err(res, 409, 'no backup target is set');
      const s = b.name ? v.snaps.find((x) => x.name === b.name) : snap(`snap-${Date.now().toString(16)}`, false);
      const id = `backup-${Math.random().toString(16).slice(2, 10)}`;
      const st = { id, snapshot: s.name, progress: 0, state: 'InProgress', error: '' };
      v.backupStatus.push(st);
      const t = setInterval(() => {
        st.progress = Math.min(100, st.progress + 25);
        if (st.progress === 100) {
          st.state = 'Completed'; clearInterval(t);
          const bv = bvols.get(v.name) || { name: v.name, size: v.size, created: now(), backups: [] };
          bv.backups.push({ type: 'backup', id, name: id, snapshotName: s.name, snapshotCreated: s.created, created: now(), size: '4096', state: 'Completed', url: `mock://?backup=${id}&volume=${v.name}`, labels: {}, progress: 100 });
          bv.lastBackupName = id; bv.lastBackupAt = now(); bv.lastSyncedAt = now();
          bvols.set(v.name, bv);
          v.lastBackup = id; v.lastBackupAt = now();
          emit({ type: 'backup', id });
        }
        changed(v);
      }, 400);
      return send(res, 200, { backup: id, snapshot: s.name });
    }
    case 'recurringJobAdd':
      for (const [i, j] of (b.jobs || []).entries()) {
        if (!j.name || j.name.length > 8) return err(res, 400, `recurringJobs[${i}] ("${j.name}"): field "name" must be 1 to 8 characters, not ${j.name.length}`, 'name');
        if (j.cron.split(' ').length !== 5 || Number(j.cron.split(' ')[0]) > 59) return err(res, 400, `recurringJobs[${i}] ("${j.name}"): field "cron": not valid`, 'cron');
      }
      v.recurringJobs.push(...b.jobs);
      changed(v);
      return send(res, 200, view(v));
    case 'recurringJobDelete':
      v.recurringJobs = v.recurringJobs.filter((j) => j.name !== b.name); changed(v);
      return send(res, 200, view(v));
    case 'recurringJobList':
      return send(res, 200, { type: 'collection', data: v.recurringJobs.map((j) => ({ ...j, nextRun: now(), lastRun: '', lastResult: '' })) });
    default:
      return err(res, 400, `unknown action ${name}`);
  }
}

function newVolume(b) {
  return {
    name: b.name, size: String(b.size === '1Gi' ? 1 << 30 : b.size), actualSize: 0, numberOfReplicas: b.numberOfReplicas || 3,
    staleReplicaTimeout: b.staleReplicaTimeout || 20, accessMode: b.accessMode || 'rwo', fromBackup: b.fromBackup || '',
    frontend: b.frontend ?? 'blockdev', disableFrontend: !!b.disableFrontend, state: 'detached', robustness: 'unknown', created: now(),
    endpoint: '', nbdEndpoint: '', replicas: Array.from({ length: b.numberOfReplicas || 3 }, (_, i) => ({ name: `${b.name}-r-${i}`, address: `127.0.0.1:${10000 + i}`, mode: 'RW', running: true, dataPath: `/var/lib/longhorn/${b.name}/replica-${i}`, rebuildProgress: null })),
    rebuildStatus: [], backupStatus: [], recurringJobs: [],
    snaps: [{ type: 'snapshot', id: 'volume-head', name: 'volume-head', parent: '', children: [], created: now(), size: '0', usercreated: false, removed: false, labels: {} }],
  };
}

http.createServer(async (req, res) => {
  base = `http://${req.headers.host}`;
  const u = new URL(req.url, base);
  const p = u.pathname;
  if (p === '/v1/events') {
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
    res.write(': hello\n\n');
    clients.add(res);
    req.on('close', () => clients.delete(res));
    return;
  }
  let m;
  if (p === '/v1/volumes' && req.method === 'GET') return send(res, 200, { type: 'collection', data: [...vols.values()].map(view) });
  if (p === '/v1/volumes' && req.method === 'POST') {
    const b = await body(req);
    if (!b || !/^[a-z0-9][a-z0-9.-]{0,62}$/.test(b.name || '')) return err(res, 400, `volume name ${JSON.stringify(b && b.name)} is not valid`, 'name');
    if (vols.has(b.name)) return err(res, 409, `volume "${b.name}" exists`, 'name');
    if (b.size !== undefined && !/^\d+(Mi|Gi|G)?$/.test(b.size) || /^\d+$/.test(b.size) && b.size % 4096) return err(res, 400, `size ${b.size}: not a multiple of 4096`, 'size');
    const v = newVolume(b);
    vols.set(v.name, v);
    if (b.fromBackup) {
      v.state = 'creating'; v.restoreStatus = [{ progress: 50 }];
      setTimeout(() => { v.state = 'detached'; v.restoreStatus = []; changed(v); }, 1000);
    }
    changed(v);
    return send(res, 201, view(v));
  }
  if ((m = /^\/v1\/volumes\/([^/]+)$/.exec(p))) {
    const v = vols.get(m[1]);
    if (!v) return err(res, 404, `volume "${m[1]}": not found`, 'name');
    if (req.method === 'DELETE') { vols.delete(v.name); emit({ type: 'removed', resourceType: 'volume', id: v.name }); return send(res, 200, view(v)); }
    if (req.method === 'POST') return action(v, u.searchParams.get('action'), (await body(req)) || {}, res);
    return send(res, 200, view(v));
  }
  const bview = (bv) => ({ type: 'backupVolume', id: bv.name, name: bv.name, size: bv.size, created: bv.created, lastBackupName: bv.lastBackupName, lastBackupAt: bv.lastBackupAt, lastSyncedAt: bv.lastSyncedAt, links: { self: `${base}/v1/backupvolumes/${bv.name}` }, actions: { backupList: `${base}/v1/backupvolumes/${bv.name}?action=backupList`, backupDelete: `${base}/v1/backupvolumes/${bv.name}?action=backupDelete` } });
  if (p === '/v1/backupvolumes') return send(res, 200, { type: 'collection', data: [...bvols.values()].map(bview) });
  if ((m = /^\/v1\/backupvolumes\/([^/]+)$/.exec(p))) {
    const bv = bvols.get(m[1]);
    if (!bv) return err(res, 404, 'not found');
    if (req.method === 'GET') return send(res, 200, bview(bv));
    const b = await body(req);
    if (u.searchParams.get('action') === 'backupList') return send(res, 200, { type: 'collection', data: bv.backups });
    if (u.searchParams.get('action') === 'backupDelete') { bv.backups = bv.backups.filter((x) => x.name !== b.name); return send(res, 200, {}); }
  }
  if ((m = /^\/v1\/settings\/([^/]+)$/.exec(p)) && m[1] in settings) {
    if (req.method === 'PUT') {
      const b = await body(req);
      if (m[1] === 'backup-target' && b.value && !/^(file|vfs|nfs|s3):\/\//.test(b.value)) return err(res, 400, `backup target ${b.value}: unsupported`, 'value');
      settings[m[1]] = b.value;
    }
    return send(res, 200, { type: 'setting', id: m[1], name: m[1], value: settings[m[1]] });
  }
  if ((m = /^\/v1\/secrets\/([^/]+)$/.exec(p))) {
    if (req.method === 'PUT') secrets[m[1]] = (await body(req)).data;
    return send(res, 200, { type: 'secret', id: m[1], keys: Object.keys(secrets[m[1]] || {}) });
  }
  if (p === '/mock/kill') {
    // Degrades a volume, then rebuilds its first replica over 2 s (for the story's dry runs).
    const v = vols.get(u.searchParams.get('volume'));
    const r = v.replicas[0];
    Object.assign(r, { mode: 'ERR', running: false }); v.robustness = 'degraded'; changed(v);
    let pct = 0;
    const t = setInterval(() => {
      pct += 25;
      Object.assign(r, { mode: pct >= 100 ? 'RW' : 'WO', running: true, rebuildProgress: pct >= 100 ? null : pct });
      v.rebuildStatus = pct >= 100 ? [] : [{ replica: r.name, progress: pct, state: 'in_progress' }];
      if (pct >= 100) { v.robustness = 'healthy'; clearInterval(t); }
      changed(v);
    }, 500);
    return send(res, 200, {});
  }
  if (p.startsWith('/v1/')) return err(res, 404, 'no such endpoint');
  const f = path.join(ui, p === '/' ? 'index.html' : path.normalize(p));
  if (!f.startsWith(ui) || !fs.existsSync(f)) return err(res, 404, 'not found');
  const types = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css' };
  res.writeHead(200, { 'Content-Type': types[path.extname(f)] || 'application/octet-stream' });
  res.end(fs.readFileSync(f));
}).listen(port, '127.0.0.1', () => console.log(`listening http://127.0.0.1:${port}`));
