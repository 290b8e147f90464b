/**
 * The Engine's model cache with `maxModels`: idle models are unloaded least recently used first
 * (their sessions released), a model a lease holds is never unloaded, `model()` keeps one for the
 * engine's life, a replaced folder's old model goes once idle, and a model loaded again draws the
 * same bytes; an unloaded model's image prompt sessions go with it; with `unloadAfterMs` models
 * and pose networks unused that long go. On the shipped kiln-tiny models (real ONNX graphs), the
 * golden SD 1.5 pipeline with the golden IP-Adapter, and the ControlNet / DWPose fixtures.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, rmSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Engine } from '../../src/engine/engine.js';
import { builtinModelsDir } from '../../src/engine/locate.js';
import { generate } from '../../src/engine/pipeline.js';
import type { DiffusionModel } from '../../src/engine/model.js';
import { JobEngine, type EngineJob } from '../../src/engine/run-job.js';
import sharp from 'sharp';
import { GOLDEN_DIR } from '../graphs/golden.js';
import { ensureControlNetFixture, ensureFixture, ensurePoseFixture } from '../../tools/fixtures/variants.js';

const draw = async (model: DiffusionModel) => Buffer.from((await generate(model, { prompt: 'a red kiln', seed: 7, size: '256x256', steps: 2 })).latents.buffer);

/** Every session a loaded model holds now. */
const sessions = (m: DiffusionModel) => [m.textEncoder, m.textEncoder2, m.unet, m.vaeDecoder].filter((s) => s !== undefined);

function engineWith(maxModels: number | undefined, searchDirs = [builtinModelsDir()]) {
  const unloaded: string[] = [];
  const engine = new Engine({ searchDirs, maxModels, onUnload: (name) => unloaded.push(name) });
  return { engine, unloaded };
}

test('maxModels 1: the idle model is unloaded (sessions released) to load the next; loaded again, it draws the same bytes', async () => {
  const { engine, unloaded } = engineWith(1);
  const seen: DiffusionModel[] = [];
  engine.onModelUnloaded((m) => seen.push(m));
  try {
    const a = await engine.lease('kiln-tiny');
    const first = await draw(a.model);
    a.release();
    assert.equal(engine.loadedModels, 1, 'released, it stays loaded while within the bound');
    const b = await engine.lease('kiln-tiny-xl');
    assert.deepEqual(unloaded, ['kiln-tiny'], 'the idle one is unloaded for the next');
    assert.deepEqual(seen, [a.model]);
    assert.ok(sessions(a.model).every((s) => s.released), 'its sessions are released');
    assert.equal(engine.loadedModels, 1);
    await draw(b.model);
    b.release();
    const again = await engine.lease('kiln-tiny');
    assert.notEqual(again.model, a.model, 'loaded afresh');
    assert.ok(sessions(again.model).every((s) => !s.released));
    assert.ok((await draw(again.model)).equals(first), 'the same bytes as before it was unloaded');
    again.release();
    assert.deepEqual(unloaded, ['kiln-tiny', 'kiln-tiny-xl']);
  } finally {
    await engine.close();
  }
});

test('a model in use is never unloaded: the cache holds more than maxModels until the lease ends', async () => {
  const { engine, unloaded } = engineWith(1);
  try {
    const a = await engine.lease('kiln-tiny');
    const b = await engine.lease('kiln-tiny-xl');
    assert.equal(engine.loadedModels, 2);
    assert.deepEqual(unloaded, []);
    // Both run while both are held (no session was released under either).
    await Promise.all([draw(a.model), draw(b.model)]);
    const again = await engine.lease('kiln-tiny');
    assert.equal(again.model, a.model, 'a second lease of a loaded model shares it');
    a.release();
    assert.deepEqual(unloaded, [], 'still leased once more');
    again.release();
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(unloaded, ['kiln-tiny'], 'the least recently used idle model goes when the last lease ends');
    assert.equal(engine.loadedModels, 1);
    a.release(); // twice: harmless
    b.release();
    assert.equal(engine.loadedModels, 1, 'kiln-tiny-xl, idle, within the bound');
  } finally {
    await engine.close();
  }
});

