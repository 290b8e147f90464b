/**
 * Models that declare a native size (kiln.json `native_size`): every mode denoises at the native
 * area with the request's aspect ratio and resizes the decoded picture (Lanczos 3) to the
 * request; edits bring their input down first and paste unmasked pixels back at the request's
 * size. The built-in kiln-tiny models (native 256) and a pose fixture given a kiln.json.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { DiffusionModel, detectLayout } from '../../src/engine/model.js';
import { denoiseSize, generate, resolveSettings } from '../../src/engine/pipeline.js';
import { img2img } from '../../src/engine/img2img.js';
import { inpaint } from '../../src/engine/inpaint.js';
import { nativeWorkingSize, resolveSize } from '../../src/engine/presets.js';
import { builtinModelsDir } from '../../src/engine/locate.js';
import { ModelLoadError } from '../../src/engine/errors.js';
import { parametersText } from '../../src/engine/image-codec.js';
import { renderWorldImage } from '../../bench/tiny-world.js';
import { OnnxModel, type Feed } from '../../src/engine/onnx.js';
import { poseGenerate } from '../../src/engine/pose-control.js';
import { loadPoseModels } from '../../src/engine/pose/index.js';
import { ensureControlNetFixture, ensureFixture, ensurePoseFixture } from '../../tools/fixtures/variants.js';
import type { RgbImage } from '../../src/engine/vae.js';

const opened: { release(): Promise<void> }[] = [];
const temps: string[] = [];
after(async () => {
  await Promise.all(opened.map((m) => m.release()));
  for (const dir of temps) rmSync(dir, { recursive: true, force: true });
});

const loaded = new Map<string, Promise<DiffusionModel>>();
function tiny(name: 'kiln-tiny' | 'kiln-tiny-xl'): Promise<DiffusionModel> {
  let p = loaded.get(name);
  if (!p) {
    p = DiffusionModel.load(join(builtinModelsDir(), name)).then((m) => (opened.push(m), m));
    loaded.set(name, p);
  }
  return p;
}

/** A model folder that is `source` (every entry linked) with its own kiln.json, or none. */
function withKilnJson(source: string, kilnJson: unknown): string {
  const dir = mkdtempSync(join(tmpdir(), 'kiln-native-'));
  temps.push(dir);
  for (const entry of readdirSync(source)) if (entry !== 'kiln.json') symlinkSync(join(source, entry), join(dir, entry));
  if (kilnJson !== undefined) writeFileSync(join(dir, 'kiln.json'), JSON.stringify(kilnJson));
  return dir;
}

/** The same resize the engine promises: Lanczos 3 to exactly width x height. */
async function lanczos(image: RgbImage, width: number, height: number): Promise<Uint8Array> {
  const data = await sharp(image.pixels, { raw: { width: image.width, height: image.height, channels: 3 } })
    .resize(width, height, { fit: 'fill', kernel: 'lanczos3' })
    .raw()
    .toBuffer();
  return new Uint8Array(data);
}

/** Records the `sample` dims of each UNet call until restore(). */
function sampleDims(unet: OnnxModel): { seen: number[][]; restore: () => void } {
  const seen: number[][] = [];
  const run = unet.run.bind(unet);
  unet.run = (feeds: Record<string, Feed>, out: string[]) => {
    seen.push(feeds.sample!.dims);
    return run(feeds, out);
  };
  return { seen, restore: () => void (unet.run = run) };
}

test('nativeWorkingSize: native area, the request aspect ratio, sides in multiples of 64', () => {
  const n256 = { width: 256, height: 256 };
  for (const side of [256, 512, 1024, 2048]) assert.deepEqual(nativeWorkingSize({ width: side, height: side }, n256), n256);
  assert.deepEqual(nativeWorkingSize({ width: 1792, height: 1024 }, n256), { width: 320, height: 192 });
  assert.deepEqual(nativeWorkingSize({ width: 1024, height: 1792 }, n256), { width: 192, height: 320 });
  assert.deepEqual(nativeWorkingSize({ width: 1536, height: 1024 }, n256), { width: 320, height: 192 });
  assert.deepEqual(nativeWorkingSize({ width: 1024, height: 1536 }, n256), { width: 192, height: 320 });
  assert.deepEqual(nativeWorkingSize({ width: 2048, height: 256 }, n256), { width: 768, height: 128 }, 'the closest aspect ratio of the roundings');
  assert.deepEqual(nativeWorkingSize({ width: 2048, height: 256 }, { width: 64, height: 64 }), { width: 192, height: 64 }, 'at least one step a side');
  assert.deepEqual(nativeWorkingSize({ width: 1344, height: 768 }, { width: 1024, height: 1024 }), { width: 1344, height: 768 });
  assert.deepEqual(nativeWorkingSize({ width: 256, height: 256 }, { width: 512, height: 512 }), { width: 512, height: 512 }, 'smaller requests too');
});

