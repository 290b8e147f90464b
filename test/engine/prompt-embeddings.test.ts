/**
 * Kiln's weighted conditioning equals compel's (`../shared/data/compel-golden/`: compel 2.3.1 on
 * tiny CLIP encoders), through the exported `encodePromptEmbeddings` on a transformers-style folder
 * of safetensors encoders that Kiln builds with its own CLIP graph (with attention_mask, so
 * down-weighting masks tokens as compel's default does). Every case, SD and SDXL, within float32
 * rounding (golden.ts's rule, per encoder: the README gives text_encoder_2 a 9.5e-7 spread).
 *
 * Two deliberate exceptions, in README's Prompts section: Block Entropy's `photorealistic(1.5)` and
 * A1111's `(ball:1.2)`. compel reads both as literal text; Kiln weights them (1.5 and 1.2), so they
 * are checked against compel's output for the same weights in compel's syntax
 * (`fixtures/compel-extra.*`, tools/oracle/compel_extra.py). Encoders without an attention_mask
 * input take compel's DownweightMode.REMOVE, checked against compel in that mode.
 */
import { after, before, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { encodeConditioning } from '../../src/engine/conditioning.js';
import { ModelLoadError } from '../../src/engine/errors.js';
import { encodePromptEmbeddings, loadTextEncoders } from '../../src/engine/prompt-embeddings.js';
import { buildClipText } from '../../src/graphs/clip-text.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { componentWeights, Params } from '../../src/graphs/weights.js';
import { writeGraph } from '../../src/graphs/write.js';
import { casePrompts, compelCases, compelFolder, compelReadme, compelTensor, type CompelCase, type EncoderSet } from '../graphs/compel-golden.js';
import { assertWithinRounding, COMPEL_GOLDEN_DIR, maxAbsDiff, readGolden, tempDir, type GoldenTensor } from '../graphs/golden.js';

const EXCEPTIONS = new Set(['be_example', 'a1111']);
const FIXTURES = join(import.meta.dirname, 'fixtures');
const extra = readGolden(join(FIXTURES, 'compel-extra.safetensors'));
const extraMeta = JSON.parse(readFileSync(join(FIXTURES, 'compel-extra.json'), 'utf8')) as {
  exceptions: Record<string, string>;
  remove: Record<string, { prompt: string; truncate_long_prompts?: boolean; compel_raises?: string }>;
};
const extraTensor = (key: string): GoldenTensor => {
  const t = extra.get(key);
  assert.ok(t, `compel-extra has no ${key}`);
  return t;
};

const folders = {} as Record<EncoderSet, string>;
let cacheDir: string;
before(() => {
  folders.sd15 = compelFolder('sd15');
  folders.sdxl = compelFolder('sdxl');
  cacheDir = tempDir('compel-cache');
});
// Each set's encoders, loaded once (encodePromptEmbeddings loads them per call; tested below).
const loaded = new Map<EncoderSet, ReturnType<typeof loadTextEncoders>>();
const encoders = (set: EncoderSet) => {
  if (!loaded.has(set)) loaded.set(set, loadTextEncoders(folders[set], { family: family(set), cacheDir }));
  return loaded.get(set)!;
};
after(async () => {
  for (const e of loaded.values()) await (await e).release();
});

const family = (set: EncoderSet): 'sd' | 'sdxl' => (set === 'sdxl' ? 'sdxl' : 'sd');

/** Features [from, to) of every row of a [T, D] tensor. */
function features(data: Float32Array, dim: number, from: number, to: number): Float32Array {
  const rows = data.length / dim;
  const out = new Float32Array(rows * (to - from));
  for (let r = 0; r < rows; r++) out.set(data.subarray(r * dim + from, r * dim + to), r * (to - from));
  return out;
}

/** Compares a conditioning with compel's, each encoder's features with that encoder's spread. */
function assertConditioning(t: TestContext, what: string, set: EncoderSet, got: Float32Array, dims: readonly number[], want: GoldenTensor): void {
  assert.deepEqual([...dims], want.shape, `${what} shape`);
  const D = want.shape.at(-1)!;
  if (set === 'sd15') {
    assertWithinRounding(t, what, got, want.data, compelReadme('sd15'));
    return;
  }
  assertWithinRounding(t, `${what} [text_encoder]`, features(got, D, 0, 32), features(want.data, D, 0, 32), compelReadme('sdxl', 'text_encoder'));
  assertWithinRounding(t, `${what} [text_encoder_2]`, features(got, D, 32, D), features(want.data, D, 32, D), compelReadme('sdxl', 'text_encoder_2'));
}

for (const c of compelCases().cases.filter((c: CompelCase) => c.id !== 'pair')) {
  test(`${c.key_prefix}${EXCEPTIONS.has(c.id) ? ' (deliberate exception)' : ''}`, async (t) => {
    const set = c.encoder_set;
    const [{ prompt }] = casePrompts(c);
    const [r] = await encodeConditioning(await encoders(set), [prompt!], { truncate: c.options.truncate_long_prompts });
    const got = { embeddings: r!.hidden.data, dims: r!.hidden.dims, pooled: r!.pooled?.data };
    const golden = compelTensor(`${c.key_prefix}.cond`);
    if (EXCEPTIONS.has(c.id)) {
      // compel's own output for the weight Kiln reads, and visibly not what compel reads.
      assertConditioning(t, `${c.key_prefix} as ${JSON.stringify(extraMeta.exceptions[c.id])}`, set, got.embeddings, got.dims, extraTensor(`${set}.${c.id}.cond`));
      assert.ok(maxAbsDiff(got.embeddings, golden.data) > 0.05, 'compel reads this prompt differently');
    } else {
      assertConditioning(t, c.key_prefix, set, got.embeddings, got.dims, golden);
    }
    if (set === 'sdxl') {
      // The pooled vector is the raw prompt's, syntax included, unweighted: the exceptions too.
      assert.ok(got.pooled);
      assertWithinRounding(t, `${c.key_prefix} pooled`, got.pooled, compelTensor(`${c.key_prefix}.pooled`).data, compelReadme('sdxl'));
    } else {
      assert.equal(got.pooled, undefined);
    }
  });
}

for (const set of ['sd15', 'sdxl'] as const) {
  test(`${set}.pair: positive and negative padded to the same length with the empty prompt's encoding`, async (t) => {
    const c = compelCases().cases.find((x) => x.key_prefix === `${set}.pair`)!;
    const [pos, neg] = casePrompts(c);
    {
      const [p, n] = await encodeConditioning(await encoders(set), [pos!.prompt, neg!.prompt]);
      const padded = set === 'sdxl' ? compelTensor(`${set}.pair.per_encoder_padded`) : compelTensor(`${set}.pair.call_batch`);
      const half = padded.data.length / 2;
      const row = (i: number): GoldenTensor => ({ shape: [1, ...padded.shape.slice(1)], data: padded.data.subarray(i * half, (i + 1) * half) });
      assertConditioning(t, `${set}.pair positive`, set, p!.hidden.data, p!.hidden.dims, row(0));
      assertConditioning(t, `${set}.pair negative, padded`, set, n!.hidden.data, n!.hidden.dims, row(1));
      if (set === 'sdxl') {
        assertWithinRounding(t, 'pair positive pooled', p!.pooled!.data, compelTensor('sdxl.pair.pos_pooled').data, compelReadme('sdxl'));
        assertWithinRounding(t, 'pair negative pooled', n!.pooled!.data, compelTensor('sdxl.pair.neg_pooled').data, compelReadme('sdxl'));
      }
    }
  });
}

/** The golden SDXL encoders exported to ONNX without attention_mask, as most pre-exported encoders are. */
function unmaskedOnnxFolder(): string {
  const dir = tempDir('compel-unmasked');
  for (const n of ['', '_2']) {
    const tok = join(dir, `tokenizer${n}`);
    mkdirSync(tok);
    for (const f of ['vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json']) copyFileSync(join(folders.sdxl, `tokenizer${n}`, f), join(tok, f));
    const src = join(COMPEL_GOLDEN_DIR, `text_encoder${n}`);
    mkdirSync(join(dir, `text_encoder${n}`));
    const g = new GraphBuilder(`text_encoder${n}`);
    buildClipText(g, JSON.parse(readFileSync(join(src, 'config.json'), 'utf8')), Params.of(g, componentWeights(src, `text_encoder${n}`)), { withProjection: n === '_2' });
    writeGraph(g, join(dir, `text_encoder${n}`));
  }
  return dir;
}

test('encoders without attention_mask: down-weighting re-encodes without the fragment, as compel\'s DownweightMode.REMOVE', async (t) => {
  const dir = unmaskedOnnxFolder();
  for (const [id, c] of Object.entries(extraMeta.remove)) {
    const got = await encodePromptEmbeddings(dir, c.prompt, { family: 'sdxl', truncate: c.truncate_long_prompts ?? false });
    if (c.compel_raises) {
      // The pass without the fragment has fewer chunks: compel cannot blend it; Kiln pads it with
      // the empty prompt's chunks, so the result keeps the prompt's own length.
      assert.deepEqual(got.dims, [1, 154, 80], id);
      assert.ok(got.embeddings.every(Number.isFinite), id);
      continue;
    }
    assertConditioning(t, `${id} (REMOVE)`, 'sdxl', got.embeddings, got.dims, extraTensor(`sdxl.remove.${id}.cond`));
    // Not the masked result: the mode really differs.
    assert.ok(maxAbsDiff(got.embeddings, compelTensor(`sdxl.${id}.cond`).data) > 1e-3, `${id}: REMOVE equals MASK`);
  }
});

test('encodePromptEmbeddings: the folder in, { embeddings, dims, pooled } out, built once into the cache', async () => {
  for (const [set, id] of [['sd15', 'nested'], ['sdxl', 'long_chunked']] as const) {
    const c = compelCases().cases.find((x) => x.key_prefix === `${set}.${id}`)!;
    const got = await encodePromptEmbeddings(folders[set], c.prompt!, { family: family(set), truncate: c.options.truncate_long_prompts, cacheDir });
    const [want] = await encodeConditioning(await encoders(set), [c.prompt!], { truncate: c.options.truncate_long_prompts });
    assert.deepEqual(got.dims, want!.hidden.dims);
    assert.deepEqual(got.embeddings, want!.hidden.data);
    assert.deepEqual(got.pooled, want!.pooled?.data);
    assert.equal(got.embeddings.length, got.dims[1] * got.dims[2]);
  }
  // Default: chunked, as Kiln's pipelines; `truncate: true` is compel's default.
  const long = compelCases().cases.find((x) => x.key_prefix === 'sd15.long_chunked')!.prompt!;
  assert.deepEqual((await encodePromptEmbeddings(folders.sd15, long, { family: 'sd', cacheDir })).dims, [1, 154, 32]);
  assert.deepEqual((await encodePromptEmbeddings(folders.sd15, long, { family: 'sd', cacheDir, truncate: true })).dims, [1, 77, 32]);
  // One build per encoder (the sets share text_encoder/): entries named after the component.
  const entries = readdirSync(cacheDir).filter((e) => !e.startsWith('.')).sort();
  assert.equal(entries.length, 2, entries.join(', '));
  assert.ok(entries.every((e) => /^text_encoder(_2)?-fp32-[0-9a-f]{16}$/.test(e)), entries.join(', '));
});

test('a folder without a text encoder is a ModelLoadError naming what is missing', async () => {
  const dir = tempDir('compel-no-encoder');
  mkdirSync(join(dir, 'tokenizer'));
  for (const f of ['vocab.json', 'merges.txt']) copyFileSync(join(folders.sd15, 'tokenizer', f), join(dir, 'tokenizer', f));
  await assert.rejects(
    encodePromptEmbeddings(dir, 'a cat', { family: 'sd', cacheDir }),
    (err: unknown) => err instanceof ModelLoadError && err.message.includes('text_encoder/model.onnx') && err.message.includes('text_encoder/config.json'),
  );
  await assert.rejects(encodePromptEmbeddings(dir, 'a cat', { family: 'sd3' as 'sd' }), TypeError);
});
