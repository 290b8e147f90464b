/**
 * Image prompts with pose and with LoRAs, over the API through the official openai SDK: the golden
 * SD 1.5 pipeline (diffusers safetensors: Kiln builds its graphs, its ControlNet-UNet and the
 * adapter UNets), an OpenPose ControlNet stand-in with the split layout's contract whose residuals
 * fit that UNet's widths (tools/fixtures/controlnet.ts), the DWPose stand-ins, the golden base
 * IP-Adapter and image encoder in the h94 layout, a random Plus ("face") adapter made for the same
 * UNet and encoder (all installed by image-prompt-fixtures.ts), and the golden SD 1.5 LoRA.
 *
 * What must hold: `face:0.5,style:0.6,pose:1.0` follows both (it differs from the pose alone and
 * from the image prompt alone, draws the same skeleton, reports the weights); its image-prompt
 * weights at 0 give the pose-only bytes and its pose weight 0 the image-prompt-only bytes (the
 * residuals and the adapters are each exactly additive); a LoRA with an image prompt of weight 0
 * gives the LoRA-only bytes, and with weight 0.6 an image that has both.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { toFile } from 'openai';
import { GOLDEN_DIR } from '../graphs/golden.js';
import { installImagePromptPose } from './image-prompt-fixtures.js';
import { personPng, startTestServer, type TestServer } from './helpers.js';

const SIZE = 256;
const FAST = { size: `${SIZE}x${SIZE}`, steps: 2, n: 11, response_format: 'b64_json' } as const;
const PROMPT = 'a dancer on a stage';

let server: TestServer;
let home: string;

before(async () => {
  home = mkdtempSync(join(tmpdir(), 'kiln-ip-pose-'));
  mkdirSync(join(home, 'models'));
  await installImagePromptPose(home);
  mkdirSync(join(home, 'loras'));
  copyFileSync(join(GOLDEN_DIR, 'lora', 'sd15-lora.safetensors'), join(home, 'loras', 'sd15-lora.safetensors'));
  server = await startTestServer({ home, defaultModel: 'sd15' });
});
after(async () => {
  await server?.close();
  rmSync(home, { recursive: true, force: true });
});

const png = (bytes: Buffer) => toFile(bytes, 'image.png', { type: 'image/png' });
const b64 = (r: any, field = 'b64_json') => Buffer.from(r.data[0][field], 'base64');

async function edit(fields: Record<string, unknown>): Promise<any> {
  return server.client().images.edit({ prompt: PROMPT, image: await png(await personPng(SIZE)), ...FAST, ...fields } as any);
}

describe('image prompt with pose', () => {
  test('face:0.5,style:0.6,pose:1.0 follows the pose and the image prompt; each part at 0 gives the other alone, byte for byte', async () => {
    const poseOnly = await edit({ user: 'pose:1.0' });
    assert.equal(poseOnly.kiln.mode, 'pose');
    assert.equal(poseOnly.kiln.people, 1);
    assert.equal(poseOnly.kiln.image_prompt, undefined);
    const promptOnly = await edit({ user: 'face:0.5,style:0.6' });
    assert.equal(promptOnly.kiln.mode, 'image_prompt');
    const adapters = ['ip-adapter-plus-face_sd15.safetensors', 'ip-adapter_sd15.safetensors'];
    assert.deepEqual(new Set(promptOnly.kiln.image_prompt.adapters), new Set(adapters));

    const both = await edit({ user: 'face:0.5,style:0.6,pose:1.0' });
    assert.equal(both.kiln.mode, 'pose');
    assert.equal(both.kiln.control_scale, 1);
    assert.equal(both.kiln.people, 1);
    assert.deepEqual(both.kiln.image_prompt, promptOnly.kiln.image_prompt);
    assert.equal(both.kiln.image_prompt.style, 0.6);
    assert.equal(both.kiln.image_prompt.face, 0.5);
    assert.ok(b64(both, 'b64_json_pose').equals(b64(poseOnly, 'b64_json_pose')), 'the same skeleton');
    assert.ok(!b64(both).equals(b64(poseOnly)), 'the image prompt changes the posed image');
    assert.ok(!b64(both).equals(b64(promptOnly)), 'the pose changes the image-prompted image');

    const weightsZero = await edit({ user: 'face:0,style:0,pose:1.0' });
    assert.deepEqual(weightsZero.kiln.image_prompt, { style: 0, face: 0, adapters: [] });
    assert.ok(b64(weightsZero).equals(b64(poseOnly)), 'image-prompt weights 0 with pose: the pose-only bytes');
    const poseZero = await edit({ user: 'face:0.5,style:0.6,pose:0' });
    assert.equal(poseZero.kiln.control_scale, 0);
    assert.ok(b64(poseZero).equals(b64(promptOnly)), 'pose 0 with an image prompt: the image-prompt-only bytes (zero residuals add nothing)');
    // Each adapter counts: the face weight alone moves the posed image too.
    const faceOff = await edit({ user: 'face:0,style:0.6,pose:1.0' });
    assert.ok(!b64(faceOff).equals(b64(both)));
  });
});

describe('image prompt with LoRAs', () => {
  const LORA = `${PROMPT} <lora:sd15-lora:0.7>`;

  test('a LoRA with an image prompt of weight 0 is the LoRA alone, byte for byte; at 0.6 the image has both', async () => {
    const loraOnly = await server.client().images.generate({ prompt: LORA, ...FAST } as any);
    assert.deepEqual((loraOnly as any).kiln.loras, [{ name: 'sd15-lora', scale: 0.7 }]);
    const zero = await edit({ prompt: LORA, user: 'style:0' });
    assert.deepEqual(zero.kiln.loras, [{ name: 'sd15-lora', scale: 0.7 }]);
    assert.ok(b64(zero).equals(b64(loraOnly)), 'style:0 with a LoRA: the LoRA-only bytes');

    const styled = await edit({ prompt: LORA, user: 'style:0.6' });
    assert.deepEqual(styled.kiln.loras, [{ name: 'sd15-lora', scale: 0.7 }]);
    assert.deepEqual(styled.kiln.image_prompt, { style: 0.6, adapters: ['ip-adapter_sd15.safetensors'] });
    const plainStyled = await edit({ user: 'style:0.6' });
    assert.ok(!b64(styled).equals(b64(loraOnly)), 'the image prompt changes the LoRA image');
    assert.ok(!b64(styled).equals(b64(plainStyled)), 'the LoRA is not dropped from the image-prompted image');
  });

  test('a LoRA in pose mode (alone and with an image prompt) reaches the ControlNet-UNet and the adapter UNet', async () => {
    const pose = await edit({ user: 'pose:1.0' });
    const posedLora = await edit({ prompt: LORA, user: 'pose:1.0' });
    assert.deepEqual(posedLora.kiln.loras, [{ name: 'sd15-lora', scale: 0.7 }]);
    assert.ok(!b64(posedLora).equals(b64(pose)), 'the LoRA changes the posed image');
    const zero = await edit({ prompt: LORA, user: 'style:0,pose:1.0' });
    assert.ok(b64(zero).equals(b64(posedLora)), 'weight 0: the LoRA pose bytes');
    const all = await edit({ prompt: LORA, user: 'style:0.6,pose:1.0' });
    const noLora = await edit({ user: 'style:0.6,pose:1.0' });
    assert.ok(!b64(all).equals(b64(posedLora)) && !b64(all).equals(b64(noLora)));
  });
});
