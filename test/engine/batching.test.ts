/**
 * Step-level batching (unet-batcher.ts): concurrent generations in one thread share one UNet
 * run per step, and every image is byte for byte the one its request makes alone, in every mode
 * (txt2img with and without classifier-free guidance, SDXL's extra inputs, img2img, inpainting
 * with a 9-channel UNet, pose ControlNet), while requests join, leave and are cancelled mid-run.
 * Real models (kiln-tiny, fixtures) and real sessions; the spies only count calls.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import sharp from 'sharp';
import { DiffusionModel } from '../../src/engine/model.js';
import { generate, type GenerateOptions, type GenerateResult } from '../../src/engine/pipeline.js';
import { img2img, prepareInitImage } from '../../src/engine/img2img.js';
import { inpaint, prepareMask } from '../../src/engine/inpaint.js';
import { poseGenerate, type PoseAssets } from '../../src/engine/pose-control.js';
import { loadPoseModels } from '../../src/engine/pose/index.js';
import { OnnxModel, type Feed } from '../../src/engine/onnx.js';
import { encodeGeneratedPng } from '../../src/engine/image-codec.js';
import { GenerationCancelledError } from '../../src/engine/errors.js';
import { UnetBatcher } from '../../src/engine/unet-batcher.js';
import { builtinModelsDir } from '../../src/engine/locate.js';
import { GraphBuilder, serializeModel } from '../../src/graphs/onnx-builder.js';
import { ensureControlNetFixture, ensureFixture, ensurePoseFixture, type FixtureVariant } from '../../tools/fixtures/variants.js';
import type { RgbImage } from '../../src/engine/vae.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { Engine } from '../../src/engine/engine.js';
import { loadImagePrompt } from '../../src/engine/image-prompt.js';
import { GOLDEN_DIR, goldenPath } from '../graphs/golden.js';

const opened: { release(): Promise<void> }[] = [];
after(() => Promise.all(opened.map((m) => m.release())));

const models = new Map<string, Promise<DiffusionModel>>();
function load(dir: string): Promise<DiffusionModel> {
  let m = models.get(dir);
  if (!m) {
    m = DiffusionModel.load(dir).then((model) => (opened.push(model), model));
    models.set(dir, m);
  }
  return m;
}
const kilnTiny = () => load(join(builtinModelsDir(), 'kiln-tiny'));
const fixture = async (variant: FixtureVariant) => load(await ensureFixture(variant));

/** Counts a session's runs and records each run's batch (the leading dimension of `sample`, or of `input`). */
function spy(session: OnnxModel, onRun?: (rows: number) => void, input = 'sample'): number[] {
  const rows: number[] = [];
  const s = session as OnnxModel & { run: OnnxModel['run'] };
  const original = s.run;
  s.run = function (this: OnnxModel, feeds: Record<string, Feed>, outputs: string[]) {
    rows.push(feeds[input]!.dims[0]!);
    onRun?.(feeds[input]!.dims[0]!);
    return original.call(this, feeds, outputs);
  };
  after(() => {
    s.run = original;
  });
  return rows;
}

const png = (r: GenerateResult) => encodeGeneratedPng(r.image, r.settings);

async function assertSameBytes(batched: GenerateResult[], alone: GenerateResult[], what: string): Promise<void> {
  assert.equal(batched.length, alone.length);
  for (let i = 0; i < alone.length; i++) {
    assert.ok((await png(batched[i]!)).equals(await png(alone[i]!)), `${what}: request ${i}'s PNG differs from running alone`);
    assert.ok(Buffer.from(batched[i]!.latents.buffer).equals(Buffer.from(alone[i]!.latents.buffer)), `${what}: request ${i}'s latents differ`);
  }
}

const request = (i: number, extra: Partial<GenerateOptions> = {}): GenerateOptions => ({
  prompt: ['a red circle on a blue background', 'a green square', 'a yellow star at night', 'two grey stones'][i % 4]!,
  seed: 1000 + i,
  size: '256x256',
  steps: 4,
  ...extra,
});

