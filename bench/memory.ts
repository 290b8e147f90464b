/**
 * Memory under hostile load: a `kiln serve` child process on loopback (a fixture model, an API
 * key, JSON logs at info level drained by this process), warmed up, then a large bounded batch
 * of malformed requests (tools/hostile/: broken JSON and HTTP, wrong types, huge strings, PNG
 * bombs, bad CRCs, APNG, many-file uploads, tampered URLs, no key, unknown routes, absolute-form
 * targets), with a valid image now and then, and slowloris connections (a request or upload
 * sent but for its end, then a byte a second) opened through it. It prints the server's RSS
 * after warm-up, at every tenth of the batch and at the end, its peak, and its RSS once no slow
 * peer is left (the server cuts them, or this closes them 30 s after the batch); the target is
 * an end RSS within 1.5x of the warm-up one and flat over the last half.
 *
 *   npm run bench:memory -- [--requests 10000] [--concurrency 8] [--valid-every 200]
 *                           [--slow 200] [--fixture sdxl [--channels 8] | --model NAME|DIR] [--valid-size 256x256]
 *                           [--seed 1] [--only REGEX] [--log FILE] [--serve-arg ARG ...]
 *
 * The server runs in its own process so that its RSS is its own, not the load generator's.
 */
import { parseArgs } from 'node:util';
import os from 'node:os';
import { spawn } from 'node:child_process';
import { createWriteStream, mkdtempSync, mkdirSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { locateInHome } from '../src/catalog/installed-models.js';
import { kilnHome } from '../src/catalog/home.js';
import { ensureFixture, type FixtureVariant } from '../tools/fixtures/variants.js';
import { heavyRequests, malformedRequests, multipartBody, openSlowConnection, prng, sendHostile, type HostileRequest, type SlowConnection, type SlowKind } from '../tools/hostile/requests.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');

const { values: args } = parseArgs({
  options: {
    requests: { type: 'string', default: '10000' },
    concurrency: { type: 'string', default: '8' },
    'valid-every': { type: 'string', default: '200' },
    fixture: { type: 'string', default: 'sdxl' },
    model: { type: 'string' },
    'valid-size': { type: 'string', default: '256x256' },
    channels: { type: 'string', default: '8' },
    seed: { type: 'string', default: '1' },
    only: { type: 'string' },
    slow: { type: 'string', default: '200' },
    log: { type: 'string' },
    'serve-arg': { type: 'string', multiple: true, default: [] },
  },
});

const MiB = 1024 * 1024;
const mib = (bytes: number) => `${(bytes / MiB).toFixed(0)} MiB`;

interface Sample {
  sent: number;
  rss: number;
  heapUsed: number;
  external: number;
}

/** RSS and peak RSS of a process, from /proc (Linux). */
function procMemory(pid: number): { rss: number; peak: number } | undefined {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN) * 1024;
    return { rss: kb('VmRSS'), peak: kb('VmHWM') };
  } catch {
    return undefined;
  }
}

/** The server's own memory figures from its /metrics (prom-client's process and heap metrics). */
async function serverMemory(base: string): Promise<{ rss: number; heapUsed: number; external: number }> {
  const text = await (await fetch(`${base}/metrics`)).text();
  const value = (name: string) => Number(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, 'm').exec(text)?.[1] ?? NaN);
  return { rss: value('kiln_process_resident_memory_bytes'), heapUsed: value('kiln_nodejs_heap_size_used_bytes'), external: value('kiln_nodejs_external_memory_bytes') };
}

