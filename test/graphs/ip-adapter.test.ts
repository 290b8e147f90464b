/**
 * IP-Adapter image prompts against diffusers 0.31 / transformers 4.45 (diffusers-golden
 * `ip_adapter/`): CLIP preprocessing, the image encoder (CLIPVisionModelWithProjection), the base
 * and Plus projections, the h94 `ip_adapter.<n>` -> cross-attention map, the UNet with the
 * adapter at scale 0.0 and 0.6, and the two pipeline cases through the Engine (latents_final and
 * the 8-bit image); weight 0 gives the plain model's bytes; the errors for pieces that are
 * missing or do not fit.
 *
 * Tolerance: roundingTolerance (golden.ts). The image encoder and embedding goldens are
 * bit-stable across torch thread counts (README 0), so 8 float32 ulps of the tensor's largest value.
 */
import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import sharp from 'sharp';
import { Engine } from '../../src/engine/engine.js';
import { InvalidOptionError, ModelLoadError } from '../../src/engine/errors.js';
import { img2img } from '../../src/engine/img2img.js';
import { clipPixelValues, loadImagePrompt, modelUnetSource, resizeBicubicPil, type ImagePromptRunner } from '../../src/engine/image-prompt.js';
import type { DiffusionModel } from '../../src/engine/model.js';
import { generate } from '../../src/engine/pipeline.js';
import type { RgbImage } from '../../src/engine/vae.js';
import { buildClipVision } from '../../src/graphs/clip-vision.js';
import { buildImageProjection, buildIpAdapterUnet, crossAttentionPaths, ipAdapterLayerMap, planImagePrompt, readIpAdapter } from '../../src/graphs/ip-adapter.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { openSafetensors, readTensorBytes, writeSafetensors } from '../../src/graphs/safetensors.js';
import { buildUnet, parseUnetConfig } from '../../src/graphs/unet.js';
import { componentWeights, Params } from '../../src/graphs/weights.js';
import { GRAPH_FILE, writeGraph } from '../../src/graphs/write.js';
import {
  assertGolden,
  assertGoldenCase,
  GOLDEN_DIR,
  goldenPath,
  maxAbsDiff,
  readConfig,
  readGolden,
  readGoldenJson,
  runGoldenCase,
  runGraph,
  SESSION_OPTIONS,
  tempDir,
  type GoldenCase,
  type GoldenTensor,
} from './golden.js';

const ENCODER = 'ip_adapter/IP-Adapter/models/image_encoder';
const ADAPTERS = {
  sd15: goldenPath('ip_adapter/IP-Adapter/models/ip-adapter_sd15.safetensors'),
  sdxl: goldenPath('ip_adapter/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors'),
} as const;
const UNETS = { sd15: 'components/unet_sd15', sdxl: 'components/unet_sdxl' } as const;

interface Manifest {
  sd15: { ip_layers: Record<string, { processor: string }> };
  sdxl: { ip_layers: Record<string, { processor: string }> };
  cases: (GoldenCase & { pipeline: 'sd15' | 'sdxl'; folder: string; ip_adapter_scale: number })[];
}
const manifest = readGoldenJson<Manifest>('ip_adapter/manifest.json');

/** The test image as the engine gets an upload: decoded to 8-bit RGB. */
function testImage(): RgbImage {
  const file = openSafetensors(goldenPath('ip_adapter/image_encoder.inputs.safetensors'));
  const t = file.tensors.get('test_image_uint8')!;
  const [height, width] = t.shape as [number, number];
  return { width, height, pixels: new Uint8Array(readTensorBytes(file, t)) };
}

const tensor = (data: Float32Array, shape: number[]): GoldenTensor => ({ data, shape });

