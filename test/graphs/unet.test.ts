/**
 * The UNet page against diffusers: the golden tiny SD 1.5 and SDXL UNets (components/), the odd
 * latent size through the pipeline goldens' step-0 UNet call, config/weight mismatches, refused
 * features, the time-ids rule and the frequency table. The full-size architectures are counted
 * in full-size.test.ts.
 *
 * Tolerance: roundingTolerance (golden.ts), 3x torch's own 1-vs-2-thread difference here.
 * ONNX Runtime sums in other orders than torch (GroupNorm as InstanceNormalization, fused GELU,
 * MLAS GEMM/conv blocking). Measured (t.diagnostic; 'all' optimizations, identical at 1, 2 and
 * 4 threads): unet_sd15 7.60e-7 (1.5x README 4.99e-7; 6.8 ulps of 0.933), unet_sdxl 9.69e-7
 * (1.2x README 8.34e-7), sd15_euler_4_odd 2.98e-7 (1.1x README 2.68e-7), sdxl_euler_4_odd
 * 8.34e-7 (1.3x README 6.37e-7). For scale: a LayerNorm eps of 1e-6 instead of 1e-5 moves these
 * outputs by 4e-6..6e-6.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { ModelLoadError } from '../../src/engine/errors.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { buildUnet, parseUnetConfig, timestepFrequencies } from '../../src/graphs/unet.js';
import { componentWeights, Params, RandomWeights } from '../../src/graphs/weights.js';
import { assertGolden, describeValues, editedWeights, goldenPath, readConfig, readGolden, runGraph, type Feed } from './golden.js';

/** Builds the UNet of `folder` (golden-relative or absolute), runs it on `feeds` and returns out_sample. */
async function runUnet(folder: string, feeds: Record<string, Feed>): Promise<Float32Array> {
  const g = new GraphBuilder('unet');
  const p = Params.of(g, componentWeights(goldenPath(folder), 'unet'));
  buildUnet(g, readConfig(folder), p);
  assert.deepEqual(p.unusedKeys(), [], 'every stored weight is used');
  return (await runGraph(g, feeds, ['out_sample'])).out_sample!.data as Float32Array;
}

for (const name of ['unet_sd15', 'unet_sdxl']) {
  test(`${name} matches diffusers (components golden)`, async (t) => {
    const folder = `components/${name}`;
    const out = await runUnet(folder, Object.fromEntries(readGolden(`${folder}/inputs.safetensors`)));
    const file = `${folder}/outputs.safetensors`;
    assertGolden(t, name, out, readGolden(file).get('sample')!.data, file, 'sample');
  });
}

/** The pipeline goldens' step-0 UNet call at 6x8 latents (not divisible by 2^levels). */
async function oddCase(t: TestContext, id: string, pipeline: string): Promise<void> {
  const file = `pipelines/cases/${id}.outputs.safetensors`;
  const o = readGolden(file);
  const sample = o.get('unet_step0_sample')!;
  assert.deepEqual(sample.shape.slice(2), [6, 8]);
  const batch = sample.shape[0]!;
  const feeds: Record<string, Feed> = {
    sample,
    encoder_hidden_states: o.get('unet_step0_encoder_hidden_states')!,
    timestep: { data: new Float32Array(batch).fill(o.get('unet_timesteps')!.data[0]!), shape: [batch] },
  };
  if (o.has('unet_step0_text_embeds')) feeds['text_embeds'] = o.get('unet_step0_text_embeds')!;
  if (o.has('unet_step0_time_ids')) feeds['time_ids'] = o.get('unet_step0_time_ids')!;
  const out = await runUnet(`pipelines/${pipeline}/unet`, feeds);
  assertGolden(t, id, out, o.get('unet_step0_noise_pred')!.data, file, 'unet_step0_noise_pred');
}

test('sd15 UNet at an odd latent size (sd15_euler_4_odd step 0)', (t) => oddCase(t, 'sd15_euler_4_odd', 'sd15'));
test('sdxl UNet at an odd latent size (sdxl_euler_4_odd step 0)', (t) => oddCase(t, 'sdxl_euler_4_odd', 'sdxl'));

function buildFrom(folder: string): Params {
  const g = new GraphBuilder('unet');
  const p = Params.of(g, componentWeights(folder, 'unet'));
  buildUnet(g, readConfig(folder), p);
  return p;
}

