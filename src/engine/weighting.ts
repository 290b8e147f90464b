/**
 * compel's rule for weighted prompts (compel 2.3.1, `EmbeddingsProvider`), the library whose
 * syntax Block Entropy documents; `../shared/data/compel-golden/README.md` spells it out and
 * test/engine/weighting.test.ts checks it number for number. Per text encoder:
 *
 *  1. Each fragment of the parse is tokenized on its own; adjacent fragments of equal weight are
 *     one fragment (compel merges them). Tokens carry their fragment's weight (float32); BOS, EOS
 *     and padding carry 1.
 *  2. Rows: `[BOS] + ids + [EOS] + pads`, 77 long. Truncated: the first 75 ids. Chunked (compel's
 *     `truncate_long_prompts=False` with `SplitLongTextMode.SENTENCES`): while more than 75 ids
 *     remain, a chunk ends after the last `.` among the next 75, else after the last `. , ; :`,
 *     else after the last word end, else after 75.
 *  3. Z = encoder(rows), E = encoder([BOS, EOS, pads]). Each row j whose weight w ≠ 1 becomes
 *     E[j] + (Z[j] − E[j])·w in float32; rows of weight 1 stay Z[j] exactly. No renormalisation.
 *  4. Each fragment of weight w < 1 (in prompt order) adds a pass: the same rows encoded with that
 *     fragment's positions masked out of attention (`DownweightMode.MASK`), weighted as in 3. The
 *     result is Σ n_k·W_k over [the base, pass 1, ...] with t = [1, tan((1 − max(w, 1e-5))·π/2), ...]
 *     and n = t / Σt in float32: w = 0.5 is the midpoint of "with" and "without".
 *     Encoders without an `attention_mask` input (most pre-exported ONNX files) take compel's
 *     other mode, `DownweightMode.REMOVE`: the pass re-tokenizes the prompt without the fragment.
 *  5. compel's quirks are kept: truncated, a fragment starting past the 75 kept ids is dropped with
 *     its weight, and a down-weighted fragment cut by the limit masks the EOS too; chunked, a mask
 *     never covers a chunk's first or last position.
 *
 * Two bounds compel does not have: the extra passes of one prompt encode at most MAX_EXTRA_ROWS
 * rows (a long prompt can hold hundreds of down-weighted fragments, each a pass, and in REMOVE
 * mode each pass re-encodes every chunk); fragments past it keep step 3's weighting only. And a
 * chunked prompt keeps at most MAX_PROMPT_CHUNKS chunks (the UNet attends to every token of
 * every chunk, at every step): ids past them are dropped, counted in the layout's `dropped`.
 */
import type { ClipTokenizer } from './tokenizer.js';
import type { WeightedFragment } from './prompt-weights.js';

export type DownweightMode = 'mask' | 'remove';

export interface WeightingOptions {
  /** Cut to one 77-token row (compel's default) rather than chunking long prompts. */
  truncate: boolean;
  downweight: DownweightMode;
  /** Encoder rows the down-weighting passes may add (default MAX_EXTRA_ROWS). */
  maxExtraRows?: number;
}

/** Rows the passes of one prompt may add: far beyond any hand-written prompt, bounded for a server. */
export const MAX_EXTRA_ROWS = 48;

/** A fragment as token ids, with its weight (a double, as the parser gives it). */
export interface TokenFragment {
  ids: number[];
  weight: number;
}

/** Tokenizes fragments one by one, drops those with no tokens and merges neighbours of equal weight. */
export function tokenFragments(tokenizer: ClipTokenizer, fragments: readonly WeightedFragment[]): TokenFragment[] {
  const out: TokenFragment[] = [];
  for (const f of fragments) {
    const ids = tokenizer.tokenize(f.text);
    if (ids.length === 0) continue;
    const last = out[out.length - 1];
    if (last && last.weight === f.weight) last.ids.push(...ids);
    else out.push({ ids, weight: f.weight });
  }
  return out;
}

/**
 * Chunks a chunked prompt keeps: 16 x 75 = 1,200 tokens, about 5,000 characters of English (a
 * 4,000-character prompt of ordinary words is 12-14 chunks).
 */
