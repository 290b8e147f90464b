/**
 * CLIP's text encoder: transformers' `CLIPTextModel` (SD 1.x, SD 2.x, SDXL encoder 1) and
 * `CLIPTextModelWithProjection` (SDXL encoder 2, OpenCLIP bigG), from the component's config.json
 * and its weights under transformers' names (`text_model.encoder.layers.N.self_attn.q_proj.weight`, ...).
 *
 *   x = token_embedding[ids] + position_embedding[0..S)                    hidden_states.0
 *   per layer:  x += out_proj(causal self-attention(layer_norm1(x)))
 *               x += fc2(act(fc1(layer_norm2(x))))                        hidden_states.i
 *   last_hidden_state = final_layer_norm(x)
 *   pooled = last_hidden_state at the EOS token  -> pooler_output, or text_projection -> text_embeds
 *
 * Numerics follow transformers 4.45's eager path: q is scaled by 1/√head_dim before q·kᵀ, and the
 * causal mask adds float32's lowest value (not -inf) above the diagonal.
 *
 * Graph I/O (onnx-model-contracts.md §2.1/2.2): `input_ids` int64 [batch, sequence] (sequence at
 * most max_position_embeddings), and with the `attentionMask` option `attention_mask` int64
 * [batch, sequence]; outputs `last_hidden_state`, `pooler_output` (or `text_embeds` first, without
 * `pooler_output`), then `hidden_states.0` … `hidden_states.L`.
 *
 * attention_mask is transformers' padding mask: a key whose mask is not 1 gets float32's lowest
 * value added to its scores, on top of the causal mask (two lowests make -inf, as in torch). An
 * all-ones mask adds 0, so the outputs are bit-identical to the graph without the input. compel's
 * down-weighting (conditioning.ts) masks tokens this way.
 */
import { clipConfigReader, clipEncoderLayer, type ClipActivation } from './clip-encoder.js';
import type { GraphBuilder } from './onnx-builder.js';
import { layerNorm, linear } from './layers.js';
import type { Params } from './weights.js';

export interface ClipTextOptions {
  /** Build CLIPTextModelWithProjection; default: what config.json's `architectures` says. */
  withProjection?: boolean;
  /** Expose `hidden_states.0..L` (default true; SDXL reads the penultimate one). */
  hiddenStates?: boolean;
  /** Take an `attention_mask` input after `input_ids` (default false: the contract's single input). */
  attentionMask?: boolean;
}

export interface ClipTextConfig {
  vocabSize: number;
  hidden: number;
  intermediate: number;
  layers: number;
  heads: number;
  maxPositions: number;
  act: ClipActivation;
  eps: number;
  projectionDim: number;
  eosTokenId: number;
}

export interface ClipTextGraph {
  config: ClipTextConfig;
  withProjection: boolean;
  /** Graph output names, in order. */
  outputs: string[];
}

/** float32's lowest value: transformers' causal mask value (torch.finfo(float32).min). */
const FLOAT32_LOWEST = -3.4028234663852886e38;

/** Reads the text config, with transformers' CLIPTextConfig defaults for absent keys. */
export function clipTextConfig(config: Record<string, unknown>, component = 'text_encoder', where?: string): ClipTextConfig {
  const r = clipConfigReader(config, component, where, 0);
  const c: ClipTextConfig = {
    vocabSize: r.int('vocab_size', 49408),
    hidden: r.int('hidden_size', 512),
    intermediate: r.int('intermediate_size', 2048),
    layers: r.int('num_hidden_layers', 12),
    heads: r.int('num_attention_heads', 8),
    maxPositions: r.int('max_position_embeddings', 77),
    act: r.act,
    eps: r.eps,
    projectionDim: r.int('projection_dim', 512),
    eosTokenId: r.int('eos_token_id', 49407),
  };
  r.checkHeads(c.hidden, c.heads);
  return c;
}

