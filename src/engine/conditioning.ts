/**
 * Prompt -> text conditioning (the UNet's `encoder_hidden_states`, plus SDXL's pooled vector).
 *
 * - Inline weights (`(ball)0.5`, `word++`) follow compel's rule (weighting.ts): weighted rows move
 *   away from (w > 1) or toward (w < 1) the empty prompt's encoding, and each down-weighted
 *   fragment is also blended with a pass that masks it out of attention (or, for encoders without
 *   an `attention_mask` input, with the prompt re-encoded without it).
 * - Prompts longer than 75 tokens are split into 77-token chunks at sentence ends (compel's
 *   `truncate_long_prompts=False`), each wrapped in BOS/EOS and padded, and concatenated along the
 *   sequence axis, so nothing is silently cut. Positive and negative are padded to the same
 *   number of chunks with the empty prompt's encoding (compel's padding).
 * - SDXL: both encoders' penultimate hidden states (`hidden_states.{n-2}`) concatenated on the
 *   feature axis, each encoder weighted on its own. The pooled vector is not weighted: it is
 *   encoder 2's `text_embeds` of the raw prompt, syntax included, cut to 77 tokens (what compel
 *   gives). An absent negative prompt gives zeros when the pipeline sets
 *   `force_zeros_for_empty_prompt` (as diffusers does: `negative_prompt=None` is zeros,
 *   `negative_prompt=""` is the encoding of "").
 */
import type { FloatTensor, OnnxModel } from './onnx.js';
import type { ClipTokenizer } from './tokenizer.js';
import { parsePromptWeights } from './prompt-weights.js';
import { ModelLoadError } from './errors.js';
import { layoutChunks, planWeighting, runPlans, fitChunks, tokenFragments, type EncoderRow, type WeightingPlan } from './weighting.js';

export interface TextConditioning {
  /** [1, 77·chunks, D] */
  hidden: FloatTensor;
  /** [1, P] for SDXL, else undefined. */
  pooled?: FloatTensor;
  /** Prompt tokens past the chunks kept (weighting.ts MAX_PROMPT_CHUNKS), not encoded; absent when none. */
  droppedTokens?: number;
}

/** What conditioning needs of a model (a DiffusionModel has it). */
export interface TextEncoders {
  readonly isXL: boolean;
  readonly tokenizer: ClipTokenizer;
  readonly textEncoder: OnnxModel;
  readonly tokenizer2?: ClipTokenizer;
  readonly textEncoder2?: OnnxModel;
}

export interface ConditioningOptions {
  /** Cut each prompt to one 77-token row, as compel does by default; Kiln chunks (false). */
  truncate?: boolean;
}

/** Token ids per 77-long chunk, with a weight per position. */
export interface TokenChunks {
  ids: number[][];
  weights: number[][];
}