test('model() keeps its model for the engine\'s life; without maxModels nothing is unloaded', async () => {
  const { engine, unloaded } = engineWith(1);
  try {
    const pinned = await engine.model('kiln-tiny');
    assert.equal(await engine.model('kiln-tiny'), pinned);
    const b = await engine.lease('kiln-tiny-xl');
    b.release();
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(unloaded, ['kiln-tiny-xl'], 'the pinned one stays; the other goes once idle');
    await draw(pinned);
  } finally {
    await engine.close();
  }
  const unbounded = engineWith(undefined);
  try {
    for (const name of ['kiln-tiny', 'kiln-tiny-xl', 'kiln-tiny']) (await unbounded.engine.lease(name)).release();
    assert.equal(unbounded.engine.loadedModels, 2);
    assert.deepEqual(unbounded.unloaded, []);
  } finally {
    await unbounded.engine.close();
  }
});

test('a replaced folder: the old model is unloaded once its lease ends, the new one serves', async () => {
  const home = mkdtempSync(join(tmpdir(), 'kiln-model-cache-'));
  const { engine, unloaded } = engineWith(4, [home]);
  try {
    cpSync(join(builtinModelsDir(), 'kiln-tiny'), join(home, 'demo'), { recursive: true });
    const old = await engine.lease('demo');
    const before = await draw(old.model);
    // A re-pull: a new model_index.json (another modification time).
    const later = new Date(Date.now() + 5_000);
    utimesSync(join(home, 'demo', 'model_index.json'), later, later);
    const fresh = await engine.lease('demo');
    assert.notEqual(fresh.model, old.model);
    assert.deepEqual(unloaded, [], 'the old one is still running a request');
    assert.ok((await draw(old.model)).equals(before));
    old.release();
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(unloaded, ['demo'], 'freed once idle, though within maxModels');
    assert.ok(sessions(old.model).every((s) => s.released));
    assert.ok((await draw(fresh.model)).equals(before));
    fresh.release();
    assert.equal(engine.loadedModels, 1);
  } finally {
    await engine.close();
    rmSync(home, { recursive: true, force: true });
  }
});

test('JobEngine: an unloaded model\'s image prompt (adapter UNet, image encoder) is released with it; the next job loads both again, same bytes', async () => {
  const scratch = mkdtempSync(join(tmpdir(), 'kiln-model-cache-ip-'));
  const unloaded: string[] = [];
  const engine = new Engine({ searchDirs: [builtinModelsDir()], cacheDir: join(scratch, 'cache'), maxModels: 1, onUnload: (name) => unloaded.push(name), onWarning: () => {} });
  const jobs = new JobEngine(engine, 'cpu');
  try {
    const IP = join(GOLDEN_DIR, 'ip_adapter', 'IP-Adapter', 'models');
    const image = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 200, g: 90, b: 30 } } }).png().toBuffer();
    const styled: EngineJob = {
      mode: 'image_prompt',
      model: { dir: join(GOLDEN_DIR, 'pipelines', 'sd15'), name: 'sd15' },
      options: { prompt: 'a lighthouse', seed: 3, size: '256x256', steps: 1 },
      image,
      imagePrompt: { adapters: [{ adapter: join(IP, 'ip-adapter_sd15.safetensors'), imageEncoder: join(IP, 'image_encoder'), weight: 0.6 }] },
      output: { format: 'png' },
    };
    const first = await jobs.run(styled);
    assert.equal(jobs.loadedImagePrompts, 1);
    await jobs.run({ mode: 'generate', model: { dir: join(builtinModelsDir(), 'kiln-tiny'), name: 'kiln-tiny' }, options: { prompt: 'a kiln', seed: 1, size: '256x256', steps: 1 }, output: { format: 'png' } });
    assert.deepEqual(unloaded, ['sd15']);
    assert.equal(jobs.loadedImagePrompts, 0, 'its image prompt went with it');
    const again = await jobs.run(styled);
    assert.ok(again.bytes.equals(first.bytes), 'loaded again: the same image');
    assert.deepEqual(unloaded, ['sd15', 'kiln-tiny']);
  } finally {
    await jobs.close();
    rmSync(scratch, { recursive: true, force: true });
  }
});

