/**
 * The AutoencoderKL page against diffusers v0.31: the golden tiny VAE (components/vae) encoded
 * and decoded through onnxruntime-node, weight checks at build time, and the full-size SD VAE's
 * parameter count.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { ModelLoadError } from '../../src/engine/errors.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { openSafetensors, readTensorBytes, readTensorFloat32, writeSafetensors, type TensorToWrite } from '../../src/graphs/safetensors.js';
import { buildVaeDecoder, buildVaeEncoder } from '../../src/graphs/vae.js';
import { componentWeights, Params, RandomWeights, SafetensorsWeights, type WeightSource } from '../../src/graphs/weights.js';
import { writeGraph } from '../../src/graphs/write.js';
import { GOLDEN_DIR } from './golden.js';

const GOLDEN = join(GOLDEN_DIR, 'components', 'vae');
const config = JSON.parse(readFileSync(join(GOLDEN, 'config.json'), 'utf8')) as Record<string, unknown>;

function readAll(path: string): Map<string, { data: Float32Array; shape: number[] }> {
  const file = openSafetensors(path);
  return new Map([...file.tensors.values()].map((t) => [t.name, { data: readTensorFloat32(file, t), shape: t.shape }]));
}

function build(kind: 'encoder' | 'decoder', source: WeightSource): { g: GraphBuilder; p: Params } {
  const g = new GraphBuilder(`vae_${kind}`);
  const p = Params.of(g, source);
  (kind === 'encoder' ? buildVaeEncoder : buildVaeDecoder)(g, config, p);
  return { g, p };
}

async function run(g: GraphBuilder, feeds: Record<string, { data: Float32Array; shape: number[] }>, output: string): Promise<ort.Tensor> {
  const dir = mkdtempSync(join(tmpdir(), `kiln-${g.name}-`));
  try {
    writeGraph(g, dir);
    const session = await ort.InferenceSession.create(join(dir, 'model.onnx'), { intraOpNumThreads: 1 });
    const inputs = Object.fromEntries(Object.entries(feeds).map(([k, v]) => [k, new ort.Tensor('float32', v.data, v.shape)]));
    const out = (await session.run(inputs))[output]!;
    await session.release();
    return out;
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

test('vae graphs equal diffusers AutoencoderKL on the golden tiny VAE', async () => {
  const inputs = readAll(join(GOLDEN, 'inputs.safetensors'));
  const expected = readAll(join(GOLDEN, 'outputs.safetensors'));
  const weights = componentWeights(GOLDEN, 'vae');
  const enc = build('encoder', weights);
  const dec = build('decoder', weights);
  // 111839 parameters in 244 tensors (manifest.json); every stored key is used by one graph.
  assert.equal(enc.p.parameterCount + dec.p.parameterCount, 111839);
  const decUnused = new Set(dec.p.unusedKeys());
  assert.deepEqual(enc.p.unusedKeys().filter((k) => decUnused.has(k)), []);

  const params = await run(enc.g, { sample: inputs.get('image')! }, 'latent_parameters');
  assert.deepEqual(params.dims, [2, 8, 6, 8]);
  const decoded = await run(dec.g, { latent_sample: inputs.get('latent')! }, 'sample');
  assert.deepEqual(decoded.dims, [2, 3, 48, 64]);

  // latent_parameters = cat(mean, logvar) along channel 1: split per batch row.
  const data = params.data as Float32Array;
  const half = 4 * 6 * 8;
  const mean = new Float32Array(2 * half);
  const logvar = new Float32Array(2 * half);
  for (let b = 0; b < 2; b++) {
    mean.set(data.subarray(2 * b * half, (2 * b + 1) * half), b * half);
    logvar.set(data.subarray((2 * b + 1) * half, (2 * b + 2) * half), b * half);
  }
  // The README's tolerances are torch's own 1-vs-2-thread differences. ONNX Runtime's kernels
  // round differently from torch's (the measured max abs differences are 9.5e-7, 1.07e-6 and
  // 5.8e-6, i.e. 7.8, 8.7 and 19.3 float32 ulps of the largest value); an independent float64
  // NumPy forward pass is closer to ONNX Runtime than to torch in all three (ort-f64 7.7e-7,
  // 6.1e-7, 4.5e-6; torch-f64 9.8e-7, 9.6e-7, 5.1e-6), so the gap is rounding, not a bug. Hence
  // max(README, k · 2^-23 · maxAbs) with the smallest k that holds per tensor. A wrong norm eps
  // (1e-5) gives 4.7e-5 / 5.7e-5 / 2.3e-4 here.
  const checks: [string, Float32Array, number, number][] = [
    ['latent_mean', mean, 7.2e-7, 8],
    ['latent_logvar', logvar, 5.4e-7, 9],
    ['decoded', decoded.data as Float32Array, 4.9e-6, 20],
  ];
  for (const [name, actual, readme, k] of checks) {
    const { diff, maxAbs } = maxAbsDiff(actual, expected.get(name)!.data);
    const tolerance = Math.max(readme, k * 2 ** -23 * maxAbs);
    console.log(`${name}: max abs diff ${diff.toExponential(3)} (tolerance ${tolerance.toExponential(2)}, max abs ${maxAbs.toPrecision(3)})`);
    assert.ok(diff <= tolerance, `${name}: max abs diff ${diff} > ${tolerance}`);
  }
});

/** A temp copy of the golden weights with `edit` applied, as a SafetensorsWeights source. */
function editedWeights(edit: (tensors: Record<string, TensorToWrite>) => void): { source: SafetensorsWeights; dir: string } {
  const file = openSafetensors(join(GOLDEN, 'diffusion_pytorch_model.safetensors'));
  const tensors: Record<string, TensorToWrite> = {};
  for (const t of file.tensors.values()) tensors[t.name] = { dtype: t.dtype, shape: t.shape, data: readTensorBytes(file, t) };
  edit(tensors);
  const dir = mkdtempSync(join(tmpdir(), 'kiln-vae-weights-'));
  writeSafetensors(join(dir, 'diffusion_pytorch_model.safetensors'), tensors);
  return { source: componentWeights(dir, 'vae'), dir };
}