describe('CLIP preprocessing', () => {
  test('the PNG decodes to the golden pixels', async () => {
    const { data, info } = await sharp(goldenPath('ip_adapter/test_image.png')).removeAlpha().raw().toBuffer({ resolveWithObject: true });
    const image = testImage();
    assert.deepEqual([info.width, info.height, info.channels], [image.width, image.height, 3]);
    assert.deepEqual(new Uint8Array(data), image.pixels);
  });

  test('pixel_values of test_image.png equal CLIPImageProcessor\'s', (t) => {
    const expected = readGolden('ip_adapter/image_encoder.inputs.safetensors').get('pixel_values')!;
    const actual = clipPixelValues(testImage(), 32);
    const diff = maxAbsDiff(actual, expected.data);
    t.diagnostic(`pixel_values max abs diff ${diff} (${expected.data.length} values)`);
    assert.equal(diff, 0, 'PIL bicubic, crop, rescale and normalise reproduced bit for bit');
  });

  test('the bicubic resize keeps a constant picture constant and a same-size resize is a copy', () => {
    const flat: RgbImage = { width: 7, height: 5, pixels: new Uint8Array(7 * 5 * 3).fill(200) };
    assert.ok(resizeBicubicPil(flat, 3, 11).pixels.every((v) => v === 200));
    const same = resizeBicubicPil(flat, 7, 5);
    assert.deepEqual(same.pixels, flat.pixels);
    assert.notEqual(same.pixels, flat.pixels);
  });
});

describe('image encoder (CLIPVisionModelWithProjection)', () => {
  test('every output for the test image and for zeros matches transformers', async (t) => {
    const g = new GraphBuilder('image_encoder');
    const p = Params.of(g, componentWeights(goldenPath(ENCODER), 'image_encoder'));
    const built = buildClipVision(g, readConfig(ENCODER), p);
    assert.deepEqual(p.unusedKeys(), [], 'every stored weight is used');
    assert.equal(built.tokens, 17);
    const file = 'ip_adapter/image_encoder.outputs.safetensors';
    const expected = readGolden(file);
    const pixels = readGolden('ip_adapter/image_encoder.inputs.safetensors').get('pixel_values')!;
    const zeros = tensor(new Float32Array(pixels.data.length), pixels.shape);
    // Both rows in one batch, as they could be run; each row must match its own golden.
    const batch = tensor(new Float32Array([...pixels.data, ...zeros.data]), [2, ...pixels.shape.slice(1)]);
    const out = await runGraph(g, { pixel_values: batch });
    const row = (name: string, r: number): Float32Array => {
      const d = out[name]!.data as Float32Array;
      const size = d.length / 2;
      return d.subarray(r * size, (r + 1) * size);
    };
    assertGolden(t, 'image_embeds', row('image_embeds', 0), expected.get('image_embeds')!.data, file, 'image_embeds');
    assertGolden(t, 'last_hidden_state', row('last_hidden_state', 0), expected.get('last_hidden_state')!.data, file, 'last_hidden_state');
    const hidden = expected.get('hidden_states')!;
    const layerSize = hidden.data.length / 3;
    for (let i = 0; i < 3; i++) {
      assertGolden(t, `hidden_states.${i}`, row(`hidden_states.${i}`, 0), hidden.data.subarray(i * layerSize, (i + 1) * layerSize), file, 'hidden_states');
    }
    assertGolden(t, 'penultimate (hidden_states.1)', row('hidden_states.1', 0), expected.get('penultimate')!.data, file, 'penultimate');
    assertGolden(t, 'zeros.image_embeds', row('image_embeds', 1), expected.get('zeros.image_embeds')!.data, file, 'zeros.image_embeds');
    assertGolden(t, 'zeros.penultimate', row('hidden_states.1', 1), expected.get('zeros.penultimate')!.data, file, 'zeros.penultimate');
  });
});