test('concurrent txt2img requests: one UNet run per step for the batch and one VAE decode, each image byte for byte as alone', async () => {
  const model = await kilnTiny();
  const alone = [];
  for (let i = 0; i < 4; i++) alone.push(await generate(model, request(i)));
  const rows = spy(model.unet);
  const decodes = spy(model.vaeDecoder, undefined, 'latent_sample');
  // verify off: the count is exactly one run per step (the check would add one lone round).
  const batcher = new UnetBatcher({ maxBatch: 4, verify: false });
  const batched = await Promise.all([0, 1, 2, 3].map((i) => generate(model, { ...request(i), batcher })));
  assert.deepEqual(rows, [8, 8, 8, 8], 'one UNet run per step, 4 requests x 2 CFG rows');
  assert.deepEqual(decodes, [4], 'the four pictures decoded in one run');
  assert.equal(batcher.stats.runs, 5);
  assert.equal(batcher.stats.calls, 20);
  assert.equal(batcher.stats.largestBatch, 4);
  assert.ok(batched.every((r) => r.unetCalls === 4), 'each request still counts its own 4 steps');
  await assertSameBytes(batched, alone, 'kiln-tiny, CFG');
});

test('batchDecodes false (Kiln\'s threads on CPU): the UNet runs stay batched, each picture is decoded alone, bytes as alone', async () => {
  const model = await kilnTiny();
  const alone = [];
  for (let i = 0; i < 3; i++) alone.push(await generate(model, request(i)));
  const rows = spy(model.unet);
  const decodes = spy(model.vaeDecoder, undefined, 'latent_sample');
  const batcher = new UnetBatcher({ maxBatch: 4, verify: false, batchDecodes: false });
  const batched = await Promise.all([0, 1, 2].map((i) => generate(model, { ...request(i), batcher })));
  assert.deepEqual(rows, [6, 6, 6, 6], 'one UNet run per step, 3 requests x 2 CFG rows');
  assert.deepEqual(decodes, [1, 1, 1], 'three decodes of one picture each');
  assert.equal(batcher.stats.calls, 12, 'decodes do not go through the batcher');
  await assertSameBytes(batched, alone, 'kiln-tiny, decodes alone');
});

test('the first batch of a shape is checked against running alone; without CFG (one row per request) too', async () => {
  const model = await kilnTiny();
  const opts = (i: number) => request(i, { guidanceScale: 1, steps: 3 });
  const alone = [];
  for (let i = 0; i < 3; i++) alone.push(await generate(model, opts(i)));
  const rows = spy(model.unet);
  const batcher = new UnetBatcher({ maxBatch: 8 });
  const batched = await Promise.all([0, 1, 2].map((i) => generate(model, { ...opts(i), batcher })));
  // Step 1: the batched run and its check (each call alone); steps 2 and 3: one run each.
  assert.deepEqual(rows, [3, 1, 1, 1, 3, 3]);
  // Checked: the UNet's shape and the VAE decoder's (the three pictures decoded together).
  assert.deepEqual({ checks: batcher.stats.checks, inexact: batcher.stats.inexact }, { checks: 2, inexact: 0 });
  await assertSameBytes(batched, alone, 'kiln-tiny, guidance 1');
});

test('join and leave mid-run: different step counts and a request that starts while others are denoising', async () => {
  const model = await kilnTiny();
  // A: CFG (2 rows), 12 steps. B: guidance 1 (1 row), 2 steps, leaves early. C: 1 row, 4 steps,
  // starts once A has done 4 steps (B has left by then).
  const a = request(0, { steps: 12 });
  const b = request(1, { steps: 2, guidanceScale: 1 });
  const c = request(2, { steps: 4, guidanceScale: 1 });
  const alone = [await generate(model, a), await generate(model, b), await generate(model, c)];
  let aStep = 0;
  const runs: { rows: number; aStep: number }[] = [];
  spy(model.unet, (rows) => runs.push({ rows, aStep }));
  const batcher = new UnetBatcher({ maxBatch: 8 });
  let late: Promise<GenerateResult> | undefined;
  const first = generate(model, {
    ...a,
    batcher,
    onProgress: (p) => {
      if (p.stage !== 'denoise') return;
      aStep = p.step;
      if (p.step === 4) late = generate(model, { ...c, batcher });
    },
  });
  const second = generate(model, { ...b, batcher });
  const [ra, rb] = await Promise.all([first, second]);
  const rc = await late!;
  await assertSameBytes([ra, rb, rc], alone, 'join/leave');
  assert.ok(runs.some((r) => r.rows === 3 && r.aStep < 2), 'B ran in a batch with A');
  assert.ok(runs.some((r) => r.rows === 3 && r.aStep >= 4), 'C joined A mid-run');
  assert.ok(runs.some((r) => r.rows === 2 && r.aStep >= 4), 'A went on alone after C left');
  assert.equal(runs.filter((r) => r.rows === 3).length, 2 + 4, 'every step of B and C shared a run with A');
});

