/**
 * compel's weighting rule (src/engine/weighting.ts) against compel 2.3.1's own steps, recorded in
 * compel-golden's `events`: for every case and encoder, the rows compel encoded (ids and attention
 * masks, pass by pass), its per-token weights and lerp weights, and, fed compel's own encoder
 * outputs, every weighted tensor bit for bit. The text encoders themselves are checked in
 * test/graphs/clip-text.test.ts and end to end in test/engine/prompt-embeddings.test.ts.
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { loadClipTokenizer, type ClipTokenizer } from '../../src/engine/tokenizer.js';
import { parsePromptWeights } from '../../src/engine/prompt-weights.js';
import { applyWeights, blendPasses, layoutChunks, MAX_EXTRA_ROWS, MAX_PROMPT_CHUNKS, planWeighting, runPlans, tokenFragments, type EncoderRow, type WeightingPlan } from '../../src/engine/weighting.js';
import { casePrompts, compelCases, compelFolder, compelTensor, type CompelEvent, type EncoderCall, type LerpEvent, type WeightedEvent } from '../graphs/compel-golden.js';

const tokenizers: Record<string, ClipTokenizer> = {};
before(async () => {
  const dir = compelFolder('sdxl');
  tokenizers.text_encoder = await loadClipTokenizer(join(dir, 'tokenizer'));
  tokenizers.text_encoder_2 = await loadClipTokenizer(join(dir, 'tokenizer_2'));
});

/** One (prompt, encoder) run of compel: its encoder calls, weighted tensors and final lerp. */
interface Segment {
  encoder: 'text_encoder' | 'text_encoder_2';
  calls: EncoderCall[];
  weighted: WeightedEvent[];
  lerp: LerpEvent;
}

function segments(events: CompelEvent[]): Segment[] {
  const out: Segment[] = [];
  let calls: EncoderCall[] = [];
  let weighted: WeightedEvent[] = [];
  for (const e of events) {
    if (e.type === 'encoder_call' && e.called_from === 'build_weighted_embedding_tensor') calls.push(e);
    else if (e.type === 'weighted_embedding') weighted.push(e);
    else if (e.type === 'lerp') {
      out.push({ encoder: (calls[0] ?? weighted[0])!.encoder, calls, weighted, lerp: e });
      calls = [];
      weighted = [];
    }
  }
  return out;
}

const key = (encoder: string, ids: readonly number[], mask?: ArrayLike<number> | null) => `${encoder}|${ids.join(',')}|${mask ? Array.from(mask).join('') : '1'.repeat(ids.length)}`;

/** The rows compel encodes for a plan: the base rows, then every chunk again for each pass. */
function planRows(plan: WeightingPlan, S: number): { ids: number[]; mask: number[] }[] {
  const rows = (ids: number[], mask?: Int32Array) =>
    Array.from({ length: ids.length / S }, (_, c) => ({ ids: ids.slice(c * S, (c + 1) * S), mask: mask ? Array.from(mask.subarray(c * S, (c + 1) * S)) : new Array<number>(S).fill(1) }));
  return [...rows(plan.base.ids), ...plan.passes.flatMap((p) => rows(p.layout?.ids ?? plan.base.ids, p.mask))];
}

