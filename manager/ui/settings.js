// Settings > General: Backup Target and its credential secret (Save), and the secret's
// contents (its values are never shown back: the API returns keys only).

import { h, fill, api, form, input, toast } from './lib.js';

export function render(main) {
  const target = input({ placeholder: 's3://bucket@us-east-1/prefix', style: 'width:100%' });
  const secret = input({ placeholder: 'secret name (S3 only)', style: 'width:100%' });
  const current = h('div.small.muted#saved-target');

  const general = form('settings-form', [
    { name: 'backup-target', label: 'Backup Target', input: target, hint: 'file:///path, nfs://host:/path, s3://bucket@region/prefix' },
    { name: 'backup-target-credential-secret', label: 'Backup Target Credential Secret', input: secret, hint: 'the secret holding AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINTS' },
  ], 'Save', async (f) => {
    const put = async (id, value) => {
      try {
        await api('PUT', `/v1/settings/${id}`, { value });
      } catch (e) {
        e.field = id;
        throw e;
      }
    };
    // The secret first: the manager checks the target with the credentials it names.
    await put('backup-target-credential-secret', f['backup-target-credential-secret'].trim());
    await put('backup-target', f['backup-target'].trim());
    toast('settings saved');
    load();
  });

  const sname = input({ placeholder: 's3-secret' });
  const sdata = h('textarea', { rows: 4, placeholder: 'AWS_ACCESS_KEY_ID=...\nAWS_SECRET_ACCESS_KEY=...\nAWS_ENDPOINTS=http://...' });
  const keys = h('div.small.muted#secret-keys');
  const secrets = form('secret-form', [
    { name: 'name', label: 'Secret Name', input: sname },
    { name: 'data', label: 'Data (KEY=value, one a line)', input: sdata },
  ], 'Save Secret', async (f) => {
    const data = {};
    for (const line of f.data.split('\n').map((l) => l.trim()).filter(Boolean)) {
      const i = line.indexOf('=');
      if (i <= 0) throw Object.assign(new Error(`"${line.slice(0, 40)}" is not KEY=value`), { field: 'data' });
      data[line.slice(0, i).trim()] = line.slice(i + 1).trim();
    }
    const n = f.name.trim();
    if (!n) throw Object.assign(new Error('a secret needs a name'), { field: 'name' });
    await api('PUT', `/v1/secrets/${encodeURIComponent(n)}`, { data });
    sdata.value = '';
    toast(`secret ${n} saved`);
    showKeys(n);
  });

  async function showKeys(n) {
    if (!n) return fill(keys);
    try {
      const s = await api('GET', `/v1/secrets/${encodeURIComponent(n)}`);
      const ks = Array.isArray(s.keys) ? s.keys : Object.keys(s.data || {});
      fill(keys, `${n} holds: `, ks.length ? ks.join(', ') : '(nothing)');
    } catch {
      fill(keys);
    }
  }

  async function load() {
    try {
      const [t, c] = await Promise.all([
        api('GET', '/v1/settings/backup-target'),
        api('GET', '/v1/settings/backup-target-credential-secret').catch(() => ({ value: '' })),
      ]);
      target.value = t.value || '';
      secret.value = c.value || '';
      if (!sname.value) sname.value = c.value || '';
      fill(current, 'saved: ', h('span.mono', t.value || '(none)'), c.value ? [' with secret ', h('span.mono', c.value)] : '');
      showKeys(sname.value.trim());
    } catch (e) {
      toast(e.message, 'error');
    }
  }

  main.append(
    h('div.page-head', h('h2', 'Settings')),
    h('section.card#general', h('div.card-head', h('h3', 'General')), general, current),
    h('section.card#secrets', h('div.card-head', h('h3', 'Credential Secret')), secrets, keys),
  );
  load();
  return {};
}
