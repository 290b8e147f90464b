/**
 * Server benchmark: concurrent clients against the HTTP API, requests per second and latency
 * percentiles, plus /health latency while the server is loaded.
 *
 *   npm run bench:server -- [--clients 4] [--requests 32] [--size 256x256] [--steps 8]
 *                           [--format b64_json|url] [--workers 1] [--device cpu|cuda] [--partial-images N [--taesd]]
 *                           [--max-batch 1 | --max-batch 1,8 [--rounds 2]]
 *                           [--model NAME|DIR | --fixture VARIANT [--channels N]] [--url http://HOST:PORT]
 *   npm run bench:server -- --queue redis://HOST:PORT ...   scale-out: 1 and 2 kiln worker processes (bench/server-queue.ts)
 *
 * --max-batch: the server's `--max-batch` (jobs per worker at once, their UNet steps batched).
 * Several values (`1,8`: batching off and on) measure each on a fresh server, side by side in one
 * run, with each one's images/s and p50 relative to the first; `--rounds R` alternates them R
 * times (requests / R each time, results pooled; the servers stay up between rounds), so that
 * outside load falls on all alike.
 * BENCH_TRACE=1 prints each request's finish time and latency to stderr.
 *
 * --taesd: the previews come from a tiny VAE decoder: a full-size TAESD (the real config, 1.22 M
 * decoder parameters, seeded random weights) is installed as the temp home's previews/taesd and
 * previews/taesdxl, as `kiln pull taesd` / `taesdxl` would (engine/tiny-decoder.ts).
 * --partial-images N: the preview cost. Requests alternate between a plain one and a streamed one
 * (`stream: true, partial_images: N`, read to its completed event), same settings otherwise, so
 * outside load falls on both alike; each kind's latency is reported and the streamed / plain ratio.
 *
 * Without --url it starts a server in this process (inference in its worker threads) on a temp
 * home whose default model is the given model (default: the SDXL-layout fixture, 8 channels).
 */
import { parseArgs } from 'node:util';
import os from 'node:os';
import { mkdtempSync, mkdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createServer, type KilnServer } from '../src/server/app.js';
import { locateInHome } from '../src/catalog/installed-models.js';
import { kilnHome, previewBudget } from '../src/catalog/home.js';
import { ensureFixture, type FixtureVariant } from '../tools/fixtures/variants.js';
import { Engine } from '../src/engine/engine.js';
import { parseSize } from '../src/engine/presets.js';
import { PREVIEWS_DIR, tinyDecoderFor } from '../src/engine/tiny-decoder.js';
import { GraphBuilder } from '../src/graphs/onnx-builder.js';
import { TAESD } from '../src/graphs/reference-configs.js';
import { writeSafetensors, type TensorToWrite } from '../src/graphs/safetensors.js';
import { buildTinyDecoder } from '../src/graphs/taesd.js';
import { Params, RecordingWeights } from '../src/graphs/weights.js';
import { queueBench, queueBenchRequested } from './server-queue.js';

// --queue redis://...: the scale-out benchmark (its own options, bench/server-queue.ts).
if (queueBenchRequested()) {
  await queueBench();
  process.exit(0);
}

const { values: args } = parseArgs({
  options: {
    clients: { type: 'string', default: '4' },
    requests: { type: 'string', default: '32' },
    size: { type: 'string', default: '256x256' },
    steps: { type: 'string', default: '8' },
    format: { type: 'string', default: 'b64_json' },
    workers: { type: 'string', default: '1' },
    device: { type: 'string', default: 'cpu' },
    model: { type: 'string' },
    fixture: { type: 'string' },
    channels: { type: 'string' },
    url: { type: 'string' },
    prompt: { type: 'string', default: 'a lighthouse on a cliff at dusk, oil painting' },
    'partial-images': { type: 'string' },
    'max-batch': { type: 'string', default: '1' },
    rounds: { type: 'string', default: '1' },
    taesd: { type: 'boolean', default: false },
  },
});
const partialImages = args['partial-images'] === undefined ? undefined : Number(args['partial-images']);
if (args.taesd && (args.url || partialImages === undefined)) throw new Error('--taesd installs the decoder in the bench\'s own server: it needs --partial-images and no --url');

