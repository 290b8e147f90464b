/**
 * Image prompts (IP-Adapter) and LoRAs over the API, through the official openai SDK against a
 * real server whose home holds the golden SD 1.5 pipeline (diffusers safetensors, tiny widths) as
 * a model, the golden IP-Adapter files in the h94/IP-Adapter layout under ip-adapters/, and the
 * golden SD 1.5 LoRA in loras/: `user=style:<w>` / `face:<w>` and the `style` field, weight 0 =
 * the plain model's bytes, the weights in `kiln`, the 400s naming the `kiln pull` lines, and
 * `kiln.loras`, with the LoRA errors' messages free of server paths (image prompts with pose and
 * with LoRAs: image-prompt-pose.test.ts).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import OpenAI, { toFile } from 'openai';
import { pino } from 'pino';
import { resolvePullSpec } from '../../src/models/aliases.js';
import { writeSafetensors } from '../../src/graphs/safetensors.js';
import { IMAGE_ENCODERS, IMAGE_PROMPT_ADAPTERS, IP_ADAPTERS_DIR } from '../../src/catalog/image-prompt-assets.js';
import { editWeights, readParams } from '../../src/server/params.js';
import { ApiError, redactPaths } from '../../src/server/errors.js';
import { GOLDEN_DIR } from '../graphs/golden.js';
import { envelope, postJson, rgbPng, startTestServer, type TestServer } from './helpers.js';

const SIZE = 256;
const FAST = { size: `${SIZE}x${SIZE}`, steps: 1, n: 7, response_format: 'b64_json' } as const;
const IP = join(GOLDEN_DIR, 'ip_adapter', 'IP-Adapter');

let server: TestServer;
let home: string;
/** The plain model's image for PROMPT (a generation), shared by the tests. */
let plainGen: any;
const PROMPT = 'a lighthouse at dusk';
const logLines: string[] = [];

before(async () => {
  home = mkdtempSync(join(tmpdir(), 'kiln-image-prompts-'));
  mkdirSync(join(home, 'models'));
  symlinkSync(join(GOLDEN_DIR, 'pipelines', 'sd15'), join(home, 'models', 'sd15'), 'dir');
  // The h94 layout: ip-adapters/models/ip-adapter_sd15.safetensors and ip-adapters/models/image_encoder/.
  mkdirSync(join(home, IP_ADAPTERS_DIR));
  symlinkSync(join(IP, 'models'), join(home, IP_ADAPTERS_DIR, 'models'), 'dir');
  mkdirSync(join(home, 'loras'));
  copyFileSync(join(GOLDEN_DIR, 'lora', 'sd15-lora.safetensors'), join(home, 'loras', 'sd15-lora.safetensors'));
  writeFileSync(join(home, 'loras', 'broken.safetensors'), Buffer.from('not a safetensors file at all'));
  // A LoRA none of whose modules exist in the model: loads, changes nothing, and is reported.
  const f32 = (shape: number[]) => ({ dtype: 'F32' as const, shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.01) });
  writeSafetensors(join(home, 'loras', 'stray.safetensors'), {
    'lora_unet_no_such_block_proj.lora_down.weight': f32([2, 8]),
    'lora_unet_no_such_block_proj.lora_up.weight': f32([8, 2]),
  });
  const logStream = new Writable({
    write(chunk, _encoding, done) {
      logLines.push(...String(chunk).split('\n').filter(Boolean));
      done();
    },
  });
  server = await startTestServer({ home, defaultModel: 'sd15', logger: pino({ level: 'warn' }, logStream) });
});
after(async () => {
  await server?.close();
  rmSync(home, { recursive: true, force: true });
});

const INPUT = () => rgbPng(SIZE, SIZE, (x, y) => [(x * 255) / SIZE, 40, (y * 255) / SIZE]);
const png = (bytes: Buffer) => toFile(bytes, 'image.png', { type: 'image/png' });
const b64 = (r: any) => Buffer.from(r.data[0].b64_json, 'base64');

async function edit(fields: Record<string, unknown>): Promise<any> {
  return server.client().images.edit({ prompt: PROMPT, image: await png(await INPUT()), ...FAST, ...fields } as any);
}

async function badRequest(p: Promise<unknown>, param: string, code?: string): Promise<InstanceType<typeof OpenAI.BadRequestError>> {
  let caught: unknown;
  await p.then(
    () => assert.fail('expected a 400'),
    (err: unknown) => (caught = err),
  );
  assert.ok(caught instanceof OpenAI.BadRequestError, `expected BadRequestError, got ${String(caught)}`);
  assert.equal(caught.param, param, caught.message);
  if (code) assert.equal(caught.code, code, caught.message);
  assert.ok(!caught.message.includes(home), `no server path in: ${caught.message}`);
  return caught;
}

