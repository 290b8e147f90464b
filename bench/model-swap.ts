/**
 * What `--max-models` trades: memory for load time. Requests go round-robin over several models
 * (fixture models with a wide UNet, distinct folders), each setting in a fresh process (its RSS
 * its own): with no bound every model stays loaded after its first request; with `--max-models 1`
 * each switch unloads the idle model first and loads the next. Prints per setting the RSS peak and
 * at the end, the time per request (median, after the first round), and the unloads.
 * No peer figure: peers' model caches (A1111's checkpoint limit, ComfyUI's) were not run here.
 *
 *   npm run bench:model-swap -- [--models 3] [--rounds 4] [--channels 64] [--size 256x256] [--steps 4]
 *                               [--max-models none,1] [--device cpu|cuda]
 */
import { parseArgs } from 'node:util';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, statSync, symlinkSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Engine } from '../src/engine/engine.js';
import { generate } from '../src/engine/pipeline.js';
import { median } from './stats.js';
import { ensureFixture, type FixtureVariant } from '../tools/fixtures/variants.js';

const { values: args } = parseArgs({
  options: {
    models: { type: 'string', default: '3' },
    rounds: { type: 'string', default: '4' },
    channels: { type: 'string', default: '64' },
    size: { type: 'string', default: '256x256' },
    steps: { type: 'string', default: '4' },
    'max-models': { type: 'string', default: 'none,1' },
    device: { type: 'string', default: 'cpu' },
    child: { type: 'string' },
  },
});

/** Distinct fixture folders: the variants alternate families, and each width differs so no two share a graph. */
async function modelDirs(count: number, channels: number): Promise<string[]> {
  const variants: FixtureVariant[] = ['sdxl', 'sd15-optimum'];
  return Promise.all(Array.from({ length: count }, (_, i) => ensureFixture(variants[i % 2]!, { channels: channels + 8 * Math.floor(i / 2) })));
}

/** Bytes of the files under `dir` (a model's graphs and weights). */
function folderBytes(dir: string): number {
  return readdirSync(dir, { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile())
    .reduce((sum, e) => sum + statSync(join(e.parentPath, e.name)).size, 0);
}

interface ChildResult {
  peakRssMb: number;
  endRssMb: number;
  firstRoundMs: number[];
  laterMs: number[];
  unloads: number;
}

async function child(maxModels: number | undefined): Promise<ChildResult> {
  const dirs = await modelDirs(Number(args.models), Number(args.channels));
  const home = mkdtempSync(join(tmpdir(), 'kiln-model-swap-'));
  mkdirSync(join(home, 'models'));
  dirs.forEach((d, i) => symlinkSync(d, join(home, 'models', `m${i}`), 'dir'));
  let unloads = 0;
  const engine = new Engine({ searchDirs: [join(home, 'models')], device: args.device as 'cpu' | 'cuda', maxModels, onUnload: () => unloads++ });
  const rss = () => process.memoryUsage.rss() / 2 ** 20;
  let peak = rss();
  const firstRoundMs: number[] = [];
  const laterMs: number[] = [];
  try {
    for (let round = 0; round < Number(args.rounds); round++) {
      for (let i = 0; i < dirs.length; i++) {
        const started = performance.now();
        const { model, release } = await engine.lease(`m${i}`);
        try {
          await generate(model, { prompt: 'a kiln at night', seed: round * 100 + i, size: args.size, steps: Number(args.steps) });
        } finally {
          release();
        }
        (round === 0 ? firstRoundMs : laterMs).push(performance.now() - started);
        peak = Math.max(peak, rss());
      }
    }
    return { peakRssMb: peak, endRssMb: rss(), firstRoundMs, laterMs, unloads };
  } finally {
    await engine.close();
    rmSync(home, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  if (args.child !== undefined) {
    const result = await child(args.child === 'none' ? undefined : Number(args.child));
    process.stdout.write(JSON.stringify(result));
    return;
  }
  const dirs = await modelDirs(Number(args.models), Number(args.channels)); // built once, before any timing
  const settings = args['max-models'].split(',');
  console.log(`${args.models} models (fixture UNets from width ${args.channels}), ${args.rounds} rounds round-robin, ${args.size}, ${args.steps} steps, ${args.device}`);
  console.log(`model folders on disk: ${dirs.map((d) => `${(folderBytes(d) / 2 ** 20).toFixed(0)} MB`).join(', ')}`);
  console.log('max-models  peak RSS MB  end RSS MB  first round ms/request  later ms/request (median)  unloads');
  for (const setting of settings) {
    const out = execFileSync(process.execPath, ['--import', 'tsx', 'bench/model-swap.ts', ...process.argv.slice(2).filter((a) => !a.startsWith('--child')), '--child', setting], { encoding: 'utf8', maxBuffer: 1 << 24 });
    const r = JSON.parse(out) as ChildResult;
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    console.log(
      `${setting.padEnd(10)}  ${r.peakRssMb.toFixed(0).padStart(11)}  ${r.endRssMb.toFixed(0).padStart(10)}  ${mean(r.firstRoundMs).toFixed(0).padStart(22)}  ${median(r.laterMs).toFixed(0).padStart(25)}  ${String(r.unloads).padStart(7)}`,
    );
  }
  console.log(`reproduce: npm run bench:model-swap -- ${process.argv.slice(2).join(' ')}`.trimEnd());
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