/** A full-size TAESD folder (config.json + seeded random decoder weights) in previews/taesd and previews/taesdxl of `home`. */
function installRandomTaesd(home: string): number {
  const weights = new RecordingWeights('taesd');
  const g = new GraphBuilder('taesd_decoder');
  const p = Params.of(g, weights);
  buildTinyDecoder(g, { ...TAESD }, p);
  const tensors: Record<string, TensorToWrite> = {};
  for (const [key, shape] of weights.shapes) {
    const source = weights.lookup(key, shape).source;
    if (source.kind !== 'values') throw new Error(`${key}: expected generated values`);
    tensors[key] = { dtype: 'F32', shape, data: source.values() };
  }
  for (const alias of ['taesd', 'taesdxl']) {
    const dir = join(home, PREVIEWS_DIR, alias);
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'config.json'), JSON.stringify(TAESD));
    writeSafetensors(join(dir, 'diffusion_pytorch_model.safetensors'), tensors);
  }
  return p.parameterCount;
}

/**
 * What the model's tiny decoder costs per preview at the bench's size (median of 5 decodes, in
 * this process once the server is closed), and what the previewer's budget rule decides with it
 * for a run as long as a plain request (preview.ts withinBudget).
 */
async function tinyDecoderCost(dir: string, count: number, plainMs: number): Promise<string> {
  const home = mkdtempSync(join(os.tmpdir(), 'kiln-bench-taesd-'));
  mkdirSync(join(home, 'models'));
  symlinkSync(dir, join(home, 'models', 'bench-model'), 'dir');
  installRandomTaesd(home);
  const engine = new Engine({ searchDirs: [join(home, 'models')], cacheDir: join(home, 'cache') });
  try {
    const model = await engine.model('bench-model');
    const decoder = await tinyDecoderFor(model, { home });
    if (!decoder) return 'tiny decoder: none loaded';
    const { width, height } = parseSize(args.size!, [args.size!]);
    const dims = [1, decoder.config.latentChannels, height / 8, width / 8];
    const latents = new Float32Array(dims.reduce((a, b) => a * b, 1)).map((_, i) => Math.sin(i));
    const times: number[] = [];
    for (let i = 0; i < 5; i++) {
      const t0 = performance.now();
      await decoder.decode(latents, dims);
      times.push(performance.now() - t0);
    }
    times.sort((a, b) => a - b);
    const ms = times[2]!;
    const budget = previewBudget();
    const share = (count * ms) / plainMs;
    return (
      `tiny decoder (${decoder.alias}) at ${dims[2]}x${dims[3]} latents: median ${ms.toFixed(0)} ms per preview; ${count} previews = ` +
      `${(share * 100).toFixed(1)}% of a plain image's mean latency; budget ${(budget * 100).toFixed(0)}%` +
      ` ($KILN_PREVIEW_BUDGET): such runs preview with ${share <= budget ? 'the tiny decoder' : 'the linear map'}`
    );
  } finally {
    await engine.close();
    rmSync(home, { recursive: true, force: true });
  }
}

const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
const ms = (x: number) => `${x.toFixed(0)} ms`;

interface Measurement {
  wallMs: number;
  latencies: number[];
  streamed: number[];
  partialsSeen: number;
  statuses: Map<number, number>;
  healthMs: number[];
  cpuMs: { plain: number[]; stream: number[] };
  /** CPU time of this whole process (server, inference threads, clients) over the measured requests. */
  totalCpuMs: number;
}

/** The model folder and its label, when this process starts the server. */
async function modelDir(): Promise<{ dir: string; label: string }> {
  if (args.model) return { dir: locateInHome(args.model, kilnHome()), label: args.model };
  const variant = (args.fixture ?? 'sdxl') as FixtureVariant;
  const channels = Number(args.channels ?? 8);
  return { dir: await ensureFixture(variant, { channels }), label: `fixture ${variant} (UNet channels ${channels})` };
}

