/**
 * Server benchmark: concurrent clients against the HTTP API, requests per second and latency
 * percentiles, plus /health latency while the server is loaded.
 *
 *   npm run bench:server -- [--clients 4] [--requests 32] [--size 256x256] [--steps 8]
 *                           [--format b64_json|url] [--workers 1]
 *                           [--model NAME|DIR | --fixture VARIANT [--channels N]] [--url http://HOST:PORT]
 *
 * Without --url it starts a server in this process (inference in its worker threads) on a temp
 * home whose default model is the given model (default: the SDXL-layout fixture, 8 channels).
 */
import { parseArgs } from 'node:util';
import os from 'node:os';
import { mkdtempSync, mkdirSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { createServer, type KilnServer } from '../src/server/app.js';
import { locateModel } from '../src/engine/locate.js';
import { ensureFixture, type FixtureVariant } from '../tools/fixtures/variants.js';

const { values: args } = parseArgs({
  options: {
    clients: { type: 'string', default: '4' },
    requests: { type: 'string', default: '32' },
    size: { type: 'string', default: '256x256' },
    steps: { type: 'string', default: '8' },
    format: { type: 'string', default: 'b64_json' },
    workers: { type: 'string', default: '1' },
    model: { type: 'string' },
    fixture: { type: 'string' },
    channels: { type: 'string' },
    url: { type: 'string' },
    prompt: { type: 'string', default: 'a lighthouse on a cliff at dusk, oil painting' },
  },
});

const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
const ms = (x: number) => `${x.toFixed(0)} ms`;

async function main(): Promise<void> {
  const clients = Number(args.clients);
  const total = Number(args.requests);
  let server: KilnServer | undefined;
  let home: string | undefined;
  let base = args.url?.replace(/\/+$/, '');
  let label = base ?? '';
  if (!base) {
    let dir: string;
    if (args.model) {
      dir = locateModel(args.model);
      label = args.model;
    } else {
      const variant = (args.fixture ?? 'sdxl') as FixtureVariant;
      const channels = Number(args.channels ?? 8);
      dir = await ensureFixture(variant, { channels });
      label = `fixture ${variant} (UNet channels ${channels})`;
    }
    home = mkdtempSync(join(os.tmpdir(), 'kiln-bench-'));
    mkdirSync(join(home, 'models'));
    symlinkSync(dir, join(home, 'models', 'bench-model'), 'dir');
    server = await createServer({
      home,
      port: 0,
      defaultModel: 'bench-model',
      workers: Number(args.workers),
      maxQueue: clients,
      logger: 'silent',
    });
    base = await server.listen();
  }

  const body = JSON.stringify({ prompt: args.prompt, size: args.size, steps: Number(args.steps), response_format: args.format });
  const post = async (): Promise<{ ms: number; status: number }> => {
    const started = performance.now();
    const res = await fetch(`${base}/v1/images/generations`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    const json = (await res.json()) as { data?: { url?: string }[] };
    if (res.ok && args.format === 'url') await (await fetch(json.data![0]!.url!)).arrayBuffer();
    return { ms: performance.now() - started, status: res.status };
  };

  // One warm-up request loads the model; it is not counted.
  const warm = await post();
  if (warm.status !== 200) throw new Error(`warm-up request answered ${warm.status}`);

  let next = 0;
  const latencies: number[] = [];
  const statuses = new Map<number, number>();
  const healthMs: number[] = [];
  let loaded = true;
  const probe = (async () => {
    while (loaded) {
      const t0 = performance.now();
      await (await fetch(`${base}/health`)).arrayBuffer();
      healthMs.push(performance.now() - t0);
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  const started = performance.now();
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (next < total) {
        next++;
        const r = await post();
        statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
        if (r.status === 200) latencies.push(r.ms);
      }
    }),
  );
  const wallMs = performance.now() - started;
  loaded = false;
  await probe;

  latencies.sort((a, b) => a - b);
  healthMs.sort((a, b) => a - b);
  const ok = latencies.length;
  const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
  const command =
    `npm run bench:server -- --clients ${clients} --requests ${total} --size ${args.size} --steps ${args.steps} --format ${args.format} --workers ${args.workers}` +
    (args.url ? ` --url ${args.url}` : args.model ? ` --model ${args.model}` : ` --fixture ${args.fixture ?? 'sdxl'} --channels ${args.channels ?? 8}`);
  const lines = [
    `kiln server benchmark: ${label}, ${args.size}, ${args.steps} steps, ${args.format}, ${clients} concurrent clients, ${total} requests, ${args.workers} worker(s)`,
    `host: ${cpu}, ${os.cpus().length} cores, node ${process.version}`,
    `throughput: ${((ok / wallMs) * 1000).toFixed(2)} images/s (${ok} ok in ${(wallMs / 1000).toFixed(1)} s)` +
      `; statuses ${[...statuses].map(([s, n]) => `${s}x${n}`).join(' ')}`,
    ok
      ? `latency: p50 ${ms(percentile(latencies, 50))}, p90 ${ms(percentile(latencies, 90))}, p99 ${ms(percentile(latencies, 99))}, max ${ms(latencies[ok - 1]!)}`
      : 'latency: no successful requests',
    healthMs.length
      ? `/health under load: ${healthMs.length} probes, p50 ${percentile(healthMs, 50).toFixed(1)} ms, p99 ${percentile(healthMs, 99).toFixed(1)} ms, max ${healthMs[healthMs.length - 1]!.toFixed(1)} ms`
      : '',
    `reproduce: ${command}`,
  ];
  process.stdout.write(`${lines.filter(Boolean).join('\n')}\n`);
  await server?.close();
  if (home) rmSync(home, { recursive: true, force: true });
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:server: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
