/**
 * `kiln serve` as a process: SIGTERM stops accepting, answers queued jobs 503 at once (with
 * retry-after), lets a running job finish within the shutdown deadline (or cancels it past the
 * deadline: 503), and exits 0.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { makeHome, getJson, envelope, type ModelSpec } from './helpers.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const homes: string[] = [];
after(() => homes.forEach((h) => rmSync(h, { recursive: true, force: true })));

async function serve(model: ModelSpec, args: string[]): Promise<{ child: ChildProcess; url: string; exit: Promise<number | null>; logs: string[] }> {
  const home = await makeHome({ 'kiln-tiny-xl': model });
  homes.push(home);
  const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'src/cli/main.ts'), 'serve', '--home', home, '--port', '0', ...args], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, KILN_API_KEYS: '' },
  });
  const logs: string[] = [];
  const exit = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  const url = await new Promise<string>((resolveUrl, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`kiln serve did not start within 30 s:\n${logs.join('\n')}`));
    }, 30_000);
    let buffered = '';
    // The banner goes to stderr; JSON logs to stdout.
    child.stderr!.on('data', (chunk: Buffer) => {
      buffered += chunk.toString();
      let nl;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        logs.push(line);
        const m = /serving the images API at (http:\/\/[^ ]+)\/v1/.exec(line);
        if (m) {
          clearTimeout(timer);
          resolveUrl(m[1]!);
        }
      }
    });
    child.stdout!.on('data', (c: Buffer) => logs.push(c.toString()));
    void exit.then((code) => {
      clearTimeout(timer);
      reject(new Error(`kiln serve exited (${code}) before listening:\n${logs.join('\n')}`));
    });
  });
  return { child, url, exit, logs };
}

const generate = (url: string, body: Record<string, unknown>) =>
  fetch(`${url}/v1/images/generations`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'shutdown', response_format: 'b64_json', ...body }),
  });

async function waitActive(url: string, queued = 0): Promise<void> {
  for (let i = 0; i < 500; i++) {
    const ping = (await getJson(`${url}/ping`)).json;
    if (ping.active === 1 && ping.queued === queued) return;
    await sleep(20);
  }
  throw new Error(`the job never started (or the queue never held ${queued})`);
}

test('SIGTERM: the running job finishes and is delivered, new connections are refused, exit 0', async () => {
  const s = await serve('sdxl', ['--shutdown-timeout', '60s', '--log-level', 'info']);
  const pending = generate(s.url, { size: '1024x1024', steps: 25 });
  await waitActive(s.url);
  s.child.kill('SIGTERM');
  const res = await pending;
  assert.equal(res.status, 200);
  const body = (await res.json()) as any;
  assert.ok(body.data[0].b64_json.length > 1000);
  await assert.rejects(fetch(`${s.url}/health`), 'no longer accepting');
  assert.equal(await s.exit, 0);
});

test('SIGTERM past the deadline: the running job is cancelled (503), exit 0 promptly', async () => {
  const s = await serve({ variant: 'sdxl', options: { channels: 64 } }, ['--shutdown-timeout', '300ms', '--log-level', 'warn']);
  const pending = generate(s.url, { size: '1024x1024', steps: 100 });
  await waitActive(s.url);
  const started = performance.now();
  s.child.kill('SIGTERM');
  const res = await pending;
  assert.equal(res.status, 503);
  assert.equal(envelope(await res.json()).code, 'shutting_down');
  assert.equal(await s.exit, 0);
  assert.ok(performance.now() - started < 10_000, 'exited well before the job would have finished');
});

test('SIGTERM with jobs queued: they get 503 with retry-after at once, the running one finishes, exit 0', async () => {
  // About 0.2 s per step at 1024x1024: the running job takes seconds after the signal.
  const s = await serve({ variant: 'sdxl', options: { channels: 64 } }, ['--shutdown-timeout', '60s', '--max-queue', '4', '--log-level', 'warn']);
  // Loaded first, so that the running job's time is generation only.
  await (await generate(s.url, { size: '256x256', steps: 1 })).arrayBuffer();
  const answered = (res: Promise<Response>) => res.then(async (r) => ({ res: r, at: performance.now(), body: (await r.json()) as any }));
  const running = answered(generate(s.url, { size: '1024x1024', steps: 12 }));
  await waitActive(s.url);
  const queued = [answered(generate(s.url, { size: '256x256', steps: 1 })), answered(generate(s.url, { size: '256x256', steps: 1 }))];
  await waitActive(s.url, 2);
  const signalled = performance.now();
  s.child.kill('SIGTERM');
  for (const q of await Promise.all(queued)) {
    assert.equal(q.res.status, 503);
    assert.equal(envelope(q.body).code, 'shutting_down');
    assert.equal(q.res.headers.get('retry-after'), '5');
    assert.equal(q.res.headers.get('x-should-retry'), 'true');
    assert.ok(q.at - signalled < 2_000, `a queued job was answered ${(q.at - signalled).toFixed(0)} ms after SIGTERM`);
  }
  const r = await running;
  assert.equal(r.res.status, 200);
  assert.ok(r.body.data[0].b64_json.length > 1000);
  const lastQueued = Math.max(...(await Promise.all(queued)).map((q) => q.at));
  assert.ok(r.at > lastQueued, 'the queued jobs were answered before the running one finished, not after');
  assert.equal(await s.exit, 0);
});
