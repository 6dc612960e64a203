// Backup page: the backup target's volumes (the columns of `kubectl get backupvolumes`),
// Restore Latest Backup; a backup volume's backups with restore to a new volume and delete.

import { h, fill, api, act, can, run, bytes, when, pill, progress, labels, form, modal, input, toast } from './lib.js';

export function render(main, name) {
  return name ? renderOne(main, name) : renderList(main);
}

/** Restore `backup` (with its url) into a new volume named in a dialog. */
function restoreDialog(bv, backup, title) {
  const fields = [
    { name: 'name', label: 'New Volume Name', input: input({ value: `${bv.name}-restore` }) },
    { name: 'numberOfReplicas', label: 'Number of Replicas', input: input({ type: 'number', min: 1, max: 32, value: 3 }) },
  ];
  const close = modal(title, h('div',
    h('p.small', 'From backup ', h('span.mono', backup.name), ' of ', h('span.mono', bv.name)),
    form('restore-form', fields, 'Restore', async (f) => {
      const body = { name: f.name.trim(), fromBackup: backup.url, numberOfReplicas: Number(f.numberOfReplicas) };
      // Longhorn's UI sends the backed-up volume's size with the restore.
      const size = backup.volumeSize || bv.size;
      if (Number(size) > 0) body.size = String(size);
      await api('POST', '/v1/volumes', body);
      close();
      toast(`restoring ${backup.name} into ${body.name}`);
      location.hash = `#/volumes/${encodeURIComponent(body.name)}`;
    })));
}

async function backupsOf(bv) {
  const col = can(bv, 'backupList')
    ? await act(bv, 'backupList', {})
    : await api('GET', `/v1/backupvolumes/${encodeURIComponent(bv.name)}?action=backupList`);
  return (col && col.data) || [];
}

async function restoreLatest(btn, bv) {
  await run(btn, async () => {
    const list = await backupsOf(bv);
    const done = list.filter((b) => !b.state || b.state === 'Completed');
    let latest = done.find((b) => b.name === bv.lastBackupName);
    if (!latest) latest = done.sort((a, b) => String(b.created).localeCompare(String(a.created)))[0];
    if (!latest) throw new Error(`${bv.name} has no completed backup`);
    restoreDialog(bv, latest, `Restore Latest Backup of ${bv.name}`);
  });
}

function renderList(main) {
  const body = h('tbody');
  const target = h('span.muted.small');
  async function load() {
    try {
      const t = await api('GET', '/v1/settings/backup-target').catch(() => null);
      fill(target, t && t.value ? ['backup target: ', h('span.mono', t.value)] : h('a', { href: '#/settings' }, 'set a backup target'));
      const col = await api('GET', '/v1/backupvolumes');
      const list = (col.data || []).sort((a, b) => a.name.localeCompare(b.name));
      fill(body, list.length ? list.map((bv) => h('tr', { 'data-backup-volume': bv.name },
        h('td.name', h('a', { href: `#/backups/${encodeURIComponent(bv.name)}` }, bv.name)),
        h('td', bytes(bv.size)),
        h('td.small', when(bv.created)),
        h('td.mono.small', bv.lastBackupName || ''),
        h('td.small', when(bv.lastBackupAt)),
        h('td.small', when(bv.lastSyncedAt)),
        h('td', h('span.actions',
          bv.lastBackupName && h('button.small', { type: 'button', 'data-action': 'restoreLatest', onclick: (e) => restoreLatest(e.currentTarget, bv) }, 'Restore Latest Backup'),
          bv.links && bv.links.self && h('button.small.danger', { type: 'button', 'data-action': 'delete', onclick: (e) => {
            if (confirm(`Delete every backup of ${bv.name}?`)) run(e.currentTarget, () => api('DELETE', bv.links.self), `backups of ${bv.name} deleted`).then(load);
          } }, 'Delete'))),
      )) : h('tr', h('td.empty', { colspan: 7 }, 'No backup volumes on the backup target.')));
    } catch (e) {
      fill(body, h('tr', h('td.err', { colspan: 7 }, e.message)));
    }
  }
  main.append(
    h('div.page-head', h('h2', 'Backup'), target, h('span.grow'), h('button', { type: 'button', id: 'refresh-backups', onclick: load }, 'Refresh')),
    h('table.grid#backup-volumes', h('thead', h('tr',
      ['Name', 'Size', 'Created At', 'Last Backup', 'Last Backup At', 'Last Synced At', ''].map((t) => h('th', t)))), body));
  load();
  let t = null;
  return {
    onEvent(ev) {
      if (ev.type === 'backup' || ev.type === 'refresh' || ev.type === 'backupVolume') {
        clearTimeout(t);
        t = setTimeout(load, 500);
      }
    },
    dispose() {
      clearTimeout(t);
    },
  };
}

function renderOne(main, name) {
  const head = h('div.page-head', h('h2', name));
  const body = h('tbody');
  let bv = null;
  async function load() {
    try {
      bv = await api('GET', `/v1/backupvolumes/${encodeURIComponent(name)}`);
      fill(head, h('h2', bv.name), h('span.muted.small', bytes(bv.size)), h('span.grow'),
        bv.lastBackupName && h('button.primary', { type: 'button', id: 'restore-latest', onclick: (e) => restoreLatest(e.currentTarget, bv) }, 'Restore Latest Backup'));
      const list = (await backupsOf(bv)).sort((a, b) => String(b.created).localeCompare(String(a.created)));
      fill(body, list.length ? list.map((b) => h('tr', { 'data-backup': b.name },
        h('td.mono', b.name), h('td.mono.small', b.snapshotName || ''), h('td', bytes(b.size)), h('td.small', when(b.created)),
        h('td', pill(b.state), b.state && b.state !== 'Completed' && b.progress !== undefined ? progress(b.progress) : ''),
        h('td', labels(b.labels)),
        h('td', h('span.actions',
          b.url && (!b.state || b.state === 'Completed') && h('button.small', { type: 'button', 'data-action': 'restore', onclick: () => restoreDialog(bv, b, `Restore ${b.name}`) }, 'Restore'),
          can(bv, 'backupDelete') && h('button.small.danger', { type: 'button', 'data-action': 'backupDelete', onclick: (e) => {
            if (confirm(`Delete backup ${b.name}?`)) run(e.currentTarget, () => act(bv, 'backupDelete', { name: b.name }), `${b.name} deleted`).then(load);
          } }, 'Delete'))),
      )) : h('tr', h('td.empty', { colspan: 7 }, 'No backups.')));
    } catch (e) {
      fill(body, h('tr', h('td.err', { colspan: 7 }, e.message)));
    }
  }
  main.append(h('div.crumbs', h('a', { href: '#/backups' }, 'Backup'), ' / ', name), head,
    h('table.grid#backups', h('thead', h('tr', ['Name', 'Snapshot', 'Size', 'Created', 'State', 'Labels', ''].map((t) => h('th', t)))), body));
  load();
  let t = null;
  return {
    onEvent(ev) {
      if (ev.type === 'backup' || ev.type === 'refresh') {
        clearTimeout(t);
        t = setTimeout(load, 500);
      }
    },
    dispose() {
      clearTimeout(t);
    },
  };
}
