/**
 * The AutoencoderKL page against diffusers v0.31: the golden tiny VAE (components/vae) encoded
 * and decoded through onnxruntime-node, and weight checks at build time. The full-size VAEs are
 * counted in full-size.test.ts.
 *
 * Tolerance: roundingTolerance (golden.ts), 3x torch's own 1-vs-2-thread difference here.
 * ONNX Runtime's kernels round differently from torch's; an independent float64 NumPy forward
 * pass is closer to ONNX Runtime than to torch for all three tensors (ort-f64 7.7e-7, 6.1e-7,
 * 4.5e-6; torch-f64 9.8e-7, 9.6e-7, 5.1e-6), so the gap is rounding, not a bug. Measured
 * (t.diagnostic): latent_mean 9.54e-7 (1.3x README 7.15e-7), latent_logvar 1.07e-6 (2.0x README
 * 5.36e-7), decoded 5.80e-6 (1.2x README 4.92e-6). A wrong norm eps (1e-5) gives
 * 4.7e-5 / 5.7e-5 / 2.3e-4 here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ModelLoadError } from '../../src/engine/errors.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { buildVaeDecoder, buildVaeEncoder } from '../../src/graphs/vae.js';
import { componentWeights, Params, type WeightSource } from '../../src/graphs/weights.js';
import { assertGolden, editedWeights, goldenPath, readConfig, readGolden, runGraph } from './golden.js';

const VAE = 'components/vae';
const config = readConfig(VAE);

function build(kind: 'encoder' | 'decoder', source: WeightSource): { g: GraphBuilder; p: Params } {
  const g = new GraphBuilder(`vae_${kind}`);
  const p = Params.of(g, source);
  (kind === 'encoder' ? buildVaeEncoder : buildVaeDecoder)(g, config, p);
  return { g, p };
}

test('vae graphs equal diffusers AutoencoderKL on the golden tiny VAE', async (t) => {
  const inputs = readGolden(`${VAE}/inputs.safetensors`);
  const file = `${VAE}/outputs.safetensors`;
  const expected = readGolden(file);
  const weights = componentWeights(goldenPath(VAE), 'vae');
  const enc = build('encoder', weights);
  const dec = build('decoder', weights);
  // 111839 parameters in 244 tensors (manifest.json); every stored key is used by one graph.
  assert.equal(enc.p.parameterCount + dec.p.parameterCount, 111839);
  const decUnused = new Set(dec.p.unusedKeys());
  assert.deepEqual(enc.p.unusedKeys().filter((k) => decUnused.has(k)), []);

  const params = (await runGraph(enc.g, { sample: inputs.get('image')! })).latent_parameters!;
  assert.deepEqual(params.dims, [2, 8, 6, 8]);
  const decoded = (await runGraph(dec.g, { latent_sample: inputs.get('latent')! })).sample!;
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
  const checks: [string, Float32Array][] = [
    ['latent_mean', mean],
    ['latent_logvar', logvar],
    ['decoded', decoded.data as Float32Array],
  ];
  for (const [name, actual] of checks) assertGolden(t, name, actual, expected.get(name)!.data, file, name);
});

const WEIGHTS = `${VAE}/diffusion_pytorch_model.safetensors`;

test('a missing weight fails at build with a ModelLoadError naming the component, key and shape', () => {
  const key = 'decoder.mid_block.attentions.0.to_q.bias';
  const source = componentWeights(editedWeights(WEIGHTS, (t) => delete t[key]), 'vae');
  build('encoder', source); // the encoder does not need it
  assert.throws(
    () => build('decoder', source),
    (e: unknown) => e instanceof ModelLoadError && /^vae: /.test(e.message) && e.message.includes(`"${key}"`) && e.message.includes('[16]'),
  );
});

test('a weight of the wrong shape fails at build with a ModelLoadError naming both shapes', () => {
  const key = 'encoder.down_blocks.1.downsamplers.0.conv.weight';
  const dir = editedWeights(WEIGHTS, (t) => {
    const w = t[key]!; // [16, 16, 3, 3] -> [16, 16, 1, 9]: same bytes, wrong kernel
    t[key] = { ...w, shape: [16, 16, 1, 9] };
  });
  assert.throws(
    () => build('encoder', componentWeights(dir, 'vae')),
    (e: unknown) =>
      e instanceof ModelLoadError &&
      /^vae: /.test(e.message) &&
      e.message.includes(`"${key}"`) &&
      e.message.includes('[16, 16, 1, 9]') &&
      e.message.includes('[16, 16, 3, 3]'),
  );
});