test('a missing weight fails at build with a ModelLoadError naming the component, key and shape', () => {
  const key = 'decoder.mid_block.attentions.0.to_q.bias';
  const { source, dir } = editedWeights((t) => delete t[key]);
  try {
    build('encoder', source); // the encoder does not need it
    assert.throws(
      () => build('decoder', source),
      (e: unknown) => e instanceof ModelLoadError && /^vae: /.test(e.message) && e.message.includes(`"${key}"`) && e.message.includes('[16]'),
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a weight of the wrong shape fails at build with a ModelLoadError naming both shapes', () => {
  const key = 'encoder.down_blocks.1.downsamplers.0.conv.weight';
  const { source, dir } = editedWeights((t) => {
    const w = t[key]!; // [16, 16, 3, 3] -> [16, 16, 1, 9]: same bytes, wrong kernel
    t[key] = { ...w, shape: [16, 16, 1, 9] };
  });
  try {
    assert.throws(
      () => build('encoder', source),
      (e: unknown) =>
        e instanceof ModelLoadError &&
        /^vae: /.test(e.message) &&
        e.message.includes(`"${key}"`) &&
        e.message.includes('[16, 16, 1, 9]') &&
        e.message.includes('[16, 16, 3, 3]'),
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the full-size SD VAE has 83,653,863 parameters', () => {
  const sd = {
    _class_name: 'AutoencoderKL',
    act_fn: 'silu',
    block_out_channels: [128, 256, 512, 512],
    down_block_types: Array(4).fill('DownEncoderBlock2D'),
    in_channels: 3,
    latent_channels: 4,
    layers_per_block: 2,
    norm_num_groups: 32,
    out_channels: 3,
    sample_size: 512,
    scaling_factor: 0.18215,
    up_block_types: Array(4).fill('UpDecoderBlock2D'),
  };
  const count = (build: typeof buildVaeEncoder): number => {
    const g = new GraphBuilder('vae');
    const p = Params.of(g, new RandomWeights('vae'));
    build(g, sd, p);
    return p.parameterCount;
  };
  // Summing the shapes diffusers creates: encoder + quant_conv 34,163,664; post_quant_conv + decoder 49,490,199.
  const encoder = count(buildVaeEncoder);
  const decoder = count(buildVaeDecoder);
  assert.deepEqual([encoder, decoder], [34_163_664, 49_490_199]);
  assert.equal(encoder + decoder, 83_653_863);
});
