/**
 * Engine benchmark: per-stage times of one txt2img generation and the share of wall time
 * spent outside onnxruntime's session.run (our own JS: tokenizer, scheduler maths, CFG
 * combine, tensor conversion, PNG encoding).
 *
 *   npm run bench:engine -- [--model NAME|DIR | --fixture VARIANT [--channels N]] [--size 512x512]
 *                           [--steps 25] [--scheduler euler] [--runs 3] [--device cpu]
 *
 * With no model given it benchmarks the largest fixture: SDXL layout, a 64-channel UNet.
 */
import { parseArgs } from 'node:util';
import os from 'node:os';
import { DiffusionModel } from '../src/engine/model.js';
import { generate } from '../src/engine/pipeline.js';
import { encodeGeneratedPng } from '../src/engine/image-codec.js';
import { locateInHome } from '../src/catalog/installed-models.js';
import { kilnHome } from '../src/catalog/home.js';
import type { Device } from '../src/engine/onnx.js';
import { median } from './stats.js';
import { ensureFixture, type FixtureVariant } from '../tools/fixtures/variants.js';

const { values: args } = parseArgs({
  options: {
    model: { type: 'string' },
    fixture: { type: 'string' },
    channels: { type: 'string' },
    size: { type: 'string', default: '512x512' },
    steps: { type: 'string', default: '25' },
    scheduler: { type: 'string' },
    runs: { type: 'string', default: '3' },
    device: { type: 'string', default: 'cpu' },
    prompt: { type: 'string', default: 'a large red circle at the left on a blue background' },
  },
});

const fmt = (ms: number) => `${ms.toFixed(1)} ms`;

async function main(): Promise<void> {
  let dir: string;
  let label: string;
  if (args.model) {
    dir = locateInHome(args.model, kilnHome());
    label = args.model;
  } else {
    const variant = (args.fixture ?? 'sdxl') as FixtureVariant;
    const channels = Number(args.channels ?? (args.fixture ? 8 : 64));
    dir = await ensureFixture(variant, { channels });
    label = `fixture ${variant} (UNet channels ${channels})`;
  }
  const stats = { sessionRunMs: 0, runs: 0 };
  const loadStarted = performance.now();
  const model = await DiffusionModel.load(dir, { device: args.device as Device, stats });
  const loadMs = performance.now() - loadStarted;

  const runs = Number(args.runs);
  const steps = Number(args.steps);
  const rows: Record<string, number[]> = {
    total: [], tokenize: [], encode: [], unetStep: [], unetAll: [], scheduler: [], decode: [], png: [], sessionRun: [], outside: [],
  };
  // One warm-up run: first calls pay for allocator growth and lazy kernels.
  for (let r = -1; r < runs; r++) {
    const runBefore = stats.sessionRunMs;
    const wallStarted = performance.now();
    const result = await generate(model, { prompt: args.prompt, seed: 1234 + r, size: args.size, steps, scheduler: args.scheduler });
    const pngStarted = performance.now();
    await encodeGeneratedPng(result.image, result.settings);
    const pngMs = performance.now() - pngStarted;
    const wall = performance.now() - wallStarted;
    const sessionRun = stats.sessionRunMs - runBefore;
    if (r < 0) continue;
    const t = result.timings;
    rows.total!.push(wall);
    rows.tokenize!.push(t.tokenizeMs);
    rows.encode!.push(t.encodeMs - t.tokenizeMs);
    rows.unetStep!.push(median(t.unetMs));
    rows.unetAll!.push(t.unetMs.reduce((a, b) => a + b, 0));
    rows.scheduler!.push(t.schedulerMs);
    rows.decode!.push(t.decodeMs);
    rows.png!.push(pngMs);
    rows.sessionRun!.push(sessionRun);
    rows.outside!.push(wall - sessionRun);
  }

  const m = (k: string) => median(rows[k]!);
  const cmd = `npm run bench:engine -- ${process.argv.slice(2).join(' ')}`.trim();
  console.log(`kiln engine benchmark: ${label}`);
  console.log(`  host: ${os.cpus()[0]?.model ?? 'cpu'} x${os.cpus().length}, node ${process.version}, device ${args.device}`);
  console.log(`  size ${args.size}, ${steps} steps, scheduler ${args.scheduler ?? 'model default'}, ${runs} runs (median), model load ${fmt(loadMs)}`);
  console.log(`  tokenize           ${fmt(m('tokenize'))}`);
  console.log(`  text encode        ${fmt(m('encode'))}`);
  console.log(`  UNet step (median) ${fmt(m('unetStep'))}   all steps ${fmt(m('unetAll'))}`);
  console.log(`  scheduler + CFG    ${fmt(m('scheduler'))}`);
  console.log(`  VAE decode         ${fmt(m('decode'))}`);
  console.log(`  PNG encode         ${fmt(m('png'))}`);
  console.log(`  total (wall)       ${fmt(m('total'))}`);
  console.log(`  inside session.run ${fmt(m('sessionRun'))}`);
  console.log(`  outside session.run ${fmt(m('outside'))} = ${((100 * m('outside')) / m('total')).toFixed(1)}% of wall time`);
  console.log(`  reproduce: ${cmd}`);
  await model.release();
}

await main();
