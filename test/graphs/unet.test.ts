/**
 * The UNet page against diffusers: the golden tiny SD 1.5 and SDXL UNets (components/), the odd
 * latent size through the pipeline goldens' step-0 UNet call, config/weight mismatches, refused
 * features, the time-ids rule, the frequency table, and the full-size SD 1.5 parameter count.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { ModelLoadError } from '../../src/engine/errors.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { openSafetensors, readTensorFloat32, writeSafetensors } from '../../src/graphs/safetensors.js';
import { buildUnet, parseUnetConfig, timestepFrequencies } from '../../src/graphs/unet.js';
import { componentWeights, Params, RandomWeights } from '../../src/graphs/weights.js';
import { writeGraph } from '../../src/graphs/write.js';
import { GOLDEN_DIR, readmeTolerance } from './golden.js';

const GOLDEN = GOLDEN_DIR;
/**
 * ONNX Runtime sums in other orders than torch (GroupNorm as InstanceNormalization, fused GELU,
 * MLAS GEMM/conv blocking), so the UNet outputs land a few float32 ulps of the largest value from
 * diffusers', just above torch's own 1-vs-2-thread differences (tolerances.json: 4.99e-7,
 * 8.34e-7, 2.68e-7, 6.37e-7). Measured (ORT 'all' optimizations, identical at 1, 2 and 4
 * threads): unet_sd15 7.600e-7 (max 0.933, 6.8 ulps), unet_sdxl 9.686e-7 (max 1.677, 4.8 ulps),
 * sd15_euler_4_odd 2.980e-7 (max 0.685, 3.6 ulps), sdxl_euler_4_odd 8.345e-7 (max 1.429,
 * 4.9 ulps). k is the smallest integer that holds for each family. For scale: a LayerNorm eps of 1e-6 instead of 1e-5 moves these outputs by 4e-6..6e-6.
 */
const K_SD15 = 7;
const K_SDXL = 5;

interface Tensor {
  data: Float32Array;
  dims: number[];
}

function readTensors(path: string): Record<string, Tensor> {
  const file = openSafetensors(path);
  const out: Record<string, Tensor> = {};
  for (const [name, t] of file.tensors) out[name] = { data: readTensorFloat32(file, t), dims: t.shape };
  return out;
}

function readConfig(folder: string): Record<string, unknown> {
  return JSON.parse(readFileSync(join(folder, 'config.json'), 'utf8')) as Record<string, unknown>;
}