/** A weighted prompt as Kiln feeds it to one encoder: padded 77-token chunks (at least one, even for ""). */
export function chunkPrompt(tokenizer: ClipTokenizer, prompt: string): TokenChunks {
  const layout = layoutChunks(tokenizer, tokenFragments(tokenizer, parsePromptWeights(prompt)), false);
  const S = tokenizer.modelMaxLength;
  const chunks: TokenChunks = { ids: [], weights: [] };
  for (let c = 0; c < layout.chunks; c++) {
    chunks.ids.push(layout.ids.slice(c * S, (c + 1) * S));
    chunks.weights.push(Array.from(layout.weights.subarray(c * S, (c + 1) * S)));
  }
  return chunks;
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

/** Rows per session.run: bounds memory when a long prompt has many down-weighted fragments. */
const MAX_ROWS_PER_RUN = 16;

/**
 * Runs an encoder on 77-token rows and returns output `name` as [rows·77, D]. Encoders with an
 * `attention_mask` input get each row's mask (all ones when it has none).
 */
async function encodeRows(encoder: OnnxModel, rows: readonly EncoderRow[], name: string): Promise<{ data: Float32Array; dim: number }> {
  const withMask = encoder.hasInput('attention_mask');
  const parts: FloatTensor[] = [];
  for (let at = 0; at < rows.length; at += MAX_ROWS_PER_RUN) {
    const batch = rows.slice(at, at + MAX_ROWS_PER_RUN);
    const seq = batch[0]!.ids.length;
    const dims = [batch.length, seq];
    const feeds: Parameters<OnnxModel['run']>[0] = { input_ids: { ints: batch.flatMap((r) => r.ids), dims } };
    if (withMask) {
      const mask = new Int32Array(batch.length * seq).fill(1);
      batch.forEach((r, i) => r.mask && mask.set(r.mask, i * seq));
      feeds.attention_mask = { ints: mask, dims };
    }
    parts.push((await encoder.run(feeds, [name]))[name]!);
  }
  const dim = parts[0]!.dims.at(-1)!;
  const data = new Float32Array(parts.reduce((n, p) => n + p.data.length, 0));
  let offset = 0;
  for (const p of parts) {
    data.set(p.data, offset);
    offset += p.data.length;
  }
  return { data, dim };
}

/**
 * Weighted conditioning of several prompts (positive, negative), all padded to the same number
 * of chunks; for SDXL also each raw prompt's pooled vector.
 */
export async function encodeConditioning(
  model: TextEncoders,
  prompts: readonly string[],
  options: ConditioningOptions = {},
  timings?: { tokenizeMs: number },
): Promise<TextConditioning[]> {
  const sides: { tokenizer: ClipTokenizer; encoder: OnnxModel; output: string }[] = model.isXL
    ? [
        { tokenizer: model.tokenizer, encoder: model.textEncoder, output: penultimateOutput(model.textEncoder) },
        { tokenizer: model.tokenizer2!, encoder: model.textEncoder2!, output: penultimateOutput(model.textEncoder2!) },
      ]
    : [{ tokenizer: model.tokenizer, encoder: model.textEncoder, output: 'last_hidden_state' }];
  const started = performance.now();
  const parsed = prompts.map((p) => parsePromptWeights(p));
  const plans: WeightingPlan[][] = sides.map((side) =>
    parsed.map((fragments) =>
      planWeighting(side.tokenizer, tokenFragments(side.tokenizer, fragments), {
        truncate: options.truncate ?? false,
        downweight: side.encoder.hasInput('attention_mask') ? 'mask' : 'remove',
      }),
    ),
  );
  if (timings) timings.tokenizeMs += performance.now() - started;

  const encoded: Awaited<ReturnType<typeof runPlans>>[] = [];
  for (const [i, side] of sides.entries()) {
    encoded.push(await runPlans(side.tokenizer, plans[i]!, (rows) => encodeRows(side.encoder, rows, side.output)));
  }
  // SDXL's tokenizer_2 turns each "!" into its pad token, so the encoders can chunk differently:
  // every side of every prompt is padded to the most chunks.
  const S = model.tokenizer.modelMaxLength;
  const count = Math.max(...plans.flat().map((p) => p.base.chunks));
  const dim = encoded.reduce((n, e) => n + e.dim, 0);
  const hidden = prompts.map((_, p) => {
    const data = new Float32Array(count * S * dim);
    let offset = 0;
    for (const e of encoded) {
      const part = fitChunks(e.results[p]!, e.empty, count);
      for (let r = 0; r < count * S; r++) data.set(part.subarray(r * e.dim, (r + 1) * e.dim), r * dim + offset);
      offset += e.dim;
    }
    return { data, dims: [1, count * S, dim] };
  });
  // What each prompt lost to the chunk bound (the encoders tokenize alike but for SDXL's "!": the most).
  const dropped = (p: number): { droppedTokens?: number } => {
    const n = Math.max(...plans.map((side) => side[p]!.base.dropped));
    return n > 0 ? { droppedTokens: n } : {};
  };
  if (!model.isXL) return hidden.map((h, p) => ({ hidden: h, ...dropped(p) }));

  const rows = prompts.map((p) => ({ ids: model.tokenizer2!.encodePadded(p) }));
  const pooled = await encodeRows(model.textEncoder2!, rows, 'text_embeds');
  return hidden.map((h, p) => ({ hidden: h, pooled: { data: pooled.data.slice(p * pooled.dim, (p + 1) * pooled.dim), dims: [1, pooled.dim] }, ...dropped(p) }));
}

/**
 * Encodes the positive prompt and, when CFG is on, the negative one, as two conditionings
 * with equal sequence length. Both prompts go through each encoder in one batched call.
 */
export async function encodePrompts(
  model: TextEncoders & { layout: { forceZerosForEmptyPrompt: boolean } },
  prompt: string,
  negativePrompt: string | undefined,
  withNegative: boolean,
  timings?: { tokenizeMs: number },
): Promise<{ cond: TextConditioning; uncond?: TextConditioning }> {
  const zeroNegative = model.isXL && negativePrompt === undefined && model.layout.forceZerosForEmptyPrompt;
  const encodeNegative = withNegative && !zeroNegative;
  const [cond, uncond] = await encodeConditioning(model, encodeNegative ? [prompt, negativePrompt ?? ''] : [prompt], {}, timings);
  if (!withNegative) return { cond: cond! };
  if (zeroNegative) {
    return {
      cond: cond!,
      uncond: {
        hidden: { data: new Float32Array(cond!.hidden.data.length), dims: [...cond!.hidden.dims] },
        pooled: cond!.pooled && { data: new Float32Array(cond!.pooled.data.length), dims: [...cond!.pooled.dims] },
      },
    };
  }
  return { cond: cond!, uncond };
}
