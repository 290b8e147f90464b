/**
 * The CLIP text encoder page against transformers 4.45 (diffusers-golden components clip_l and
 * clip_g): every output, and the load errors for weights that do not fit config.json.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { ModelLoadError } from '../../src/engine/errors.js';
import { buildClipText } from '../../src/graphs/clip-text.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { openSafetensors, readTensorBytes, readTensorFloat32, writeSafetensors, type TensorToWrite } from '../../src/graphs/safetensors.js';
import { componentWeights, Params, RandomWeights } from '../../src/graphs/weights.js';
import { writeGraph } from '../../src/graphs/write.js';
import { GOLDEN_DIR } from './golden.js';

const GOLDEN = GOLDEN_DIR;
const tolerances = JSON.parse(readFileSync(join(GOLDEN, 'tolerances.json'), 'utf8')) as { per_file: Record<string, number | Record<string, number>> };

const temps: string[] = [];
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'kiln-clip-text-'));
  temps.push(dir);
  return dir;
}
after(() => {
  for (const d of temps) rmSync(d, { recursive: true, force: true });
});

function readConfig(dir: string): Record<string, unknown> {
  return JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
}

/** The golden README's 1-vs-2-thread difference for a tensor (0 for files listed as identical). */
function readmeTolerance(file: string, tensor: string): number {
  const entry = tolerances.per_file[file];
  if (entry === undefined) throw new Error(`tolerances.json has no ${file}`);
  return typeof entry === 'number' ? entry : (entry[tensor] ?? 0);
}

