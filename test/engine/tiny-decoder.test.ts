/**
 * Previews from a tiny VAE decoder (src/engine/tiny-decoder.ts): with the family's TAESD installed
 * under <home>/previews/, a partial image is that decoder's picture of the step's predicted clean
 * sample (checked against the decoder graph run on its own), SDXL takes taesdxl and SD taesd, a run
 * whose previews would cost over the budget keeps to the linear map, and a decoder that does not
 * load gives the linear map's previews and one warning. The decoder is the
 * small diffusers-made fixture of test/graphs/taesd.test.ts.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { DiffusionModel } from '../../src/engine/model.js';
import { builtinModelsDir, locateModel } from '../../src/engine/locate.js';
import { generate, type StepLatents } from '../../src/engine/pipeline.js';
import { createPreviewer, encodePreview, withinBudget, type PartialImage, type PreviewerOptions } from '../../src/engine/preview.js';
import { PREVIEWS_DIR, tinyDecoderDir, tinyDecoderFor } from '../../src/engine/tiny-decoder.js';
import { previewBudget } from '../../src/catalog/home.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { buildTinyDecoder } from '../../src/graphs/taesd.js';
import { componentWeights, Params } from '../../src/graphs/weights.js';
import { runGraph } from '../graphs/golden.js';

const TAESD_FIXTURE = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'taesd');

const loaded: DiffusionModel[] = [];
const temps: string[] = [];
after(async () => {
  await Promise.all(loaded.map((m) => m.release()));
  for (const dir of temps) rmSync(dir, { recursive: true, force: true });
});

async function load(name: string): Promise<DiffusionModel> {
  const model = await DiffusionModel.load(locateModel(name, [builtinModelsDir()]));
  loaded.push(model);
  return model;
}

/** A temp home with the fixture decoder installed under previews/<alias> for each alias given. */
function homeWith(...aliases: string[]): string {
  const home = mkdtempSync(join(tmpdir(), 'kiln-taesd-'));
  temps.push(home);
  for (const alias of aliases) {
    const dir = join(home, PREVIEWS_DIR, alias);
    mkdirSync(dir, { recursive: true });
    for (const f of ['config.json', 'diffusion_pytorch_model.safetensors']) copyFileSync(join(TAESD_FIXTURE, f), join(dir, f));
  }
  return home;
}

const request = { prompt: 'a large red circle at the left on a blue background', seed: 3, size: '256x256', steps: 6 };

/** A run with previews; also the step states the previews were taken from. */
async function run(model: DiffusionModel, options: Partial<PreviewerOptions>) {
  const partials: PartialImage[] = [];
  const steps = new Map<number, StepLatents>();
  const previewer = createPreviewer(model, { count: 2, width: 256, height: 256, format: 'png', onPartial: (p) => partials.push(p), ...options });
  const result = await generate(model, {
    ...request,
    onStepLatents: (s) => {
      steps.set(s.step, s);
      previewer.onStepLatents(s);
    },
  });
  await previewer.flush();
  return { result, partials, steps };
}

/** The fixture decoder's picture of latents, as an independent run of its graph gives it, encoded as a preview. */
async function expectedPreview(latents: Float32Array, dims: number[]): Promise<Buffer> {
  const g = new GraphBuilder('taesd_decoder');
  const config = JSON.parse(readFileSync(join(TAESD_FIXTURE, 'config.json'), 'utf8')) as Record<string, unknown>;
  buildTinyDecoder(g, config, Params.of(g, componentWeights(TAESD_FIXTURE, 'taesd')));
  const out = (await runGraph(g, { latent_sample: { shape: dims, data: latents } })).sample!;
  const [, , h, w] = out.dims as number[];
  const data = out.data as Float32Array;
  const pixels = new Uint8Array(h! * w! * 3);
  for (let i = 0; i < h! * w!; i++) for (let c = 0; c < 3; c++) pixels[i * 3 + c] = Math.round(Math.min(1, Math.max(0, data[c * h! * w! + i]! / 2 + 0.5)) * 255);
  return encodePreview({ width: w!, height: h!, pixels }, 256, 256, 'png');
}

