// The web UI's story in a real browser (playwright-core driving Debian's chromium),
// run by tests/tests/manager_ui.rs against a real manager. What a browser cannot see
// (data over NBD, files in replica directories, processes) the Rust test does: at each
// such point this script prints one line `@@ STEP {json}` and waits for one line of
// JSON on stdin, `{"ok":true,...}` or `{"error":"..."}`.
//
// Env: MANAGER_URL, UI_VOLUME (the volume to create), UI_SIZE, UI_SCREENSHOTS (a dir),
// UI_TARGETS (JSON list of {kind, url, secret?, secretData?}: backup targets to try).
// Exit status 0 when the whole story passed; else the step that failed is on stderr.

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

const URL_ = process.env.MANAGER_URL || 'http://127.0.0.1:9599';
const VOL = process.env.UI_VOLUME || 'uivol';
const SIZE = process.env.UI_SIZE || '64Mi';
const SHOTS = process.env.UI_SCREENSHOTS || 'target/ui-screenshots';
const TARGETS = JSON.parse(process.env.UI_TARGETS || '[]');
const T = 30_000;
const t0 = Date.now();

fs.mkdirSync(SHOTS, { recursive: true });
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** Asks the Rust side to do or check something; throws its error. */
async function step(name, data = {}) {
  process.stdout.write(`@@ ${name} ${JSON.stringify(data)}\n`);
  const { value, done } = await lines.next();
  if (done) throw new Error(`${name}: the test closed stdin`);
  const r = JSON.parse(value);
  if (r.error) throw new Error(`${name}: ${r.error}`);
  return r;
}

const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'lh-ui-chromium-'));
const ctx = await chromium.launchPersistentContext(dataDir, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1360, height: 900 },
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const page = ctx.pages()[0] || await ctx.newPage();
page.setDefaultTimeout(T);
const problems = [];
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (m) => m.type() === 'error' && !/Failed to load resource/.test(m.text()) && problems.push(`console: ${m.text()}`));
page.on('dialog', (d) => d.accept());

const shot = async (name) => {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
  log('screenshot', name);
};
const expectText = (loc, re, timeout = T) => loc.filter({ hasText: re }).first().waitFor({ timeout });
const row = (name) => page.locator(`#volumes tr[data-volume="${name}"]`);
const volPage = async (name) => {
  await page.goto(`${URL_}/#/volumes/${encodeURIComponent(name)}`);
  await page.locator('.page-head h2', { hasText: name }).waitFor();
};
const headPill = (what) => page.locator(`.page-head [data-test="${what}"]`);
/** Dismisses toasts so they do not cover buttons. */
const clearToasts = () => page.evaluate(() => document.querySelectorAll('.toast').forEach((t) => t.remove()));

async function fillForm(id, values) {
  for (const [k, v] of Object.entries(values)) {
    const el = page.locator(`#${id}-${k}`);
    if (await el.evaluate((e) => e.tagName === 'SELECT')) await el.selectOption(String(v));
    else await el.fill(String(v));
  }
}

async function createVolume(name, extra = {}) {
  await page.goto(`${URL_}/#/volumes`);
  await page.click('#create-volume');
  await fillForm('create-volume-form', { name, size: SIZE, numberOfReplicas: 3, frontend: 'none', accessMode: 'rwo', staleReplicaTimeout: 20, ...extra });
  await page.click('#create-volume-form button[type=submit]');
  await row(name).waitFor();
}

/** Attach from the volume list (frontend none: the NBD export only), wait for healthy. */
async function attach(name) {
  await page.goto(`${URL_}/#/volumes`);
  await row(name).locator('button[data-action=attach]').click({ timeout: 60_000 });
  await fillForm('attach-form', { frontend: 'none' });
  await page.click('#attach-form button[type=submit]');
  await expectText(row(name).locator('td.state'), /attached/i, 60_000);
  await expectText(row(name).locator('td.robustness'), /healthy/i, 60_000);
}

async function setTarget(t) {
  await page.goto(`${URL_}/#/settings`);
  await page.locator('#saved-target').filter({ hasText: 'saved:' }).waitFor();
  if (t.secret) {
    await fillForm('secret-form', { name: t.secret, data: Object.entries(t.secretData || {}).map(([k, v]) => `${k}=${v}`).join('\n') });
    await page.click('#secret-form button[type=submit]');
    await expectText(page.locator('#secret-keys'), /AWS_ACCESS_KEY_ID/);
  }
  await fillForm('settings-form', { 'backup-target': t.url, 'backup-target-credential-secret': t.secret || '' });
  await page.click('#settings-form button[type=submit]');
  await page.locator('#saved-target .mono', { hasText: t.url }).waitFor();
}

