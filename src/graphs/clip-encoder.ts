/**
 * What CLIP's text and vision towers (clip-text.ts, clip-vision.ts) share: reading config.json
 * (integer keys with transformers' defaults for absent ones, the activation, the layer-norm
 * epsilon and the head split, each refused with a ModelLoadError naming the component) and the
 * encoder layer, transformers' CLIPEncoderLayer.
 */
import { ModelLoadError } from '../engine/errors.js';
import type { GraphBuilder } from './onnx-builder.js';
import { attention, gelu, layerNorm, linear, quickGelu } from './layers.js';
import type { Params } from './weights.js';

export type ClipActivation = 'quick_gelu' | 'gelu';

export interface ClipConfigReader {
  /** `key` as an integer (`value` when it lives elsewhere, e.g. a full CLIPConfig's top level), `fallback` when absent. */
  int(key: string, fallback: number, value?: unknown): number;
  /** hidden_act (default quick_gelu). */
  act: ClipActivation;
  /** layer_norm_eps (default 1e-5). */
  eps: number;
  /** Refuses a hidden size the heads do not split evenly. */
  checkHeads(hidden: number, heads: number): void;
  /** A ModelLoadError about this config.json. */
  error(message: string): ModelLoadError;
}

/**
 * A reader over `config`; `min` is the least integer value accepted (the text tower has always
 * taken 0, the vision tower needs positive sizes).
 */
export function clipConfigReader(config: Record<string, unknown>, component: string, where: string | undefined, min: 0 | 1): ClipConfigReader {
  const error = (message: string): ModelLoadError => new ModelLoadError(`${component}: config.json ${message}`, where);
  const int = (key: string, fallback: number, value: unknown = config[key]): number => {
    const v = value ?? fallback;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min) {
      throw error(`${key} must be a ${min === 0 ? 'non-negative' : 'positive'} integer, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const act = config.hidden_act ?? 'quick_gelu';
  if (act !== 'quick_gelu' && act !== 'gelu') throw error(`hidden_act ${JSON.stringify(act)} is not supported (quick_gelu or gelu)`);
  const eps = config.layer_norm_eps ?? 1e-5;
  if (typeof eps !== 'number' || !(eps > 0)) throw error('layer_norm_eps must be a positive number');
  const checkHeads = (hidden: number, heads: number): void => {
    if (heads === 0 || hidden % heads !== 0) throw error(`hidden_size ${hidden} is not divisible by num_attention_heads ${heads}`);
  };
  return { int, act, eps, checkHeads, error };
}

/** The sizes an encoder layer reads (ClipTextConfig and ClipVisionConfig both have them). */
export interface ClipLayerSizes {
  hidden: number;
  intermediate: number;
  heads: number;
  act: ClipActivation;
  eps: number;
}

/**
 * One pre-norm encoder layer under `l` (`encoder.layers.N`), q scaled by 1/sqrt(head_dim) before
 * q·kᵀ as transformers' eager attention does:
 *   x += out_proj(self_attn(layer_norm1(x)));  x += fc2(act(fc1(layer_norm2(x))))
 * `mask` is added to the attention scores (the text tower's causal mask); `output` names the result.
 */
export function clipEncoderLayer(g: GraphBuilder, l: Params, x: string, c: ClipLayerSizes, mask?: string, output?: string): string {
  const D = c.hidden;
  const act = c.act === 'gelu' ? gelu : quickGelu;
  const a = l.at('self_attn');
  const h1 = layerNorm(g, l.at('layer_norm1'), x, D, c.eps);
  const q = linear(g, a.at('q_proj'), h1, D, D);
  const k = linear(g, a.at('k_proj'), h1, D, D);
  const v = linear(g, a.at('v_proj'), h1, D, D);
  const attn = linear(g, a.at('out_proj'), attention(g, q, k, v, c.heads, D / c.heads, { mask, scaleQuery: true }), D, D);
  const r = g.op('Add', [x, attn]);
  const h2 = layerNorm(g, l.at('layer_norm2'), r, D, c.eps);
  const mlp = linear(g, l.at('mlp.fc2'), act(g, linear(g, l.at('mlp.fc1'), h2, D, c.intermediate)), c.intermediate, D);
  return g.op('Add', [r, mlp], {}, output);
}