interface Target {
  base: string;
  maxBatch: number;
  warm: boolean;
  close(): Promise<void>;
}

/** The server to measure: --url, or one started here with `maxBatch` on a temp home. */
async function startTarget(maxBatch: number, dir: string | undefined): Promise<Target> {
  const clients = Number(args.clients);
  let server: KilnServer | undefined;
  let home: string | undefined;
  let base = args.url?.replace(/\/+$/, '');
  if (!base) {
    home = mkdtempSync(join(os.tmpdir(), 'kiln-bench-'));
    mkdirSync(join(home, 'models'));
    symlinkSync(dir!, join(home, 'models', 'bench-model'), 'dir');
    if (args.taesd) installRandomTaesd(home);
    server = await createServer({
      home,
      port: 0,
      defaultModel: 'bench-model',
      workers: Number(args.workers),
      device: args.device as 'cpu' | 'cuda',
      maxBatch,
      maxQueue: clients,
      logger: 'silent',
    });
    base = await server.listen();
  }
  return {
    base,
    maxBatch,
    warm: false,
    async close() {
      await server?.close();
      if (home) rmSync(home, { recursive: true, force: true });
    },
  };
}

/** `total` requests from `clients` clients against `target` (warmed up first, the first time). */
async function measure(target: Target, total: number): Promise<Measurement> {
  const clients = Number(args.clients);
  const { base, maxBatch } = target;
  const fields = { prompt: args.prompt, size: args.size, steps: Number(args.steps), response_format: args.format };
  const body = JSON.stringify(fields);
  const streamBody = JSON.stringify({ ...fields, stream: true, partial_images: partialImages });
  /** A streamed request read to its end; ok when it ended with the completed event after the partials asked for. */
  const postStream = async (): Promise<{ ms: number; status: number; partials: number }> => {
    const started = performance.now();
    const res = await fetch(`${base}/v1/images/generations`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: streamBody });
    const events = (await res.text()).split('\n\n').filter((f) => f.startsWith('data: ')).map((f) => JSON.parse(f.slice(6)) as { type: string });
    const partials = events.filter((e) => e.type.endsWith('.partial_image')).length;
    const status = res.ok && events.at(-1)?.type === 'image_generation.completed' ? res.status : res.ok ? 599 : res.status;
    return { ms: performance.now() - started, status, partials };
  };
  const post = async (): Promise<{ ms: number; status: number }> => {
    const started = performance.now();
    const res = await fetch(`${base}/v1/images/generations`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    const json = (await res.json()) as { data?: { url?: string }[] };
    if (res.ok && args.format === 'url') await (await fetch(json.data![0]!.url!)).arrayBuffer();
    return { ms: performance.now() - started, status: res.status };
  };

  // Warm-up, not counted: one request loads the model; with batching, two rounds of as many at
  // once as run together, so that the exactness checks of the batch shapes the run will meet
  // (once per shape and worker: unet-batcher.ts) fall here too.
  for (let round = 0; round < (target.warm ? 0 : maxBatch > 1 ? 2 : 1); round++) {
    for (const warm of await Promise.all(Array.from({ length: Math.min(clients, maxBatch) }, () => post()))) {
      if (warm.status !== 200) throw new Error(`warm-up request answered ${warm.status}`);
    }
  }
  if (partialImages !== undefined && !target.warm) {
    // The preview map is fitted on the first streamed request: not counted either.
    const warmStream = await postStream();
    if (warmStream.status !== 200) throw new Error(`streamed warm-up request answered ${warmStream.status}`);
  }
  const streamed: number[] = [];
  let partialsSeen = 0;
  // CPU seconds of this whole process (server, inference threads, client) per request: with one
  // client a request's share is its own, whatever else runs on the host.
  const cpuMs = { plain: [] as number[], stream: [] as number[] };

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
  const cpuStart = process.cpuUsage();
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (next < total) {
        const i = next++;
        const stream = partialImages !== undefined && i % 2 === 1;
        const cpu0 = process.cpuUsage();
        const r = stream ? await postStream() : { ...(await post()), partials: 0 };
        const cpu = process.cpuUsage(cpu0);
        if (clients === 1) cpuMs[stream ? 'stream' : 'plain'].push((cpu.user + cpu.system) / 1000);
        statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
        if (r.status === 200) (stream ? streamed : latencies).push(r.ms);
        if (process.env.BENCH_TRACE) process.stderr.write(`req ${i} client done at ${(performance.now() - started).toFixed(0)} ms, latency ${r.ms.toFixed(0)}\n`);
        partialsSeen += r.partials;
      }
    }),
  );
  const wallMs = performance.now() - started;
  const cpuUsed = process.cpuUsage(cpuStart);
  loaded = false;
  await probe;
  target.warm = true;
  return { wallMs, latencies, streamed, partialsSeen, statuses, healthMs, cpuMs, totalCpuMs: (cpuUsed.user + cpuUsed.system) / 1000 };
}