describe('adapter files (h94 layout)', () => {
  test('kinds, sizes and the ip_adapter.<n> -> attn2 map equal diffusers\' (manifest ip_layers)', () => {
    const expectations = {
      sd15: { kind: 'base', tokens: 4, embedDim: 20, crossAttentionDim: 8, layers: 16 },
      sdxl: { kind: 'plus', tokens: 16, embedDim: 16, crossAttentionDim: 18, layers: 22 },
    } as const;
    for (const kind of ['sd15', 'sdxl'] as const) {
      const a = readIpAdapter(ADAPTERS[kind]);
      const e = expectations[kind];
      assert.deepEqual([a.kind, a.tokens, a.embedDim, a.crossAttentionDim, a.layers.size], [e.kind, e.tokens, e.embedDim, e.crossAttentionDim, e.layers]);
      const map = ipAdapterLayerMap(parseUnetConfig(readConfig(UNETS[kind])));
      const expected = Object.entries(manifest[kind].ip_layers).map(([key, v]) => [v.processor.replace(/\.processor$/, ''), Number(key.split('.')[1])]);
      assert.deepEqual([...map], expected);
    }
    assert.deepEqual(readIpAdapter(ADAPTERS.sdxl).resampler, { hidden: 16, heads: 2, depth: 4 });
  });

  for (const kind of ['sd15', 'sdxl'] as const) {
    test(`${kind}: the projection gives diffusers' ip_tokens`, async (t) => {
      const file = `ip_adapter/${kind}.embeds.safetensors`;
      const golden = readGolden(file);
      const embeds = golden.get('image_embeds')!;
      const g = new GraphBuilder('image_proj');
      const adapter = readIpAdapter(ADAPTERS[kind]);
      buildImageProjection(g, adapter);
      // (2, 1, ...) num_images = 1 -> (2, ...)
      const out = await runGraph(g, { image_embeds: tensor(embeds.data, [embeds.shape[0]!, ...embeds.shape.slice(2)]) });
      assertGolden(t, `${kind} ip_tokens`, out.ip_tokens!.data as Float32Array, golden.get('ip_tokens')!.data, file, 'ip_tokens');
    });
  }
});

/** Projects the golden UNet inputs' image_embeds with the adapter (as the engine does, its own graph). */
async function projectedTokens(kind: 'sd15' | 'sdxl', embeds: GoldenTensor): Promise<GoldenTensor> {
  const g = new GraphBuilder('image_proj');
  buildImageProjection(g, readIpAdapter(ADAPTERS[kind]));
  const out = await runGraph(g, { image_embeds: tensor(embeds.data, [embeds.shape[0]!, ...embeds.shape.slice(2)]) });
  return tensor(out.ip_tokens!.data as Float32Array, [...out.ip_tokens!.dims]);
}

/**
 * Writes `g` once and runs it in one session at each scale (a number: `ip_scale`; a list: one per
 * adapter, `ip_scale`, `ip_scale.1`, ...), returning out_sample per run.
 */
async function runScales(g: GraphBuilder, feeds: Record<string, GoldenTensor>, scales: (number | number[])[]): Promise<Float32Array[]> {
  const dir = tempDir('ip-unet');
  writeGraph(g, dir);
  const session = await ort.InferenceSession.create(join(dir, GRAPH_FILE), SESSION_OPTIONS);
  try {
    const out: Float32Array[] = [];
    for (const scale of scales) {
      const inputs: Record<string, ort.Tensor> = {};
      for (const name of session.inputNames) {
        const adapter = name === 'ip_scale' ? 0 : name.startsWith('ip_scale.') ? Number(name.slice('ip_scale.'.length)) : undefined;
        const f = adapter === undefined ? feeds[name] : tensor(Float32Array.of(typeof scale === 'number' ? scale : scale[adapter]!), [1]);
        assert.ok(f, `no feed for ${name}`);
        inputs[name] = new ort.Tensor('float32', f.data, f.shape);
      }
      out.push((await session.run(inputs, ['out_sample'])).out_sample!.data as Float32Array);
    }
    return out;
  } finally {
    await session.release();
  }
}