for (const c of compelCases().cases) {
  test(`${c.key_prefix}: compel's rows, weights and every weighted tensor`, async (t) => {
    const prompts = casePrompts(c);
    const segs = segments(c.events);
    const encoders = c.encoder_set === 'sdxl' ? (['text_encoder', 'text_encoder_2'] as const) : (['text_encoder'] as const);
    assert.equal(segs.length, prompts.length * encoders.length);
    // Every output compel got from an encoder, by what it fed.
    const outputs = new Map<string, Float32Array>();
    for (const e of c.events) if (e.type === 'encoder_call' && e.called_from !== 'get_pooled_embeddings') outputs.set(key(e.encoder, e.input_ids[0]!, e.attention_mask?.[0]), compelTensor(e.out_key).data);

    let masked = 0;
    segs.forEach((seg, i) => {
      const { fragments } = prompts[Math.floor(i / encoders.length)]!;
      assert.equal(seg.encoder, encoders[i % encoders.length]);
      const tok = tokenizers[seg.encoder]!;
      const plan = planWeighting(tok, tokenFragments(tok, fragments), { truncate: c.options.truncate_long_prompts, downweight: 'mask' });
      const S = tok.modelMaxLength;
      // The rows and masks, in compel's order (a pass re-encodes every chunk).
      assert.deepEqual(
        planRows(plan, S),
        seg.calls.map((e) => ({ ids: e.input_ids[0], mask: e.attention_mask![0] })),
        `${seg.encoder} rows`,
      );
      masked += plan.passes.length;
      // Per-token weights (float32) and masks of each weighted tensor, and the normalised lerp weights.
      assert.equal(seg.weighted.length, 1 + plan.passes.length);
      seg.weighted.forEach((w, k) => {
        assert.deepEqual(Array.from(plan.base.weights), w.per_token_weights.map(Math.fround), `${seg.encoder} weights`);
        assert.deepEqual(w.token_ids, plan.base.ids);
        assert.deepEqual(Array.from(k === 0 ? new Int32Array(plan.base.ids.length).fill(1) : plan.passes[k - 1]!.mask!), w.attention_mask);
      });
      assert.deepEqual(Array.from(plan.blend), seg.lerp.per_embedding_weights_f32_normalized);
    });
    t.diagnostic(`${segs.length} encoder runs, ${masked} masked passes`);

    // The arithmetic, fed compel's encoder outputs: each weighted tensor and the blend, bit for bit.
    for (const [i, seg] of segs.entries()) {
      const tok = tokenizers[seg.encoder]!;
      const plan = planWeighting(tok, tokenFragments(tok, prompts[Math.floor(i / encoders.length)]!.fragments), { truncate: c.options.truncate_long_prompts, downweight: 'mask' });
      const D = compelTensor(seg.lerp.out_key).shape.at(-1)!;
      const encode = async (rows: EncoderRow[]) => {
        const parts = rows.map((r, k) => {
          const out = outputs.get(key(seg.encoder, r.ids, r.mask));
          // compel computes the empty prompt only when some weight is not 1; Kiln always encodes
          // it (row 0, for padding). NaNs there would show in the result if it were used.
          if (!out && k === 0) return new Float32Array(tok.modelMaxLength * D).fill(NaN);
          assert.ok(out, `compel never encoded ${key(seg.encoder, r.ids, r.mask).slice(0, 80)}…`);
          return out;
        });
        const data = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
        parts.forEach((p, k) => data.set(p, k * p.length));
        return { data, dim: parts[0]!.length / tok.modelMaxLength };
      };
      const { results, empty, dim } = await runPlans(tok, [plan], encode);
      const base = seg.calls.slice(0, plan.base.chunks).map((e) => compelTensor(e.out_key).data);
      const z = new Float32Array(base.reduce((n, p) => n + p.length, 0));
      base.forEach((p, k) => z.set(p, k * p.length));
      assert.deepEqual(applyWeights(z, empty, plan.base.weights, dim), compelTensor(seg.weighted[0]!.out_key).data, `${seg.encoder} W(Z)`);
      plan.passes.forEach((p, k) => {
        const rows = seg.calls.slice((k + 1) * plan.base.chunks, (k + 2) * plan.base.chunks).map((e) => compelTensor(e.out_key).data);
        const zk = new Float32Array(z.length);
        rows.forEach((r, j) => zk.set(r, j * r.length));
        assert.deepEqual(applyWeights(zk, empty, plan.base.weights, dim), compelTensor(seg.weighted[k + 1]!.out_key).data, `${seg.encoder} W(Z_${k + 1})`);
      });
      assert.deepEqual(results[0], compelTensor(seg.lerp.out_key).data, `${seg.encoder} blend`);
    }
  });
}

test('the blend is the plain weighted sum in float32; weight 0.5 is the midpoint of with and without', () => {
  const a = Float32Array.from([1, 2, -3]);
  const b = Float32Array.from([3, 0, 1]);
  assert.deepEqual(blendPasses([a, b], Float32Array.from([0.5, 0.5])), Float32Array.from([2, 1, -1]));
  assert.equal(blendPasses([a], Float32Array.from([1])), a);
});

test('weights act relative to the empty prompt: 0 gives its rows, 2 doubles the offset, 1 keeps the bits', () => {
  const dim = 2;
  const empty = Float32Array.from([1, 1, 0, 0]); // S = 2
  const z = Float32Array.from([3, 5, 0.1, 0.2]);
  assert.equal(applyWeights(z, empty, Float32Array.from([1, 1]), dim), z);
  assert.deepEqual(applyWeights(z, empty, Float32Array.from([0, 1]), dim), Float32Array.from([1, 1, 0.1, 0.2]));
  assert.deepEqual(applyWeights(z, empty, Float32Array.from([2, 1]), dim), Float32Array.from([5, 9, 0.1, 0.2]));
});