async function main(): Promise<void> {
  const clients = Number(args.clients);
  const total = Number(args.requests);
  const batches = args['max-batch'].split(',').map(Number);
  if (!batches.every((b) => Number.isInteger(b) && b >= 1)) throw new Error('--max-batch takes integers >= 1, e.g. 1,8');
  if (args.url && batches.length > 1) throw new Error('--max-batch with several values starts its own servers: leave out --url');
  const rounds = Math.max(1, Number(args.rounds));
  const { dir, label: modelLabel } = args.url ? { dir: undefined, label: args.url } : await modelDir();
  const label = args.taesd ? `${modelLabel}, previews from a random-weight full-size TAESD` : modelLabel;
  const loadBefore = os.loadavg();
  // Every server is started first and stays up (idle while another is measured), so that rounds
  // can alternate often without paying a start-up each time.
  const targets: Target[] = [];
  for (const b of batches) targets.push(await startTarget(b, dir));
  const runs = batches.map(() => [] as Measurement[]);
  try {
    for (let r = 0; r < rounds; r++) {
      for (let k = 0; k < batches.length; k++) runs[k]!.push(await measure(targets[k]!, Math.ceil(total / rounds)));
    }
  } finally {
    for (const t of targets) await t.close();
  }
  const loadAfter = os.loadavg();
  const pooled = runs.map((group): Measurement => ({
    wallMs: group.reduce((n, m) => n + m.wallMs, 0),
    latencies: group.flatMap((m) => m.latencies).sort((a, b) => a - b),
    streamed: group.flatMap((m) => m.streamed).sort((a, b) => a - b),
    partialsSeen: group.reduce((n, m) => n + m.partialsSeen, 0),
    statuses: group.reduce((all, m) => {
      for (const [s, n] of m.statuses) all.set(s, (all.get(s) ?? 0) + n);
      return all;
    }, new Map<number, number>()),
    healthMs: group.flatMap((m) => m.healthMs).sort((a, b) => a - b),
    cpuMs: { plain: group.flatMap((m) => m.cpuMs.plain), stream: group.flatMap((m) => m.cpuMs.stream) },
    totalCpuMs: group.reduce((n, m) => n + m.totalCpuMs, 0),
  }));
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
  const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
  const command =
    `npm run bench:server -- --clients ${clients} --requests ${total} --size ${args.size} --steps ${args.steps} --format ${args.format} --workers ${args.workers}` +
    (args.device !== 'cpu' ? ` --device ${args.device}` : '') +
    ` --max-batch ${args['max-batch']}` + (rounds > 1 ? ` --rounds ${rounds}` : '') +
    (partialImages !== undefined ? ` --partial-images ${partialImages}` : '') +
    (args.taesd ? ' --taesd' : '') +
    (args.url ? ` --url ${args.url}` : args.model ? ` --model ${args.model}` : ` --fixture ${args.fixture ?? 'sdxl'} --channels ${args.channels ?? 8}`);
  const lines = [
    `kiln server benchmark: ${label}, ${args.size}, ${args.steps} steps, ${args.format}, ${clients} concurrent clients, ${total} requests, ${args.workers} worker(s), device ${args.device}`,
    `host: ${cpu}, ${os.cpus().length} cores, node ${process.version}; load average ${loadBefore.map((l) => l.toFixed(2)).join(' ')} before, ${loadAfter.map((l) => l.toFixed(2)).join(' ')} after`,
  ];
  const first = pooled[0]!;
  const ips = (m: Measurement) => ((m.latencies.length + m.streamed.length) / m.wallMs) * 1000;
  pooled.forEach((m, k) => {
    const ok = m.latencies.length + m.streamed.length;
    const { latencies, streamed, healthMs, cpuMs, partialsSeen, statuses, wallMs } = m;
    const vsFirst = k > 0 && latencies.length && first.latencies.length
      ? ` (${(ips(m) / ips(first)).toFixed(2)}x the images/s of max-batch ${batches[0]}, p50 ${(percentile(latencies, 50) / percentile(first.latencies, 50)).toFixed(2)}x)`
      : '';
    lines.push(
      ...[
        batches.length > 1 || batches[0] !== 1 ? `-- max-batch ${batches[k]}${batches[k] === 1 ? ' (batching off)' : ''}${vsFirst}` : '',
        `throughput: ${ips(m).toFixed(2)} images/s (${ok} ok in ${(wallMs / 1000).toFixed(1)} s)` +
          `; statuses ${[...statuses].map(([s, n]) => `${s}x${n}`).join(' ')}` +
          // Work per image: less swayed by other jobs on the host than wall time.
          `; CPU per image ${ms(m.totalCpuMs / Math.max(1, ok))}` +
          (k > 0 && ok && first.latencies.length ? ` (${((m.totalCpuMs / ok) / (first.totalCpuMs / Math.max(1, first.latencies.length + first.streamed.length))).toFixed(2)}x)` : ''),
        latencies.length
          ? `latency${partialImages !== undefined ? ' (plain)' : ''}: p50 ${ms(percentile(latencies, 50))}, p90 ${ms(percentile(latencies, 90))}, p95 ${ms(percentile(latencies, 95))}, p99 ${ms(percentile(latencies, 99))}, max ${ms(latencies.at(-1)!)}, mean ${ms(mean(latencies))}`
          : 'latency: no successful requests',
        partialImages !== undefined && streamed.length
          ? `latency (stream, partial_images ${partialImages}, ${(partialsSeen / streamed.length).toFixed(1)} partials each): p50 ${ms(percentile(streamed, 50))}, ` +
            `p90 ${ms(percentile(streamed, 90))}, max ${ms(streamed.at(-1)!)}, mean ${ms(mean(streamed))}; ` +
            `stream / plain: p50 ${(percentile(streamed, 50) / percentile(latencies, 50)).toFixed(3)}, mean ${(mean(streamed) / mean(latencies)).toFixed(3)}`
          : '',
        partialImages !== undefined && cpuMs.plain.length && cpuMs.stream.length
          ? `CPU per image (this process, all threads): plain ${ms(mean(cpuMs.plain))}, stream ${ms(mean(cpuMs.stream))}, ` +
            `stream / plain ${(mean(cpuMs.stream) / mean(cpuMs.plain)).toFixed(3)}`
          : '',
        healthMs.length
          ? `/health under load: ${healthMs.length} probes, p50 ${percentile(healthMs, 50).toFixed(1)} ms, p99 ${percentile(healthMs, 99).toFixed(1)} ms, max ${healthMs[healthMs.length - 1]!.toFixed(1)} ms`
          : '',
      ].filter(Boolean),
    );
  });
  if (args.taesd && dir) lines.push(await tinyDecoderCost(dir, partialImages!, mean(pooled[0]!.latencies)));
  lines.push(`reproduce: ${command}`);
  process.stdout.write(`${lines.join('\n')}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:server: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