async function main(): Promise<void> {
  const total = Number(args.requests);
  const concurrency = Number(args.concurrency);
  const validEvery = Number(args['valid-every']);
  const seed = Number(args.seed);
  const variant = args.fixture as FixtureVariant;
  const channels = Number(args.channels);
  const serveArgs = args['serve-arg'] ?? [];
  // Diagnosis: replay only the kinds whose label matches (e.g. --only 'bomb|apng').
  const only = args.only ? new RegExp(args.only) : undefined;
  const slowCount = Number(args.slow);

  const home = mkdtempSync(join(os.tmpdir(), 'kiln-bench-memory-'));
  mkdirSync(join(home, 'models'));
  const modelDir = args.model ? locateInHome(args.model, kilnHome()) : await ensureFixture(variant, { channels });
  const modelLabel = args.model ? `model ${args.model}` : `fixture ${variant}, UNet channels ${channels}`;
  symlinkSync(modelDir, join(home, 'models', 'bench-model'), 'dir');
  const validSize = args['valid-size']!;
  const apiKey = 'bench-memory-key';
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', join(ROOT, 'src/cli/main.ts'), 'serve', '--home', home, '--port', '0', '--default-model', 'bench-model', '--api-key', apiKey, '--log-level', 'info', ...serveArgs],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KILN_API_KEYS: '' } },
  );
  let logBytes = 0;
  // The last lines of its output, to show if it dies.
  let tail = '';
  const keep = (c: Buffer) => (tail = (tail + c.toString()).slice(-6000));
  const logFile = args.log ? createWriteStream(args.log) : undefined;
  child.stdout.on('data', (c: Buffer) => {
    logBytes += c.length;
    keep(c);
    logFile?.write(c);
  });
  child.stderr.on('data', keep);
  let finished = false;
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  void exited.then((code) => {
    if (finished) return;
    process.stderr.write(`bench:memory: kiln serve exited (${code}) during the run; its last output:\n${tail}\n`);
    process.exit(1);
  });
  const base = await new Promise<string>((resolveUrl, reject) => {
    let err = '';
    child.stderr.on('data', (c: Buffer) => {
      err += c.toString();
      const m = /serving the images API at (http:\/\/[^ ]+)\/v1/.exec(err);
      if (m) resolveUrl(m[1]!);
    });
    void exited.then((code) => reject(new Error(`kiln serve exited (${code}) before listening:\n${err}`)));
  });

  const auth = { authorization: `Bearer ${apiKey}` };
  const generate = async (responseFormat: 'url' | 'b64_json') => {
    const res = await fetch(`${base}/v1/images/generations`, {
      method: 'POST',
      headers: { ...auth, 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'a red circle', size: '256x256', steps: 2, response_format: responseFormat }),
    });
    const body = (await res.json()) as { data?: { url?: string }[] };
    if (res.status !== 200) throw new Error(`a valid generation answered ${res.status}: ${JSON.stringify(body)}`);
    return body.data![0]!.url;
  };
  const good = await sharp({ create: { width: 48, height: 48, channels: 3, background: '#3366aa' } }).png().toBuffer();
  const validEdit = (): HostileRequest => {
    const f = multipartBody([
      { name: 'prompt', data: 'a blue square' },
      { name: 'size', data: validSize },
      { name: 'steps', data: '2' },
      { name: 'response_format', data: 'b64_json' },
      { name: 'image', filename: 'a.png', type: 'image/png', data: good },
    ]);
    return { label: 'valid edit', path: '/v1/images/edits', headers: { ...auth, 'content-type': f.type }, body: f.body };
  };
  const validGeneration = (): HostileRequest => ({
    label: 'valid generation',
    path: '/v1/images/generations',
    headers: { ...auth, 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'a green triangle', size: validSize, steps: 2, response_format: 'b64_json' }),
  });

  const signedUrl = await generate('url');
  const signedPath = signedUrl ? new URL(signedUrl).pathname + new URL(signedUrl).search : undefined;
  const rounds = function* (first: number): Generator<HostileRequest> {
    for (let round = first; ; round++) {
      const rand = prng(seed * 1_000_003 + round);
      const batch = [...malformedRequests(rand, { good, apiKey, tooLargePad: 4 * MiB }), ...heavyRequests(rand, { good, apiKey, signedPath })].filter(
        (r) => !only || only.test(r.label),
      );
      // Shuffled, so that heavy and light requests overlap across the concurrent clients.
      for (let i = batch.length - 1; i > 0; i--) {
        const j = Math.floor(rand() * (i + 1));
        [batch[i], batch[j]] = [batch[j]!, batch[i]!];
      }
      yield* batch;
    }
  };

  const statuses = new Map<string, number>();
  const unexpected: string[] = [];
  const slowest: [number, string][] = [];
  const run = async (count: number, source: Generator<HostileRequest>, validEvery: number, onSent?: (sent: number) => Promise<void>) => {
    let sent = 0;
    let checkpoint = Promise.resolve();
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        while (sent < count) {
          const n = ++sent;
          const r = validEvery > 0 && n % validEvery === 0 ? (n % (2 * validEvery) === 0 ? validEdit() : validGeneration()) : source.next().value!;
          let key: string;
          const t0 = performance.now();
          try {
            // Its number as the request id, to find it in the server's log (--log).
            const a = await sendHostile(base, r.raw === undefined ? { ...r, headers: { 'x-request-id': `bench-${n}`, ...r.headers } } : r, 60_000);
            slowest.push([performance.now() - t0, `${r.label} (${a.status})`]);
            if (slowest.length > 50) slowest.sort((x, y) => y[0] - x[0]).splice(10);
            key = String(a.status);
            const valid = r.label.startsWith('valid');
            // A 503 uploads_busy is the budget doing its job while the slow peers hold their share.
            const refused = a.status >= 500 && !(a.status === 503 && a.body.includes('"uploads_busy"'));
            if (valid ? a.status !== 200 : refused || a.status < 400) unexpected.push(`${r.label}: ${a.status} ${a.body.slice(0, 120)}`);
          } catch (err) {
            key = `error ${(err as Error).cause ? String((err as { cause: { code?: string } }).cause.code) : (err as Error).name}`;
            unexpected.push(`${r.label} (bench-${n}): ${key}`);
          }
          statuses.set(key, (statuses.get(key) ?? 0) + 1);
          if (onSent) {
            // One checkpoint at a time, in order; the clients go on meanwhile.
            checkpoint = checkpoint.then(() => onSent(n));
          }
        }
      }),
    );
    await checkpoint;
  };

  // Warm-up: images through the worker (model loaded, ONNX Runtime's arenas sized), then one
  // round of every hostile kind, so that what the server allocates once is allocated.
  for (let i = 0; i < 3; i++) await generate('b64_json');
  await sendHostile(base, validEdit());
  const warmRound = rounds(-1);
  const warmCount = malformedRequests(prng(0), { good }).length + heavyRequests(prng(0), { good, signedPath }).length;
  await run(warmCount, warmRound, 0);
  statuses.clear();
  unexpected.length = 0;
  slowest.length = 0;

  const samples: Sample[] = [];
  const sample = async (sent: number) => {
    const m = await serverMemory(base);
    const proc = procMemory(child.pid!);
    samples.push({ sent, rss: proc?.rss ?? m.rss, heapUsed: m.heapUsed, external: m.external });
  };
  await sample(0);
  const started = performance.now();
  const every = Math.max(1, Math.floor(total / 10));
  // Slowloris connections, opened evenly through the batch and left dribbling a byte a second.
  const slow: SlowConnection[] = [];
  const slowKinds: SlowKind[] = ['upload', 'json', 'headers'];
  const slowEvery = slowCount > 0 ? Math.max(1, Math.floor(total / slowCount)) : 0;
  await run(total, rounds(0), validEvery, async (n) => {
    if (slowEvery && n % slowEvery === 0 && slow.length < slowCount) slow.push(openSlowConnection(base, slowKinds[slow.length % 3]!, { apiKey }));
    if (n % every === 0 && n < total) await sample(n);
  });
  const wallS = (performance.now() - started) / 1000;
  await sample(total);
  const peak = procMemory(child.pid!)?.peak;
  const slowOpen = slow.filter((c) => c.closedAt === undefined).length;
  // Then the same server once no slow peer is left: those the server has not cut within 30 s
  // more are closed here.
  const gone = performance.now() + 30_000;
  while (slow.some((c) => c.closedAt === undefined) && performance.now() < gone) await new Promise((r) => setTimeout(r, 250));
  const slowLeft = slow.filter((c) => c.closedAt === undefined).length;
  const slowAges = slow.filter((c) => c.closedByServer).map((c) => (c.closedAt! - c.openedAt) / 1000).sort((a, b) => a - b);
  const slowStatuses = new Map<string, number>();
  for (const c of slow.filter((c) => c.closedByServer)) slowStatuses.set(`${c.kind}:${c.status}`, (slowStatuses.get(`${c.kind}:${c.status}`) ?? 0) + 1);
  for (const c of slow) c.close();
  await new Promise((r) => setTimeout(r, 1000));
  const peerless = slowCount > 0 ? await serverMemory(base).then((m) => ({ ...m, rss: procMemory(child.pid!)?.rss ?? m.rss })) : undefined;

  finished = true;
  child.kill('SIGTERM');
  await exited;
  rmSync(home, { recursive: true, force: true });

  samples.sort((a, b) => a.sent - b.sent);
  const warm = samples[0]!;
  const end = samples[samples.length - 1]!;
  const middle = samples.reduce((best, s) => (Math.abs(s.sent - total / 2) < Math.abs(best.sent - total / 2) ? s : best));
  const command =
    `npm run bench:memory -- --requests ${total} --concurrency ${concurrency} --valid-every ${validEvery} --valid-size ${validSize}` +
    (args.model ? ` --model ${args.model}` : ` --fixture ${variant} --channels ${channels}`) +
    ` --seed ${seed}` +
    ` --slow ${slowCount}` +
    (args.only ? ` --only '${args.only}'` : '') +
    serveArgs.map((a) => ` --serve-arg=${a}`).join('');
  const lines = [
    `kiln memory benchmark: kiln serve (child process, ${modelLabel}, API key, info logs drained), ` +
      `${total} hostile requests from ${concurrency} clients${validEvery > 0 ? `, a valid ${validSize} image every ${validEvery}` : ''}`,
    `host: ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${os.cpus().length} cores, node ${process.version}`,
    `requests: ${total} in ${wallS.toFixed(1)} s (${(total / wallS).toFixed(0)}/s); statuses ${[...statuses].sort().map(([s, n]) => `${s}x${n}`).join(' ')}; server log ${mib(logBytes)}`,
    ...(slowCount > 0
      ? [
          `slow connections (1 byte/s): ${slow.length} opened, ${slowOpen} still open at the end of the batch; ${slowAges.length} closed by the server` +
            (slowAges.length ? ` after ${slowAges[0]!.toFixed(1)}-${slowAges[slowAges.length - 1]!.toFixed(1)} s (median ${slowAges[slowAges.length >> 1]!.toFixed(1)} s; ${[...slowStatuses].sort().map(([k, n]) => `${k}x${n}`).join(' ')})` : '') +
            (slowLeft ? `, ${slowLeft} not within 30 s after the batch` : ''),
        ]
      : []),
    `slowest answers: ${slowest.sort((x, y) => y[0] - x[0]).slice(0, 5).map(([ms, l]) => `${l} ${(ms / 1000).toFixed(1)} s`).join(', ')}`,
    ...(unexpected.length ? [`unexpected answers (${unexpected.length}): ${[...new Set(unexpected)].slice(0, 8).join(" | ")}`] : []),
    'sent      RSS       heap used  external',
    ...samples.map((s) => `${String(s.sent).padEnd(9)} ${mib(s.rss).padEnd(9)} ${mib(s.heapUsed).padEnd(10)} ${mib(s.external)}`),
    `RSS after warm-up ${mib(warm.rss)}, at the middle (${middle.sent}) ${mib(middle.rss)}, at the end ${mib(end.rss)}` + (peak ? `, peak ${mib(peak)}` : ''),
    ...(peerless
      ? [
          `with no slow peer left (${slowLeft ? `${slowLeft} closed by the bench after 30 s` : 'all cut by the server'}): RSS ${mib(peerless.rss)}, heap used ${mib(peerless.heapUsed)}, external ${mib(peerless.external)}`,
        ]
      : []),
    `end / warm-up ${(end.rss / warm.rss).toFixed(2)}x (target <= 1.5x); last half ${end.rss >= middle.rss ? '+' : ''}${(((end.rss - middle.rss) / middle.rss) * 100).toFixed(1)}% (target: flat)`,
    `reproduce: ${command}`,
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:memory: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