test('chunking splits at the last sentence end, then phrase end, then word end', () => {
  const tok = tokenizers.text_encoder!;
  const words = (n: number, w = 'cat') => Array.from({ length: n }, () => w).join(' ');
  const chunksOf = (text: string) => {
    const l = layoutChunks(tok, tokenFragments(tok, [{ text, weight: 1 }]), false);
    return Array.from({ length: l.chunks }, (_, c) => l.ids.slice(c * 77 + 1, (c + 1) * 77).filter((id) => id !== tok.eosTokenId).length);
  };
  assert.deepEqual(chunksOf(words(75)), [75]);
  assert.deepEqual(chunksOf(words(76)), [75, 1]);
  // "cat" ×40 then "." then ×40: the first chunk ends after the full stop (41 ids).
  assert.deepEqual(chunksOf(`${words(40)}. ${words(40)}`), [41, 40]);
  // A comma when there is no full stop; a full stop wins over a later comma.
  assert.deepEqual(chunksOf(`${words(30)}, ${words(50)}`), [31, 50]);
  assert.deepEqual(chunksOf(`${words(20)}. ${words(20)}, ${words(40)}`), [21, 61]);
  // Truncated: one row whatever the length.
  assert.equal(layoutChunks(tok, tokenFragments(tok, [{ text: words(200), weight: 1 }]), true).chunks, 1);
});

test('the extra passes of one prompt are bounded: hundreds of down-weighted fragments encode at most MAX_EXTRA_ROWS more rows', async () => {
  const tok = tokenizers.text_encoder!;
  // 4000 characters of `cat- dog cat-- dog ...`: 421 fragments below 1, 12 chunks.
  const prompt = Array.from({ length: 800 }, (_, i) => `cat${'-'.repeat(1 + (i % 2))} dog`).join(' ').slice(0, 4000);
  const fragments = tokenFragments(tok, parsePromptWeights(prompt));
  const down = fragments.filter((f) => f.weight < 1).length;
  assert.ok(down > 400, `${down} fragments below 1`);
  for (const downweight of ['mask', 'remove'] as const) {
    const plan = planWeighting(tok, fragments, { truncate: false, downweight });
    assert.ok(plan.base.chunks > 10, `${plan.base.chunks} chunks`);
    assert.ok(plan.passes.length >= 1 && plan.passes.length <= MAX_EXTRA_ROWS, `${downweight}: ${plan.passes.length} passes`);
    let encoded = 0;
    await runPlans(tok, [plan], async (rows) => {
      encoded = rows.length;
      return { data: new Float32Array(rows.length * 77 * 4).fill(0.5), dim: 4 };
    });
    assert.ok(encoded <= 1 + plan.base.chunks + MAX_EXTRA_ROWS, `${downweight}: ${encoded} rows`);
    // The budget is used: it stops only when the next pass would not fit.
    assert.ok(encoded > 1 + plan.base.chunks + MAX_EXTRA_ROWS - (downweight === 'remove' ? plan.base.chunks + 1 : 2), `${downweight}: ${encoded} rows`);
  }
});

test('a chunked prompt keeps MAX_PROMPT_CHUNKS chunks: later ids are dropped and counted, their fragments lose their weight pass', () => {
  const tok = tokenizers.text_encoder!;
  const words = (n: number, w = 'cat') => Array.from({ length: n }, () => w).join(' ');
  // Exactly the bound: nothing dropped, the layout as before.
  const full = layoutChunks(tok, tokenFragments(tok, [{ text: words(75 * MAX_PROMPT_CHUNKS), weight: 1 }]), false);
  assert.deepEqual([full.chunks, full.dropped], [MAX_PROMPT_CHUNKS, 0]);
  // 40 ids more, then a down-weighted fragment wholly past the bound, and one across it.
  const fragments = tokenFragments(tok, parsePromptWeights(`${words(75 * MAX_PROMPT_CHUNKS - 10)} (dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog)0.5 ${words(30)} (bird)0.5`));
  const layout = layoutChunks(tok, fragments, false);
  assert.equal(layout.chunks, MAX_PROMPT_CHUNKS);
  assert.equal(layout.ids.length, MAX_PROMPT_CHUNKS * 77);
  const total = fragments.reduce((n, f) => n + f.ids.length, 0);
  assert.equal(layout.dropped, total - 75 * MAX_PROMPT_CHUNKS, 'every id past the kept chunks is counted');
  const across = fragments.findIndex((f) => f.ids.length === 20);
  const past = fragments.length - 1;
  const [from, to] = layout.ranges[across]!;
  assert.ok(from < to && to === MAX_PROMPT_CHUNKS * 77 - 2, `the fragment across the bound keeps its kept part: ${from}..${to}`);
  assert.equal(layout.ranges[past], undefined, 'a fragment past the bound has no range');
  for (const downweight of ['mask', 'remove'] as const) {
    const plan = planWeighting(tok, fragments, { truncate: false, downweight });
    assert.equal(plan.base.chunks, MAX_PROMPT_CHUNKS);
    assert.deepEqual(plan.passes.map((p) => p.fragment), [across], `${downweight}: one pass, for the fragment that was kept in part`);
    if (plan.passes[0]!.layout) assert.ok(plan.passes[0]!.layout.chunks <= MAX_PROMPT_CHUNKS);
  }
});