const SD15 = 'components/unet_sd15';
const SD15_WEIGHTS = `${SD15}/diffusion_pytorch_model.safetensors`;

test('a config that does not fit the weights fails at build, naming the component, the key and both shapes', () => {
  const dir = editedWeights(SD15_WEIGHTS, undefined, { ...readConfig(SD15), block_out_channels: [8, 16, 16, 32] });
  assert.throws(
    () => buildFrom(dir),
    (e: unknown) => {
      assert.ok(e instanceof ModelLoadError);
      assert.match(e.message, /^unet: weight "down_blocks\.3\.resnets\.0\.conv1\.weight" .* has shape \[24, 16, 3, 3\] but config\.json implies \[32, 16, 3, 3\]/);
      return true;
    },
  );
});

test('a weights file missing a key fails at build, naming the component, the key and the expected shape', () => {
  const key = 'mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight';
  const dir = editedWeights(
    SD15_WEIGHTS,
    (weights) => {
      assert.deepEqual(weights[key]!.shape, [24, 8]);
      delete weights[key];
    },
    readConfig(SD15),
  );
  assert.throws(
    () => buildFrom(dir),
    (e: unknown) => {
      assert.ok(e instanceof ModelLoadError);
      assert.match(e.message, /^unet: the weights in .* have no "mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight" \(config\.json implies shape \[24, 8\]\)/);
      return true;
    },
  );
});

test('features the page does not implement are refused, naming the key', () => {
  const base = readConfig(SD15);
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ class_embed_type: 'timestep' }, /"class_embed_type" = "timestep" is not supported/],
    [{ addition_embed_type: 'text' }, /"addition_embed_type" = "text" is not supported/],
    [{ resnet_time_scale_shift: 'scale_shift' }, /"resnet_time_scale_shift" = "scale_shift" is not supported/],
    [{ down_block_types: ['AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D', 'DownBlock2D'] }, /"down_block_types" .*block type "AttnDownBlock2D"/],
    [{ mid_block_type: 'UNetMidBlock2DSimpleCrossAttn' }, /"mid_block_type" = "UNetMidBlock2DSimpleCrossAttn" is not supported/],
    [{ num_attention_heads: 8 }, /"num_attention_heads" = 8 is not supported/],
    [{ time_embedding_type: 'fourier' }, /"time_embedding_type" = "fourier" is not supported/],
    [{ encoder_hid_dim_type: 'text_proj', encoder_hid_dim: 16 }, /"encoder_hid_dim_type" = "text_proj" is not supported/],
    [{ transformer_layers_per_block: [[1, 2], [1, 2], [1, 2], [1, 2]] }, /"transformer_layers_per_block" .* is not supported/],
    [{ cross_attention_dim: [8, 8, 16, 16] }, /"cross_attention_dim" .* is not supported \(one width for every block\)/],
    [{ attention_head_dim: 3 }, /attention_head_dim.* 3 heads, which do not split 8 channels/],
  ];
  for (const [change, message] of cases) {
    const g = new GraphBuilder('unet');
    assert.throws(
      () => buildUnet(g, { ...base, ...change }, Params.of(g, componentWeights(goldenPath(SD15), 'unet'))),
      (e: unknown) => e instanceof ModelLoadError && message.test(e.message) && e.message.startsWith('unet: '),
      JSON.stringify(change),
    );
  }
});

test('SDXL time ids: 6 for base models, 5 for the aesthetic-score refiner', () => {
  const textTime = (config: Record<string, unknown>) => parseUnetConfig({ addition_embed_type: 'text_time', ...config }).textTime;
  // Golden tiny SDXL: 60 = 12 + 6·8 (README: text_embeds (2, 12), time_ids (2, 6)).
  assert.deepEqual(textTime(readConfig('components/unet_sdxl')), { textEmbedsDim: 12, timeIds: 6, timeIdDim: 8, inputDim: 60 });
  // SDXL base: 2816 = 1280 + 6·256; refiner: 2560 = 1280 + 5·256 with cross_attention_dim 1280.
  assert.deepEqual(textTime({ addition_time_embed_dim: 256, projection_class_embeddings_input_dim: 2816, cross_attention_dim: 2048 }), { textEmbedsDim: 1280, timeIds: 6, timeIdDim: 256, inputDim: 2816 });
  assert.deepEqual(textTime({ addition_time_embed_dim: 256, projection_class_embeddings_input_dim: 2560, cross_attention_dim: 1280 }), { textEmbedsDim: 1280, timeIds: 5, timeIdDim: 256, inputDim: 2560 });
  // model_index.json's requires_aesthetics_score, merged in by a caller, decides over the inference.
  assert.equal(textTime({ addition_time_embed_dim: 8, projection_class_embeddings_input_dim: 60, cross_attention_dim: 18, requires_aesthetics_score: true })?.timeIds, 5);
  assert.equal(textTime({ addition_time_embed_dim: 256, projection_class_embeddings_input_dim: 2560, cross_attention_dim: 1280, requires_aesthetics_score: false })?.timeIds, 6);
  assert.throws(() => textTime({ addition_time_embed_dim: 256, projection_class_embeddings_input_dim: 1024, cross_attention_dim: 1280 }), /projection_class_embeddings_input_dim/);
});