export const MAX_PROMPT_CHUNKS = 16;

/** Rows laid end to end, with a float32 weight per position and where each fragment landed. */
export interface ChunkLayout {
  /** chunks·77 ids. */
  ids: number[];
  /** chunks·77 float32 weights. */
  weights: Float32Array;
  chunks: number;
  /** Per fragment: its first and last position in `ids` (compel's ranges), or undefined when dropped. */
  ranges: ([number, number] | undefined)[];
  /** Chunked: ids past MAX_PROMPT_CHUNKS chunks, not encoded (0 when all fit). */
  dropped: number;
}

const SENTENCE_END = ['.</w>'];
const PHRASE_END = ['.</w>', ',</w>', ';</w>', ':</w>'];

/** compel's `_find_next_best_split_point` for SENTENCES: how many ids the next chunk takes. */
function splitPoint(tokenizer: ClipTokenizer, ids: readonly number[], from: number, span: number): number {
  const left = ids.length - from;
  if (left <= span) return left;
  const tests: ((t: string) => boolean)[] = [(t) => SENTENCE_END.includes(t), (t) => PHRASE_END.includes(t), (t) => t.endsWith('</w>')];
  for (const test of tests) {
    for (let i = span - 1; i >= 0; i--) {
      if (test(tokenizer.tokenText(ids[from + i]!) ?? '')) return i + 1;
    }
  }
  return span;
}

/** compel's `get_token_ids_and_expand_weights` and `_get_token_ranges_for_fragments`. */
export function layoutChunks(tokenizer: ClipTokenizer, fragments: readonly TokenFragment[], truncate: boolean): ChunkLayout {
  const S = tokenizer.modelMaxLength;
  const span = S - 2;
  const body: number[] = [];
  const bodyWeights: number[] = [];
  const starts: number[] = [];
  for (const f of fragments) {
    starts.push(body.length);
    // compel cuts each fragment to the row's room before concatenating (a no-op for the result).
    const ids = truncate ? f.ids.slice(0, span) : f.ids;
    for (const id of ids) {
      body.push(id);
      bodyWeights.push(f.weight);
    }
  }
  if (truncate) body.length = Math.min(body.length, span);

  // Chunk boundaries in the body, and the position of each body index in the rows.
  const bounds: number[] = [0];
  if (truncate) bounds.push(body.length);
  else
    for (let from = 0; ; ) {
      from += splitPoint(tokenizer, body, from, span);
      bounds.push(from);
      if (from >= body.length) break;
    }
  let dropped = 0;
  if (bounds.length - 1 > MAX_PROMPT_CHUNKS) {
    bounds.length = MAX_PROMPT_CHUNKS + 1;
    dropped = body.length - bounds[MAX_PROMPT_CHUNKS]!;
    body.length = bounds[MAX_PROMPT_CHUNKS]!;
  }
  const chunks = bounds.length - 1;
  const ids = new Array<number>(chunks * S).fill(tokenizer.padTokenId);
  const weights = new Float32Array(chunks * S).fill(1);
  const position = new Int32Array(body.length);
  for (let c = 0; c < chunks; c++) {
    const base = c * S;
    ids[base] = tokenizer.bosTokenId;
    for (let i = bounds[c]!; i < bounds[c + 1]!; i++) {
      const at = base + 1 + i - bounds[c]!;
      ids[at] = body[i]!;
      weights[at] = bodyWeights[i]!;
      position[i] = at;
    }
    ids[base + 1 + bounds[c + 1]! - bounds[c]!] = tokenizer.eosTokenId;
  }

  const ranges: ([number, number] | undefined)[] = [];
  for (let k = 0; k < fragments.length; k++) {
    const start = starts[k]!;
    const end = start + fragments[k]!.ids.length - 1;
    if (truncate) {
      // Past the kept ids: this fragment and every later one lose their weight's extra pass.
      if (start >= span) {
        while (ranges.length < fragments.length) ranges.push(undefined);
        break;
      }
      ranges.push([start + 1, end < span ? end + 1 : S - 1]);
    } else if (dropped > 0 && start >= body.length) {
      ranges.push(undefined); // past the kept chunks
    } else {
      ranges.push([position[start]!, position[Math.min(end, body.length - 1)]!]);
    }
  }
  return { ids, weights, chunks, ranges, dropped };
}