function maxAbs(a: Float32Array): number {
  let m = 0;
  for (const v of a) m = Math.max(m, Math.abs(v));
  return m;
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** The golden `input_ids` (3, 77) int64. */
function inputIds(dir: string): BigInt64Array {
  const inputs = openSafetensors(join(dir, 'inputs.safetensors'));
  const t = inputs.tensors.get('input_ids')!;
  assert.deepEqual([t.dtype, t.shape], ['I64', [3, 77]]);
  const bytes = readTensorBytes(inputs, t);
  return new BigInt64Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

/** Tolerance for a tensor ORT computes that torch computed: see the comment in the first test. */
function ulpTolerance(want: Float32Array): number {
  return 8 * 2 ** -23 * maxAbs(want);
}

for (const name of ['clip_l', 'clip_g'] as const) {
  test(`${name}: every output equals transformers' within float32 rounding`, async (t) => {
    const dir = join(GOLDEN, 'components', name);
    const config = readConfig(dir);
    const g = new GraphBuilder(`text_encoder_${name}`);
    const built = buildClipText(g, config, Params.of(g, componentWeights(dir, 'text_encoder')));
    assert.equal(built.withProjection, name === 'clip_g');
    const out = tempDir();
    writeGraph(g, out);

    const ids = inputIds(dir);
    const session = await ort.InferenceSession.create(join(out, 'model.onnx'));
    try {
      assert.deepEqual([...session.outputNames], built.outputs);
      const result = await session.run({ input_ids: new ort.Tensor('int64', ids, [3, 77]) });

      const expected = openSafetensors(join(dir, 'outputs.safetensors'));
      const golden = (key: string): Float32Array => readTensorFloat32(expected, expected.tensors.get(key)!);
      const L = config.num_hidden_layers as number;
      const D = config.hidden_size as number;
      const stacked = golden('hidden_states');
      const perState = 3 * 77 * D;
      const pairs: [string, string, Float32Array][] = [
        ['last_hidden_state', 'last_hidden_state', golden('last_hidden_state')],
        ...Array.from({ length: L + 1 }, (_, i): [string, string, Float32Array] => [`hidden_states.${i}`, 'hidden_states', stacked.subarray(i * perState, (i + 1) * perState)]),
        ['hidden_states.' + (L - 1), 'penultimate', golden('penultimate')],
        name === 'clip_g' ? ['text_embeds', 'text_embeds', golden('text_embeds')] : ['pooler_output', 'pooler_output', golden('pooler_output')],
      ];
      const file = `components/${name}/outputs.safetensors`;
      for (const [output, key, want] of pairs) {
        const got = result[output]!.data as Float32Array;
        const diff = maxAbsDiff(got, want);
        // The README lists 0 here (torch is bit-identical across thread counts), but ONNX Runtime
        // sums in another order than torch's kernels: allow a few float32 ulps of the tensor's
        // magnitude, far below any real discrepancy (wrong eps, mask, pooling row or GELU variant).
        const tol = Math.max(readmeTolerance(file, key), ulpTolerance(want));
        t.diagnostic(`${name} ${output} vs ${key}: max abs diff ${diff.toExponential(2)} (tolerance ${tol.toExponential(2)}, max abs ${maxAbs(want).toFixed(3)})`);
        assert.ok(diff <= tol, `${name} ${output}: max abs diff ${diff} over ${tol}`);
      }
    } finally {
      await session.release();
    }
  });
}

/** A copy of clip_l's weights with `edit` applied, in a fresh folder. */
function editedWeights(edit: (tensors: Record<string, TensorToWrite>) => void): string {
  const file = openSafetensors(join(GOLDEN, 'components/clip_l/model.safetensors'));
  const tensors: Record<string, TensorToWrite> = {};
  for (const [key, t] of file.tensors) tensors[key] = { dtype: t.dtype, shape: t.shape, data: readTensorBytes(file, t) };
  edit(tensors);
  const dir = tempDir();
  writeSafetensors(join(dir, 'model.safetensors'), tensors);
  return dir;
}

function buildFrom(dir: string): void {
  const g = new GraphBuilder('text_encoder');
  buildClipText(g, readConfig(join(GOLDEN, 'components/clip_l')), Params.of(g, componentWeights(dir, 'text_encoder')));
}

test('a missing weight fails at build with a ModelLoadError naming the component, the key and the shape', () => {
  const key = 'text_model.encoder.layers.1.mlp.fc1.weight';
  const dir = editedWeights((t) => delete t[key]);
  assert.throws(
    () => buildFrom(dir),
    (err: unknown) => err instanceof ModelLoadError && /^text_encoder: /.test(err.message) && err.message.includes(`"${key}"`) && err.message.includes('[32, 8]'),
  );
});

test('a weight of the wrong shape fails at build with a ModelLoadError naming both shapes', () => {
  const key = 'text_model.encoder.layers.2.self_attn.k_proj.weight';
  const dir = editedWeights((t) => {
    t[key] = { dtype: 'F32', shape: [8, 4], data: new Float32Array(32) };
  });
  assert.throws(
    () => buildFrom(dir),
    (err: unknown) =>
      err instanceof ModelLoadError &&
      /^text_encoder: /.test(err.message) &&
      err.message.includes(`"${key}"`) &&
      err.message.includes('[8, 4]') &&
      err.message.includes('[8, 8]'),
  );
});

test('configs with a real eos_token_id pool at its first occurrence, not at the highest id', async (t) => {
  const dir = join(GOLDEN, 'components/clip_l');
  const ids = inputIds(dir);
  const expected = openSafetensors(join(dir, 'outputs.safetensors'));
  const last = readTensorFloat32(expected, expected.tensors.get('last_hidden_state')!);
  const D = 8;
  // 49407: the tokenizers' EOS, first where the legacy argmax finds it. 320 ("a"): every row has
  // it, row 0 twice ("a photo of a cat"), so a last-occurrence pick would show.
  for (const eos of [49407, 320]) {
    const g = new GraphBuilder('text_encoder');
    buildClipText(g, { ...readConfig(dir), eos_token_id: eos }, Params.of(g, componentWeights(dir, 'text_encoder')), { hiddenStates: false });
    const out = tempDir();
    writeGraph(g, out);
    const session = await ort.InferenceSession.create(join(out, 'model.onnx'));
    try {
      assert.deepEqual([...session.outputNames], ['last_hidden_state', 'pooler_output']);
      const got = (await session.run({ input_ids: new ort.Tensor('int64', ids, [3, 77]) })).pooler_output!.data as Float32Array;
      const want = new Float32Array(3 * D);
      const positions: number[] = [];
      for (let b = 0; b < 3; b++) {
        const row = [...ids.subarray(b * 77, (b + 1) * 77)];
        const at = Math.max(0, row.indexOf(BigInt(eos)));
        positions.push(at);
        want.set(last.subarray((b * 77 + at) * D, (b * 77 + at + 1) * D), b * D);
      }
      const diff = maxAbsDiff(got, want);
      t.diagnostic(`eos_token_id ${eos}: pooled at ${positions.join(', ')}, max abs diff ${diff.toExponential(2)}`);
      assert.ok(diff <= ulpTolerance(want), `eos_token_id ${eos}: max abs diff ${diff}`);
    } finally {
      await session.release();
    }
  }
});

test('full-size configs with random weights: CLIP ViT-L 123.1 M and OpenCLIP bigG with projection 694.7 M parameters', () => {
  const common = { max_position_embeddings: 77, vocab_size: 49408, layer_norm_eps: 1e-5, eos_token_id: 2 };
  const vitL = { ...common, architectures: ['CLIPTextModel'], hidden_size: 768, intermediate_size: 3072, num_hidden_layers: 12, num_attention_heads: 12, hidden_act: 'quick_gelu', projection_dim: 768 };
  const bigG = { ...common, architectures: ['CLIPTextModelWithProjection'], hidden_size: 1280, intermediate_size: 5120, num_hidden_layers: 32, num_attention_heads: 20, hidden_act: 'gelu', projection_dim: 1280 };
  for (const [config, params, outputs] of [
    [vitL, 123_060_480, ['last_hidden_state', 'pooler_output', ...Array.from({ length: 13 }, (_, i) => `hidden_states.${i}`)]],
    [bigG, 694_659_840, ['text_embeds', 'last_hidden_state', ...Array.from({ length: 33 }, (_, i) => `hidden_states.${i}`)]],
  ] as const) {
    const g = new GraphBuilder('text_encoder');
    const p = Params.of(g, new RandomWeights('text_encoder'));
    const built = buildClipText(g, config, p);
    assert.equal(p.parameterCount, params);
    assert.deepEqual(built.outputs, outputs);
    assert.deepEqual(
      g.outputs.map((o) => o.name),
      outputs,
    );
  }
});
