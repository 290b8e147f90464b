/**
 * How much an inline weight moves a picture: the mean absolute pixel change (0-255 scale) between
 * a prompt and the same prompt with one word weighted, same seed and settings, averaged over seeds.
 *
 *   npm run bench:prompt-weights -- [--model kiln-tiny] [--weights 0,0.1,0.5,0.9,1.1,1.5,2,5]
 *                                   [--seeds 4] [--size 256x256] [--steps 12]
 *
 * The weighted word is the one in parentheses of each prompt below (colour, shape and position
 * words of kiln-tiny's captions). It prints the command that reproduces it.
 */
import { parseArgs } from 'node:util';
import { DiffusionModel } from '../src/engine/model.js';
import { generate } from '../src/engine/pipeline.js';
import { locateInHome } from '../src/catalog/installed-models.js';
import { kilnHome } from '../src/catalog/home.js';

const { values: args } = parseArgs({
  options: {
    model: { type: 'string', default: 'kiln-tiny' },
    weights: { type: 'string', default: '0,0.1,0.5,0.9,1.1,1.5,2,5' },
    seeds: { type: 'string', default: '4' },
    size: { type: 'string', default: '256x256' },
    steps: { type: 'string', default: '12' },
  },
});

const PROMPTS = [
  'a large (red) circle at the left on a blue background',
  'a small yellow (triangle) at the top on a black background',
  'a white square on a (green) background',
];

async function main(): Promise<void> {
  const model = await DiffusionModel.load(locateInHome(args.model!, kilnHome()));
  const weights = args.weights!.split(',').map(Number);
  const seeds = Number(args.seeds);
  const base = { size: args.size!, allowedSizes: [args.size!], steps: Number(args.steps) };
  const rows: string[] = [];
  try {
    const plain = new Map<string, Uint8Array | Uint8ClampedArray>();
    for (const p of PROMPTS) for (let s = 0; s < seeds; s++) plain.set(`${p}|${s}`, (await generate(model, { ...base, prompt: p.replace(/[()]/g, ''), seed: s })).image.pixels);
    for (const w of weights) {
      let sum = 0;
      let count = 0;
      for (const p of PROMPTS) {
        for (let s = 0; s < seeds; s++) {
          const pixels = (await generate(model, { ...base, prompt: p.replace(/\)/, `)${w}`), seed: s })).image.pixels;
          const ref = plain.get(`${p}|${s}`)!;
          for (let i = 0; i < pixels.length; i++) sum += Math.abs(pixels[i]! - ref[i]!);
          count += pixels.length;
        }
      }
      rows.push(`| ${w} | ${(sum / count).toFixed(2)} |`);
    }
  } finally {
    await model.release();
  }
  console.log(`${args.model}: mean |pixel change| (0-255) of one weighted word, ${PROMPTS.length} prompts x ${seeds} seeds, ${args.size}, ${args.steps} steps`);
  console.log('| weight | mean change |\n|---|---|');
  for (const r of rows) console.log(r);
  console.log(`\nnpm run bench:prompt-weights -- --model ${args.model} --weights ${args.weights} --seeds ${args.seeds} --size ${args.size} --steps ${args.steps}`);
}

await main();