describe('UNet with the adapter', () => {
  for (const kind of ['sd15', 'sdxl'] as const) {
    test(`${kind}: scale 0.0 and 0.6 match diffusers, and scale 0.0 the plain UNet`, async (t: TestContext) => {
      const inputs = readGolden(`ip_adapter/${kind}.unet.inputs.safetensors`);
      const feeds: Record<string, GoldenTensor> = Object.fromEntries([...inputs].filter(([name]) => name !== 'image_embeds'));
      feeds.ip_tokens = await projectedTokens(kind, inputs.get('image_embeds')!);
      const g = new GraphBuilder('unet');
      const p = Params.of(g, componentWeights(goldenPath(UNETS[kind]), 'unet'));
      buildIpAdapterUnet(g, readConfig(UNETS[kind]), p, [readIpAdapter(ADAPTERS[kind])]);
      assert.deepEqual(p.unusedKeys(), []);
      assert.equal(g.inputs.at(-2)!.name, 'ip_tokens');
      assert.equal(g.inputs.at(-1)!.name, 'ip_scale');
      const file = `ip_adapter/${kind}.unet.outputs.safetensors`;
      const expected = readGolden(file);
      // One session, both scales: the scale is an input, so a new weight needs no rebuild.
      const results = await runScales(g, feeds, [0, 0.6]);
      for (const [i, scale] of ['0.0', '0.6'].entries()) {
        assertGolden(t, `${kind} sample_scale_${scale}`, results[i]!, expected.get(`sample_scale_${scale}`)!.data, file, `sample_scale_${scale}`);
      }
      // Scale 0 in the graph adds 0 · the IP part, so only ONNX Runtime's fusions could make it
      // differ from the plain UNet (measured: identical here; the engine skips the adapter UNet at 0 anyway).
      const plain = new GraphBuilder('unet');
      buildUnet(plain, readConfig(UNETS[kind]), Params.of(plain, componentWeights(goldenPath(UNETS[kind]), 'unet')));
      delete feeds.ip_tokens;
      const plainOut = (await runGraph(plain, feeds, ['out_sample'])).out_sample!.data as Float32Array;
      t.diagnostic(`${kind}: adapter UNet at scale 0 vs plain UNet, max abs diff ${maxAbsDiff(results[0]!, plainOut)}`);
      assertGolden(t, `${kind} plain vs scale 0`, plainOut, expected.get('sample_scale_0.0')!.data, file, 'sample_scale_0.0');
    });
  }

  test('two adapters in one UNet: each at its own weight (sd15 adapter twice: [0.6, 0] and [0.3, 0.3] are scale 0.6)', async (t) => {
    const inputs = readGolden('ip_adapter/sd15.unet.inputs.safetensors');
    const feeds: Record<string, GoldenTensor> = Object.fromEntries([...inputs].filter(([name]) => name !== 'image_embeds'));
    feeds.ip_tokens = feeds['ip_tokens.1'] = await projectedTokens('sd15', inputs.get('image_embeds')!);
    const g = new GraphBuilder('unet');
    const adapter = readIpAdapter(ADAPTERS.sd15);
    buildIpAdapterUnet(g, readConfig(UNETS.sd15), Params.of(g, componentWeights(goldenPath(UNETS.sd15), 'unet')), [adapter, adapter]);
    assert.deepEqual(g.inputs.slice(-4).map((v) => v.name), ['ip_tokens', 'ip_scale', 'ip_tokens.1', 'ip_scale.1']);
    const file = 'ip_adapter/sd15.unet.outputs.safetensors';
    const expected = readGolden(file).get('sample_scale_0.6')!.data;
    const [first, split] = await runScales(g, feeds, [[0.6, 0], [0.3, 0.3]]);
    assertGolden(t, 'weights [0.6, 0]', first!, expected, file, 'sample_scale_0.6');
    assertGolden(t, 'weights [0.3, 0.3]', split!, expected, file, 'sample_scale_0.6');
  });

  test('the SDXL map has 22 layers, mid block last (as diffusers registers the blocks)', () => {
    const paths = crossAttentionPaths(parseUnetConfig(readConfig(UNETS.sdxl)));
    assert.equal(paths.length, 22);
    assert.equal(paths.at(-1), 'mid_block.attentions.0.transformer_blocks.1.attn2');
  });
});