test('a request cancelled mid-batch leaves it; the others finish byte for byte as alone', async () => {
  const model = await kilnTiny();
  const opts = [request(0, { steps: 5 }), request(1, { steps: 5 }), request(2, { steps: 5 })];
  const alone = [];
  for (const o of opts) alone.push(await generate(model, o));
  const rows = spy(model.unet);
  const batcher = new UnetBatcher({ maxBatch: 8, verify: false });
  const controller = new AbortController();
  const runs = opts.map((o, i) =>
    generate(model, {
      ...o,
      batcher,
      ...(i === 1
        ? { signal: controller.signal, onProgress: (p: { stage: string; step: number }) => p.stage === 'denoise' && p.step === 2 && controller.abort() }
        : {}),
    }),
  );
  await assert.rejects(runs[1]!, GenerationCancelledError);
  const done = await Promise.all([runs[0]!, runs[2]!]);
  await assertSameBytes(done, [alone[0]!, alone[2]!], 'after a cancel');
  assert.deepEqual(rows, [6, 6, 4, 4, 4], 'the cancelled request left after its second step');
});

test('SDXL inputs (text_embeds, time_ids) and different sizes: same-size requests batch, others run beside them', async () => {
  const model = await fixture('sdxl');
  const opts = [request(0), request(1), request(2, { size: '320x256' })];
  const alone = [];
  for (const o of opts) alone.push(await generate(model, o));
  const rows = spy(model.unet);
  const batcher = new UnetBatcher({ maxBatch: 8, verify: false });
  const batched = await Promise.all(opts.map((o) => generate(model, { ...o, batcher })));
  await assertSameBytes(batched, alone, 'SDXL fixture');
  assert.deepEqual([...rows].sort(), [2, 2, 2, 2, 4, 4, 4, 4], 'the two 256x256 requests share each step; the 320x256 one runs alone');
});

test('img2img with different strengths (timesteps differ per row) and inpainting with a 9-channel UNet batch exactly', async () => {
  const solid = await sharp({ create: { width: 256, height: 256, channels: 3, background: '#2a9a4a' } }).png().toBuffer();
  const image = await prepareInitImage(solid, 256, 256);
  const tiny = await kilnTiny();
  const i2i = [request(0, { steps: 6 }), request(1, { steps: 6 })].map((o, i) => ({ ...o, image, strength: i ? 0.5 : 0.8 }));
  const alone = [];
  for (const o of i2i) alone.push(await img2img(tiny, o));
  const rows = spy(tiny.unet);
  const batcher = new UnetBatcher({ maxBatch: 8 });
  await assertSameBytes(await Promise.all(i2i.map((o) => img2img(tiny, { ...o, batcher }))), alone, 'img2img');
  assert.ok(rows.includes(4), 'the two img2img requests shared runs');

  const model = await fixture('sd15-inpaint9');
  const maskPng = await sharp({ create: { width: 256, height: 256, channels: 3, background: '#000000' } })
    .composite([{ input: await sharp({ create: { width: 64, height: 64, channels: 3, background: '#ffffff' } }).png().toBuffer(), left: 96, top: 96 }])
    .png()
    .toBuffer();
  const mask = await prepareMask(maskPng, 256, 256);
  const inp = [request(0), request(1)].map((o) => ({ ...o, image, mask }));
  const aloneInp = [];
  for (const o of inp) aloneInp.push(await inpaint(model, o));
  const unet = (await model.inpaintUnet())!;
  const inpRows = spy(unet);
  await assertSameBytes(await Promise.all(inp.map((o) => inpaint(model, { ...o, batcher }))), aloneInp, 'inpainting (9 channels)');
  assert.ok(inpRows.includes(4), 'the two inpainting requests shared runs');
});

/** A "person" for the stand-in detector: a bright upright rectangle on a dark picture. */
function personPicture(width = 320, height = 320): RgbImage {
  const pixels = new Uint8Array(width * height * 3).fill(20);
  for (let y = 60; y < 280; y++) for (let x = 120; x < 200; x++) pixels.fill(240, (y * width + x) * 3, (y * width + x) * 3 + 3);
  return { width, height, pixels };
}

