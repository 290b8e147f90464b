/**
 * The CLIP text encoder page against transformers 4.45 (diffusers-golden components clip_l and
 * clip_g): every output, and the load errors for weights that do not fit config.json. The
 * full-size architectures are counted in full-size.test.ts.
 *
 * Tolerance: roundingTolerance (golden.ts). The README lists 0 for these files (torch is
 * bit-identical across thread counts), so the bound is 8 float32 ulps of each tensor's largest
 * value. Measured (t.diagnostic): clip_l at most 4.2 ulps (last_hidden_state 1.07e-6 of 2.16),
 * clip_g at most 5.6 ulps (last_hidden_state 1.43e-6 of 2.16), hidden_states.0 (embeddings)
 * exact; the eos pooling rows 3.0 and 1.3 ulps.
 *
 * attention_mask (the optional input compel's down-weighting needs) against every encoder call
 * recorded in compel-golden, masked ones included: at most 44% of the allowance; an all-ones mask
 * gives the bits of the graph without the input.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as ort from 'onnxruntime-node';
import { ModelLoadError } from '../../src/engine/errors.js';
import { buildClipText } from '../../src/graphs/clip-text.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { componentWeights, Params } from '../../src/graphs/weights.js';
import { join } from 'node:path';
import { assertGolden, COMPEL_GOLDEN_DIR, editedWeights, goldenPath, maxAbs, maxAbsDiff, readConfig, readGolden, readGoldenFeeds, roundingTolerance, runGraph, stackedEntry } from './golden.js';
import { compelCases, compelReadme, compelTensor, type EncoderCall } from './compel-golden.js';

/** The golden `input_ids` (3, 77) int64. */
function inputIds(name: string): ort.Tensor {
  const ids = readGoldenFeeds(`components/${name}/inputs.safetensors`).input_ids!;
  assert.deepEqual([ids.type, ids.dims], ['int64', [3, 77]]);
  return ids;
}

for (const name of ['clip_l', 'clip_g'] as const) {
  test(`${name}: every output equals transformers' within float32 rounding`, async (t) => {
    const dir = `components/${name}`;
    const config = readConfig(dir);
    const g = new GraphBuilder(`text_encoder_${name}`);
    const built = buildClipText(g, config, Params.of(g, componentWeights(goldenPath(dir), 'text_encoder')));
    assert.equal(built.withProjection, name === 'clip_g');
    // runGraph checks the session's outputs against the declared ones, in order.
    assert.deepEqual(g.outputs.map((o) => o.name), built.outputs);
    const result = await runGraph(g, { input_ids: inputIds(name) });

    const file = `${dir}/outputs.safetensors`;
    const golden = readGolden(file);
    const want = (key: string): Float32Array => golden.get(key)!.data;
    const L = config.num_hidden_layers as number;
    // hidden_states is stored stacked [L+1, B, S, D]: entry i is the graph's `hidden_states.i`.
    const stacked = golden.get('hidden_states')!;
    assert.deepEqual(stacked.shape.slice(0, 3), [L + 1, 3, 77]);
    const pairs: [string, string, Float32Array][] = [
      ['last_hidden_state', 'last_hidden_state', want('last_hidden_state')],
      ...Array.from({ length: L + 1 }, (_, i): [string, string, Float32Array] => [`hidden_states.${i}`, 'hidden_states', stackedEntry(stacked, i)]),
      ['hidden_states.' + (L - 1), 'penultimate', want('penultimate')],
      name === 'clip_g' ? ['text_embeds', 'text_embeds', want('text_embeds')] : ['pooler_output', 'pooler_output', want('pooler_output')],
    ];
    for (const [output, key, expected] of pairs) {
      assertGolden(t, `${name} ${output} vs ${key}`, result[output]!.data as Float32Array, expected, file, key);
    }
  });
}

const CLIP_L = 'components/clip_l';

function buildFrom(dir: string): void {
  const g = new GraphBuilder('text_encoder');
  buildClipText(g, readConfig(CLIP_L), Params.of(g, componentWeights(dir, 'text_encoder')));
}

test('a missing weight fails at build with a ModelLoadError naming the component, the key and the shape', () => {
  const key = 'text_model.encoder.layers.1.mlp.fc1.weight';
  const dir = editedWeights(`${CLIP_L}/model.safetensors`, (t) => delete t[key]);
  assert.throws(
    () => buildFrom(dir),
    (err: unknown) => err instanceof ModelLoadError && /^text_encoder: /.test(err.message) && err.message.includes(`"${key}"`) && err.message.includes('[32, 8]'),
  );
});