/** One extra encoder pass for a down-weighted fragment, and its lerp weight before normalising. */
export interface DownweightPass {
  fragment: number;
  /** Masked copy of the base rows (mask mode), 1 = attend. */
  mask?: Int32Array;
  /** The rows without the fragment (remove mode). */
  layout?: ChunkLayout;
  lerp: number;
}

export interface WeightingPlan {
  base: ChunkLayout;
  passes: DownweightPass[];
  /** float32 n = t / Σt over [base, passes...]. */
  blend: Float32Array;
  /** Whether any weight differs from 1 (else the result is the encoder output as it is). */
  weighted: boolean;
}

/** What compel computes for one encoder, short of running it. */
export function planWeighting(tokenizer: ClipTokenizer, fragments: readonly TokenFragment[], options: WeightingOptions): WeightingPlan {
  const base = layoutChunks(tokenizer, fragments, options.truncate);
  const S = tokenizer.modelMaxLength;
  const passes: DownweightPass[] = [];
  let budget = options.maxExtraRows ?? MAX_EXTRA_ROWS;
  for (const [k, f] of fragments.entries()) {
    const range = base.ranges[k];
    if (!range || !(f.weight < 1)) continue;
    const lerp = Math.tan((1 - Math.max(1e-5, f.weight)) * (Math.PI / 2));
    let pass: DownweightPass;
    let rows: number;
    if (options.downweight === 'mask') {
      const mask = new Int32Array(base.ids.length).fill(1);
      mask.fill(0, range[0], range[1] + 1);
      if (!options.truncate) {
        for (let c = 0; c < base.chunks; c++) {
          mask[c * S] = 1;
          mask[c * S + S - 1] = 1;
        }
      }
      pass = { fragment: k, mask, lerp };
      rows = Math.floor(range[1] / S) - Math.floor(range[0] / S) + 1;
    } else {
      // compel re-tokenizes the remaining fragments as they are (not merged again).
      const rest = fragments.filter((_, i) => i !== k);
      pass = { fragment: k, layout: layoutChunks(tokenizer, rest, options.truncate), lerp };
      rows = pass.layout!.chunks;
    }
    if (rows > budget) break;
    budget -= rows;
    passes.push(pass);
  }
  const t = Float32Array.from([1, ...passes.map((p) => p.lerp)]);
  let sum = 0;
  for (const v of t) sum = Math.fround(sum + v);
  const blend = t.map((v) => Math.fround(v / sum));
  return { base, passes, blend, weighted: base.weights.some((w) => w !== 1) };
}

/**
 * compel's `build_weighted_embedding_tensor` after the encoder: z [chunks·S, D] against the
 * empty prompt's e [S, D]. Returns z itself when every weight is 1.
 */
export function applyWeights(z: Float32Array, empty: Float32Array, weights: Float32Array, dim: number): Float32Array {
  if (weights.every((w) => w === 1)) return z;
  const out = Float32Array.from(z);
  const S = empty.length / dim;
  for (let j = 0; j < weights.length; j++) {
    const w = weights[j]!;
    if (w === 1) continue;
    const e0 = (j % S) * dim;
    for (let d = 0; d < dim; d++) {
      const e = empty[e0 + d]!;
      out[j * dim + d] = Math.fround(e + Math.fround(Math.fround(z[j * dim + d]! - e) * w));
    }
  }
  return out;
}

/** Σ n_k·W_k in float32, in order (compel's `apply_embedding_weights`). */
export function blendPasses(tensors: readonly Float32Array[], n: Float32Array): Float32Array {
  if (tensors.length === 1 && n[0] === 1) return tensors[0]!;
  const out = new Float32Array(tensors[0]!.length);
  for (let i = 0; i < out.length; i++) {
    let acc = Math.fround(tensors[0]![i]! * n[0]!);
    for (let k = 1; k < tensors.length; k++) acc = Math.fround(acc + Math.fround(tensors[k]![i]! * n[k]!));
    out[i] = acc;
  }
  return out;
}

