/**
 * Server benchmark: concurrent clients against the HTTP API, requests per second and latency
 * percentiles, plus /health latency while the server is loaded.
 *
 *   npm run bench:server -- [--clients 4] [--requests 32] [--size 256x256] [--steps 8]
 *                           [--format b64_json|url] [--workers 1] [--partial-images N [--taesd]]
 *                           [--model NAME|DIR | --fixture VARIANT [--channels N]] [--url http://HOST:PORT]
 *
 * --partial-images N: the preview cost. Requests alternate between a plain one and a streamed one
 * (`stream: true, partial_images: N`, read to its completed event), same settings otherwise, so
 * outside load falls on both alike; each kind's latency is reported and the streamed / plain ratio.
 * --taesd: the previews come from a tiny VAE decoder: a full-size TAESD (the real config, 1.22 M
 * decoder parameters, seeded random weights) is installed as the temp home's previews/taesd and
 * previews/taesdxl, as `kiln pull taesd` / `taesdxl` would (engine/tiny-decoder.ts).
 *
 * Without --url it starts a server in this process (inference in its worker threads) on a temp
 * home whose default model is the given model (default: the SDXL-layout fixture, 8 channels).
 */
import { parseArgs } from 'node:util';
import os from 'node:os';
import { mkdtempSync, mkdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createServer, type KilnServer } from '../src/server/app.js';
import { locateModel } from '../src/engine/locate.js';
import { Engine } from '../src/engine/engine.js';
import { parseSize } from '../src/engine/presets.js';
import { PREVIEWS_DIR, previewBudget, tinyDecoderFor } from '../src/engine/tiny-decoder.js';
import { GraphBuilder } from '../src/graphs/onnx-builder.js';
import { TAESD } from '../src/graphs/reference-configs.js';
import { writeSafetensors, type TensorToWrite } from '../src/graphs/safetensors.js';
import { buildTinyDecoder } from '../src/graphs/taesd.js';
import { Params, RecordingWeights } from '../src/graphs/weights.js';
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
    'partial-images': { type: 'string' },
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
async function tinyDecoderCost(home: string, count: number, plainMs: number): Promise<string> {
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
  }
}

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
    if (args.taesd) label += `, previews from a random-weight TAESD (${installRandomTaesd(home).toLocaleString('en-US')} decoder parameters)`;
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

  // One warm-up request loads the model; it is not counted.
  const warm = await post();
  if (warm.status !== 200) throw new Error(`warm-up request answered ${warm.status}`);
  if (partialImages !== undefined) {
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
        partialsSeen += r.partials;
      }
    }),
  );
  const wallMs = performance.now() - started;
  loaded = false;
  await probe;

  latencies.sort((a, b) => a - b);
  streamed.sort((a, b) => a - b);
  healthMs.sort((a, b) => a - b);
  const ok = latencies.length + streamed.length;
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
  const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
  const command =
    `npm run bench:server -- --clients ${clients} --requests ${total} --size ${args.size} --steps ${args.steps} --format ${args.format} --workers ${args.workers}` +
    (partialImages !== undefined ? ` --partial-images ${partialImages}` : '') +
    (args.taesd ? ' --taesd' : '') +
    (args.url ? ` --url ${args.url}` : args.model ? ` --model ${args.model}` : ` --fixture ${args.fixture ?? 'sdxl'} --channels ${args.channels ?? 8}`);
  const lines = [
    `kiln server benchmark: ${label}, ${args.size}, ${args.steps} steps, ${args.format}, ${clients} concurrent clients, ${total} requests, ${args.workers} worker(s)`,
    `host: ${cpu}, ${os.cpus().length} cores, node ${process.version}`,
    `throughput: ${((ok / wallMs) * 1000).toFixed(2)} images/s (${ok} ok in ${(wallMs / 1000).toFixed(1)} s)` +
      `; statuses ${[...statuses].map(([s, n]) => `${s}x${n}`).join(' ')}`,
    latencies.length
      ? `latency${partialImages !== undefined ? ' (plain)' : ''}: p50 ${ms(percentile(latencies, 50))}, p90 ${ms(percentile(latencies, 90))}, p99 ${ms(percentile(latencies, 99))}, max ${ms(latencies.at(-1)!)}, mean ${ms(mean(latencies))}`
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
    `reproduce: ${command}`,
  ];
  await server?.close();
  if (args.taesd && home) lines.splice(-1, 0, await tinyDecoderCost(home, partialImages!, mean(latencies)));
  process.stdout.write(`${lines.filter(Boolean).join('\n')}\n`);
  if (home) rmSync(home, { recursive: true, force: true });
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:server: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
