// End-to-end check through Kiln's own engine (dist build): generates the (caption, seed, scheduler)
// list written by `eval_kiln.py make` and stores raw RGB files for `eval_kiln.py score`.
// usage: node tools/kiln-tiny/kiln_eval.mjs <modelDir> <list.json> <outDir>
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { Engine, generate } from '../../dist/engine/index.js';

const [modelDir, listPath, outDir] = process.argv.slice(2);
const list = JSON.parse(readFileSync(listPath, 'utf8'));
mkdirSync(outDir, { recursive: true });
const engine = new Engine({ device: 'cpu' });
const model = await engine.model(modelDir);
let ms = 0;
for (let i = 0; i < list.length; i++) {
  const it = list[i];
  const t0 = performance.now();
  const r = await generate(model, { prompt: it.caption, seed: it.seed, size: '256x256', steps: 25, scheduler: it.scheduler, guidanceScale: it.guidance ?? 7 });
  ms += performance.now() - t0;
  writeFileSync(`${outDir}/${i}.rgb`, r.image.pixels);
  if (i === 0) console.log('settings', JSON.stringify(r.settings), 'unet ms/step', (r.timings.unetMs.reduce((a, b) => a + b, 0) / r.timings.unetMs.length).toFixed(1), 'decode ms', r.timings.decodeMs.toFixed(1));
}
console.log(`generated ${list.length} images, mean ${(ms / list.length).toFixed(0)} ms/image`);
await engine.close();
