/**
 * Prompt -> text conditioning (the UNet's `encoder_hidden_states`, plus SDXL's pooled vector).
 *
 * - Inline weights (`(ball)0.5`, `word++`) become a weight per token; the encoder's hidden
 *   states are scaled token by token and then rescaled so their overall mean is unchanged
 *   (compel / A1111 style), which keeps the UNet's input statistics in range.
 * - Prompts longer than 75 tokens are split into 75-token chunks, each wrapped in BOS/EOS and
 *   padded to 77, encoded in one batch, and concatenated along the sequence axis, so nothing
 *   is silently cut. Positive and negative are padded to the same number of chunks.
 * - SDXL: both encoders' penultimate hidden states (`hidden_states.{n-2}`) concatenated on the
 *   feature axis; the pooled vector is encoder 2's `text_embeds` of the first chunk; an absent
 *   negative prompt gives zeros when the pipeline sets `force_zeros_for_empty_prompt` (as diffusers
 *   does: `negative_prompt=None` is zeros, `negative_prompt=""` is the encoding of "").
 */
import type { DiffusionModel } from './model.js';
import type { FloatTensor, OnnxModel } from './onnx.js';
import type { ClipTokenizer } from './tokenizer.js';
import { parsePromptWeights } from './prompt-weights.js';
import { ModelLoadError } from './errors.js';

export interface TextConditioning {
  /** [1, 77·chunks, D] */
  hidden: FloatTensor;
  /** [1, P] for SDXL, else undefined. */
  pooled?: FloatTensor;
}

/** Token ids per 77-long chunk, with a weight per position. */
export interface TokenChunks {
  ids: number[][];
  weights: number[][];
}

/** Splits a weighted prompt into padded 77-token chunks (at least one, even for ""). */
export function chunkPrompt(tokenizer: ClipTokenizer, prompt: string): TokenChunks {
  const body: number[] = [];
  const bodyWeights: number[] = [];
  for (const fragment of parsePromptWeights(prompt)) {
    const ids = tokenizer.tokenize(fragment.text);
    body.push(...ids);
    for (let i = 0; i < ids.length; i++) bodyWeights.push(fragment.weight);
  }
  const span = tokenizer.modelMaxLength - 2;
  const chunks: TokenChunks = { ids: [], weights: [] };
  for (let start = 0; start === 0 || start < body.length; start += span) {
    const ids = [tokenizer.bosTokenId, ...body.slice(start, start + span), tokenizer.eosTokenId];
    const weights = [1, ...bodyWeights.slice(start, start + span), 1];
    while (ids.length < tokenizer.modelMaxLength) {
      ids.push(tokenizer.padTokenId);
      weights.push(1);
    }
    chunks.ids.push(ids);
    chunks.weights.push(weights);
  }
  return chunks;
}

/** Pads a chunk list with empty-prompt chunks up to `count` (so cond and uncond batch together). */
function padChunks(tokenizer: ClipTokenizer, chunks: TokenChunks, count: number): TokenChunks {
  const empty = chunkPrompt(tokenizer, '');
  const out = { ids: [...chunks.ids], weights: [...chunks.weights] };
  while (out.ids.length < count) {
    out.ids.push(empty.ids[0]!);
    out.weights.push(empty.weights[0]!);
  }
  return out;
}

/** Penultimate hidden layer by name (`hidden_states.11` of 0..12), as SDXL uses it. */
function penultimateOutput(encoder: OnnxModel): string {
  const layers = encoder
    .outputNames(/^hidden_states\.\d+$/)
    .map((n) => Number(n.slice('hidden_states.'.length)))
    .sort((a, b) => a - b);
  if (layers.length < 2) {
    throw new ModelLoadError(`${encoder.label} has no hidden_states.N outputs; SDXL needs the penultimate layer`);
  }
  return `hidden_states.${layers[layers.length - 2]}`;
}

/** Runs one encoder on several 77-token chunks at once: [k, 77] ids -> named outputs. */
async function runEncoder(encoder: OnnxModel, chunkIds: number[][], outputs: string[]): Promise<Record<string, FloatTensor>> {
  const seq = chunkIds[0]!.length;
  return encoder.run({ input_ids: { ints: chunkIds.flat(), dims: [chunkIds.length, seq] } }, outputs);
}

/**
 * Scales each token's hidden vector by its weight, then restores the tensor's mean
 * (only when some weight differs from 1: unweighted prompts stay bit-exact).
 */
export function applyTokenWeights(hidden: Float32Array, weights: number[], dim: number): void {
  if (weights.every((w) => w === 1)) return;
  let before = 0;
  for (let i = 0; i < hidden.length; i++) before += hidden[i]!;
  for (let t = 0; t < weights.length; t++) {
    const w = weights[t]!;
    if (w === 1) continue;
    for (let d = 0; d < dim; d++) hidden[t * dim + d]! *= w;
  }
  let after = 0;
  for (let i = 0; i < hidden.length; i++) after += hidden[i]!;
  if (after !== 0 && Number.isFinite(before / after)) {
    const k = before / after;
    for (let i = 0; i < hidden.length; i++) hidden[i]! *= k;
  }
}

