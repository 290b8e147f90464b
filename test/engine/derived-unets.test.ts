/**
 * A Kiln-built model's other UNets, one UNet step each on the golden SD 1.5 pipeline: its
 * ControlNet-UNet (built into the cache entry on first use, graphs/control-unet.ts), the
 * image-prompt UNet with residual inputs (ip-adapter.ts ensureImagePromptControlUnet), and for a
 * LoRA variant the same graphs with its LoRA folded in (model.withLoras). Zero residuals and
 * ip_scale 0 must give the UNet they extend, byte for byte, so any difference left is the LoRA's
 * or the adapter's own, and a LoRA that did not reach a derived UNet shows as a mismatch.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, linkSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Engine } from '../../src/engine/engine.js';
import { loadImagePrompt } from '../../src/engine/image-prompt.js';
import type { Feed, OnnxModel } from '../../src/engine/onnx.js';
import { CONTROL_UNET_FORMAT } from '../../src/graphs/control-unet.js';
import { RESIDUAL_OUTPUT } from '../../src/engine/pipeline.js';
import { controlnetGenerate } from '../../src/engine/controlnet.js';
import { OnnxModel as Onnx } from '../../src/engine/onnx.js';
import { hashString } from '../../src/graphs/onnx-builder.js';
import { buildControlNet, controlNetSpecForUnet } from '../../tools/fixtures/controlnet.js';
import { writeOnnx } from '../../tools/fixtures/variants.js';
import { GOLDEN_DIR, maxAbsDiff, readConfig, readGolden } from '../graphs/golden.js';

const scratch = mkdtempSync(join(tmpdir(), 'kiln-derived-unets-'));
const lorasDir = join(scratch, 'loras');
mkdirSync(lorasDir);
linkSync(join(GOLDEN_DIR, 'lora', 'sd15-lora.safetensors'), join(lorasDir, 'sd15-lora.safetensors'));
const cacheDir = join(scratch, 'cache');
const engine = new Engine({ cacheDir, searchDirs: [], lorasDir, onWarning: () => {} });
after(async () => {
  await engine.close();
  rmSync(scratch, { recursive: true, force: true });
});

const SD15 = join(GOLDEN_DIR, 'pipelines', 'sd15');
const IP = join(GOLDEN_DIR, 'ip_adapter', 'IP-Adapter', 'models');
const ADAPTER = [{ adapter: join(IP, 'ip-adapter_sd15.safetensors'), imageEncoder: join(IP, 'image_encoder') }];

/** The golden UNet inputs (batch 2, 16x24 latents) and ip tokens (tokens x width). */
const goldenInputs = (unet: string) =>
  Object.fromEntries([...readGolden(`components/${unet}/inputs.safetensors`)].map(([k, v]) => [k, { data: v.data, dims: v.shape }])) as Record<string, Feed>;
const inputs = goldenInputs('unet_sd15');
const ipFeeds = (scale: number, tokens = 4, width = 8): Record<string, Feed> => ({
  ip_tokens: { data: Float32Array.from({ length: 2 * tokens * width }, (_, i) => Math.sin(i)), dims: [2, tokens, width] },
  ip_scale: { data: Float32Array.of(scale), dims: [1] },
});

/**
 * The residuals of the golden UNets at 16x24 latents (diffusers' down_block_res_samples, then the
 * mid block's output: channels and downscale of each; tools/oracle/unet_residuals.py prints them).
 */
const RESIDUALS = {
  sd15: { widths: [8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 24, 24, 24], levels: [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8] },
  sdxl: { widths: [8, 8, 8, 8, 16, 16, 16, 24, 24, 24], levels: [1, 1, 1, 2, 2, 2, 4, 4, 4, 4] },
};