/** Builds the UNet of `folder`, writes it, runs it on `feeds` and returns out_sample. */
async function runUnet(folder: string, feeds: Record<string, Tensor>): Promise<Float32Array> {
  const g = new GraphBuilder('unet');
  const p = Params.of(g, componentWeights(folder, 'unet'));
  buildUnet(g, readConfig(folder), p);
  assert.deepEqual(p.unusedKeys(), [], 'every stored weight is used');
  const dir = mkdtempSync(join(tmpdir(), 'kiln-unet-'));
  try {
    writeGraph(g, dir);
    const session = await ort.InferenceSession.create(join(dir, 'model.onnx'), { graphOptimizationLevel: 'all' });
    try {
      const inputs: Record<string, ort.Tensor> = {};
      for (const name of session.inputNames) {
        const t = feeds[name];
        assert.ok(t, `feed for ${name}`);
        inputs[name] = new ort.Tensor('float32', t.data, t.dims);
      }
      const out = await session.run(inputs);
      return out['out_sample']!.data as Float32Array;
    } finally {
      await session.release();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function maxAbsDiff(a: Float32Array, b: Float32Array): { diff: number; maxAbs: number } {
  assert.equal(a.length, b.length);
  let diff = 0;
  let maxAbs = 0;
  for (let i = 0; i < a.length; i++) {
    diff = Math.max(diff, Math.abs(a[i]! - b[i]!));
    maxAbs = Math.max(maxAbs, Math.abs(b[i]!));
  }
  return { diff, maxAbs };
}

/**
 * Tolerance: the golden README's 1-vs-2-thread difference of torch itself (tolerances.json), or
 * k float32 ulps of the largest output value where ONNX Runtime's summation orders land above it.
 */
function tolerance(file: string, tensor: string, k: number, maxAbs: number): number {
  return Math.max(readmeTolerance(file, tensor), k * 2 ** -23 * maxAbs);
}

test('unet_sd15 matches diffusers (components golden)', async () => {
  const folder = join(GOLDEN, 'components/unet_sd15');
  const out = await runUnet(folder, readTensors(join(folder, 'inputs.safetensors')));
  const { diff, maxAbs } = maxAbsDiff(out, readTensors(join(folder, 'outputs.safetensors'))['sample']!.data);
  console.log(`unet_sd15: max abs diff ${diff.toExponential(3)} (max value ${maxAbs.toFixed(3)})`);
  assert.ok(diff <= tolerance('components/unet_sd15/outputs.safetensors', 'sample', K_SD15, maxAbs), `max abs diff ${diff}`);
});

test('unet_sdxl matches diffusers (components golden)', async () => {
  const folder = join(GOLDEN, 'components/unet_sdxl');
  const out = await runUnet(folder, readTensors(join(folder, 'inputs.safetensors')));
  const { diff, maxAbs } = maxAbsDiff(out, readTensors(join(folder, 'outputs.safetensors'))['sample']!.data);
  console.log(`unet_sdxl: max abs diff ${diff.toExponential(3)} (max value ${maxAbs.toFixed(3)})`);
  assert.ok(diff <= tolerance('components/unet_sdxl/outputs.safetensors', 'sample', K_SDXL, maxAbs), `max abs diff ${diff}`);
});

/** The pipeline goldens' step-0 UNet call at 6x8 latents (not divisible by 2^levels). */
async function oddCase(id: string, pipeline: string, k: number): Promise<void> {
  const file = `pipelines/cases/${id}.outputs.safetensors`;
  const o = readTensors(join(GOLDEN, file));
  const sample = o['unet_step0_sample']!;
  assert.deepEqual(sample.dims.slice(2), [6, 8]);
  const batch = sample.dims[0]!;
  const feeds: Record<string, Tensor> = {
    sample,
    encoder_hidden_states: o['unet_step0_encoder_hidden_states']!,
    timestep: { data: new Float32Array(batch).fill(o['unet_timesteps']!.data[0]!), dims: [batch] },
  };
  if (o['unet_step0_text_embeds']) feeds['text_embeds'] = o['unet_step0_text_embeds'];
  if (o['unet_step0_time_ids']) feeds['time_ids'] = o['unet_step0_time_ids'];
  const out = await runUnet(join(GOLDEN, 'pipelines', pipeline, 'unet'), feeds);
  const { diff, maxAbs } = maxAbsDiff(out, o['unet_step0_noise_pred']!.data);
  console.log(`${id}: max abs diff ${diff.toExponential(3)} (max value ${maxAbs.toFixed(3)})`);
  assert.ok(diff <= tolerance(file, 'unet_step0_noise_pred', k, maxAbs), `max abs diff ${diff}`);
}

test('sd15 UNet at an odd latent size (sd15_euler_4_odd step 0)', () => oddCase('sd15_euler_4_odd', 'sd15', K_SD15));
test('sdxl UNet at an odd latent size (sdxl_euler_4_odd step 0)', () => oddCase('sdxl_euler_4_odd', 'sdxl', K_SDXL));

/** A temporary UNet folder holding `config` and `weights` (a safetensors file path or tensors). */
function tempFolder(config: Record<string, unknown>, weights: string | Record<string, Tensor>): string {
  const dir = mkdtempSync(join(tmpdir(), 'kiln-unet-folder-'));
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config));
  const target = join(dir, 'diffusion_pytorch_model.safetensors');
  if (typeof weights === 'string') copyFileSync(weights, target);
  else writeSafetensors(target, Object.fromEntries(Object.entries(weights).map(([k, t]) => [k, { dtype: 'F32', shape: t.dims, data: t.data }])));
  return dir;
}

function buildFrom(folder: string): Params {
  const g = new GraphBuilder('unet');
  const p = Params.of(g, componentWeights(folder, 'unet'));
  buildUnet(g, readConfig(folder), p);
  return p;
}

const SD15 = join(GOLDEN, 'components/unet_sd15');
const SD15_WEIGHTS = join(SD15, 'diffusion_pytorch_model.safetensors');

test('a config that does not fit the weights fails at build, naming the component, the key and both shapes', () => {
  const dir = tempFolder({ ...readConfig(SD15), block_out_channels: [8, 16, 16, 32] }, SD15_WEIGHTS);
  try {
    assert.throws(
      () => buildFrom(dir),
      (e: unknown) => {
        assert.ok(e instanceof ModelLoadError);
        assert.match(e.message, /^unet: weight "down_blocks\.3\.resnets\.0\.conv1\.weight" .* has shape \[24, 16, 3, 3\] but config\.json implies \[32, 16, 3, 3\]/);
        return true;
      },
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a weights file missing a key fails at build, naming the component, the key and the expected shape', () => {
  const weights = readTensors(SD15_WEIGHTS);
  const key = 'mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight';
  assert.deepEqual(weights[key]!.dims, [24, 8]);
  delete weights[key];
  const dir = tempFolder(readConfig(SD15), weights);
  try {
    assert.throws(
      () => buildFrom(dir),
      (e: unknown) => {
        assert.ok(e instanceof ModelLoadError);
        assert.match(e.message, /^unet: the weights in .* have no "mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight" \(config\.json implies shape \[24, 8\]\)/);
        return true;
      },
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
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
      () => buildUnet(g, { ...base, ...change }, Params.of(g, componentWeights(SD15, 'unet'))),
      (e: unknown) => e instanceof ModelLoadError && message.test(e.message) && e.message.startsWith('unet: '),
      JSON.stringify(change),
    );
  }
});

test('SDXL time ids: 6 for base models, 5 for the aesthetic-score refiner', () => {
  const textTime = (config: Record<string, unknown>) => parseUnetConfig({ addition_embed_type: 'text_time', ...config }).textTime;
  // Golden tiny SDXL: 60 = 12 + 6·8 (README: text_embeds (2, 12), time_ids (2, 6)).
  assert.deepEqual(textTime(readConfig(join(GOLDEN, 'components/unet_sdxl'))), { textEmbedsDim: 12, timeIds: 6, timeIdDim: 8, inputDim: 60 });
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

test('full-size SD 1.5 UNet: 859520964 parameters', () => {
  const config = {
    _class_name: 'UNet2DConditionModel', act_fn: 'silu', attention_head_dim: 8, block_out_channels: [320, 640, 1280, 1280],
    center_input_sample: false, cross_attention_dim: 768,
    down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
    downsample_padding: 1, flip_sin_to_cos: true, freq_shift: 0, in_channels: 4, layers_per_block: 2, mid_block_scale_factor: 1,
    norm_eps: 1e-5, norm_num_groups: 32, out_channels: 4, sample_size: 64,
    up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
  };
  const g = new GraphBuilder('unet');
  const p = Params.of(g, new RandomWeights('unet'));
  buildUnet(g, config, p);
  assert.equal(p.parameterCount, 859520964);
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
  const dims = (list: typeof g.inputs) => Object.fromEntries(list.map((v) => [v.name, v.type!.tensorType!.shape!.dim!.map((d) => d.dimValue ?? d.dimParam)]));
  assert.deepEqual(dims(g.inputs), {
    sample: ['batch', 9, 'height', 'width'],
    timestep: ['batch'],
    encoder_hidden_states: ['batch', 'sequence', 6],
    text_embeds: ['batch', 6],
    time_ids: ['batch', 5],
    timestep_cond: ['batch', 16],
  });
  assert.deepEqual(dims(g.outputs), { out_sample: ['batch', 4, 'height', 'width'] });
  const dir = mkdtempSync(join(tmpdir(), 'kiln-unet-'));
  try {
    writeGraph(g, dir);
    const session = await ort.InferenceSession.create(join(dir, 'model.onnx'));
    const fill = (dimsOf: number[], f: (i: number) => number) => new ort.Tensor('float32', Float32Array.from({ length: dimsOf.reduce((a, b) => a * b, 1) }, (_, i) => f(i)), dimsOf);
    const out = await session.run({
      sample: fill([2, 9, 5, 7], (i) => Math.sin(i)),
      timestep: fill([2], (i) => [999, 1][i]!),
      encoder_hidden_states: fill([2, 3, 6], (i) => Math.cos(i)),
      text_embeds: fill([2, 6], (i) => Math.sin(2 * i)),
      time_ids: fill([2, 5], (i) => [40, 56, 0, 0, 6][i % 5]!),
      timestep_cond: fill([2, 16], (i) => Math.cos(3 * i)),
    });
    await session.release();
    const y = out['out_sample']!;
    assert.deepEqual(y.dims, [2, 4, 5, 7]);
    assert.ok((y.data as Float32Array).every(Number.isFinite));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