/**
 * Encodes the positive prompt and, when CFG is on, the negative one, as two conditionings
 * with equal sequence length. Both prompts go through each encoder in one batched call.
 */
export async function encodePrompts(
  model: DiffusionModel,
  prompt: string,
  negativePrompt: string | undefined,
  withNegative: boolean,
  timings?: { tokenizeMs: number },
): Promise<{ cond: TextConditioning; uncond?: TextConditioning }> {
  const negative = negativePrompt ?? '';
  const zeroNegative = model.isXL && negativePrompt === undefined && model.layout.forceZerosForEmptyPrompt;
  const tokenizeStarted = performance.now();
  const encodeNegative = withNegative && !zeroNegative;
  // Chunk with every tokenizer first: SDXL's tokenizer_2 makes each "!" its pad token, so
  // the two encoders can need different chunk counts. All sides are padded to the largest.
  const tokenizers = model.isXL ? [model.tokenizer, model.tokenizer2!] : [model.tokenizer];
  const pos = tokenizers.map((tok) => chunkPrompt(tok, prompt));
  const neg = encodeNegative ? tokenizers.map((tok) => chunkPrompt(tok, negative)) : [];
  const count = Math.max(...[...pos, ...neg].map((c) => c.ids.length));
  const pos1 = padChunks(model.tokenizer, pos[0]!, count);
  const neg1 = encodeNegative ? padChunks(model.tokenizer, neg[0]!, count) : undefined;

  // Token weights follow encoder 1's tokens (they line up with encoder 2's but for "!").
  const batch1 = neg1 ? [...pos1.ids, ...neg1.ids] : pos1.ids;
  const weights = neg1 ? [...pos1.weights, ...neg1.weights] : pos1.weights;

  let hidden: Float32Array;
  let dim: number;
  let pooledAll: FloatTensor | undefined;
  if (!model.isXL) {
    if (timings) timings.tokenizeMs += performance.now() - tokenizeStarted;
    const out = await runEncoder(model.textEncoder, batch1, ['last_hidden_state']);
    ({ data: hidden } = out.last_hidden_state!);
    dim = out.last_hidden_state!.dims[2]!;
  } else {
    const te2 = model.textEncoder2!;
    const tok2 = model.tokenizer2!;
    const pos2 = padChunks(tok2, pos[1]!, count);
    const neg2 = encodeNegative ? padChunks(tok2, neg[1]!, count) : undefined;
    const batch2 = neg2 ? [...pos2.ids, ...neg2.ids] : pos2.ids;
    if (timings) timings.tokenizeMs += performance.now() - tokenizeStarted;
    const name1 = penultimateOutput(model.textEncoder);
    const name2 = penultimateOutput(te2);
    const out1 = await runEncoder(model.textEncoder, batch1, [name1]);
    const out2 = await runEncoder(te2, batch2, [name2, 'text_embeds']);
    const h1 = out1[name1]!;
    const h2 = out2[name2]!;
    const [rows, seq, d1] = h1.dims as [number, number, number];
    const d2 = h2.dims[2]!;
    if (h2.dims[0] !== rows || h2.dims[1] !== seq) {
      throw new ModelLoadError(`text encoders disagree on shapes: [${h1.dims}] vs [${h2.dims}]`);
    }
    dim = d1 + d2;
    hidden = new Float32Array(rows * seq * dim);
    for (let r = 0; r < rows * seq; r++) {
      hidden.set(h1.data.subarray(r * d1, (r + 1) * d1), r * dim);
      hidden.set(h2.data.subarray(r * d2, (r + 1) * d2), r * dim + d1);
    }
    pooledAll = out2.text_embeds;
  }

  const seq = batch1[0]!.length;
  const rowSize = seq * dim;
  // Weight per chunk of each side, then lay the chunks end to end: [1, count·77, D].
  const side = (first: number): TextConditioning => {
    const data = new Float32Array(count * rowSize);
    for (let c = 0; c < count; c++) data.set(hidden.subarray((first + c) * rowSize, (first + c + 1) * rowSize), c * rowSize);
    applyTokenWeights(data, weights.slice(first, first + count).flat(), dim);
    const pooled = pooledAll && {
      data: pooledAll.data.slice(first * pooledAll.dims[1]!, (first + 1) * pooledAll.dims[1]!),
      dims: [1, pooledAll.dims[1]!],
    };
    return { hidden: { data, dims: [1, count * seq, dim] }, pooled };
  };

  const cond = side(0);
  if (!withNegative) return { cond };
  if (zeroNegative) {
    return {
      cond,
      uncond: {
        hidden: { data: new Float32Array(cond.hidden.data.length), dims: [...cond.hidden.dims] },
        pooled: cond.pooled && { data: new Float32Array(cond.pooled.data.length), dims: [...cond.pooled.dims] },
      },
    };
  }
  return { cond, uncond: side(count) };
}
