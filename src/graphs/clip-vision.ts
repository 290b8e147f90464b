/**
 * CLIP's image encoder: transformers' `CLIPVisionModelWithProjection` (the IP-Adapter image
 * encoders: OpenCLIP ViT-H/14, ViT-bigG/14) and `CLIPVisionModel`, from the folder's config.json
 * and its weights under transformers' names (`vision_model.encoder.layers.N.self_attn.q_proj.weight`, ...).
 *
 *   x = patch_embedding(pixels) (conv, stride = patch, no bias) -> [B, P, D]
 *   x = concat(class_embedding, x) + position_embedding; x = pre_layrnorm(x)       hidden_states.0
 *   per layer: as the text encoder, without a mask                                 hidden_states.i
 *   last_hidden_state = x (no final norm); pooled = post_layernorm(x[:, 0])
 *   image_embeds = visual_projection(pooled)   (CLIPVisionModel: pooler_output = pooled)
 *
 * Numerics follow transformers 4.45's eager attention (q scaled by 1/√head_dim before q·kᵀ).
 *
 * Graph I/O: `pixel_values` float32 [batch, 3, S, S] (S = image_size: position embeddings are
 * not interpolated); outputs `image_embeds` (or `pooler_output`), `last_hidden_state`, then
 * `hidden_states.0` … `hidden_states.L`. IP-Adapter uses `image_embeds` (base adapters) or
 * `hidden_states.{L-1}` = hidden_states[-2] (Plus / face adapters).
 */
import { ModelLoadError } from '../engine/errors.js';
import { clipConfigReader, clipEncoderLayer, type ClipActivation } from './clip-encoder.js';
import type { GraphBuilder } from './onnx-builder.js';
import { conv2d, layerNorm, linear } from './layers.js';
import type { Params } from './weights.js';

export interface ClipVisionConfig {
  hidden: number;
  intermediate: number;
  layers: number;
  heads: number;
  channels: number;
  imageSize: number;
  patchSize: number;
  act: ClipActivation;
  eps: number;
  projectionDim: number;
  withProjection: boolean;
}

/**
 * Reads a vision config with transformers' CLIPVisionConfig defaults for absent keys. A full
 * CLIPConfig (model_type "clip") is read through its `vision_config`, with its top-level projection_dim.
 */
export function clipVisionConfig(raw: Record<string, unknown>, component = 'image_encoder', where?: string): ClipVisionConfig {
  let config = raw;
  let projectionDim = raw.projection_dim;
  if (raw.model_type === 'clip' && raw.vision_config && typeof raw.vision_config === 'object') {
    config = raw.vision_config as Record<string, unknown>;
    projectionDim = raw.projection_dim ?? config.projection_dim;
  }
  const architectures = Array.isArray(raw.architectures) ? raw.architectures.map(String) : [];
  const known = ['CLIPVisionModelWithProjection', 'CLIPVisionModel'];
  if (architectures.length && !architectures.some((a) => known.includes(a))) {
    throw new ModelLoadError(`${component}: config.json names ${architectures.join(', ')}; Kiln builds ${known.join(' or ')} here`, where);
  }
  const r = clipConfigReader(config, component, where, 1);
  const c: ClipVisionConfig = {
    hidden: r.int('hidden_size', 768),
    intermediate: r.int('intermediate_size', 3072),
    layers: r.int('num_hidden_layers', 12),
    heads: r.int('num_attention_heads', 12),
    channels: r.int('num_channels', 3),
    imageSize: r.int('image_size', 224),
    patchSize: r.int('patch_size', 32),
    act: r.act,
    eps: r.eps,
    projectionDim: r.int('projection_dim', 512, projectionDim),
    withProjection: !architectures.includes('CLIPVisionModel') || architectures.includes('CLIPVisionModelWithProjection'),
  };
  r.checkHeads(c.hidden, c.heads);
  if (c.imageSize % c.patchSize !== 0) throw r.error(`image_size ${c.imageSize} is not a multiple of patch_size ${c.patchSize}`);
  return c;
}

export interface ClipVisionGraph {
  config: ClipVisionConfig;
  /** Graph output names, in order. */
  outputs: string[];
  /** Tokens per image: 1 + (image_size / patch_size)². */
  tokens: number;
}

/** The `hidden_states.{L-1}` output: what IP-Adapter Plus reads (transformers' hidden_states[-2]). */
export function penultimateOutput(c: ClipVisionConfig): string {
  return `hidden_states.${c.layers - 1}`;
}

export function buildClipVision(g: GraphBuilder, config: Record<string, unknown>, p: Params): ClipVisionGraph {
  const c = clipVisionConfig(config, p.source.component, p.source.location);
  const D = c.hidden;
  const grid = c.imageSize / c.patchSize;
  const tokens = grid * grid + 1;
  const vm = p.at('vision_model');

  const pixels = g.input('pixel_values', 'float32', ['batch', c.channels, c.imageSize, c.imageSize]);
  const pooledName = c.withProjection ? 'image_embeds' : 'pooler_output';
  g.output(pooledName, 'float32', ['batch', c.withProjection ? c.projectionDim : D]);
  g.output('last_hidden_state', 'float32', ['batch', tokens, D]);
  const hiddenNames = Array.from({ length: c.layers + 1 }, (_, i) => g.output(`hidden_states.${i}`, 'float32', ['batch', tokens, D]));

  let x = g.scope('embeddings', () => {
    const e = vm.at('embeddings');
    const patches = conv2d(g, e.at('patch_embedding'), pixels, c.channels, D, { kernel: c.patchSize, stride: c.patchSize, padding: 0, bias: false });
    // [B, D, g, g] -> [B, g·g, D]
    const seq = g.op('Transpose', [g.op('Reshape', [patches, g.constI64([0, D, -1])])], { perm: [0, 2, 1] });
    const batch = g.op('Slice', [g.op('Shape', [pixels]), g.constI64([0]), g.constI64([1])]);
    const cls = g.op('Expand', [g.op('Reshape', [e.get('class_embedding', [D]), g.constI64([1, 1, D])]), g.op('Concat', [batch, g.constI64([1, D])], { axis: 0 })]);
    const joined = g.op('Concat', [cls, seq], { axis: 1 });
    return g.op('Add', [joined, e.get('position_embedding.weight', [tokens, D])]);
  });
  x = layerNorm(g, vm.at('pre_layrnorm'), x, D, c.eps);
  g.op('Identity', [x], {}, hiddenNames[0]);

  for (let i = 0; i < c.layers; i++) {
    x = g.scope(`layers.${i}`, () => clipEncoderLayer(g, vm.at(`encoder.layers.${i}`), x, c, undefined, hiddenNames[i + 1]));
  }
  g.op('Identity', [x], {}, 'last_hidden_state');

  g.scope('pool', () => {
    const cls = g.op('Gather', [x, g.constI64([0], [])], { axis: 1 }); // [B, D]
    const pooled = layerNorm(g, vm.at('post_layernorm'), cls, D, c.eps);
    if (c.withProjection) g.op('Identity', [linear(g, p.at('visual_projection'), pooled, D, c.projectionDim, false)], {}, pooledName);
    else g.op('Identity', [pooled], {}, pooledName);
  });

  return { config: c, outputs: [pooledName, 'last_hidden_state', ...hiddenNames], tokens };
}
