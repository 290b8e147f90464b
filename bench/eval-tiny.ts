/**
 * kiln-tiny accuracy: generates (caption, seed) pairs from the whole synthetic world through
 * Kiln's own engine and scores every image by pixels alone (bench/tiny-world.ts). Prints
 * accuracy per attribute for each model x scheduler, against the bar (colours and shape 90%,
 * position 80%), and the median time per image.
 *
 *   npm run bench:eval-tiny -- [--models kiln-tiny,kiln-tiny-xl] [--pairs 200] [--seed 777]
 *        [--schedulers euler,euler_a,ddim,dpmpp_2m,unipc] [--size 256x256] [--quality smooth]
 *        [--guidance G] [--failures DIR]
 *
 * Every scheduler sees the same pairs. `--size` is the requested (output) size, 256x256 by
 * default; a model whose kiln.json declares `native_size` denoises at that size and resizes (the
 * table says so). `--failures DIR` writes the images that missed an attribute as PNGs named after
 * what was asked and what was seen.
 */
import { parseArgs } from 'node:util';
import { mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import cliProgress from 'cli-progress';
import { DiffusionModel } from '../src/engine/model.js';
import { denoiseSize, generate, resolveModelSize } from '../src/engine/pipeline.js';
import { locateInHome } from '../src/catalog/installed-models.js';
import { kilnHome } from '../src/catalog/home.js';
import { median } from './stats.js';
import {
  ACCURACY_BAR, ATTRIBUTES, accuracy, describe, emptyTally, scoreImage, tallyImage, worldCaptions,
} from './tiny-world.js';

const { values: args } = parseArgs({
  options: {
    models: { type: 'string', default: 'kiln-tiny,kiln-tiny-xl' },
    pairs: { type: 'string', default: '200' },
    seed: { type: 'string', default: '777' },
    schedulers: { type: 'string', default: 'euler,euler_a,ddim,dpmpp_2m,unipc' },
    size: { type: 'string', default: '256x256' },
    quality: { type: 'string', default: 'smooth' },
    guidance: { type: 'string' },
    failures: { type: 'string' },
  },
});

const pct = (x: number) => (Number.isNaN(x) ? '   - ' : `${(100 * x).toFixed(1).padStart(5)}`);

async function main(): Promise<void> {
  const models = args.models!.split(',');
  const schedulers = args.schedulers!.split(',');
  const pairs = worldCaptions(Number(args.pairs), Number(args.seed));
  const guidanceScale = args.guidance === undefined ? undefined : Number(args.guidance);
  const rows: string[] = [];
  const header = `${'model'.padEnd(14)}${'scheduler'.padEnd(10)}${ATTRIBUTES.map((a) => a.padStart(7)).join('')}   images  ms/image  bar`;
  let allPass = true;
  const denoised: string[] = [];
  for (const name of models) {
    const model = await DiffusionModel.load(locateInHome(name, kilnHome()), { device: 'cpu' });
    const output = resolveModelSize(model, { size: args.size });
    const work = denoiseSize(model, output);
    denoised.push(`${name} ${work.width === output.width && work.height === output.height ? 'at that size' : `at ${work.width}x${work.height} (kiln.json native_size), resized`}`);
    const total = emptyTally();
    const allTimes: number[] = [];
    for (const scheduler of schedulers) {
      const times: number[] = [];
      const tally = emptyTally();
      const bar = new cliProgress.SingleBar(
        { format: `${name} ${scheduler.padEnd(9)} [{bar}] {value}/{total} {duration}s`, hideCursor: true },
        cliProgress.Presets.shades_classic,
      );
      bar.start(pairs.length, 0);
      for (const [i, pair] of pairs.entries()) {
        const seed = Number(args.seed) * 1000 + i;
        const t0 = performance.now();
        const r = await generate(model, {
          prompt: pair.caption, seed, size: args.size, quality: args.quality, scheduler, guidanceScale,
        });
        times.push(performance.now() - t0);
        allTimes.push(times.at(-1)!);
        if (r.image.width !== output.width || r.image.height !== output.height) {
          throw new Error(`${name} returned ${r.image.width}x${r.image.height} for ${args.size}`);
        }
        const scored = scoreImage(r.image.pixels, r.image.width, r.image.height);
        tallyImage(total, pair, scored);
        const wrong = tallyImage(tally, pair, scored);
        if (wrong.length && args.failures) {
          mkdirSync(args.failures, { recursive: true });
          const file = `${name}-${scheduler}-${i}-asked ${describe(pair.image)}-saw ${describe(scored)}.png`.replaceAll(' ', '_');
          await sharp(r.image.pixels, { raw: { width: r.image.width, height: r.image.height, channels: 3 } })
            .png().toFile(path.join(args.failures, file));
        }
        bar.increment();
      }
      bar.stop();
      const acc = accuracy(tally);
      const pass = Object.entries(ACCURACY_BAR).every(([a, min]) => acc[a as keyof typeof acc] >= min!);
      allPass &&= pass;
      rows.push(`${name.padEnd(14)}${scheduler.padEnd(10)}${ATTRIBUTES.map((a) => pct(acc[a]).padStart(7)).join('')}   ${String(pairs.length).padStart(6)}  ${median(times).toFixed(0).padStart(8)}  ${pass ? 'pass' : 'FAIL'}`);
    }
    const acc = accuracy(total);
    rows.push(`${name.padEnd(14)}${'(all)'.padEnd(10)}${ATTRIBUTES.map((a) => pct(acc[a]).padStart(7)).join('')}   ${String(pairs.length * schedulers.length).padStart(6)}  ${median(allTimes).toFixed(0).padStart(8)}`);
    await model.release();
  }
  console.log(`\nkiln-tiny accuracy (% of images whose caption states the attribute), size ${args.size}, quality ${args.quality}` +
    `${guidanceScale === undefined ? '' : `, guidance ${guidanceScale}`}, ${pairs.length} (caption, seed) pairs from seed ${args.seed}`);
  console.log(`denoised: ${denoised.join('; ')}`);
  console.log(header);
  for (const r of rows) console.log(r);
  console.log(`bar: ${Object.entries(ACCURACY_BAR).map(([a, v]) => `${a} >= ${100 * v!}%`).join(', ')}: ${allPass ? 'every row passes' : 'NOT MET'}`);
  console.log(`machine: ${os.cpus().length} x ${os.cpus()[0]?.model ?? 'cpu'}, node ${process.version}`);
  console.log(`reproduce: npm run bench:eval-tiny -- ${process.argv.slice(2).join(' ')}`.trimEnd());
  process.exitCode = allPass ? 0 : 1;
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
