/**
 * The AutoencoderTiny decoder page (src/graphs/taesd.ts) against diffusers v0.31: a small
 * random-weight TAESD (test/fixtures/taesd/, written by tools/oracle/taesd_golden.py: TAESD's real
 * block layout at narrow widths) decoded through onnxruntime-node; the full-size config's
 * parameter count against PyTorch's; config and weight checks at build time.
 *
 * Tolerance: roundingTolerance (golden.ts), 3x torch's own float32 spread on the fixture
 * (manifest.json readme_tolerance: the convs are too small for threads to change torch's result,
 * so the spread is that of torch's two CPU conv kernels, mkldnn on vs off: 1.9e-6). Measured:
 * Kiln vs torch 1.37e-6 (10 ulps), and Kiln is nearer a float64 run of diffusers than torch's
 * float32 is (8.2e-7 vs 1.26e-6): rounding, not a defect. A wrong clamp (tanh(x) instead of
 * tanh(x / 3) · 3) moves the output by 0.74, dropping the blocks' residual by 1.65.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ModelLoadError } from '../../src/engine/errors.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { TAESD } from '../../src/graphs/reference-configs.js';
import { openSafetensors, readTensorFloat32 } from '../../src/graphs/safetensors.js';
import { buildTinyDecoder, tinyDecoderConfig, tinyDecoderScale } from '../../src/graphs/taesd.js';
import { componentWeights, Params, RandomWeights, type WeightSource } from '../../src/graphs/weights.js';
import { assertWithinRounding, describeValues, editedWeights, maxAbsDiff, runGraph } from './golden.js';

const TAESD_FIXTURE = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'taesd');
const config = JSON.parse(readFileSync(join(TAESD_FIXTURE, 'config.json'), 'utf8')) as Record<string, unknown>;
const manifest = JSON.parse(readFileSync(join(TAESD_FIXTURE, 'manifest.json'), 'utf8')) as {
  decoder_parameters: number;
  full_size_decoder_parameters: number;
  readme_tolerance: number;
  latent: { beyond_3: number };
};

function build(source: WeightSource, cfg: Record<string, unknown> = config): { g: GraphBuilder; p: Params } {
  const g = new GraphBuilder('taesd_decoder');
  const p = Params.of(g, source);
  buildTinyDecoder(g, cfg, p);
  return { g, p };
}

function golden(name: string): { shape: number[]; data: Float32Array } {
  const file = openSafetensors(join(TAESD_FIXTURE, 'golden.safetensors'));
  const t = file.tensors.get(name)!;
  return { shape: t.shape, data: readTensorFloat32(file, t) };
}

test('taesd_decoder equals diffusers AutoencoderTiny.decode on the fixture', async (t) => {
  const { g, p } = build(componentWeights(TAESD_FIXTURE, 'taesd'));
  assert.equal(p.parameterCount, manifest.decoder_parameters);
  // Every decoder weight is used; the encoder's are the ones left.
  assert.deepEqual(p.unusedKeys().filter((k) => !k.startsWith('encoder.')), []);
  assert.ok(manifest.latent.beyond_3 > 0, 'the latent reaches the tanh clamp');
  const decoded = (await runGraph(g, { latent_sample: golden('latent') })).sample!;
  const expected = golden('decoded');
  assert.deepEqual(decoded.dims, expected.shape);
  assert.deepEqual(expected.shape, [2, 3, 48, 80]);
  assertWithinRounding(t, 'decoded', decoded.data as Float32Array, expected.data, manifest.readme_tolerance);
  const f64 = golden('decoded_f64').data;
  t.diagnostic(`vs diffusers in float64: Kiln ${maxAbsDiff(decoded.data as Float32Array, f64).toExponential(2)}, torch float32 ${maxAbsDiff(expected.data, f64).toExponential(2)}`);
});

test('the full-size TAESD config: PyTorch parameter count, graph inputs and output', () => {
  const { g, p } = build(new RandomWeights('taesd'), { ...TAESD });
  // diffusers 0.31 AutoencoderTiny().decoder, counted by tools/oracle/taesd_golden.py.
  assert.equal(manifest.full_size_decoder_parameters, 1_222_531);
  assert.equal(p.parameterCount, 1_222_531);
  assert.deepEqual(describeValues(g.inputs), { latent_sample: 'float32 [batch, 4, latent_height, latent_width]' });
  assert.deepEqual(describeValues(g.outputs), { sample: 'float32 [batch, 3, height, width]' });
  assert.equal(tinyDecoderScale(tinyDecoderConfig({ ...TAESD })), 8);
});

test('configs the page cannot build fail with a ModelLoadError naming the key', () => {
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ decoder_block_out_channels: [64, 32, 64, 64] }, /decoder_block_out_channels \[64,32,64,64\]/],
    [{ num_decoder_blocks: [3, 3, 1] }, /4 decoder_block_out_channels but 3 num_decoder_blocks/],
    [{ act_fn: 'gelu' }, /act_fn "gelu"/],
    [{ upsample_fn: 'bilinear' }, /upsample_fn "bilinear"/],
    [{ scaling_factor: 'one' }, /scaling_factor "one"/],
  ];
  for (const [edit, message] of cases) {
    assert.throws(
      () => build(new RandomWeights('taesd'), { ...TAESD, ...edit }),
      (e: unknown) => e instanceof ModelLoadError && /^taesd: config.json /.test(e.message) && message.test(e.message),
      JSON.stringify(edit),
    );
  }
});

test('a weight of the wrong shape fails at build, naming the key and both shapes', () => {
  const key = 'decoder.layers.2.conv.2.weight';
  const dir = editedWeights(join(TAESD_FIXTURE, 'diffusion_pytorch_model.safetensors'), (t) => {
    t[key] = { ...t[key]!, shape: [12, 12, 1, 9] };
  });
  assert.throws(
    () => build(componentWeights(dir, 'taesd')),
    (e: unknown) => e instanceof ModelLoadError && e.message.includes(`"${key}"`) && e.message.includes('[12, 12, 1, 9]') && e.message.includes('[12, 12, 3, 3]'),
  );
});