export function buildClipText(g: GraphBuilder, config: Record<string, unknown>, p: Params, options: ClipTextOptions = {}): ClipTextGraph {
  const c = clipTextConfig(config, p.source.component, p.source.location);
  const architectures = Array.isArray(config.architectures) ? config.architectures : [];
  const withProjection = options.withProjection ?? architectures.includes('CLIPTextModelWithProjection');
  const D = c.hidden;
  const tm = p.at('text_model');

  const ids = g.input('input_ids', 'int64', ['batch', 'sequence']);
  const padMask = options.attentionMask ? g.input('attention_mask', 'int64', ['batch', 'sequence']) : undefined;
  const pooledName = withProjection ? 'text_embeds' : 'pooler_output';
  const pooledDim = withProjection ? c.projectionDim : D;
  // Declaration order is the output order the contract gives.
  if (withProjection) g.output(pooledName, 'float32', ['batch', pooledDim]);
  g.output('last_hidden_state', 'float32', ['batch', 'sequence', D]);
  if (!withProjection) g.output(pooledName, 'float32', ['batch', pooledDim]);
  const keepHidden = options.hiddenStates ?? true;
  // hidden_states.0 is the embeddings, hidden_states.i the output of layer i (before the final norm).
  const hiddenNames = Array.from({ length: c.layers + 1 }, (_, i) =>
    keepHidden ? g.output(`hidden_states.${i}`, 'float32', ['batch', 'sequence', D]) : undefined,
  );

  const seqLen = g.op('Slice', [g.op('Shape', [ids]), g.constI64([1]), g.constI64([2])]);

  // Embeddings: token rows plus the first S position rows.
  let x = g.scope('embeddings', () => {
    const e = tm.at('embeddings');
    const tokens = g.op('Gather', [e.get('token_embedding.weight', [c.vocabSize, D]), ids], { axis: 0 });
    const positions = g.op('Slice', [e.get('position_embedding.weight', [c.maxPositions, D]), g.constI64([0]), seqLen, g.constI64([0])]);
    return g.op('Add', [tokens, positions], {}, hiddenNames[0]);
  });

  // Causal mask [S, S]: 0 on and below the diagonal, float32's lowest value above it.
  const causal = g.scope('causal_mask', () => {
    const full = g.op('Expand', [g.constF32([FLOAT32_LOWEST], []), g.op('Concat', [seqLen, seqLen], { axis: 0 })]);
    return g.op('Trilu', [full, g.constI64([1], [])], { upper: 1 });
  });
  // Padding mask [B, 1, 1, S] (0 where attention_mask is 1, else float32's lowest) added to the
  // causal one: [B, 1, S, S]. Adding both at once gives torch's two additions bit for bit, since
  // one of each pair of summands is 0 or both are the lowest value (-inf either way).
  const mask = !padMask
    ? causal
    : g.scope('attention_mask', () => {
        const keep = g.op('Equal', [padMask, g.constI64([1], [])]);
        const add = g.op('Where', [keep, g.constF32([0], []), g.constF32([FLOAT32_LOWEST], [])]);
        return g.op('Add', [causal, g.op('Unsqueeze', [add, g.constI64([1, 2])])]);
      });

  for (let i = 0; i < c.layers; i++) {
    x = g.scope(`layers.${i}`, () => clipEncoderLayer(g, tm.at(`encoder.layers.${i}`), x, c, mask, hiddenNames[i + 1]));
  }

  const last = layerNorm(g, tm.at('final_layer_norm'), x, D, c.eps);
  g.op('Identity', [last], {}, 'last_hidden_state');

  // Pooling at the EOS token, as transformers 4.45 does: configs from before its eos fix carry
  // eos_token_id 2 and pool at argmax(ids) (the first highest id, 49407); newer ones at the first
  // position holding eos_token_id. ArgMax runs on int32, which holds every CLIP token id.
  g.scope('pool', () => {
    const keyed = c.eosTokenId === 2 ? g.cast(ids, 'int32') : g.cast(g.op('Equal', [ids, g.constI64([c.eosTokenId], [])]), 'int32');
    const at = g.op('ArgMax', [keyed], { axis: -1, keepdims: 1, select_last_index: 0 }); // [B, 1]
    const pooled = g.op('GatherND', [last, at], { batch_dims: 1 }, withProjection ? undefined : pooledName);
    if (withProjection) g.op('Identity', [linear(g, p.at('text_projection'), pooled, D, c.projectionDim, false)], {}, pooledName);
  });

  const outputs = [
    ...(withProjection ? [pooledName, 'last_hidden_state'] : ['last_hidden_state', pooledName]),
    ...(keepHidden ? hiddenNames.map((n) => n!) : []),
  ];
  return { config: c, withProjection, outputs };
}
