/**
 * What batching the UNet calls of several requests would buy (issue 14's step-level batching):
 * one real denoising step's UNet feeds (taken from a generation), stacked for 1, 2, 4, 8 ...
 * requests along the batch dimension, each copy with its own sample and timestep; per batch, the
 * time per call and per request, and whether every request's rows come out bit for bit as when
 * its call runs alone (the API's same-n-same-bytes promise).
 *
 *   node --import tsx bench/unet-batch.ts -- [--model NAME|DIR | --fixture VARIANT] [--size 256x256]
 *                                            [--requests 1,2,4,8] [--runs 10] [--device cpu|cuda]
 */
import { parseArgs } from 'node:util';
import os from 'node:os';
import { join } from 'node:path';
import { DiffusionModel } from '../src/engine/model.js';
import { OnnxModel } from '../src/engine/onnx.js';
import { generate } from '../src/engine/pipeline.js';
import { locateInHome } from '../src/catalog/installed-models.js';
import { kilnHome } from '../src/catalog/home.js';
import type { Feed } from '../src/engine/onnx.js';
import { median } from './stats.js';
import { ensureFixture, type FixtureVariant } from '../tools/fixtures/variants.js';

const { values: args } = parseArgs({
  options: {
    model: { type: 'string' },
    fixture: { type: 'string' },
    size: { type: 'string', default: '256x256' },
    requests: { type: 'string', default: '1,2,4,8' },
    runs: { type: 'string', default: '10' },
    device: { type: 'string', default: 'cpu' },
  },
});

async function main(): Promise<void> {
  const dir = args.model ? locateInHome(args.model, kilnHome()) : await ensureFixture((args.fixture ?? 'sdxl') as FixtureVariant);
  const label = args.model ?? `fixture ${args.fixture ?? 'sdxl'}`;
  const device = args.device as 'cpu' | 'cuda';
  const model = await DiffusionModel.load(dir, { device });
  const unet = model.unet as OnnxModel & { run: OnnxModel['run'] };
  const run = unet.run.bind(unet);
  let captured: Record<string, Feed> | undefined;
  unet.run = (feeds, outputs) => {
    captured ??= feeds;
    return run(feeds, outputs);
  };
  await generate(model, { prompt: 'a large red circle at the left on a blue background', seed: 1, size: args.size, steps: 1 });
  unet.run = run;
  const base = captured!;
  const rows = base.sample!.dims[0]!; // 2 with classifier-free guidance
  const outName = [...unet.outputs.keys()].find((n) => n === 'out_sample') ?? [...unet.outputs.keys()][0]!;

  /** Feeds for `n` requests: inputs with the batch dimension repeated n times, each copy's sample and timestep its own. */
  const stacked = (n: number, first = 0): Record<string, Feed> => {
    const out: Record<string, Feed> = {};
    for (const [name, feed] of Object.entries(base)) {
      if (feed.dims[0] !== rows || !('data' in feed)) {
        out[name] = feed;
        continue;
      }
      const size = feed.data.length;
      const data = new Float32Array(size * n);
      for (let c = 0; c < n; c++) {
        const copy = first + c;
        for (let k = 0; k < size; k++) {
          const v = feed.data[k]!;
          data[c * size + k] = name === 'sample' ? v + 0.01 * copy : name === 'timestep' ? Math.max(0, v - 37 * copy) : v;
        }
      }
      out[name] = { data, dims: [rows * n, ...feed.dims.slice(1)] };
    }
    return out;
  };

  const counts = args.requests.split(',').map(Number);
  const lines = [
    `UNet batching: ${label}, ${args.size}, ${device}, ${rows} rows per request, ${args.runs} runs per batch`,
    `host: ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${os.cpus().length} cores, load ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`,
  ];
  const alone = new Map<number, Float32Array>();
  const soloMs: number[] = [];
  for (const n of counts) {
    const feeds = stacked(n);
    await run(feeds, [outName]);
    const times: number[] = [];
    let out: Float32Array | undefined;
    for (let r = 0; r < Number(args.runs); r++) {
      const t0 = performance.now();
      out = (await run(feeds, [outName]))[outName]!.data;
      times.push(performance.now() - t0);
    }
    let exact = 0;
    const rowSize = out!.length / n;
    for (let c = 0; c < n; c++) {
      if (!alone.has(c)) alone.set(c, (await run(stacked(1, c), [outName]))[outName]!.data);
      const ref = alone.get(c)!;
      const mine = out!.subarray(c * rowSize, (c + 1) * rowSize);
      if (ref.every((v, k) => v === mine[k])) exact++;
    }
    const ms = median(times);
    if (n === 1) soloMs.push(ms);
    const speedup = soloMs.length ? (soloMs[0]! * n) / ms : NaN;
    lines.push(
      `${String(n).padStart(3)} requests: ${ms.toFixed(1)} ms per call, ${(ms / n).toFixed(2)} ms per request` +
        (Number.isFinite(speedup) ? `, ${speedup.toFixed(2)}x the throughput of one at a time` : '') +
        `; bit-identical to running alone: ${exact}/${n}`,
    );
  }
  // The ceiling on a CPU host: batching can only remove per-call overhead and idle cores, so the
  // best it can do is every core busy at one thread's per-request pace in a large batch.
  if (device === 'cpu') {
    const largest = Math.max(...counts);
    const oneThread = await OnnxModel.load(join(dir, 'unet/model.onnx'), dir, { device, intraOpThreads: 1 });
    const feeds = stacked(largest);
    await oneThread.run(feeds, [outName]);
    const times: number[] = [];
    for (let r = 0; r < Number(args.runs); r++) {
      const t0 = performance.now();
      await oneThread.run(feeds, [outName]);
      times.push(performance.now() - t0);
    }
    await oneThread.release();
    const cores = os.availableParallelism();
    const perRequestOneThread = median(times) / largest;
    if (soloMs.length) {
      lines.push(
        `ceiling: one thread takes ${perRequestOneThread.toFixed(2)} ms per request at ${largest} requests a call, so ${cores} cores at that pace ` +
          `give ${(perRequestOneThread / cores).toFixed(2)} ms per request at best: at most ${(soloMs[0]! / (perRequestOneThread / cores)).toFixed(2)}x ` +
          `the throughput of one at a time on this host`,
      );
    }
  }
  lines.push(`reproduce: node --import tsx bench/unet-batch.ts ${process.argv.slice(2).join(' ')}`.trimEnd());
  process.stdout.write(`${lines.join('\n')}\n`);
  await model.release();
}

main().catch((err: unknown) => {
  process.stderr.write(`bench/unet-batch: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