test('kiln.json native_size: a side or "WxH", multiples of 64; it is also what `auto` means; bad values fail the load', () => {
  const source = join(builtinModelsDir(), 'kiln-tiny');
  assert.deepEqual(detectLayout(source).defaults.nativeSize, { width: 256, height: 256 }, 'the built-in models declare 256');
  assert.deepEqual(detectLayout(join(builtinModelsDir(), 'kiln-tiny-xl')).defaults.nativeSize, { width: 256, height: 256 });

  const none = detectLayout(withKilnJson(source, undefined));
  assert.equal(none.defaults.nativeSize, undefined);
  assert.deepEqual(none.nativeSize, { width: 256, height: 256 }, 'sample_size x 8 still names `auto`');
  assert.deepEqual(denoiseSize({ layout: none }, { width: 1024, height: 1024 }), { width: 1024, height: 1024 }, 'undeclared: denoised as asked');

  const wide = detectLayout(withKilnJson(source, { native_size: '384x256', steps: { smooth: 20 } }));
  assert.deepEqual(wide.defaults.nativeSize, { width: 384, height: 256 });
  assert.deepEqual(resolveSize('auto', wide), { width: 384, height: 256 });
  assert.equal(wide.defaults.steps.smooth, 20, 'other keys still read');
  assert.deepEqual(denoiseSize({ layout: wide }, { width: 768, height: 512 }), { width: 384, height: 256 });
  assert.deepEqual(denoiseSize({ layout: wide }, { width: 1024, height: 1024 }), { width: 320, height: 320 });

  for (const bad of [100, 0, -256, 256.5, '256', '256x100', [256, 256], { width: 256 }, null, true]) {
    assert.throws(() => detectLayout(withKilnJson(source, { native_size: bad })), (e: unknown) => {
      assert.ok(e instanceof ModelLoadError);
      assert.match(e.message, /native_size.*multiple of 64/);
      return true;
    }, JSON.stringify(bad));
  }
});

test('kiln-tiny-xl at 1024x1024 is its 256x256 picture resized with Lanczos 3, byte for byte; settings keep 1024x1024', async () => {
  const m = await tiny('kiln-tiny-xl');
  const seen: Feed[] = [];
  const run = m.unet.run.bind(m.unet);
  m.unet.run = (feeds: Record<string, Feed>, out: string[]) => {
    seen.push(feeds.time_ids!, feeds.sample!);
    return run(feeds, out);
  };
  try {
    const options = { prompt: 'a large red circle at the left on a blue background', seed: 5, steps: 8 };
    const small = await generate(m, { ...options, size: '256x256' });
    assert.equal(small.settings.nativeSize, undefined, '256 is native: nothing to say');
    seen.length = 0;
    const big = await generate(m, { ...options, size: '1024x1024' });
    assert.equal(big.image.width, 1024);
    assert.equal(big.image.height, 1024);
    assert.deepEqual(big.image.pixels, await lanczos(small.image, 1024, 1024));
    assert.deepEqual(big.latents, small.latents);
    assert.deepEqual(Array.from((seen[0] as { data: Float32Array }).data), [256, 256, 0, 0, 256, 256, 256, 256, 0, 0, 256, 256], 'SDXL size conditioning: the size drawn');
    assert.deepEqual(seen[1]!.dims, [2, 4, 32, 32]);
    assert.equal(big.settings.width, 1024);
    assert.equal(big.settings.height, 1024);
    assert.equal(big.settings.nativeSize, '256x256');
    assert.match(parametersText(big.settings), /Size: 1024x1024/);
    assert.deepEqual(resolveSettings(m, { ...options, size: '1024x1024' }), big.settings);
  } finally {
    m.unet.run = run;
  }
});

test('kiln-tiny: a wide request is drawn at 320x192 and comes back at 1536x1024', async () => {
  const m = await tiny('kiln-tiny');
  const spy = sampleDims(m.unet);
  const r = await generate(m, { prompt: 'a small yellow triangle at the top', seed: 3, steps: 4, size: '1536x1024' }).finally(spy.restore);
  assert.deepEqual(spy.seen[0], [2, 4, 24, 40]);
  assert.equal(r.image.width, 1536);
  assert.equal(r.image.height, 1024);
  assert.equal(r.image.pixels.length, 1536 * 1024 * 3);
  assert.equal(r.settings.width, 1536);
  assert.equal(r.settings.height, 1024);
  assert.equal(r.settings.nativeSize, '320x192');
});