/** All-zero feeds for every residual input of `unet`. */
function zeroResiduals(unet: OnnxModel, kind: keyof typeof RESIDUALS = 'sd15'): Record<string, Feed> {
  const { widths, levels } = RESIDUALS[kind];
  const names = [...unet.inputs.keys()].filter((n) => RESIDUAL_OUTPUT.test(n));
  assert.equal(names.length, widths.length, `${unet.label} takes ${widths.length - 1} down residuals and the mid one`);
  return Object.fromEntries(
    names.map((name) => {
      const j = name.startsWith('mid') ? widths.length - 1 : Number(/\d+/.exec(name)![0]);
      const dims = [2, widths[j]!, 16 / levels[j]!, 24 / levels[j]!];
      return [name, { data: new Float32Array(dims.reduce((a, b) => a * b, 1)), dims }];
    }),
  );
}

const step = async (unet: OnnxModel, feeds: Record<string, Feed>): Promise<Float32Array> => (await unet.run(feeds, ['out_sample'])).out_sample!.data;
const same = (a: Float32Array, b: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));

test('ControlNet-UNet and image-prompt UNets of a Kiln-built model, plain and with a LoRA: zero residuals and ip_scale 0 give the UNet they extend', async () => {
  const base = await engine.model(SD15);
  const lora = await engine.model(SD15, { loras: [{ name: 'sd15-lora', scale: 0.7 }] });
  assert.ok(lora.sameModelAs(base) && lora !== base);

  const plain = await step(base.unet, inputs);
  const withLora = await step(lora.unet, inputs);
  assert.ok(maxAbsDiff(plain, withLora) > 1e-3, 'the LoRA changes the UNet');

  // The ControlNet-UNet, built into the cache entry with its format stamp.
  const control = (await base.controlUnet())!;
  assert.ok(control && control !== base.unet);
  const stamp = join(base.layout.dir, 'controlnet', 'kiln-control.json');
  assert.deepEqual(JSON.parse(readFileSync(stamp, 'utf8')), { format: CONTROL_UNET_FORMAT });
  assert.ok(same(await step(control, { ...inputs, ...zeroResiduals(control) }), plain), 'ControlNet-UNet, zero residuals: the plain UNet');
  const loraControl = (await lora.controlUnet())!;
  assert.ok(loraControl !== control, 'the variant has its own ControlNet-UNet');
  assert.ok(same(await step(loraControl, { ...inputs, ...zeroResiduals(loraControl) }), withLora), 'with the LoRA: the LoRA UNet');

  // Image-prompt UNets: the plain one and the residual-taking one, for the model and for its LoRA variant.
  const runner = await loadImagePrompt(base, ADAPTER, { cacheDir });
  const ipUnet = await runner.unetFor(base, false);
  const ipControl = await runner.unetFor(base, true);
  assert.ok(existsSync(join(runner.build.dir, 'controlnet', 'kiln-control.json')));
  const ipLora = await runner.unetFor(lora, false);
  const ipLoraControl = await runner.unetFor(lora, true);
  assert.equal(new Set([ipUnet, ipControl, ipLora, ipLoraControl]).size, 4);
  assert.ok(same(await step(ipUnet, { ...inputs, ...ipFeeds(0) }), plain), 'adapter UNet at ip_scale 0: the plain UNet');
  assert.ok(same(await step(ipControl, { ...inputs, ...ipFeeds(0), ...zeroResiduals(ipControl) }), plain));
  assert.ok(same(await step(ipLora, { ...inputs, ...ipFeeds(0) }), withLora), 'the variant\'s adapter UNet at ip_scale 0: the LoRA UNet');
  assert.ok(same(await step(ipLoraControl, { ...inputs, ...ipFeeds(0), ...zeroResiduals(ipLoraControl) }), withLora));
  // And at a real weight the residual-taking build computes what the plain adapter UNet does.
  const styled = await step(ipUnet, { ...inputs, ...ipFeeds(0.6) });
  assert.ok(maxAbsDiff(styled, plain) > 1e-3, 'the adapter changes the UNet at 0.6');
  assert.ok(same(await step(ipControl, { ...inputs, ...ipFeeds(0.6), ...zeroResiduals(ipControl) }), styled));
  await runner.release();
});