/** FNV-1a over the little-endian float32 bytes of a table. */
function fnv1a(values: Float32Array): number {
  const bytes = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  let h = 0x811c9dc5;
  for (const b of bytes) h = Math.imul(h ^ b, 0x01000193) >>> 0;
  return h >>> 0;
}

test("timestep frequency tables equal torch's float32 values bit for bit", () => {
  const bits = (half: number, shift: number, k: number): number => new Uint32Array(timestepFrequencies(half, shift).buffer)[k]!;
  // Values where torch's exp (SLEEF expf_u10) is one ulp off the correctly rounded exp.
  assert.equal(bits(160, 0, 2), 0x3f642906);
  assert.equal(bits(160, 0, 6), 0x3f353bf0);
  assert.equal(bits(128, 0, 14), 0x3ebaf81a);
  assert.equal(bits(192, 1, 6), 0x3f3faf10);
  // Whole tables, hashed, as printed by torch 1.13 (exp(-ln(1e4)·arange(half)/(half − shift))).
  const torch: Array<[number, number, number]> = [
    [4, 0, 0x215cf3fa],
    [128, 0, 0x2a63e58b],
    [160, 0, 0x72f711f8],
    [192, 0, 0xc98a4884],
    [640, 0, 0x4d948a9e],
    [64, 1, 0x28c44e10],
    [128, 1, 0x97846b20],
  ];
  for (const [half, shift, hash] of torch) assert.equal(fnv1a(timestepFrequencies(half, shift)), hash, `half ${half}, shift ${shift}`);
});

test('inpainting, LCM, linear projection, per-block heads and refiner time ids build and run (random weights)', async () => {
  const config = {
    ...readConfig(SD15),
    in_channels: 9,
    time_cond_proj_dim: 16,
    use_linear_projection: true,
    attention_head_dim: [1, 2, 2, 3],
    transformer_layers_per_block: [1, 2, 1, 1],
    addition_embed_type: 'text_time',
    addition_time_embed_dim: 4,
    projection_class_embeddings_input_dim: 26, // 6 + 5·4 with cross_attention_dim 6: five time ids
    cross_attention_dim: 6,
  };
  const g = new GraphBuilder('unet');
  buildUnet(g, config, Params.of(g, new RandomWeights('unet')));
  assert.deepEqual(describeValues(g.inputs), {
    sample: 'float32 [batch, 9, height, width]',
    timestep: 'float32 [batch]',
    encoder_hidden_states: 'float32 [batch, sequence, 6]',
    text_embeds: 'float32 [batch, 6]',
    time_ids: 'float32 [batch, 5]',
    timestep_cond: 'float32 [batch, 16]',
  });
  assert.deepEqual(describeValues(g.outputs), { out_sample: 'float32 [batch, 4, height, width]' });
  const fill = (shape: number[], f: (i: number) => number): Feed => ({ data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => f(i)), shape });
  const out = await runGraph(g, {
    sample: fill([2, 9, 5, 7], (i) => Math.sin(i)),
    timestep: fill([2], (i) => [999, 1][i]!),
    encoder_hidden_states: fill([2, 3, 6], (i) => Math.cos(i)),
    text_embeds: fill([2, 6], (i) => Math.sin(2 * i)),
    time_ids: fill([2, 5], (i) => [40, 56, 0, 0, 6][i % 5]!),
    timestep_cond: fill([2, 16], (i) => Math.cos(3 * i)),
  });
  const y = out['out_sample']!;
  assert.deepEqual(y.dims, [2, 4, 5, 7]);
  assert.ok((y.data as Float32Array).every(Number.isFinite));
});