test('a weight of the wrong shape fails at build with a ModelLoadError naming both shapes', () => {
  const key = 'text_model.encoder.layers.2.self_attn.k_proj.weight';
  const dir = editedWeights(`${CLIP_L}/model.safetensors`, (t) => {
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
  const ids = inputIds('clip_l');
  const idData = ids.data as BigInt64Array;
  const file = `${CLIP_L}/outputs.safetensors`;
  const last = readGolden(file).get('last_hidden_state')!.data;
  const D = 8;
  // 49407: the tokenizers' EOS, first where the legacy argmax finds it. 320 ("a"): every row has
  // it, row 0 twice ("a photo of a cat"), so a last-occurrence pick would show.
  for (const eos of [49407, 320]) {
    const g = new GraphBuilder('text_encoder');
    buildClipText(g, { ...readConfig(CLIP_L), eos_token_id: eos }, Params.of(g, componentWeights(goldenPath(CLIP_L), 'text_encoder')), { hiddenStates: false });
    assert.deepEqual(g.outputs.map((o) => o.name), ['last_hidden_state', 'pooler_output']);
    const got = (await runGraph(g, { input_ids: ids })).pooler_output!.data as Float32Array;
    const want = new Float32Array(3 * D);
    const positions: number[] = [];
    for (let b = 0; b < 3; b++) {
      const row = [...idData.subarray(b * 77, (b + 1) * 77)];
      const at = Math.max(0, row.indexOf(BigInt(eos)));
      positions.push(at);
      want.set(last.subarray((b * 77 + at) * D, (b * 77 + at + 1) * D), b * D);
    }
    assertGolden(t, `eos_token_id ${eos} (pooled at ${positions.join(', ')})`, got, want, file, 'last_hidden_state');
  }
});

// ---------------------------------------------------------------------------------------------
// attention_mask: transformers' padding mask, against the encoder calls compel made (compel-golden
// events: every call of every case, masked ones included, with the output compel used).

for (const encoder of ['text_encoder', 'text_encoder_2'] as const) {
  test(`${encoder} with attention_mask: every compel-golden encoder call (masked or not) within float32 rounding`, async (t) => {
    const dir = join(COMPEL_GOLDEN_DIR, encoder);
    const config = readConfig(dir);
    const build = (attentionMask: boolean) => {
      const g = new GraphBuilder(encoder);
      const built = buildClipText(g, config, Params.of(g, componentWeights(dir, encoder)), { attentionMask, withProjection: encoder === 'text_encoder_2' });
      return { g, built };
    };
    const masked = build(true);
    assert.deepEqual(masked.g.inputs.map((i) => i.name), ['input_ids', 'attention_mask']);
    const L = config.num_hidden_layers as number;
    const outputOf: Record<EncoderCall['output_used'], string> = {
      last_hidden_state: 'last_hidden_state',
      'hidden_states[-2]': `hidden_states.${L - 1}`,
      text_embeds: 'text_embeds',
    };
    const calls = compelCases()
      .cases.flatMap((c) => c.events)
      .filter((e): e is EncoderCall => e.type === 'encoder_call' && e.encoder === encoder);
    const withMask = calls.filter((e) => e.attention_mask?.[0]!.includes(0));
    assert.ok(withMask.length >= 10, `${withMask.length} masked calls`);
    const S = 77;
    const ids = new BigInt64Array(calls.flatMap((e) => e.input_ids[0]!.map(BigInt)));
    const mask = new BigInt64Array(calls.flatMap((e) => (e.attention_mask?.[0] ?? new Array<number>(S).fill(1)).map(BigInt)));
    const feeds = { input_ids: new ort.Tensor('int64', ids, [calls.length, S]), attention_mask: new ort.Tensor('int64', mask, [calls.length, S]) };
    const names = [...new Set(calls.map((e) => outputOf[e.output_used]))];
    const got = await runGraph(masked.g, feeds, names);
    let worstMasked = 0;
    let worst = 0;
    calls.forEach((e, row) => {
      const want = compelTensor(e.out_key);
      const out = got[outputOf[e.output_used]]!;
      const size = want.data.length;
      const mine = (out.data as Float32Array).subarray(row * size, (row + 1) * size);
      const diff = maxAbsDiff(mine, want.data);
      const allowed = roundingTolerance(compelReadme('sdxl', encoder), maxAbs(want.data));
      assert.ok(diff <= allowed, `${e.out_key} (${e.output_used}): ${diff} over ${allowed}`);
      if (withMask.includes(e)) worstMasked = Math.max(worstMasked, diff / allowed);
      else worst = Math.max(worst, diff / allowed);
    });
    t.diagnostic(`${calls.length} calls (${withMask.length} masked): worst ${(worst * 100).toFixed(0)}% of the allowance unmasked, ${(worstMasked * 100).toFixed(0)}% masked`);

    // An all-ones mask changes nothing: the graph without the input gives the same bits.
    const plain = build(false);
    const unmasked = calls.map((e, row) => ({ e, row })).filter(({ e }) => !withMask.includes(e));
    const plainIds = new BigInt64Array(unmasked.flatMap(({ e }) => e.input_ids[0]!.map(BigInt)));
    const plainOut = await runGraph(plain.g, { input_ids: new ort.Tensor('int64', plainIds, [unmasked.length, S]) }, plain.built.outputs);
    const again = await runGraph(
      masked.g,
      { input_ids: new ort.Tensor('int64', plainIds, [unmasked.length, S]), attention_mask: new ort.Tensor('int64', new BigInt64Array(unmasked.length * S).fill(1n), [unmasked.length, S]) },
      masked.built.outputs,
    );
    for (const name of plain.built.outputs) assert.deepEqual(again[name]!.data, plainOut[name]!.data, `${name} with an all-ones mask`);

    // And the mask matters: the masked calls' ids without their mask are far from compel's outputs.
    const maskedIds = new BigInt64Array(withMask.flatMap((e) => e.input_ids[0]!.map(BigInt)));
    const ignored = await runGraph(plain.g, { input_ids: new ort.Tensor('int64', maskedIds, [withMask.length, S]) }, names);
    withMask.forEach((e, row) => {
      const want = compelTensor(e.out_key).data;
      const out = ignored[outputOf[e.output_used]]!.data as Float32Array;
      const diff = maxAbsDiff(out.subarray(row * want.length, (row + 1) * want.length), want);
      assert.ok(diff > 1e-2, `${e.out_key} without its mask differs by only ${diff}`);
    });
  });
}