test('SDXL (9 down residuals, a Plus adapter): the ControlNet-UNet and the residual-taking adapter UNet with zero residuals give the UNets they extend', async () => {
  const model = await engine.model(join(GOLDEN_DIR, 'pipelines', 'sdxl'));
  const feeds = goldenInputs('unet_sdxl');
  const plain = await step(model.unet, feeds);
  const control = (await model.controlUnet())!;
  assert.ok(same(await step(control, { ...feeds, ...zeroResiduals(control, 'sdxl') }), plain));
  const runner = await loadImagePrompt(model, [{ adapter: join(IP, '..', 'sdxl_models', 'ip-adapter-plus_sdxl_vit-h.safetensors'), imageEncoder: join(IP, 'image_encoder') }], { cacheDir });
  const ip = ipFeeds(0.6, runner.adapters[0]!.tokens, 18);
  const styled = await step(await runner.unetFor(model, false), { ...feeds, ...ip });
  assert.ok(maxAbsDiff(styled, plain) > 1e-3);
  const ipControl = await runner.unetFor(model, true);
  assert.ok(same(await step(ipControl, { ...feeds, ...ip, ...zeroResiduals(ipControl, 'sdxl') }), styled));
  await runner.release();
});

test('a prompt\'s LoRA tag reaches the ControlNet-UNet and the adapter UNet: the same latents as the model loaded with that LoRA', async () => {
  const dir = join(scratch, 'controlnet');
  await writeOnnx(dir, buildControlNet(controlNetSpecForUnet(readConfig('pipelines/sd15/unet')), hashString('controlnet/golden-sd15')));
  const net = await Onnx.load(join(dir, 'model.onnx'), dir);
  const base = await engine.model(SD15);
  const lora = await engine.model(SD15, { loras: [{ name: 'sd15-lora', scale: 0.7 }] });
  const size = 64;
  const controlImage = { width: size, height: size, pixels: Uint8Array.from({ length: size * size * 3 }, (_, i) => ((i * 37) % 251)) };
  const options = { prompt: 'a dancer', seed: 3, size: `${size}x${size}`, allowedSizes: [`${size}x${size}`], steps: 2, controlImage };
  const tagged = { ...options, prompt: 'a dancer <lora:sd15-lora:0.7>' };
  const bytes = (r: { latents: Float32Array }) => Buffer.from(r.latents.buffer, r.latents.byteOffset, r.latents.byteLength);

  const posed = await controlnetGenerate(base, net, options);
  const viaTag = await controlnetGenerate(base, net, tagged);
  const viaModel = await controlnetGenerate(lora, net, options);
  assert.ok(bytes(viaTag).equals(bytes(viaModel)), 'pose with a prompt LoRA = pose on the LoRA model');
  assert.ok(!bytes(viaTag).equals(bytes(posed)));

  const runner = await loadImagePrompt(base, ADAPTER, { cacheDir });
  const image = { width: 48, height: 40, pixels: Uint8Array.from({ length: 48 * 40 * 3 }, (_, i) => ((i * 11) % 256)) };
  const imagePrompt = { runner, image, scale: 0.6 };
  const ipTag = await controlnetGenerate(base, net, { ...tagged, imagePrompt });
  const ipModel = await controlnetGenerate(lora, net, { ...options, imagePrompt });
  assert.ok(bytes(ipTag).equals(bytes(ipModel)), 'pose and image prompt with a prompt LoRA = on the LoRA model');
  assert.ok(!bytes(ipTag).equals(bytes(viaTag)), 'the image prompt steers');
  const ipZero = await controlnetGenerate(base, net, { ...tagged, imagePrompt: { ...imagePrompt, scale: 0 } });
  assert.ok(bytes(ipZero).equals(bytes(viaTag)), 'image prompt at 0: the LoRA pose latents');
  await runner.release();
  await net.release();
});