/** Create Backup on the volume page; returns the progress values seen. */
async function createBackup(name) {
  await volPage(name);
  const before = await page.locator('#backup-progress tbody tr').count();
  await clearToasts();
  await page.click('#create-backup');
  const rows = page.locator('#backup-progress tbody tr');
  await page.waitForFunction((n) => document.querySelectorAll('#backup-progress tbody tr').length > n, before, { timeout: T });
  const last = rows.nth(before);
  const seen = new Set();
  const deadline = Date.now() + 60_000;
  for (;;) {
    const p = await last.locator('[role=progressbar]').getAttribute('aria-valuenow');
    const st = (await last.locator('.pill').textContent()).trim();
    seen.add(`${st}:${p}`);
    if (/completed/i.test(st)) break;
    if (/error/i.test(st)) throw new Error(`backup failed: ${await last.textContent()}`);
    if (Date.now() > deadline) throw new Error(`backup did not complete; saw ${[...seen]}`);
    await page.waitForTimeout(100);
  }
  return { backup: (await last.getAttribute('data-backup')), seen: [...seen] };
}

/** Backup page: Restore Latest Backup of `name` into `into`, wait until it can attach. */
async function restoreLatest(name, into, backup, shotName) {
  await page.goto(`${URL_}/#/backups`);
  const r = page.locator(`#backup-volumes tr[data-backup-volume="${name}"]`);
  await expectText(r, new RegExp(backup));
  if (shotName) await shot(shotName);
  await r.locator('a').click();
  await page.locator(`#backups tr[data-backup="${backup}"]`).waitFor();
  if (shotName) await shot(`${shotName}-volume`);
  await page.click('#restore-latest');
  await fillForm('restore-form', { name: into, numberOfReplicas: 1 });
  await page.click('#restore-form button[type=submit]');
  await page.locator('.page-head h2', { hasText: into }).waitFor();
  // The restore runs first (state creating); then the volume is detached and can attach.
  await page.goto(`${URL_}/#/volumes`);
  await row(into).waitFor();
  await row(into).locator('button[data-action=attach]').waitFor({ timeout: 90_000 });
}

async function deleteVolume(name) {
  await page.goto(`${URL_}/#/volumes`);
  await row(name).locator('button[data-action=delete]').click();
  await row(name).waitFor({ state: 'detached', timeout: 60_000 });
}