describe('image prompts', () => {
  test('style:0.6 steers the image; weight 0 is the plain model byte for byte; the kiln object reports the weights', async () => {
    plainGen = await server.client().images.generate({ prompt: PROMPT, ...FAST } as any);
    const zero = await edit({ user: 'style:0' });
    assert.equal(zero.kiln.mode, 'image_prompt');
    assert.deepEqual(zero.kiln.image_prompt, { style: 0, adapters: [] });
    assert.ok(b64(zero).equals(b64(plainGen)), 'style:0 draws what the plain model draws');

    const styled = await edit({ user: 'style:0.6' });
    assert.equal(styled.kiln.mode, 'image_prompt');
    assert.deepEqual(styled.kiln.image_prompt, { style: 0.6, adapters: ['ip-adapter_sd15.safetensors'] });
    assert.equal(styled.kiln.strength, undefined);
    assert.ok(!b64(styled).equals(b64(zero)), 'the image prompt changes the image');
    // The `style` field asks for the same (the reference's field; a number as text in a form).
    const field = await edit({ style: '0.6' });
    assert.deepEqual(field.kiln.image_prompt, styled.kiln.image_prompt);
    assert.ok(b64(field).equals(b64(styled)));
  });

  test('with strength: image-to-image with the image prompt (weight 0: the plain edit\'s bytes); with a mask: inpainting with it', async () => {
    const plainEdit = await edit({ strength: 0.6 });
    assert.equal(plainEdit.kiln.mode, 'img2img');
    const zero = await edit({ user: 'style:0', strength: 0.6 });
    assert.equal(zero.kiln.mode, 'img2img');
    assert.equal(zero.kiln.strength, 0.6);
    assert.ok(b64(zero).equals(b64(plainEdit)), 'style:0 with strength is the plain edit');
    const styled = await edit({ user: 'style:0.8', strength: 0.6 });
    assert.deepEqual(styled.kiln.image_prompt, { style: 0.8, adapters: ['ip-adapter_sd15.safetensors'] });
    assert.ok(!b64(styled).equals(b64(plainEdit)));

    const mask = await rgbPng(SIZE, SIZE, (x, y) => (x >= 64 && x < 192 && y >= 64 && y < 192 ? [255, 255, 255] : [0, 0, 0]));
    const inpainted = await edit({ mask: await png(mask) });
    const steered = await edit({ mask: await png(mask), user: 'style:0.8' });
    assert.equal(steered.kiln.mode, 'inpaint');
    assert.equal(steered.kiln.strength, 1);
    assert.deepEqual(steered.kiln.image_prompt, { style: 0.8, adapters: ['ip-adapter_sd15.safetensors'] });
    assert.ok(!b64(steered).equals(b64(inpainted)));
  });

  test('bad weights are 400s naming user (or style); pose with an image prompt needs the pose models', async () => {
    for (const user of ['style:abc', 'style:-1', 'style:9', 'face:', 'style:0.5,style:0.6']) {
      await badRequest(edit({ user }), 'user', 'invalid_value');
    }
    for (const style of ['abc', '-1', '9']) await badRequest(edit({ style }), 'style', 'invalid_value');
    // This home has no OpenPose ControlNet (image-prompt-pose.test.ts has one): the pose part names its pull.
    const e = await badRequest(edit({ user: 'face:0.5,style:0.6,pose:1.0' }), 'user', 'pose_model_missing');
    assert.match(e.message, /no OpenPose ControlNet is installed .* `kiln pull controlnet-openpose`/);
    // cn with the reference's style field: pose mode as the reference had it (the field does not ask for an image prompt there).
    assert.deepEqual(editWeights({ user: 'cn', styleWeight: 0.6 }), { pose: 1 });
    assert.deepEqual(editWeights({ user: 'face:0.5', styleWeight: undefined }), { imagePrompt: { style: 0.6, face: 0.5, from: 'user', styleDefault: true } });
    assert.deepEqual(editWeights({ user: 'user-42', styleWeight: 0.3 }), { imagePrompt: { style: 0.3, from: 'style' } });
    assert.deepEqual(editWeights({ user: 'user-42', styleWeight: undefined }), {});
    // DALL-E 3's style values are not weights: an ordinary edit.
    for (const style of ['vivid', 'natural']) assert.deepEqual(editWeights(readParams({ prompt: 'x', style }, 'edits', 'form')), {});
    assert.equal(readParams({ prompt: 'x', style: 0.25 }, 'generations', 'json').styleWeight, 0.25);
    assert.throws(() => editWeights({ user: 'face:6', styleWeight: undefined }), (err: unknown) => err instanceof ApiError && err.param === 'user');
  });

  test('a missing face adapter is a 400 naming the kiln pull line; one made for SDXL is a 400 too', async () => {
    const missing = await badRequest(edit({ user: 'face:0.5' }), 'user', 'image_prompt_model_missing');
    assert.match(missing.message, /the face IP-Adapter for SD 1\.x \(ip-adapter-plus-face_sd15\.safetensors\) is not installed/);
    assert.match(missing.message, /Install with `kiln pull ip-adapter-plus-face-sd15`/);
    assert.match(missing.message, /send style:0 in user to use the face adapter alone/);

    // What `kiln pull ip-adapter-plus-face-sd15` would install, but the file is the golden SDXL Plus adapter.
    const pulled = join(home, IP_ADAPTERS_DIR, 'ip-adapter-plus-face-sd15');
    mkdirSync(pulled);
    copyFileSync(join(IP, 'sdxl_models', 'ip-adapter-plus_sdxl_vit-h.safetensors'), join(pulled, 'ip-adapter-plus-face_sd15.safetensors'));
    try {
      const wrong = await badRequest(edit({ user: 'face:0.5,style:0' }), 'user', 'invalid_value');
      assert.match(wrong.message, /ip-adapter-plus-face_sd15\.safetensors is made for another UNet .*model sd15 has 16 cross-attention layers/);
    } finally {
      rmSync(pulled, { recursive: true, force: true });
    }
  });

  test('every pull line the 400s name installs its file where the lookup finds it', () => {
    for (const family of Object.values(IMAGE_PROMPT_ADAPTERS)) {
      for (const choice of Object.values(family!).flat()) {
        const target = resolvePullSpec(choice.alias, home);
        assert.equal(target.repo, 'h94/IP-Adapter');
        assert.deepEqual(target.files, [{ path: `${choice.subfolder}/${choice.file}`, as: choice.file }]);
        assert.equal(target.dir, `${IP_ADAPTERS_DIR}/${choice.alias}`);
      }
    }
    for (const encoder of Object.values(IMAGE_ENCODERS)) {
      const target = resolvePullSpec(encoder.alias, home);
      assert.equal(target.dir, `${IP_ADAPTERS_DIR}/${encoder.dir}`);
      assert.deepEqual(target.files?.map((f) => [f.path, f.as]), [
        [`${encoder.dir}/config.json`, 'config.json'],
        [`${encoder.dir}/model.safetensors`, 'model.safetensors'],
      ]);
    }
  });
});

