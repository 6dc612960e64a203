// Volume list: every volume of this host, Create Volume, Attach/Detach, Delete.

import { h, fill, api, act, can, run, bytes, pill, progress, form, modal, input, select, toast } from './lib.js';

export const FRONTENDS = [
  ['blockdev', 'blockdev (ublk, else nbd, else fuse)'],
  ['ublk', 'ublk'],
  ['nbd', 'nbd'],
  ['fuse', 'fuse'],
  ['none', 'none (NBD export only)'],
];

/** The frontend form value as the API's fields. */
export function frontendBody(v) {
  return v === 'none' ? { frontend: '', disableFrontend: true } : { frontend: v, disableFrontend: false };
}

export function frontendText(v) {
  if (v.disableFrontend || !v.frontend) return 'none';
  return v.frontend;
}

/** The device (or NBD export) a client uses. */
export function devicePath(v) {
  return v.endpoint || v.nbdEndpoint || '';
}

/** Attach with a frontend chosen in a dialog. */
export function attachDialog(v, after) {
  const fe = select(FRONTENDS, frontendText(v));
  const close = modal(`Attach ${v.name}`, form('attach-form', [{ name: 'frontend', label: 'Frontend', input: fe }], 'Attach', async (vals) => {
    await act(v, 'attach', frontendBody(vals.frontend));
    close();
    toast(`${v.name}: attaching`);
    if (after) after();
  }));
}

export function volumeActions(v, after) {
  const b = (name, label, fn, cls = '') => can(v, name) &&
    h(`button.small${cls}`, { type: 'button', 'data-action': name, onclick: (e) => fn(e.currentTarget) }, label);
  return h('span.actions',
    b('attach', 'Attach', () => attachDialog(v, after)),
    b('detach', 'Detach', (btn) => run(btn, () => act(v, 'detach'), `${v.name}: detaching`).then(after)),
    v.links && v.links.self && h('button.small.danger', {
      type: 'button', 'data-action': 'delete',
      onclick: (e) => {
        if (!confirm(`Delete volume ${v.name} and its replicas' data?`)) return;
        run(e.currentTarget, () => api('DELETE', v.links.self), `${v.name}: deleted`).then(after);
      },
    }, 'Delete'));
}

function restoreInfo(v) {
  const rs = v.restoreStatus;
  if (!rs) return null;
  const list = Array.isArray(rs) ? rs : [rs];
  const p = list.find((r) => r && r.progress !== undefined && r.progress < 100 && !r.error);
  const err = list.find((r) => r && r.error);
  if (err) return h('div.err', `restore: ${err.error}`);
  return p ? h('div', 'restoring ', progress(p.progress)) : null;
}

export function render(main) {
  const table = h('tbody');
  const count = h('span.count');
  let vols = new Map();
  let collection = null;

  const draw = () => {
    const rows = [...vols.values()].sort((a, b) => a.name.localeCompare(b.name));
    fill(count, `${rows.length} volume${rows.length === 1 ? '' : 's'}`);
    fill(table, rows.length ? rows.map((v) => h('tr', { 'data-volume': v.name },
      h('td.name', h('a', { href: `#/volumes/${encodeURIComponent(v.name)}` }, v.name)),
      h('td.state', pill(v.state), v.message ? h('div.err', v.message) : null, restoreInfo(v)),
      h('td.robustness', pill(v.robustness)),
      h('td.size', bytes(v.size)),
      h('td.actual', bytes(v.actualSize)),
      h('td.replicas', String((v.replicas || []).length), ' / ', String(v.numberOfReplicas ?? '')),
      h('td.frontend', h('div', frontendText(v)), h('div.mono.small', devicePath(v))),
      h('td.access', v.accessMode || ''),
      h('td', volumeActions(v, load)),
    )) : h('tr', h('td.empty', { colspan: 9 }, 'No volumes yet: Create Volume.')));
  };

  async function load() {
    try {
      collection = await api('GET', '/v1/volumes');
      vols = new Map((collection.data || []).map((v) => [v.name, v]));
      draw();
    } catch (e) {
      toast(e.message, 'error');
    }
  }

  const create = h('button.primary', { type: 'button', id: 'create-volume', onclick: () => createDialog(load) }, 'Create Volume');
  main.append(
    h('div.page-head', h('h2', 'Volume'), count, h('span.grow'), create),
    h('table.grid#volumes', h('thead', h('tr',
      ['Name', 'State', 'Robustness', 'Size', 'Actual Size', 'Replicas', 'Frontend / Device', 'Access Mode', ''].map((t) => h('th', t)))),
    table));
  load();

  return {
    onEvent(ev) {
      if (ev.type === 'volume' && ev.data) {
        vols.set(ev.data.name || ev.id, ev.data);
        draw();
      } else if (ev.type === 'removed' && ev.resourceType === 'volume') {
        vols.delete(ev.id);
        draw();
      } else if (ev.type === 'refresh') {
        load();
      }
    },
  };
}

function createDialog(after) {
  const fields = [
    { name: 'name', label: 'Name', input: input({ placeholder: 'vol1', required: true }), hint: 'a-z, 0-9, . and -' },
    { name: 'size', label: 'Size', input: input({ value: '1Gi' }), hint: 'bytes, or 512Mi, 10Gi, 10G' },
    { name: 'numberOfReplicas', label: 'Number of Replicas', input: input({ type: 'number', min: 1, max: 32, value: 3 }) },
    { name: 'frontend', label: 'Frontend', input: select(FRONTENDS, 'blockdev') },
    { name: 'accessMode', label: 'Access Mode', input: select([['rwo', 'ReadWriteOnce (rwo)'], ['rwx', 'ReadWriteMany (rwx)']], 'rwo') },
    { name: 'staleReplicaTimeout', label: 'Stale Replica Timeout (minutes)', input: input({ type: 'number', min: 1, value: 20 }) },
  ];
  const close = modal('Create Volume', form('create-volume-form', fields, 'Create', async (v) => {
    const body = {
      name: v.name.trim(),
      size: v.size.trim(),
      numberOfReplicas: Number(v.numberOfReplicas),
      accessMode: v.accessMode,
      staleReplicaTimeout: Number(v.staleReplicaTimeout),
      ...frontendBody(v.frontend),
    };
    await api('POST', '/v1/volumes', body);
    close();
    toast(`${body.name}: created`);
    after();
  }));
}