try {
  // --- volume list: Create Volume, a bad size named next to its field, Attach ---
  await page.goto(`${URL_}/`);
  await page.locator('#live[data-state=live]').waitFor({ timeout: 10_000 });
  await page.click('#create-volume');
  await fillForm('create-volume-form', { name: VOL, size: '12345', frontend: 'none' });
  await page.click('#create-volume-form button[type=submit]');
  await page.locator('[data-error-for=size]:not(:empty)').waitFor();
  log('bad size:', await page.locator('[data-error-for=size]').textContent());
  await page.click('.modal .x');
  if (await row(VOL).count()) throw new Error('a volume was created from a bad size');
  await createVolume(VOL);
  await expectText(row(VOL).locator('td.state'), /detached/i);
  await attach(VOL);
  const ready = await step('attached', { volume: VOL });
  log('wrote data:', ready.wrote || '');
  await page.goto(`${URL_}/#/volumes`);
  await expectText(row(VOL).locator('td.frontend'), /nbd\+unix|none/);
  await shot('volumes');

  // --- volume page: Take Snapshot; it is in the chain before Volume Head ---
  await volPage(VOL);
  await page.locator('#snapshot-chain [data-snapshot="volume-head"]').waitFor();
  await clearToasts();
  await page.click('#take-snapshot');
  const snapNode = page.locator('#snapshot-chain .node.user').first();
  await snapNode.waitFor();
  const snap = await snapNode.getAttribute('data-snapshot');
  const chainOrder = await page.locator('#snapshot-chain [data-snapshot]').evaluateAll((ns) => ns.map((n) => n.dataset.snapshot));
  if (chainOrder[chainOrder.length - 1] !== 'volume-head' || !chainOrder.includes(snap)) throw new Error(`chain ${chainOrder} does not end in volume-head after ${snap}`);
  log('snapshot', snap, 'chain', chainOrder.join(' -> '));
  const labelled = await step('snapshot', { volume: VOL, snapshot: snap });
  // A snapshot the Rust side took through the API, with markup in a label: shown as text.
  if (labelled.snapshot) {
    const n = page.locator(`#snapshot-chain [data-snapshot="${labelled.snapshot}"]`);
    await n.waitFor();
    await expectText(n.locator('.label'), /<b>bold<\/b>/);
    if (await page.locator('#snapshot-chain b, #snapshot-chain img').count()) throw new Error('a label was rendered as HTML');
  }

  // --- Recurring Jobs Schedule: a 9-character name, a bad cron, then a valid job ---
  await page.click('#add-job');
  await fillForm('job-form', { name: 'ninechars', task: 'snapshot', cron: '*/5 * * * *', retain: 2, labels: 'team=ui' });
  await page.click('#job-form button[type=submit]');
  const nameErr = page.locator('#job-form [data-error-for=name]:not(:empty)');
  await nameErr.waitFor();
  log('9-character name:', await nameErr.textContent());
  if (!/name/.test(await nameErr.textContent())) throw new Error('the name error does not name the field');
  await fillForm('job-form', { name: 'snap', cron: '61 * * * *' });
  await page.click('#job-form button[type=submit]');
  const cronErr = page.locator('#job-form [data-error-for=cron]:not(:empty)');
  await cronErr.waitFor();
  if (await page.locator('#job-form [data-error-for=name]:not(:empty)').count()) throw new Error('the name error stayed after fixing the name');
  log('bad cron:', await cronErr.textContent());
  await shot('recurring-job-error');
  await fillForm('job-form', { cron: '*/5 * * * *' });
  await page.click('#job-form button[type=submit]');
  await page.locator('#job-table tr[data-job="snap"]').waitFor();
  await expectText(page.locator('#job-table tr[data-job="snap"]'), /\*\/5 \* \* \* \*/);
  await expectText(page.locator('#job-table tr[data-job="snap"]'), /team=ui/);
  await step('job', { volume: VOL, job: 'snap' });
  await shot('volume');

  // --- backups: each target; Create Backup, Restore Latest Backup, compare ---
  for (const [i, t] of TARGETS.entries()) {
    log('backup target', t.kind, t.url);
    await setTarget(t);
    if (i === 0) await shot('settings');
    const b = await createBackup(VOL);
    log(t.kind, 'backup', b.backup, 'progress seen', b.seen.join(' '));
    if (i === 0) await shot('volume-backup');
    const into = `${VOL}-${t.kind}`;
    await restoreLatest(VOL, into, b.backup, i === 0 ? 'backups' : null);
    await attach(into);
    await step('restored', { source: VOL, volume: into, kind: t.kind, backup: b.backup, progress: b.seen });
    await deleteVolume(into);
    await step('deleted', { volume: into });
  }

  // --- a replica killed: degraded, then healthy after its rebuild, without reload ---
  await volPage(VOL);
  await expectText(headPill('robustness'), /healthy/i);
  await step('kill-replica', { volume: VOL });
  await expectText(headPill('robustness'), /degraded/i, 30_000);
  log('degraded');
  await shot('volume-degraded');
  // The Rust side held the rebuild back (it stopped `longhorn up`) until the UI had
  // shown the degraded state; now it lets the rebuild run.
  await step('resume-rebuild', { volume: VOL });
  const modes = new Set();
  const deadline = Date.now() + 90_000;
  let shotDegraded = false;
  while (!/healthy/i.test(await headPill('robustness').textContent())) {
    for (const m of await page.locator('#replica-table td.mode').allTextContents()) modes.add(m.trim());
    const rb = await page.locator('#replica-table td.rebuild [role=progressbar]').count();
    if (rb) modes.add(`rebuild:${await page.locator('#replica-table td.rebuild [role=progressbar]').first().getAttribute('aria-valuenow')}`);
    if (!shotDegraded) {
      await shot('volume-degraded');
      shotDegraded = true;
    }
    if (Date.now() > deadline) throw new Error(`not healthy again; saw ${[...modes]}`);
    await page.waitForTimeout(100);
  }
  log('healthy again; replica modes seen:', [...modes].join(' '));
  await shot('volume-healthy');
  await step('healed', { volume: VOL, seen: [...modes] });

  if (problems.length) throw new Error(problems.join('\n'));
  log('story passed');
  await ctx.close();
  process.exit(0);
} catch (e) {
  console.error(`story failed at ${((Date.now() - t0) / 1000).toFixed(1)}s: ${e.stack || e}`);
  if (problems.length) console.error(problems.join('\n'));
  await page.screenshot({ path: path.join(SHOTS, 'failure.png'), fullPage: true }).catch(() => {});
  await ctx.close().catch(() => {});
  process.exit(1);
}