/** Polls `check` every 20 ms until it holds (a state, never a fixed wait), for at most 10 s. */
async function until(check: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (check()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.fail(`gave up waiting for ${what}`);
}

test('unloadAfterMs: a model nobody uses is unloaded once idle that long; one still leased is not, however long it runs', async () => {
  const unloaded: string[] = [];
  const engine = new Engine({ searchDirs: [builtinModelsDir()], unloadAfterMs: 150, onUnload: (name, why) => unloaded.push(`${name}:${why}`) });
  try {
    const idle = await engine.lease('kiln-tiny');
    const busy = await engine.lease('kiln-tiny-xl');
    idle.release();
    await until(() => unloaded.length > 0, 'the idle model to be unloaded');
    assert.deepEqual(unloaded, ['kiln-tiny:idle']);
    assert.ok(sessions(idle.model).every((s) => s.released));
    // The leased one has been held past the idle time meanwhile, and runs.
    await draw(busy.model);
    await draw(busy.model);
    assert.deepEqual(unloaded, ['kiln-tiny:idle'], 'a leased model is not idle');
    busy.release();
    await until(() => unloaded.length > 1, 'the second model to be unloaded once released');
    assert.deepEqual(unloaded, ['kiln-tiny:idle', 'kiln-tiny-xl:idle']);
    assert.equal(engine.loadedModels, 0);
    const again = await engine.lease('kiln-tiny');
    assert.notEqual(again.model, idle.model, 'loaded afresh');
    again.release();
  } finally {
    await engine.close();
  }
});

test('JobEngine with unloadAfterMs: the pose networks (ControlNet, DWPose) held by a job stay; unused that long they go, and come back for the next pose job', async () => {
  const unloaded: string[] = [];
  // Long enough that the networks, released at the end of the denoising, are still there when the job returns (PNG encoding comes after).
  const engine = new Engine({ searchDirs: [], unloadAfterMs: 1000, onUnload: (name) => unloaded.push(name) });
  const jobs = new JobEngine(engine, 'cpu');
  try {
    const controlNetDir = await ensureControlNetFixture('sd15-openpose');
    // A bright upright rectangle on a dark picture: a "person" for the stand-in detector.
    const person = await sharp({ create: { width: 320, height: 320, channels: 3, background: { r: 20, g: 20, b: 20 } } })
      .composite([{ input: { create: { width: 80, height: 220, channels: 3, background: { r: 240, g: 240, b: 240 } } }, left: 120, top: 60 }])
      .png()
      .toBuffer();
    const posed: EngineJob = {
      mode: 'pose',
      model: { dir: await ensureFixture('sd15-controlnet'), name: 'posed' },
      options: { prompt: 'a dancer', seed: 11, size: '256x256', steps: 2 },
      image: person,
      pose: { scale: 1, controlNet: join(controlNetDir, 'model.onnx'), dwpose: await ensurePoseFixture() },
      output: { format: 'png' },
    };
    const first = await jobs.run(posed);
    assert.equal(first.people, 1);
    await until(() => jobs.loadedPoseNetworks === 0 && unloaded.includes('posed'), 'the model and its pose networks to be unloaded');
    const again = await jobs.run(posed);
    assert.ok(again.bytes.equals(first.bytes), 'loaded again: the same image');
    assert.ok(again.pose!.equals(first.pose!), 'and the same skeleton');
    assert.equal(jobs.loadedPoseNetworks, 2, 'ControlNet and DWPose back while recently used');
  } finally {
    await jobs.close();
  }
});