describe('LoRAs in responses', () => {
  const GEN = () => `${server.baseURL}/images/generations`;

  test('<lora:NAME:SCALE> is reported in kiln.loras; without one kiln.loras is absent', async () => {
    assert.equal(plainGen.kiln.loras, undefined);
    const styled = await server.client().images.generate({ prompt: `${PROMPT} <lora:sd15-lora:0.7>`, ...FAST } as any);
    assert.deepEqual((styled as any).kiln.loras, [{ name: 'sd15-lora', scale: 0.7 }]);
    assert.ok(!b64(styled).equals(b64(plainGen)), 'the LoRA changes the image');
  });

  test('an unknown LoRA is a 400 (prompt); a LoRA tag with an image prompt applies both', async () => {
    const unknown = await badRequest(server.client().images.generate({ prompt: 'x <lora:nope:0.7>', ...FAST } as any), 'prompt', 'invalid_value');
    assert.match(unknown.message, /unknown LoRA "nope" in the prompt \(installed LoRAs: broken, sd15-lora, stray\)/);
    // (image-prompt-pose.test.ts checks the bytes: weight 0 is the LoRA alone.)
    const both = await edit({ prompt: 'x <lora:sd15-lora:0.7>', user: 'style:0.6' });
    assert.deepEqual(both.kiln.loras, [{ name: 'sd15-lora', scale: 0.7 }]);
    assert.deepEqual(both.kiln.image_prompt, { style: 0.6, adapters: ['ip-adapter_sd15.safetensors'] });
  });

  test('error messages keep file names and API routes, not server folders', () => {
    assert.equal(redactPaths('/srv/kiln/loras/bad.safetensors is not a LoRA file'), 'bad.safetensors is not a LoRA file');
    assert.equal(redactPaths('model folder "/srv/kiln/models/x/" lacks unet/model.onnx'), 'model folder "x" lacks unet/model.onnx');
    assert.equal(redactPaths('missing: /a/b/image_encoder (in /a/b)'), 'missing: image_encoder (in b)');
    assert.equal(redactPaths('use it through POST /v1/images/edits with a mask'), 'use it through POST /v1/images/edits with a mask');
  });

  test('a broken LoRA file answers 500 without server paths; modules that match nothing are logged as warnings', async () => {
    const r = await postJson(GEN(), { prompt: 'x <lora:broken:1>', ...FAST });
    assert.equal(r.status, 500);
    const e = envelope(r.json);
    assert.equal(e.code, 'model_load_failed');
    assert.match(e.message, /broken\.safetensors/);
    assert.ok(!e.message.includes(home) && !e.message.includes(tmpdir()), e.message);

    const stray = await server.client().images.generate({ prompt: `${PROMPT} <lora:stray:1>`, ...FAST } as any);
    assert.deepEqual((stray as any).kiln.loras, [{ name: 'stray', scale: 1 }]);
    const warnings = logLines.map((l) => JSON.parse(l) as { level: number; msg: string }).filter((l) => l.level === 40);
    assert.ok(
      warnings.some((w) => /sd15: LoRA "stray" .* matches no module of the model/.test(w.msg)),
      `a warning names the LoRA: ${JSON.stringify(warnings.map((w) => w.msg))}`,
    );
  });
});