test('pose ControlNet: the ControlNet and its UNet both run once per step for the batch; bytes as alone', async () => {
  const model = await fixture('sd15-controlnet');
  const dir = await ensureControlNetFixture('sd15-openpose');
  const controlNet = await OnnxModel.load(join(dir, 'model.onnx'), dir);
  const { detector, poseNet } = await loadPoseModels(await ensurePoseFixture());
  opened.push(controlNet, detector, poseNet);
  const assets: PoseAssets = { controlNet, detector, poseNet };
  const opts = [request(0, { steps: 3 }), request(1, { steps: 3 })].map((o) => ({ ...o, image: personPicture(), controlScale: 0.8 }));
  const alone = [];
  for (const o of opts) alone.push(await poseGenerate(model, assets, o));
  const controlRows = spy(controlNet);
  const unetRows = spy((await model.controlUnet())!);
  const batcher = new UnetBatcher({ maxBatch: 8, verify: false });
  const batched = await Promise.all(opts.map((o) => poseGenerate(model, assets, { ...o, batcher })));
  await assertSameBytes(batched, alone, 'pose');
  assert.deepEqual(controlRows, [4, 4, 4]);
  assert.deepEqual(unetRows, [4, 4, 4]);
  // A different conditioning scale (a shared input of the ControlNet): its ControlNet calls run apart.
  controlRows.length = 0;
  await Promise.all([poseGenerate(model, assets, { ...opts[0]!, batcher }), poseGenerate(model, assets, { ...opts[1]!, controlScale: 0.5, batcher })]);
  assert.deepEqual(controlRows, [2, 2, 2, 2, 2, 2]);
});

/** A graph whose rows depend on the whole batch (y = x + mean over the batch), and one with a shared `[1]` input (y = x * t). */
async function tinyGraphs(): Promise<{ mixing: OnnxModel; scaled: OnnxModel }> {
  const mix = new GraphBuilder('mixing');
  const x = mix.input('sample', 'float32', ['batch', 4]);
  mix.output('y', 'float32', ['batch', 4]);
  mix.op('Add', [x, mix.op('ReduceMean', [x], { axes: [0], keepdims: 1 })], {}, 'y');
  const sc = new GraphBuilder('scaled');
  const s = sc.input('sample', 'float32', ['batch', 4]);
  const t = sc.input('timestep', 'float32', [1]);
  sc.output('y', 'float32', ['batch', 4]);
  sc.op('Mul', [s, t], {}, 'y');
  const mixing = await OnnxModel.fromBytes(serializeModel(mix.toModel()).model, 'mixing.onnx', 'mixing.onnx');
  const scaled = await OnnxModel.fromBytes(serializeModel(sc.toModel()).model, 'scaled.onnx', 'scaled.onnx');
  opened.push(mixing, scaled);
  return { mixing, scaled };
}

const rowOf = (v: number) => ({ data: Float32Array.of(v, v + 1, v + 2, v + 3), dims: [1, 4] });

test('a batch shape whose rows differ from running alone is never batched: the callers get the lone results', async () => {
  const { mixing } = await tinyGraphs();
  const batcher = new UnetBatcher({ maxBatch: 8 });
  const ask = () => Promise.all([1, 10, 100].map((v) => batcher.run(mixing, { sample: rowOf(v) }, ['y'], { rows: 1 })));
  for (let round = 0; round < 2; round++) {
    const out = await ask();
    // Alone, the mean over the batch is the row itself: y = 2x.
    out.forEach((o, i) => assert.deepEqual([...o.y!.data], [...rowOf([1, 10, 100][i]!).data].map((v) => 2 * v)));
  }
  assert.deepEqual({ checks: batcher.stats.checks, inexact: batcher.stats.inexact, batchedRuns: batcher.stats.batchedRuns }, { checks: 1, inexact: 1, batchedRuns: 1 });
  assert.equal(batcher.stats.runs, 1 + 3 + 3, 'one batched run and its check, then every call alone');
});