/** `count` chunks of `data` ([chunks·S, D]), cut or padded with copies of the empty prompt's rows. */
export function fitChunks(data: Float32Array, empty: Float32Array, count: number): Float32Array {
  const size = empty.length;
  if (data.length === count * size) return data;
  const out = new Float32Array(count * size);
  out.set(data.subarray(0, Math.min(data.length, out.length)));
  for (let at = data.length; at < out.length; at += size) out.set(empty, at);
  return out;
}

/** One encoder row: 77 ids and, for masked passes, its attention mask. */
export interface EncoderRow {
  ids: number[];
  mask?: Int32Array;
}

/** compel's empty-prompt row: [BOS, EOS, pads]. */
export function emptyRow(tokenizer: ClipTokenizer): number[] {
  const ids = new Array<number>(tokenizer.modelMaxLength).fill(tokenizer.padTokenId);
  ids[0] = tokenizer.bosTokenId;
  ids[1] = tokenizer.eosTokenId;
  return ids;
}

/**
 * Runs plans (one per prompt) for one encoder, given a way to encode rows (`encode` returns
 * [rows·S, D] for the rows given, in order), with the empty prompt's row first. Rows of a masked
 * pass whose chunk has no masked position equal the base rows (an all-ones mask changes nothing),
 * so only the others are encoded again. Every row goes to `encode` in one call.
 */
export async function runPlans(
  tokenizer: ClipTokenizer,
  plans: readonly WeightingPlan[],
  encode: (rows: EncoderRow[]) => Promise<{ data: Float32Array; dim: number }>,
): Promise<{ results: Float32Array[]; empty: Float32Array; dim: number }> {
  const S = tokenizer.modelMaxLength;
  const rowsOf = (layout: ChunkLayout, mask?: Int32Array): EncoderRow[] =>
    Array.from({ length: layout.chunks }, (_, c) => ({ ids: layout.ids.slice(c * S, (c + 1) * S), mask: mask?.subarray(c * S, (c + 1) * S) }));
  const rows: EncoderRow[] = [{ ids: emptyRow(tokenizer) }];
  const add = (more: EncoderRow[]) => more.map((row) => rows.push(row) - 1);
  const indices = plans.map((plan) => {
    const base = add(rowsOf(plan.base));
    // Per pass: for each of its chunks, the index of the row that encodes it.
    const passes = plan.passes.map((p) =>
      p.layout ? add(rowsOf(p.layout)) : rowsOf(plan.base, p.mask).map((row, c) => (row.mask!.every((m) => m === 1) ? base[c]! : add([row])[0]!)),
    );
    return { base, passes };
  });
  const { data: z, dim } = await encode(rows);
  const size = S * dim;
  const empty = z.slice(0, size);
  const gather = (at: number[]) => {
    const out = new Float32Array(at.length * size);
    at.forEach((r, i) => out.set(z.subarray(r * size, (r + 1) * size), i * size));
    return out;
  };
  const results = plans.map((plan, i) => {
    const base = applyWeights(gather(indices[i]!.base), empty, plan.base.weights, dim);
    if (plan.passes.length === 0) return blendPasses([base], plan.blend);
    // Σ n_k·W_k accumulated pass by pass (the same float32 sums, in the same order, as blendPasses).
    const acc = new Float32Array(base.length);
    const n0 = plan.blend[0]!;
    for (let j = 0; j < acc.length; j++) acc[j] = Math.fround(base[j]! * n0);
    plan.passes.forEach((p, k) => {
      // A remove pass can chunk differently: it is fitted to the base's length with empty-prompt rows.
      const w = fitChunks(applyWeights(gather(indices[i]!.passes[k]!), empty, (p.layout ?? plan.base).weights, dim), empty, plan.base.chunks);
      const nk = plan.blend[k + 1]!;
      for (let j = 0; j < acc.length; j++) acc[j] = Math.fround(acc[j]! + Math.fround(w[j]! * nk));
    });
    return acc;
  });
  return { results, empty, dim };
}