/** A world picture at `size` (rendered at 256 and scaled, as an upload would be). */
async function worldPicture(size: number): Promise<RgbImage> {
  const pixels = renderWorldImage({ bg: 2, fg: 0, shape: 1, size: 1, pos: 0 }, 256); // large red square on blue
  const image = { width: 256, height: 256, pixels };
  return { width: size, height: size, pixels: await lanczos(image, size, size) };
}

test('kiln-tiny image-to-image at 512: the input brought down to 256, the result up; it keeps the picture', async () => {
  const m = await tiny('kiln-tiny');
  const input = await worldPicture(512);
  const options = { prompt: 'a large red square on a blue background', seed: 21, steps: 10, strength: 0.3 };
  const r = await img2img(m, { ...options, size: '512x512', image: input });
  assert.equal(r.settings.width, 512);
  assert.equal(r.settings.nativeSize, '256x256');
  assert.equal(r.settings.strength, 0.3);
  const down = { width: 256, height: 256, pixels: await lanczos(input, 256, 256) };
  const native = await img2img(m, { ...options, size: '256x256', image: down });
  assert.deepEqual(r.image.pixels, await lanczos(native.image, 512, 512), 'the 256 edit of the downsized input, resized');
  let diff = 0;
  for (let i = 0; i < input.pixels.length; i++) diff += Math.abs(r.image.pixels[i]! - input.pixels[i]!);
  assert.ok(diff / input.pixels.length < 20, `mean |diff| ${diff / input.pixels.length}`);
});

test('kiln-tiny inpainting at 512: unmasked pixels are the input\'s own, the hole is repainted', async () => {
  const m = await tiny('kiln-tiny');
  const S = 512;
  const input = await worldPicture(S);
  const lo = 96, hi = 416;
  const mask = new Float32Array(S * S);
  for (let y = lo; y < hi; y++) mask.fill(1, y * S + lo, y * S + hi);
  const r = await inpaint(m, { prompt: 'a large yellow circle on a blue background', seed: 9, steps: 10, size: `${S}x${S}`, image: input, mask });
  assert.equal(r.image.width, S);
  assert.equal(r.settings.width, S);
  assert.equal(r.settings.nativeSize, '256x256');
  const margin = 12; // the blend-back mask is softened across the edge (sigma 3 at the output size)
  let outsideMax = 0, insideSum = 0, insideN = 0;
  for (let y = 0; y < S; y++) {
    for (let x = 0; x < S; x++) {
      const i = (y * S + x) * 3;
      const d = Math.max(...[0, 1, 2].map((c) => Math.abs(r.image.pixels[i + c]! - input.pixels[i + c]!)));
      const near = (v: number, k: number) => v >= lo - k && v < hi + k;
      if (!(near(x, margin) && near(y, margin))) outsideMax = Math.max(outsideMax, d);
      else if (near(x, -margin) && near(y, -margin)) {
        insideSum += d;
        insideN++;
      }
    }
  }
  assert.equal(outsideMax, 0, 'unmasked pixels unchanged');
  assert.ok(insideSum / insideN > 40, `inside mean |diff| ${insideSum / insideN}`);
});

test('pose at 512 on a model declaring native_size 256: skeleton and picture at 512, ControlNet and UNet at 256', async () => {
  const dir = withKilnJson(await ensureFixture('sd15-controlnet'), { native_size: 256 });
  const m = await DiffusionModel.load(dir);
  opened.push(m);
  const netDir = await ensureControlNetFixture('sd15-openpose');
  const controlNet = await OnnxModel.load(join(netDir, 'model.onnx'), netDir);
  const { detector, poseNet } = await loadPoseModels(await ensurePoseFixture());
  opened.push(controlNet, detector, poseNet);
  const cond: number[][] = [];
  const run = controlNet.run.bind(controlNet);
  controlNet.run = (feeds: Record<string, Feed>, out: string[]) => {
    cond.push(feeds.controlnet_cond!.dims);
    return run(feeds, out);
  };
  const pixels = new Uint8Array(320 * 320 * 3).fill(20);
  for (let y = 60; y < 280; y++) for (let x = 120; x < 200; x++) pixels.fill(240, (y * 320 + x) * 3, (y * 320 + x) * 3 + 3);
  const r = await poseGenerate(m, { controlNet, detector, poseNet }, { prompt: 'a dancer', seed: 11, size: '512x512', steps: 2, image: { width: 320, height: 320, pixels } });
  assert.deepEqual(cond, [[2, 3, 256, 256], [2, 3, 256, 256]]);
  assert.equal(r.image.width, 512);
  assert.equal(r.pose.width, 512);
  assert.equal(r.settings.width, 512);
  assert.equal(r.settings.nativeSize, '256x256');
  assert.deepEqual(r.latents.length, 4 * 32 * 32);
});