test('inputs without a batch dimension must be equal to share a run; maxBatch bounds a run', async () => {
  const { scaled } = await tinyGraphs();
  const batcher = new UnetBatcher({ maxBatch: 2, verify: false });
  const ts = [1, 1, 2, 2, 2];
  const out = await Promise.all(ts.map((t, i) => batcher.run(scaled, { sample: rowOf(i), timestep: { data: Float32Array.of(t), dims: [1] } }, ['y'], { rows: 1 })));
  out.forEach((o, i) => assert.deepEqual([...o.y!.data], [...rowOf(i).data].map((v) => v * ts[i]!)));
  // t=1: one run of 2; t=2: a run of 2 and one of 1.
  assert.deepEqual({ runs: batcher.stats.runs, batchedRuns: batcher.stats.batchedRuns, largestBatch: batcher.stats.largestBatch }, { runs: 3, batchedRuns: 2, largestBatch: 2 });
  // A call whose request was cancelled before its run is dropped, not run.
  const controller = new AbortController();
  controller.abort();
  const feeds = { sample: rowOf(0), timestep: { data: Float32Array.of(1), dims: [1] } };
  const [kept, dropped] = await Promise.allSettled([
    batcher.run(scaled, feeds, ['y'], { rows: 1 }),
    batcher.run(scaled, feeds, ['y'], { rows: 1, signal: controller.signal }),
  ]);
  assert.equal(kept.status, 'fulfilled');
  assert.ok(dropped.status === 'rejected' && dropped.reason instanceof GenerationCancelledError);
  assert.equal(batcher.stats.runs, 4);
  // A call the graph refuses fails alone: the run it was batched into is retried call by call.
  const bad = { sample: { data: new Float32Array(5), dims: [1, 4] }, timestep: feeds.timestep };
  const [good, refused] = await Promise.allSettled([batcher.run(scaled, feeds, ['y'], { rows: 1 }), batcher.run(scaled, bad, ['y'], { rows: 1 })]);
  assert.equal(good.status, 'fulfilled');
  assert.deepEqual([...(good as PromiseFulfilledResult<Record<string, { data: Float32Array }>>).value.y!.data], [0, 1, 2, 3]);
  assert.ok(refused.status === 'rejected' && /5 values/.test(String(refused.reason)), String((refused as PromiseRejectedResult).reason));
});

test('a batch that fails as a whole while its calls succeed alone is not tried again at that size', async () => {
  // Reshape to [1, 4]: fine for one row, an error for a batch.
  const g = new GraphBuilder('one-row');
  const x = g.input('sample', 'float32', ['batch', 4]);
  g.output('y', 'float32', [1, 4]);
  g.op('Reshape', [x, g.constI64([1, 4])], {}, 'y');
  const oneRow = await OnnxModel.fromBytes(serializeModel(g.toModel()).model, 'one-row.onnx', 'one-row.onnx');
  opened.push(oneRow);
  const batcher = new UnetBatcher({ maxBatch: 8 });
  for (let round = 0; round < 2; round++) {
    const out = await Promise.all([1, 2].map((v) => batcher.run(oneRow, { sample: rowOf(v) }, ['y'], { rows: 1 })));
    out.forEach((o, i) => assert.deepEqual([...o.y!.data], [...rowOf(i + 1).data]));
  }
  assert.equal(batcher.stats.runs, 1 + 2 + 2, 'the failed batched run, its calls alone; then alone straight away');
});

test('image prompts (ip_tokens per row, ip_scale shared): the same weight batches, another weight runs apart; bytes as alone', async () => {
  const cacheDir = mkdtempSync(join(tmpdir(), 'kiln-batching-ip-'));
  const engine = new Engine({ cacheDir, searchDirs: [] });
  after(async () => {
    await engine.close();
    rmSync(cacheDir, { recursive: true, force: true });
  });
  const model = await engine.model(join(GOLDEN_DIR, 'pipelines', 'sd15'));
  const runner = await loadImagePrompt(
    model,
    [{ adapter: goldenPath('ip_adapter/IP-Adapter/models/ip-adapter_sd15.safetensors'), imageEncoder: goldenPath('ip_adapter/IP-Adapter/models/image_encoder') }],
    engine,
  );
  opened.push(runner);
  const image = personPicture(96, 96);
  const opts = [0.6, 0.6, 0.3].map((scale, i) => ({ ...request(i, { steps: 3, size: '256x256' }), imagePrompt: { runner, image, scale } }));
  const alone = [];
  for (const o of opts) alone.push(await generate(model, o));
  const rows = spy(runner.unet);
  const batcher = new UnetBatcher({ maxBatch: 8, verify: false });
  await assertSameBytes(await Promise.all(opts.map((o) => generate(model, { ...o, batcher }))), alone, 'image prompts');
  assert.deepEqual([...rows].sort(), [2, 2, 2, 4, 4, 4], 'the two requests at weight 0.6 share each step; the one at 0.3 runs apart');
});
