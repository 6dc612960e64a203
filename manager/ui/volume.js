// A volume's page: its state, the snapshot chain ending in Volume Head (Revert, Delete,
// Backup on each snapshot), Take Snapshot, Create Backup, replicas with their mode and
// rebuild progress, backups in progress, and the Recurring Jobs Schedule.

import { h, fill, api, act, can, run, bytes, when, pill, progress, labels, parseLabels, form, modal, input, select, toast } from './lib.js';
import { volumeActions, frontendText, devicePath } from './volumes.js';

const HEAD = 'volume-head';

export function render(main, name) {
  let v = null;
  const head = h('div.page-head');
  const info = h('dl.info');
  const chain = h('div.chain#snapshot-chain');
  const replicas = h('tbody');
  const backupsBox = h('div#backup-status');
  const jobs = h('tbody');
  const replicaCount = h('span');

  const card = (title, id, ...body) => h('section.card', { id }, h('div.card-head', ...title), ...body);
  main.append(
    h('div.crumbs', h('a', { href: '#/volumes' }, 'Volume'), ' / ', name),
    head,
    card([h('h3', 'Volume Details')], 'details', info),
    card([h('h3', 'Snapshots and Backups'), h('span.grow'),
      h('span.legend', h('span.node-sw.user'), 'user-created', h('span.node-sw.system'), 'system', h('span.node-sw.headsw'), 'Volume Head')],
    'snapshots', chain, backupsBox),
    card([h('h3', 'Replicas'), h('span.grow'), replicaCount], 'replicas',
      h('table.grid#replica-table', h('thead', h('tr', ['Name', 'Address', 'Mode', 'Running', 'Data Path', 'Rebuild', ''].map((t) => h('th', t)))), replicas)),
    card([h('h3', 'Recurring Jobs Schedule'), h('span.grow'),
      h('button.primary.small', { type: 'button', id: 'add-job', onclick: () => addJob() }, 'Add')], 'recurring-jobs',
      h('table.grid#job-table', h('thead', h('tr', ['Name', 'Task', 'Cron', 'Retain', 'Labels', 'Next Run', 'Last Run', 'Last Result', ''].map((t) => h('th', t)))), jobs)),
  );

  async function load() {
    try {
      v = await api('GET', `/v1/volumes/${encodeURIComponent(name)}`);
    } catch (e) {
      fill(head, h('h2', name), h('div.err', e.message));
      return;
    }
    draw();
    loadSnapshots();
    loadJobs();
  }

  function draw() {
    fill(head, h('h2', v.name), pill(v.state, { 'data-test': 'state' }), pill(v.robustness, { 'data-test': 'robustness' }),
      h('span.grow'),
      can(v, 'snapshotCreate') && h('button.primary', { type: 'button', id: 'take-snapshot', onclick: (e) => run(e.currentTarget, () => act(v, 'snapshotCreate', {}), 'snapshot taken').then(loadSnapshots) }, 'Take Snapshot'),
      can(v, 'snapshotBackup') && h('button.primary', { type: 'button', id: 'create-backup', onclick: (e) => run(e.currentTarget, () => act(v, 'snapshotBackup', {}), 'backup started').then(loadSnapshots) }, 'Create Backup'),
      can(v, 'snapshotPurge') && h('button', { type: 'button', id: 'purge', title: 'remove system snapshots', onclick: (e) => run(e.currentTarget, () => act(v, 'snapshotPurge'), 'system snapshots purged').then(loadSnapshots) }, 'Purge System Snapshots'),
      volumeActions(v, () => (v.links && location.hash.startsWith('#/volumes/') ? load() : null)));
    const kv = [
      ['State', v.state], ['Robustness', v.robustness], ['Size', bytes(v.size)], ['Actual Size', bytes(v.actualSize)],
      ['Number of Replicas', v.numberOfReplicas], ['Frontend', frontendText(v)], ['Device', devicePath(v)],
      ['NBD Endpoint', v.nbdEndpoint], ['Access Mode', v.accessMode], ['Stale Replica Timeout', `${v.staleReplicaTimeout ?? ''} min`],
      ['Created', when(v.created)], ['From Backup', v.fromBackup], ['Last Backup', v.lastBackup],
      ['Last Backup At', when(v.lastBackupAt)], ['Message', v.message],
    ];
    fill(info, kv.filter(([, x]) => x !== undefined && x !== null && x !== '').map(([k, x]) =>
      [h('dt', k), h('dd', { 'data-key': k }, String(x))]));
    drawReplicas();
    drawBackups();
  }

  function drawReplicas() {
    const rs = v.rebuildStatus || [];
    fill(replicas, (v.replicas || []).map((r) => {
      const st = rs.find((x) => x.replica === r.name);
      const pct = r.rebuildProgress ?? (st ? st.progress : null);
      return h('tr', { 'data-replica': r.name },
        h('td', r.name), h('td.mono', r.address || ''), h('td.mode', pill(r.mode || 'ERR')),
        h('td', r.running ? 'yes' : 'no'), h('td.mono.small', r.dataPath || ''),
        h('td.rebuild', pct !== null && pct !== undefined && (r.mode === 'WO' || (st && st.state !== 'complete' && pct < 100)) ? progress(pct) : ''),
        h('td', can(v, 'replicaRemove') && h('button.small.danger', { type: 'button', onclick: (e) => {
          if (confirm(`Remove replica ${r.name} and its data?`)) run(e.currentTarget, () => act(v, 'replicaRemove', { name: r.name }), `${r.name}: removed`).then(load);
        } }, 'Remove')));
    }));
    if (can(v, 'updateReplicaCount')) {
      const n = input({ type: 'number', min: 1, max: 32, value: v.numberOfReplicas, style: 'width:4em', id: 'replica-count' });
      fill(replicaCount, 'wanted ', n, ' ', h('button.small', { type: 'button', onclick: (e) =>
        run(e.currentTarget, () => act(v, 'updateReplicaCount', { replicaCount: Number(n.value) }), 'replica count updated').then(load) }, 'Update Replicas Count'));
    } else {
      fill(replicaCount, `wanted ${v.numberOfReplicas ?? ''}`);
    }
  }

  function drawBackups() {
    const bs = v.backupStatus || [];
    fill(backupsBox, bs.length ? h('table.grid#backup-progress',
      h('thead', h('tr', ['Backup', 'Snapshot', 'State', 'Progress', 'Error'].map((t) => h('th', t)))),
      h('tbody', bs.map((b) => h('tr', { 'data-backup': b.id },
        h('td.mono', b.id), h('td.mono', b.snapshot || ''), h('td', pill(b.state)), h('td', progress(b.progress)), h('td', h('span.err', b.error || '')))))) : '');
  }

  let snapTimer = null;
  const soon = (f, ms) => {
    clearTimeout(snapTimer);
    snapTimer = setTimeout(f, ms);
  };

  async function loadSnapshots() {
    if (!v || !can(v, 'snapshotList')) {
      fill(chain, h('div.muted', v && v.state !== 'attached' ? 'Attach the volume to see and take its snapshots.' : ''));
      return;
    }
    try {
      const col = await act(v, 'snapshotList', {});
      drawChain(col.data || []);
    } catch (e) {
      fill(chain, h('div.err', e.message));
    }
  }

  function drawChain(snaps) {
    const by = new Map(snaps.map((s) => [s.name, s]));
    const kids = (s) => (s.children || []).map((c) => by.get(c)).filter(Boolean)
      .sort((a, b) => String(a.created).localeCompare(String(b.created)));
    const roots = snaps.filter((s) => !s.parent || !by.has(s.parent));
    const seen = new Set();
    const branch = (s) => {
      if (seen.has(s.name)) return null;
      seen.add(s.name);
      const cs = kids(s);
      return h('div.branch', node(s), cs.length ? h('div.kids', cs.map((c) => h('div.kid', h('span.arrow', '→'), branch(c)))) : null);
    };
    fill(chain, roots.length ? h('div.tree', roots.map(branch)) : h('div.muted', 'No snapshots.'));
  }

  function node(s) {
    if (s.name === HEAD) {
      return h('div.node.head', { 'data-snapshot': HEAD }, h('div.nname', 'Volume Head'), h('div.small', bytes(s.size)));
    }
    const btn = (action, label, body, done, cls = '') => can(v, action) && h(`button.small${cls}`, {
      type: 'button', 'data-action': action,
      onclick: (e) => {
        if (action !== 'snapshotBackup' && !confirm(`${label} snapshot ${s.name}?`)) return;
        run(e.currentTarget, () => act(v, action, body), done).then(loadSnapshots);
      },
    }, label);
    return h(`div.node.${s.usercreated ? 'user' : 'system'}${s.removed ? '.removed' : ''}`, { 'data-snapshot': s.name },
      h('div.nname.mono', { title: s.name }, s.name),
      h('div.small', when(s.created)),
      h('div.small', bytes(s.size), ' · ', s.usercreated ? 'user-created' : 'system', s.removed ? ' · removed' : ''),
      labels(s.labels),
      !s.removed && h('div.nbuttons',
        btn('snapshotRevert', 'Revert', { name: s.name }, `reverted to ${s.name}`),
        btn('snapshotBackup', 'Backup', { name: s.name }, `backup of ${s.name} started`),
        btn('snapshotDelete', 'Delete', { name: s.name }, `${s.name} deleted`, '.danger')));
  }

  async function loadJobs() {
    let list = v.recurringJobs || [];
    if (can(v, 'recurringJobList')) {
      try {
        list = (await act(v, 'recurringJobList', {})).data || [];
      } catch (e) {
        toast(e.message, 'error');
      }
    }
    fill(jobs, list.length ? list.map((j) => h('tr', { 'data-job': j.name },
      h('td.mono', j.name), h('td', j.task), h('td.mono', j.cron), h('td', String(j.retain ?? '')), h('td', labels(j.labels)),
      h('td.small', when(j.nextRun)), h('td.small', when(j.lastRun)), h('td.small', j.lastResult || ''),
      h('td', can(v, 'recurringJobDelete') && h('button.small.danger', { type: 'button', 'data-action': 'recurringJobDelete', onclick: (e) =>
        run(e.currentTarget, () => act(v, 'recurringJobDelete', { name: j.name }), `job ${j.name} deleted`).then(load) }, 'Delete')),
    )) : h('tr', h('td.empty', { colspan: 9 }, 'No recurring jobs.')));
  }

  function addJob() {
    if (!can(v, 'recurringJobAdd')) {
      toast('adding recurring jobs is not allowed now', 'error');
      return;
    }
    const fields = [
      { name: 'name', label: 'Name', input: input({ placeholder: 'snap' }), hint: '1-8 characters: a-z, 0-9, -' },
      { name: 'task', label: 'Task', input: select([['snapshot', 'snapshot'], ['backup', 'backup'], ['snapshot-force-create', 'snapshot-force-create'], ['backup-force-create', 'backup-force-create']], 'snapshot') },
      { name: 'cron', label: 'Cron', input: input({ value: '0 * * * *' }), hint: 'minute hour day-of-month month day-of-week' },
      { name: 'retain', label: 'Retain', input: input({ type: 'number', min: 1, max: 250, value: 3 }) },
      { name: 'labels', label: 'Labels', input: input({ placeholder: 'key=value, key2=value2' }) },
    ];
    const close = modal('Add Recurring Job', form('job-form', fields, 'Add', async (f) => {
      const job = { name: f.name.trim(), task: f.task, cron: f.cron.trim(), retain: Number(f.retain), labels: parseLabels(f.labels) };
      if (f.retain.trim() === '' || !Number.isInteger(job.retain)) {
        throw Object.assign(new Error('retain must be a whole number'), { field: 'retain' });
      }
      await act(v, 'recurringJobAdd', { jobs: [job] });
      close();
      toast(`job ${job.name} added`);
      load();
    }));
  }

  load();
  // Snapshots taken elsewhere (the CLI, a recurring job) change no volume field the
  // events carry, so the chain is also read again every 5 s.
  const every = setInterval(() => v && can(v, 'snapshotList') && loadSnapshots(), 5000);
  return {
    onEvent(ev) {
      if (ev.type === 'refresh') return load();
      if (ev.type === 'volume' && ev.data && (ev.id === name || ev.data.name === name)) {
        const before = v && `${v.state}|${Object.keys(v.actions || {}).join()}`;
        v = ev.data;
        draw();
        if (before !== `${v.state}|${Object.keys(v.actions || {}).join()}`) loadJobs();
        soon(loadSnapshots, 300);
      } else if (ev.type === 'removed' && ev.id === name) {
        toast(`${name} was deleted`);
        location.hash = '#/volumes';
      } else if (ev.type === 'backup') {
        soon(loadSnapshots, 300);
      }
    },
    dispose() {
      clearTimeout(snapTimer);
      clearInterval(every);
    },
  };
}