describe('pipelines with an image prompt, from the cases\' latents', () => {
  let cacheDir: string;
  let engine: Engine;
  before(() => {
    cacheDir = mkdtempSync(join(tmpdir(), 'kiln-golden-ip-'));
    engine = new Engine({ cacheDir, searchDirs: [] });
  });
  const runners = new Map<string, ImagePromptRunner>();
  after(async () => {
    await Promise.all([...runners.values()].map((r) => r.release()));
    await engine.close();
    rmSync(cacheDir, { recursive: true, force: true });
  });

  async function setup(kind: 'sd15' | 'sdxl'): Promise<{ model: DiffusionModel; runner: ImagePromptRunner }> {
    const model = await engine.model(join(GOLDEN_DIR, 'pipelines', kind));
    let runner = runners.get(kind);
    if (!runner) {
      runner = await loadImagePrompt(model, [{ adapter: ADAPTERS[kind], imageEncoder: goldenPath(ENCODER) }], engine);
      runners.set(kind, runner);
    }
    return { model, runner };
  }

  for (const c of manifest.cases) {
    test(c.id, async (t) => {
      const { model, runner } = await setup(c.pipeline);
      assert.equal(await loadImagePrompt(model, [{ adapter: ADAPTERS[c.pipeline], imageEncoder: goldenPath(ENCODER) }], engine), runner, 'loaded once');
      const outFile = join('ip_adapter', c.outputs_file);
      const image = testImage();

      // What the UNet gets: diffusers' image embeddings, [uncond, cond].
      const embeds = (await runner.imageEmbeds(image, true))[0]!;
      const golden = readGolden(outFile).get('unet_step0_image_embeds')!;
      assertGolden(t, 'unet_step0_image_embeds', embeds.data, golden.data, outFile, 'unet_step0_image_embeds');

      const result = await runGoldenCase(model, c, { imagePrompt: { runner, image, scale: c.ip_adapter_scale } }, 'ip_adapter');
      assertGoldenCase(t, result, c, 'ip_adapter');

      // Weight 0: the plain model's bytes.
      const plain = await runGoldenCase(model, c, {}, 'ip_adapter');
      const zero = await runGoldenCase(model, c, { imagePrompt: { runner, image, scale: 0 } }, 'ip_adapter');
      assert.deepEqual(zero.image.pixels, plain.image.pixels);
      assert.deepEqual(zero.latents, plain.latents);
      assert.ok(maxAbsDiff(plain.latents, result.latents) > 0.1, 'the image prompt changes the result');
    });
  }

  test('img2img takes the image prompt too; wrong weights are refused', async () => {
    const { model, runner } = await setup('sd15');
    const image = testImage();
    const init: RgbImage = { width: 64, height: 64, pixels: new Uint8Array(64 * 64 * 3).map((_, i) => (i * 37) % 256) };
    const options = { prompt: 'a lighthouse', seed: 5, size: '64x64', allowedSizes: ['64x64'], steps: 4, image: init, strength: 0.6 };
    const plain = await img2img(model, options);
    const zero = await img2img(model, { ...options, imagePrompt: { runner, image, scale: [0] } });
    const steered = await img2img(model, { ...options, imagePrompt: { runner, image, scale: 0.8 } });
    assert.deepEqual(zero.image.pixels, plain.image.pixels);
    assert.ok(maxAbsDiff(steered.latents, plain.latents) > 0.05);
    for (const scale of [[0.5, 0.5], -0.1, Number.NaN]) {
      await assert.rejects(generate(model, { prompt: 'x', seed: 1, size: '64x64', allowedSizes: ['64x64'], steps: 1, imagePrompt: { runner, image, scale } }), InvalidOptionError);
    }
    const sdxl = await engine.model(join(GOLDEN_DIR, 'pipelines', 'sdxl'));
    await assert.rejects(
      generate(sdxl, { prompt: 'x', seed: 1, size: '64x64', allowedSizes: ['64x64'], steps: 1, imagePrompt: { runner, image, scale: 0.5 } }),
      /the image prompt's adapters are built into model sd15's own UNet; this generation runs model sdxl/,
    );
  });

  test('an adapter of the other family, a missing image encoder and an ONNX-only model are refused by name', async () => {
    const sdxl = await engine.model(join(GOLDEN_DIR, 'pipelines', 'sdxl'));
    await assert.rejects(
      loadImagePrompt(sdxl, [{ adapter: ADAPTERS.sd15, imageEncoder: goldenPath(ENCODER) }], engine),
      (e: unknown) => {
        assert.ok(e instanceof ModelLoadError);
        assert.match(e.message, /^IP-Adapter ip-adapter_sd15\.safetensors is made for another UNet \(16 cross-attention layers of width 8\); model sdxl has 22 cross-attention layers of width 18/);
        return true;
      },
    );
    const missing = join(tmpdir(), 'kiln-no-such-encoder');
    await assert.rejects(loadImagePrompt(sdxl, [{ adapter: ADAPTERS.sdxl, imageEncoder: missing }], engine), (e: unknown) => {
      assert.ok(e instanceof ModelLoadError);
      assert.match(e.message, /^the image encoder for IP-Adapter ip-adapter-plus_sdxl_vit-h\.safetensors is missing: .*kiln-no-such-encoder does not exist/);
      return true;
    });
    const onnxOnly = { name: 'onnx-model', layout: { dir: tempDir('onnx-model') } } as unknown as DiffusionModel;
    assert.throws(() => modelUnetSource(onnxOnly), /image prompts need model onnx-model as diffusers safetensors weights/);
  });
});