test('kiln-tiny with previews/taesd: each partial is TAESD decoding the step\'s predicted clean sample; the image is unchanged', async () => {
  const model = await load('kiln-tiny');
  assert.equal(model.layout.family, 'sd1');
  const home = homeWith('taesd');
  assert.equal(tinyDecoderDir('sd1', home), join(home, PREVIEWS_DIR, 'taesd'));
  // Budget Infinity: on a loaded test host the decoder's cost beside kiln-tiny's run must not decide.
  const tiny = await run(model, { tinyDecoder: { home }, budget: Infinity });
  assert.deepEqual(tiny.partials.map((p) => [p.step, p.decoder]), [[2, 'taesd'], [4, 'taesd']]);
  for (const p of tiny.partials) {
    const s = tiny.steps.get(p.step)!;
    assert.ok(s.predOriginal, 'the scheduler predicts the clean sample');
    assert.ok(p.bytes.equals(await expectedPreview(s.predOriginal, s.latentDims)), `partial at step ${p.step} is the decoder's picture`);
    const meta = await sharp(p.bytes).metadata();
    assert.deepEqual([meta.format, meta.width, meta.height], ['png', 256, 256]);
  }
  const linear = await run(model, { tinyDecoder: false });
  assert.deepEqual(linear.partials.map((p) => p.decoder), ['linear', 'linear']);
  for (const [i, p] of linear.partials.entries()) assert.ok(!p.bytes.equals(tiny.partials[i]!.bytes), 'the linear map draws another picture');
  assert.deepEqual(tiny.result.image.pixels, linear.result.image.pixels, 'previews never change the image');
  assert.ok(tiny.result.image.pixels.length > 0);
});

test('the family decides: an SDXL model takes taesdxl (taesd alone leaves it the linear map)', async () => {
  const model = await load('kiln-tiny-xl');
  assert.equal(model.layout.family, 'sdxl');
  const onlySd = await run(model, { tinyDecoder: { home: homeWith('taesd') }, budget: Infinity });
  assert.deepEqual(onlySd.partials.map((p) => p.decoder), ['linear', 'linear']);
  const xl = await run(model, { tinyDecoder: { home: homeWith('taesdxl') }, budget: Infinity });
  assert.deepEqual(xl.partials.map((p) => p.decoder), ['taesdxl', 'taesdxl']);
});

test('over the budget a run keeps to the linear map: budget 0 with the decoder installed', async () => {
  const model = await load('kiln-tiny');
  const home = homeWith('taesd');
  const decoder = await tinyDecoderFor(model, { home });
  assert.ok(decoder && decoder.estimateMs([1, 4, 32, 32]) > 0, 'the load measured the decoder');
  const r = await run(model, { tinyDecoder: { home }, budget: 0 });
  assert.deepEqual(r.partials.map((p) => p.decoder), ['linear', 'linear']);
});

test('withinBudget: the previews\' decodes against the budget share of the run expected at its pace so far', () => {
  // 20 steps at 100 ms each (2 s elapsed at step 5 of 20 is 8 s in all): 5% is 400 ms.
  assert.equal(withinBudget(130, 3, 2000, 5, 20, 0.05), true);
  assert.equal(withinBudget(140, 3, 2000, 5, 20, 0.05), false);
  assert.equal(withinBudget(1e9, 3, 1, 1, 2, Infinity), true);
  assert.equal(withinBudget(0.001, 1, 1000, 1, 10, 0), false);
  assert.equal(previewBudget({}), 0.05);
  assert.equal(previewBudget({ KILN_PREVIEW_BUDGET: '0.2' }), 0.2);
  assert.equal(previewBudget({ KILN_PREVIEW_BUDGET: 'Infinity' }), Infinity);
  assert.equal(previewBudget({ KILN_PREVIEW_BUDGET: 'lots' }), 0.05);
  assert.equal(previewBudget({ KILN_PREVIEW_BUDGET: '-1' }), 0.05);
});

test('a tiny decoder that does not build gives the linear map and one warning, not a failed image', async () => {
  const model = await load('kiln-tiny');
  const home = homeWith('taesd');
  writeFileSync(join(home, PREVIEWS_DIR, 'taesd', 'config.json'), JSON.stringify({ _class_name: 'AutoencoderTiny', decoder_block_out_channels: [64, 64, 64, 64] }));
  const warnings: string[] = [];
  const first = await run(model, { tinyDecoder: { home }, budget: Infinity, onWarning: (m) => warnings.push(m) });
  assert.deepEqual(first.partials.map((p) => p.decoder), ['linear', 'linear']);
  const second = await run(model, { tinyDecoder: { home }, budget: Infinity, onWarning: (m) => warnings.push(m) });
  assert.equal(second.partials.length, 2);
  assert.equal(warnings.length, 1, warnings.join('\n'));
  assert.match(warnings[0]!, /previews: the tiny decoder in .*taesd does not load \(taesd: .*decoder\.layers\.0\.weight.*\); previews use the linear latent map/);
});
