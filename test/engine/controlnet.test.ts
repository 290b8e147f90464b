/**
 * ControlNet (split layout) and pose-guided generation on fixture models with the real
 * contracts: DWPose stand-ins, OpenPose ControlNets (fp32 with a double scale input, no scale
 * input, fp16 I/O; SD 1.5 and SDXL), residual-taking UNets; and the 9-channel inpainting UNets.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import sharp from 'sharp';
import { ensureControlNetFixture, ensureFixture, ensurePoseFixture, type ControlNetFixtureKind } from '../../tools/fixtures/variants.js';
import { DiffusionModel } from '../../src/engine/model.js';
import { OnnxModel, type Feed } from '../../src/engine/onnx.js';
import { generate } from '../../src/engine/pipeline.js';
import { poseGenerate, NoPersonError, type PoseAssets } from '../../src/engine/pose-control.js';
import { loadPoseModels } from '../../src/engine/pose/index.js';
import { inpaint, prepareMask } from '../../src/engine/inpaint.js';
import { prepareInitImage } from '../../src/engine/img2img.js';
import { ModelLoadError } from '../../src/engine/errors.js';
import type { RgbImage } from '../../src/engine/vae.js';

const opened: { release(): Promise<void> }[] = [];
after(() => Promise.all(opened.map((m) => m.release())));

async function model(variant: 'sd15-controlnet' | 'sdxl-controlnet' | 'sd15-inpaint' | 'sd15-inpaint9'): Promise<DiffusionModel> {
  const m = await DiffusionModel.load(await ensureFixture(variant));
  opened.push(m);
  return m;
}

async function assets(kind: ControlNetFixtureKind): Promise<PoseAssets> {
  const dir = await ensureControlNetFixture(kind);
  const controlNet = await OnnxModel.load(join(dir, 'model.onnx'), dir);
  const { detector, poseNet } = await loadPoseModels(await ensurePoseFixture());
  opened.push(controlNet, detector, poseNet);
  return { controlNet, detector, poseNet };
}

/** A "person" for the stand-in detector: a bright upright rectangle on a dark picture. */
function personPicture(width = 320, height = 320, bright = true): RgbImage {
  const pixels = new Uint8Array(width * height * 3).fill(20);
  if (bright) {
    for (let y = 60; y < 280; y++) for (let x = 120; x < 200; x++) pixels.fill(240, (y * width + x) * 3, (y * width + x) * 3 + 3);
  }
  return { width, height, pixels };
}

const base = { prompt: 'a dancer', seed: 11, size: '256x256', steps: 3 };

test('pose-guided generation: skeleton picture, residuals reach the UNet, deterministic', async () => {
  const m = await model('sd15-controlnet');
  const a = await assets('sd15-openpose');
  const controlCalls: number[] = [];
  const run = a.controlNet.run.bind(a.controlNet);
  a.controlNet.run = (feeds: Record<string, Feed>, out: string[]) => {
    controlCalls.push(feeds.sample!.dims[0]!);
    return run(feeds, out);
  };
  const r1 = await poseGenerate(m, a, { ...base, image: personPicture() });
  assert.deepEqual(controlCalls, [2, 2, 2], 'one ControlNet call per step, CFG batch');
  assert.equal(r1.people, 1);
  assert.equal(r1.image.width, 256);
  assert.equal(r1.pose.width, 256);
  assert.equal(r1.pose.height, 256);
  const lit = r1.pose.pixels.reduce((n, v) => n + (v > 0 ? 1 : 0), 0);
  assert.ok(lit > 500, `skeleton drawn (${lit} lit values)`);
  const r2 = await poseGenerate(m, a, { ...base, image: personPicture() });
  assert.deepEqual(r2.image.pixels, r1.image.pixels);
  assert.deepEqual(r2.pose.pixels, r1.pose.pixels);
  // Scale 0 zeroes every residual: exactly the plain model's picture. Scale 1 differs from it.
  const plain = await generate(m, base);
  const off = await poseGenerate(m, a, { ...base, image: personPicture(), controlScale: 0 });
  assert.deepEqual(off.image.pixels, plain.image.pixels);
  assert.notDeepEqual(r1.image.pixels, plain.image.pixels);
  const half = await poseGenerate(m, a, { ...base, image: personPicture(), controlScale: 0.5 });
  assert.notDeepEqual(half.image.pixels, r1.image.pixels);
});

test('no person in the picture is a clear error, not an unposed image', async () => {
  const m = await model('sd15-controlnet');
  const a = await assets('sd15-openpose');
  await assert.rejects(poseGenerate(m, a, { ...base, image: personPicture(320, 320, false) }), (e: unknown) => {
    assert.ok(e instanceof NoPersonError);
    assert.equal(e.param, 'image');
    assert.match(e.message, /no person/);
    return true;
  });
});

test('ControlNets without a scale input (scaled by Kiln) and with fp16 I/O agree with the reference one', async () => {
  const m = await model('sd15-controlnet');
  const ref = await poseGenerate(m, await assets('sd15-openpose'), { ...base, image: personPicture(), controlScale: 0.7 });
  for (const kind of ['sd15-openpose-noscale', 'sd15-openpose-fp16'] as const) {
    const r = await poseGenerate(m, await assets(kind), { ...base, image: personPicture(), controlScale: 0.7 });
    let diff = 0;
    for (let i = 0; i < r.image.pixels.length; i++) diff = Math.max(diff, Math.abs(r.image.pixels[i]! - ref.image.pixels[i]!));
    assert.ok(diff <= (kind.endsWith('fp16') ? 8 : 1), `${kind}: max pixel difference ${diff}`);
  }
});

test('SDXL ControlNet (9+1 residuals, text_embeds and time_ids)', async () => {
  const m = await model('sdxl-controlnet');
  const r = await poseGenerate(m, await assets('sdxl-openpose'), { ...base, image: personPicture() });
  assert.equal(r.image.width, 256);
  const plain = await generate(m, base);
  assert.notDeepEqual(r.image.pixels, plain.image.pixels);
});

test('dedicated 9-channel inpainting UNets: beside the model and as the model', async () => {
  const solid = await sharp({ create: { width: 256, height: 256, channels: 3, background: '#2a9a4a' } }).png().toBuffer();
  const image = await prepareInitImage(solid, 256, 256);
  const maskPng = await sharp({ create: { width: 256, height: 256, channels: 3, background: '#000000' } })
    .composite([{ input: await sharp({ create: { width: 64, height: 64, channels: 3, background: '#ffffff' } }).png().toBuffer(), left: 96, top: 96 }])
    .png()
    .toBuffer();
  const mask = await prepareMask(maskPng, 256, 256);
  for (const variant of ['sd15-inpaint', 'sd15-inpaint9'] as const) {
    const m = await model(variant);
    const unet = await m.inpaintUnet();
    assert.ok(unet && m.isInpaintingUnet(unet), `${variant} has a 9-channel UNet`);
    const seen: number[][] = [];
    const run = unet.run.bind(unet);
    unet.run = (feeds: Record<string, Feed>, out: string[]) => {
      seen.push(feeds.sample!.dims);
      return run(feeds, out);
    };
    const r = await inpaint(m, { ...base, image, mask });
    assert.deepEqual(seen[0], [2, 9, 32, 32]);
    const corner = Array.from(r.image.pixels.subarray(0, 3));
    assert.deepEqual(corner, Array.from(image.pixels.subarray(0, 3)), 'unmasked pixels are the input');
  }
  const nine = await model('sd15-inpaint9');
  await assert.rejects(generate(nine, base), (e: unknown) => e instanceof ModelLoadError && /inpainting UNet/.test(e.message));
});