describe('refusals while planning (headers and configs only)', () => {
  const unet = goldenPath('components/unet_sdxl');

  test('an encoder of another width is refused, naming both widths', () => {
    const dir = tempDir('encoder');
    const config = { ...readConfig(ENCODER), hidden_size: 32 };
    writeFileSync(join(dir, 'config.json'), JSON.stringify(config));
    copyFileSync(join(goldenPath(ENCODER), 'model.safetensors'), join(dir, 'model.safetensors'));
    assert.throws(
      () => planImagePrompt({ unet, adapters: [{ file: ADAPTERS.sdxl, imageEncoder: dir }] }),
      /IP-Adapter ip-adapter-plus_sdxl_vit-h\.safetensors takes image-encoder hidden states of width 16; the image encoder .* has width 32/,
    );
  });

  test('projections Kiln does not implement and FaceID layers are refused, naming the file', () => {
    const dir = tempDir('adapters');
    const f16 = (shape: number[]) => ({ dtype: 'F16' as const, shape, data: new Uint16Array(shape.reduce((a, b) => a * b, 1)) });
    const layers = { 'ip_adapter.1.to_k_ip.weight': f16([8, 8]), 'ip_adapter.1.to_v_ip.weight': f16([8, 8]) };
    writeSafetensors(join(dir, 'full-face.safetensors'), { 'image_proj.proj.0.weight': f16([8, 20]), ...layers });
    assert.throws(() => readIpAdapter(join(dir, 'full-face.safetensors')), /full-face MLP/);
    writeSafetensors(join(dir, 'faceid.safetensors'), { 'image_proj.proj.weight': f16([32, 20]), 'ip_adapter.1.to_q_lora.down.weight': f16([4, 8]), ...layers });
    assert.throws(() => readIpAdapter(join(dir, 'faceid.safetensors')), /FaceID adapters .* are not supported/);
    mkdirSync(join(dir, 'x'));
    writeFileSync(join(dir, 'x', 'ip-adapter.bin'), readFileSync(ADAPTERS.sd15));
    assert.throws(() => readIpAdapter(join(dir, 'x', 'ip-adapter.bin')), /Kiln reads the \.safetensors adapter files/);
  });
});
