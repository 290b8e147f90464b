/**
 * The UNet2DConditionModel page: SD 1.x, SD 2.x, SDXL base and refiner, LCM and 9-channel
 * inpainting UNets, built from diffusers' unet/config.json and its safetensors weights.
 *
 * Shape of the network (diffusers' names in brackets):
 *   timestep -> sinusoidal embedding -> MLP [time_embedding]   (+ SDXL [add_embedding])  = temb
 *   sample -> [conv_in] -> down blocks (resnets, transformers, [downsamplers])            -> skips
 *          -> [mid_block] (resnet, transformer, resnet)
 *          -> up blocks (concat a skip, resnet, transformer; [upsamplers] to the next skip's size)
 *          -> [conv_norm_out] -> SiLU -> [conv_out] = out_sample
 *
 * The config is the only source of shapes; every weight is checked against them by Params.
 * Graph I/O follows the ONNX model contract §2.4 (sample, timestep, encoder_hidden_states,
 * SDXL text_embeds + time_ids, LCM timestep_cond -> out_sample). Built with IP-Adapters
 * (UnetBuildOptions.ipAdapters) it also takes each adapter's image tokens and scale; built with
 * controlResiduals, the ControlNet residuals of the split layout's ControlNet-UNet (§4.1).
 */
import { ModelLoadError } from '../engine/errors.js';
import type { GraphBuilder } from './onnx-builder.js';
import { attention, conv2d, gelu, groupNorm, layerNorm, linear, resnetBlock, silu, upsampleNearestLike } from './layers.js';
import type { Params } from './weights.js';

// ---------------------------------------------------------------------------------------------
// Config

type DownBlockType = 'CrossAttnDownBlock2D' | 'DownBlock2D';
type UpBlockType = 'CrossAttnUpBlock2D' | 'UpBlock2D';

/** A UNet config with diffusers' defaults filled in and every per-block setting as a list. */
export interface UnetConfig {
  inChannels: number;
  outChannels: number;
  centerInputSample: boolean;
  blockOutChannels: number[];
  downBlockTypes: DownBlockType[];
  upBlockTypes: UpBlockType[];
  hasMidBlock: boolean;
  layersPerBlock: number[];
  transformerLayersPerBlock: number[];
  /** Attention heads per block (diffusers' `attention_head_dim`, see parseUnetConfig). */
  heads: number[];
  crossAttentionDim: number;
  useLinearProjection: boolean;
  groups: number;
  eps: number;
  convInKernel: number;
  convOutKernel: number;
  downsamplePadding: number;
  midBlockScale: number;
  flipSinToCos: boolean;
  freqShift: number;
  /** Width of the sinusoidal timestep embedding (block_out_channels[0]) and of the time MLP. */
  timestepDim: number;
  timeEmbedDim: number;
  /** LCM: width of the `timestep_cond` input. */
  timeCondDim?: number;
  /** SDXL `text_time` conditioning. */
  textTime?: { textEmbedsDim: number; timeIds: number; timeIdDim: number; inputDim: number };
}

/**
 * Reads diffusers' unet/config.json. Keys diffusers 0.31 knows and Kiln does not implement are
 * refused with a ModelLoadError naming the key; keys diffusers does not know are ignored (as
 * diffusers ignores them).
 *
 * SDXL time ids: the UNet consumes concat(text_embeds [B, W], sinusoid(time_ids) [B, N·D]) with
 * W + N·D = projection_class_embeddings_input_dim (P) and D = addition_time_embed_dim, but the
 * config records neither W nor N (diffusers' pipelines take W from text_encoder_2's config). N is
 * 6 (original size, crop top-left, target size) unless the model is conditioned on an aesthetic
 * score instead of the target size, N = 5 (diffusers' `requires_aesthetics_score`). Rule:
 *  1. `requires_aesthetics_score` in the config (a caller may merge it in from model_index.json,
 *     where diffusers keeps it) decides: true -> 5, false -> 6;
 *  2. otherwise N = 5 exactly when P − 5·D equals cross_attention_dim: a UNet conditioned by one
 *     text encoder whose pooled projection keeps its hidden width (the SDXL refiner: bigG alone,
 *     1280 = 2560 − 5·256); SDXL base (2816 − 5·256 = 1536 ≠ 2048) and the golden tiny SDXL
 *     (60 − 5·8 = 20 ≠ 18) get 6;
 *  3. W = P − N·D, which must be positive.
 */
export function parseUnetConfig(config: Record<string, unknown>, component = 'unet'): UnetConfig {
  const refuse = (key: string, why: string): never => {
    throw new ModelLoadError(`${component}: config.json "${key}" = ${JSON.stringify(config[key])} is not supported (${why})`);
  };
  const has = (key: string): boolean => config[key] !== undefined && config[key] !== null;
  const int = (key: string, fallback?: number): number => {
    const v = has(key) ? config[key] : fallback;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) return refuse(key, 'expected a non-negative integer');
    return v;
  };
  const num = (key: string, fallback: number): number => {
    const v = has(key) ? config[key] : fallback;
    if (typeof v !== 'number' || !Number.isFinite(v)) return refuse(key, 'expected a number');
    return v;
  };
  const bool = (key: string, fallback: boolean): boolean => {
    const v = has(key) ? config[key] : fallback;
    if (typeof v !== 'boolean') return refuse(key, 'expected true or false');
    return v;
  };
  /** Accepts only the value(s) Kiln implements (absent/null counts as `fallback`). */
  const only = (key: string, allowed: readonly unknown[], fallback: unknown, why: string): void => {
    const v = has(key) ? config[key] : fallback;
    if (!allowed.includes(v as never)) refuse(key, why);
  };
  const intList = (key: string, fallback: number[]): number[] => {
    const v = has(key) ? config[key] : fallback;
    if (!Array.isArray(v) || v.length === 0 || !v.every((x) => Number.isInteger(x) && x > 0)) return refuse(key, 'expected a list of positive integers');
    return v as number[];
  };
  const strings = <T extends string>(key: string, fallback: readonly T[], allowed: readonly T[]): T[] => {
    const v = has(key) ? config[key] : fallback;
    if (!Array.isArray(v) || v.length === 0) return refuse(key, 'expected a list of block types');
    for (const t of v) if (!allowed.includes(t as T)) refuse(key, `block type ${JSON.stringify(t)}; Kiln implements ${allowed.join(', ')}`);
    return v as T[];
  };

  if (has('_class_name')) only('_class_name', ['UNet2DConditionModel'], null, 'Kiln builds UNet2DConditionModel');
  only('act_fn', ['silu', 'swish'], 'silu', 'only SiLU');
  only('time_embedding_type', ['positional'], 'positional', 'only the sinusoidal "positional" embedding');
  only('time_embedding_act_fn', [null], null, 'no activation after the time embedding');
  only('timestep_post_act', [null], null, 'no activation after the time MLP');
  only('class_embed_type', [null], null, 'no class embedding');
  only('num_class_embeds', [null], null, 'no class embedding');
  only('class_embeddings_concat', [false], false, 'no class embedding');
  only('encoder_hid_dim_type', [null], null, 'no encoder_hid_proj');
  only('encoder_hid_dim', [null], null, 'no encoder_hid_proj');
  only('addition_embed_type', [null, 'text_time'], null, 'only SDXL "text_time"');
  only('attention_type', ['default'], 'default', 'no GLIGEN');
  only('dual_cross_attention', [false], false, 'single cross-attention');
  const onlyCross = config['only_cross_attention'];
  if (!(Array.isArray(onlyCross) ? onlyCross : [onlyCross]).every((v) => v === false || v === undefined || v === null)) {
    refuse('only_cross_attention', 'self-attention in every transformer block');
  }
  only('mid_block_only_cross_attention', [null, false], null, 'self-attention in the mid block');
  only('cross_attention_norm', [null], null, 'no cross-attention norm');
  only('resnet_time_scale_shift', ['default'], 'default', 'the time embedding is added, not scale-shift');
  only('resnet_skip_time_act', [false], false, 'SiLU before every time projection');
  only('resnet_out_scale_factor', [1], 1, 'resnet outputs unscaled');
  only('reverse_transformer_layers_per_block', [null], null, 'symmetric transformer depths');
  only('mid_block_type', ['UNetMidBlock2DCrossAttn', null], 'UNetMidBlock2DCrossAttn', 'only UNetMidBlock2DCrossAttn');
  // Ignored on purpose: upcast_attention (float32 attention here anyway), dropout, sample_size,
  // addition_embed_type_num_heads (only for addition_embed_type "text").
  // diffusers 0.31 itself refuses num_attention_heads (its attention_head_dim means heads).
  only('num_attention_heads', [null], null, 'diffusers reads the head count from attention_head_dim');

  const blockOutChannels = intList('block_out_channels', [320, 640, 1280, 1280]);
  const n = blockOutChannels.length;
  const downBlockTypes = strings<DownBlockType>('down_block_types', ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'], ['CrossAttnDownBlock2D', 'DownBlock2D']);
  const upBlockTypes = strings<UpBlockType>('up_block_types', ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'], ['CrossAttnUpBlock2D', 'UpBlock2D']);
  if (downBlockTypes.length !== n) refuse('down_block_types', `${downBlockTypes.length} blocks but block_out_channels has ${n}`);
  if (upBlockTypes.length !== n) refuse('up_block_types', `${upBlockTypes.length} blocks but block_out_channels has ${n}`);

  /** An int for every block, or a list with one int per block (nested lists are refused). */
  const perBlock = (key: string, fallback: number): number[] => {
    const v = has(key) ? config[key] : fallback;
    if (typeof v === 'number' && Number.isInteger(v) && v > 0) return new Array<number>(n).fill(v);
    if (Array.isArray(v) && v.length === n && v.every((x) => Number.isInteger(x) && x > 0)) return v as number[];
    return refuse(key, `expected a positive integer or a list of ${n}`);
  };
  const layersPerBlock = perBlock('layers_per_block', 2);
  const transformerLayersPerBlock = perBlock('transformer_layers_per_block', 1);
  // The naming quirk: attention_head_dim is the NUMBER of heads (diffusers issue 2011).
  const heads = perBlock('attention_head_dim', 8);
  const crossDims = perBlock('cross_attention_dim', 1280);
  // One encoder_hidden_states input feeds every block's to_k/to_v.
  if (crossDims.some((d) => d !== crossDims[0])) refuse('cross_attention_dim', 'one width for every block');
  const crossAttentionDim = crossDims[0]!;

  const convInKernel = int('conv_in_kernel', 3);
  const convOutKernel = int('conv_out_kernel', 3);
  if (convInKernel % 2 === 0) refuse('conv_in_kernel', 'odd kernels only');
  if (convOutKernel % 2 === 0) refuse('conv_out_kernel', 'odd kernels only');
  if (!has('norm_num_groups') && config['norm_num_groups'] === null) refuse('norm_num_groups', 'GroupNorm is required');
  const groups = int('norm_num_groups', 32);

  const timestepDim = blockOutChannels[0]!;
  if (timestepDim % 2 !== 0) refuse('block_out_channels', 'the timestep embedding needs an even block_out_channels[0]');
  const timeEmbedDim = has('time_embedding_dim') ? int('time_embedding_dim') : timestepDim * 4;

  let textTime: UnetConfig['textTime'];
  if (config['addition_embed_type'] === 'text_time') {
    const timeIdDim = int('addition_time_embed_dim');
    if (timeIdDim === 0 || timeIdDim % 2 !== 0) refuse('addition_time_embed_dim', 'expected an even width');
    const inputDim = int('projection_class_embeddings_input_dim');
    let timeIds: number;
    if (has('requires_aesthetics_score')) timeIds = bool('requires_aesthetics_score', false) ? 5 : 6;
    else timeIds = inputDim - 5 * timeIdDim === crossAttentionDim ? 5 : 6;
    const textEmbedsDim = inputDim - timeIds * timeIdDim;
    if (textEmbedsDim <= 0) refuse('projection_class_embeddings_input_dim', `it leaves no room for text_embeds beside ${timeIds} time ids of width ${timeIdDim}`);
    textTime = { textEmbedsDim, timeIds, timeIdDim, inputDim };
  }

  return {
    inChannels: int('in_channels', 4),
    outChannels: int('out_channels', 4),
    centerInputSample: bool('center_input_sample', false),
    blockOutChannels,
    downBlockTypes,
    upBlockTypes,
    hasMidBlock: config['mid_block_type'] !== null,
    layersPerBlock,
    transformerLayersPerBlock,
    heads,
    crossAttentionDim,
    useLinearProjection: bool('use_linear_projection', false),
    groups,
    eps: num('norm_eps', 1e-5),
    convInKernel,
    convOutKernel,
    downsamplePadding: int('downsample_padding', 1),
    midBlockScale: num('mid_block_scale_factor', 1),
    flipSinToCos: bool('flip_sin_to_cos', true),
    freqShift: num('freq_shift', 0),
    timestepDim,
    timeEmbedDim,
    timeCondDim: has('time_cond_proj_dim') ? int('time_cond_proj_dim') : undefined,
    textTime,
  };
}

// ---------------------------------------------------------------------------------------------
// Timestep embedding

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
const fround = Math.fround;

/** The float32 next to `r` (a float32) in the direction of `up`. */
function nextFloat32(r: number, up: boolean): number {
  if (r === 0) {
    u32[0] = 1;
    return up ? f32[0]! : -f32[0]!;
  }
  f32[0] = r;
  u32[0] = (r > 0) === up ? u32[0]! + 1 : u32[0]! - 1;
  return f32[0]!;
}

/** Rounds the exact value `s + err` (|err| ≤ half an ulp of the double s) to float32. */
function roundToFloat32(s: number, err: number): number {
  const r = fround(s);
  if (err === 0 || r === s) return r;
  const other = nextFloat32(r, s > r);
  if ((r + other) / 2 !== s) return r; // s is not a tie, so the double rounding did no harm
  return err > 0 ? Math.max(r, other) : Math.min(r, other);
}

/** float32 fused multiply-add, correctly rounded (a·b is exact in a double). */
function fmaf(a: number, b: number, c: number): number {
  const p = a * b;
  const s = p + c;
  const bb = s - p;
  return roundToFloat32(s, p - (s - bb) + (c - bb));
}

/** float32 division a / n of float32 values, correctly rounded (q·n of two float32 is exact in a double). */
function divf(a: number, n: number): number {
  let q = fround(a / n);
  for (const c of [nextFloat32(q, true), nextFloat32(q, false)]) {
    if (Math.abs(a - c * n) < Math.abs(a - q * n)) q = c;
  }
  return q;
}

const SLEEF_EXPF = {
  rLn2: fround(1.442695040888963407359924681001892137426645954152985934135449406931),
  l2u: fround(0.693145751953125),
  l2l: fround(1.428606765330187045e-6),
  poly: [0.000198527617612853646278381, 0.00139304355252534151077271, 0.00833336077630519866943359, 0.0416664853692054748535156, 0.166666671633720397949219, 0.5].map(fround),
};

/**
 * torch's float32 exp on x86 CPUs (ATen's Vectorized<float>::exp = SLEEF's expf_u10 with FMA):
 * Cody-Waite reduction by ln 2, a degree-6 polynomial, scaling by 2^q. It differs from the
 * correctly rounded exp by one ulp for about one value in ten, which moves sin(t·f) by ~1e-4 at
 * t = 999; reproducing it gives torch's frequency table bit for bit (checked against torch 1.13
 * for every table of 1..1299 frequencies). Valid for the table's range, x in [-10, 0].
 */
function torchExpf(x: number): number {
  const { rLn2, l2u, l2l, poly } = SLEEF_EXPF;
  const m = fround(x * rLn2);
  let q = Math.round(m);
  if (q - m === 0.5 && q % 2 !== 0) q -= 1; // round half to even, as cvtps2dq
  let s = fmaf(q, -l2u, x);
  s = fmaf(q, -l2l, s);
  let u = poly[0]!;
  for (let i = 1; i < poly.length; i++) u = fmaf(u, s, poly[i]!);
  u = fround(1 + fmaf(fround(s * s), u, s));
  return fround(u * 2 ** q);
}

/**
 * diffusers' get_timestep_embedding frequencies exp(-ln(10000)·k / (half − shift)), k < half,
 * as torch computes them in float32 ops: (float32(-ln 10000) · k) / (half − shift), then exp.
 */
export function timestepFrequencies(half: number, shift: number): Float32Array {
  const out = new Float32Array(half);
  const c = fround(-Math.log(10000));
  const n = fround(half - shift); // a Python scalar in a float32 op is used as float32
  for (let k = 0; k < half; k++) out[k] = torchExpf(divf(fround(c * k), n));
  return out;
}

/** Sinusoidal embedding of x [..., 1] -> [..., dim]: t·f in float32, then (cos, sin) or (sin, cos). */
function sinusoid(g: GraphBuilder, x: string, dim: number, flip: boolean, shift: number): string {
  const args = g.op('Mul', [x, g.constF32(timestepFrequencies(dim / 2, shift))]);
  const sin = g.op('Sin', [args]);
  const cos = g.op('Cos', [args]);
  return g.op('Concat', flip ? [cos, sin] : [sin, cos], { axis: -1 });
}

/** diffusers' TimestepEmbedding: linear_1, SiLU, linear_2 (LCM: + cond_proj(condition) first). */
function timestepMlp(g: GraphBuilder, p: Params, x: string, inDim: number, outDim: number, cond?: { value: string; dim: number }): string {
  let h = x;
  if (cond) h = g.op('Add', [h, linear(g, p.at('cond_proj'), cond.value, cond.dim, inDim, false)]);
  h = silu(g, linear(g, p.at('linear_1'), h, inDim, outDim));
  return linear(g, p.at('linear_2'), h, outDim, outDim);
}

// ---------------------------------------------------------------------------------------------
// Transformer (diffusers' Transformer2DModel + BasicTransformerBlock)

/** Attention with diffusers' names: to_q/to_k/to_v without bias, to_out.0 with bias. */
function attentionModule(g: GraphBuilder, p: Params, x: string, context: string, dim: number, contextDim: number, heads: number, image: ImageAttention[] = []): string {
  const headDim = dim / heads;
  const q = linear(g, p.at('to_q'), x, dim, dim, false);
  const k = linear(g, p.at('to_k'), context, contextDim, dim, false);
  const v = linear(g, p.at('to_v'), context, contextDim, dim, false);
  let h = attention(g, q, k, v, heads, headDim);
  // IP-Adapter (diffusers' IPAdapterAttnProcessor): the same q over each adapter's image tokens,
  // its own softmax, added at the adapter's scale before to_out.
  for (const a of image) {
    const kIp = linear(g, a.weights.at('to_k_ip'), a.tokens, contextDim, dim, false);
    const vIp = linear(g, a.weights.at('to_v_ip'), a.tokens, contextDim, dim, false);
    h = g.op('Add', [h, g.op('Mul', [a.scale, attention(g, q, kIp, vIp, heads, headDim)])]);
  }
  return linear(g, p.at('to_out.0'), h, dim, dim);
}

/** One adapter's inputs and weights at one cross-attention layer. */
interface ImageAttention {
  tokens: string;
  scale: string;
  /** The view holding `to_k_ip.weight` / `to_v_ip.weight` ([dim, cross_attention_dim], no bias). */
  weights: Params;
}

/**
 * IP-Adapter's decoupled cross-attention, one per adapter (ip-adapter.ts makes them from the
 * h94 files): every cross-attention layer also attends over the adapter's image tokens.
 */
export interface DecoupledCrossAttention {
  /**
   * The weights of the cross-attention layer at diffusers' module path `path`
   * (`down_blocks.0.attentions.1.transformer_blocks.0.attn2`); throws when the adapter has none.
   */
  layer(path: string): Params;
}

export interface UnetBuildOptions {
  /**
   * Adapters whose image tokens every cross-attention layer attends to. Adapter k adds the inputs
   * `ipInputNames(k)`: image tokens [batch, n, cross_attention_dim] (already projected, rows in
   * the batch order of encoder_hidden_states) and its scale, float32 [1]. Absent or empty: the
   * plain UNet, unchanged.
   */
  ipAdapters?: readonly DecoupledCrossAttention[];
  /**
   * ControlNet residual inputs, the contract of the split layout's ControlNet-UNet
   * (`controlnet/model.onnx`, shared/reference/onnx-model-contracts.md §4.1): one
   * `down_block_<j>_additional_residual` per skip connection, in diffusers' down_block_res_samples
   * order (conv_in first; 12 for SD 1.x, 9 for SDXL), added to that skip where the up blocks take
   * it, and `mid_block_additional_residual`, added to the mid block's output, as
   * UNet2DConditionModel.forward does with down_block_additional_residuals /
   * mid_block_additional_residual. Absent or false: the plain UNet, unchanged.
   */
  controlResiduals?: boolean;
}

/** The residual input names of down skip j and of the mid block (the ControlNet outputs' names). */
export function residualInputName(j: number | 'mid'): string {
  return j === 'mid' ? 'mid_block_additional_residual' : `down_block_${j}_additional_residual`;
}

/** Input names of adapter k: `ip_tokens` / `ip_scale` for the first, `ip_tokens.k` / `ip_scale.k` after it. */
export function ipInputNames(k: number): { tokens: string; scale: string } {
  return k === 0 ? { tokens: 'ip_tokens', scale: 'ip_scale' } : { tokens: `ip_tokens.${k}`, scale: `ip_scale.${k}` };
}

/** What a transformer needs to add image attention: the adapters' inputs, and its module path. */
interface ImageInputs {
  adapters: readonly DecoupledCrossAttention[];
  inputs: { tokens: string; scale: string }[];
}

function imageAttentionAt(image: ImageInputs | undefined, path: string): ImageAttention[] {
  if (!image) return [];
  return image.adapters.map((a, k) => ({ ...image.inputs[k]!, weights: a.layer(path) }));
}

/** FeedForward with GEGLU: proj to 2·inner, value · gelu(gate) with the gate the second half. */
function geglu(g: GraphBuilder, p: Params, x: string, dim: number): string {
  const inner = dim * 4;
  const proj = linear(g, p.at('net.0.proj'), x, dim, inner * 2);
  const [value, gate] = g.node('Split', [proj, g.constI64([inner, inner])], { axis: -1 }, { outputCount: 2 }) as [string, string];
  return linear(g, p.at('net.2'), g.op('Mul', [value, gelu(g, gate)]), inner, dim);
}

function basicTransformerBlock(g: GraphBuilder, p: Params, x: string, context: string, dim: number, contextDim: number, heads: number, image: ImageAttention[]): string {
  // LayerNorm eps is BasicTransformerBlock's default 1e-5 (the UNet does not pass norm_eps).
  const n1 = layerNorm(g, p.at('norm1'), x, dim, 1e-5);
  let h = g.op('Add', [attentionModule(g, p.at('attn1'), n1, n1, dim, dim, heads), x]);
  h = g.op('Add', [attentionModule(g, p.at('attn2'), layerNorm(g, p.at('norm2'), h, dim, 1e-5), context, dim, contextDim, heads, image), h]);
  return g.op('Add', [geglu(g, p.at('ff'), layerNorm(g, p.at('norm3'), h, dim, 1e-5), dim), h]);
}

/**
 * Transformer2DModel on NCHW x [B, C, H, W]: GroupNorm (eps 1e-6, fixed in diffusers), proj_in
 * (1x1 conv before flattening in SD 1.x, Linear after it in SD 2.x / SDXL), the blocks on
 * [B, H·W, C], proj_out, plus the input.
 */
function transformer2d(g: GraphBuilder, p: Params, x: string, context: string, c: UnetConfig, channels: number, heads: number, depth: number, path: string, image?: ImageInputs): string {
  // diffusers' inner width is heads·(C // heads); Kiln supports the usual case where that is C.
  if (channels % heads !== 0) {
    throw new ModelLoadError(`${p.source.component}: config.json "attention_head_dim" gives ${heads} heads, which do not split ${channels} channels`);
  }
  const normed = groupNorm(g, p.at('norm'), x, channels, c.groups, 1e-6);
  // [B, C, H, W] <-> [B, H·W, C]
  const toTokens = (t: string): string => g.op('Transpose', [g.op('Reshape', [t, g.constI64([0, channels, -1])])], { perm: [0, 2, 1] });
  const toImage = (t: string): string => g.op('Reshape', [g.op('Transpose', [t], { perm: [0, 2, 1] }), g.op('Shape', [x])]);
  const linearProj = c.useLinearProjection;
  let h = linearProj ? linear(g, p.at('proj_in'), toTokens(normed), channels, channels) : toTokens(conv2d(g, p.at('proj_in'), normed, channels, channels, { kernel: 1 }));
  for (let i = 0; i < depth; i++) {
    const image2 = imageAttentionAt(image, `${path}.transformer_blocks.${i}.attn2`);
    h = g.scope(`transformer_blocks.${i}`, () => basicTransformerBlock(g, p.at(`transformer_blocks.${i}`), h, context, channels, c.crossAttentionDim, heads, image2));
  }
  const out = linearProj ? toImage(linear(g, p.at('proj_out'), h, channels, channels)) : conv2d(g, p.at('proj_out'), toImage(h), channels, channels, { kernel: 1 });
  return g.op('Add', [out, x]);
}

// ---------------------------------------------------------------------------------------------
// The UNet

interface Feature {
  value: string;
  channels: number;
}

export function buildUnet(g: GraphBuilder, config: Record<string, unknown>, p: Params, options: UnetBuildOptions = {}): void {
  const c = parseUnetConfig(config, p.source.component);
  const sample = g.input('sample', 'float32', ['batch', c.inChannels, 'height', 'width']);
  const timestep = g.input('timestep', 'float32', ['batch']);
  const context = g.input('encoder_hidden_states', 'float32', ['batch', 'sequence', c.crossAttentionDim]);
  const textEmbeds = c.textTime && g.input('text_embeds', 'float32', ['batch', c.textTime.textEmbedsDim]);
  const timeIds = c.textTime && g.input('time_ids', 'float32', ['batch', c.textTime.timeIds]);
  const timestepCond = c.timeCondDim !== undefined ? g.input('timestep_cond', 'float32', ['batch', c.timeCondDim]) : undefined;
  const adapters = options.ipAdapters ?? [];
  const image: ImageInputs | undefined = adapters.length
    ? {
        adapters,
        inputs: adapters.map((_, k) => {
          const names = ipInputNames(k);
          return {
            tokens: g.input(names.tokens, 'float32', ['batch', k === 0 ? 'ip_sequence' : `ip_sequence.${k}`, c.crossAttentionDim]),
            scale: g.input(names.scale, 'float32', [1]),
          };
        }),
      }
    : undefined;

  // Time embedding [B, timeEmbedDim].
  let temb = g.scope('time_embedding', () => {
    const tProj = sinusoid(g, g.op('Unsqueeze', [timestep, g.constI64([1])]), c.timestepDim, c.flipSinToCos, c.freqShift);
    const cond = timestepCond ? { value: timestepCond, dim: c.timeCondDim! } : undefined;
    return timestepMlp(g, p.at('time_embedding'), tProj, c.timestepDim, c.timeEmbedDim, cond);
  });
  if (c.textTime && textEmbeds && timeIds) {
    const tt = c.textTime;
    const aug = g.scope('add_embedding', () => {
      const perId = sinusoid(g, g.op('Unsqueeze', [timeIds, g.constI64([2])]), tt.timeIdDim, c.flipSinToCos, c.freqShift);
      const flat = g.op('Reshape', [perId, g.constI64([0, tt.timeIds * tt.timeIdDim])]);
      const addEmbeds = g.op('Concat', [textEmbeds, flat], { axis: 1 });
      return timestepMlp(g, p.at('add_embedding'), addEmbeds, tt.inputDim, c.timeEmbedDim);
    });
    temb = g.op('Add', [temb, aug]);
  }
  const resnetOptions = { groups: c.groups, eps: c.eps, temb: { value: temb, channels: c.timeEmbedDim } };
  const resnet = (q: Params, x: Feature, outC: number, outputScale = 1): Feature => ({
    value: resnetBlock(g, q, x.value, x.channels, outC, { ...resnetOptions, outputScale }),
    channels: outC,
  });
  const transformer = (q: Params, x: Feature, heads: number, depth: number, path: string): Feature => ({
    value: transformer2d(g, q, x.value, context, c, x.channels, heads, depth, path, image),
    channels: x.channels,
  });

  let x = sample;
  if (c.centerInputSample) x = g.op('Sub', [g.op('Mul', [x, g.constF32([2], [])]), g.constF32([1], [])]);
  let h: Feature = { value: conv2d(g, p.at('conv_in'), x, c.inChannels, c.blockOutChannels[0]!, { kernel: c.convInKernel }), channels: c.blockOutChannels[0]! };
  const skips: Feature[] = [h];

  const last = c.blockOutChannels.length - 1;
  c.downBlockTypes.forEach((type, i) => {
    const q = p.at(`down_blocks.${i}`);
    g.scope(`down_blocks.${i}`, () => {
      const outC = c.blockOutChannels[i]!;
      for (let j = 0; j < c.layersPerBlock[i]!; j++) {
        h = g.scope(`resnets.${j}`, () => resnet(q.at(`resnets.${j}`), h, outC));
        if (type === 'CrossAttnDownBlock2D') h = g.scope(`attentions.${j}`, () => transformer(q.at(`attentions.${j}`), h, c.heads[i]!, c.transformerLayersPerBlock[i]!, `down_blocks.${i}.attentions.${j}`));
        skips.push(h);
      }
      if (i < last) {
        // Downsample2D: stride-2 3x3 conv; padding 0 means one zero row/column at the bottom/right.
        const pad = c.downsamplePadding;
        const pads: [number, number, number, number] = pad === 0 ? [0, 0, 1, 1] : [pad, pad, pad, pad];
        h = { value: conv2d(g, q.at('downsamplers.0.conv'), h.value, outC, outC, { stride: 2, pads }), channels: outC };
        skips.push(h);
      }
    });
  });

  // diffusers adds the down residuals to the skip connections only (the down path itself and the
  // mid block's input are unchanged): a residual input per skip, added once, before the up blocks.
  const residual = (name: string, channels: number): string => g.input(name, 'float32', ['batch', channels, `${name}_height`, `${name}_width`]);
  if (options.controlResiduals) {
    skips.forEach((s, j) => (skips[j] = { value: g.op('Add', [s.value, residual(residualInputName(j), s.channels)]), channels: s.channels }));
  }

  if (c.hasMidBlock) {
    const q = p.at('mid_block');
    g.scope('mid_block', () => {
      h = resnet(q.at('resnets.0'), h, h.channels, c.midBlockScale);
      h = transformer(q.at('attentions.0'), h, c.heads[last]!, c.transformerLayersPerBlock[last]!, 'mid_block.attentions.0');
      h = resnet(q.at('resnets.1'), h, h.channels, c.midBlockScale);
    });
  }
  // diffusers adds it also when the config has no mid block.
  if (options.controlResiduals) h = { value: g.op('Add', [h.value, residual(residualInputName('mid'), h.channels)]), channels: h.channels };

  const reversed = <T>(list: T[]): T[] => [...list].reverse();
  const upChannels = reversed(c.blockOutChannels);
  const upHeads = reversed(c.heads);
  const upLayers = reversed(c.layersPerBlock);
  const upDepth = reversed(c.transformerLayersPerBlock);
  c.upBlockTypes.forEach((type, i) => {
    const q = p.at(`up_blocks.${i}`);
    g.scope(`up_blocks.${i}`, () => {
      const outC = upChannels[i]!;
      for (let j = 0; j <= upLayers[i]!; j++) {
        const skip = skips.pop();
        if (!skip) throw new ModelLoadError(`${p.source.component}: config.json layers_per_block leaves up_blocks.${i} without a skip connection`);
        const joined: Feature = { value: g.op('Concat', [h.value, skip.value], { axis: 1 }), channels: h.channels + skip.channels };
        h = g.scope(`resnets.${j}`, () => resnet(q.at(`resnets.${j}`), joined, outC));
        if (type === 'CrossAttnUpBlock2D') h = g.scope(`attentions.${j}`, () => transformer(q.at(`attentions.${j}`), h, upHeads[i]!, upDepth[i]!, `up_blocks.${i}.attentions.${j}`));
      }
      if (i < last) {
        // diffusers' upsample_size: nearest resize to the next skip's size (2x when sizes divide).
        const like = skips[skips.length - 1];
        if (!like) throw new ModelLoadError(`${p.source.component}: config.json layers_per_block leaves up_blocks.${i} without a skip for its upsampler`);
        h = { value: conv2d(g, q.at('upsamplers.0.conv'), upsampleNearestLike(g, h.value, like.value), outC, outC), channels: outC };
      }
    });
  });

  const out = silu(g, groupNorm(g, p.at('conv_norm_out'), h.value, h.channels, c.groups, c.eps));
  const y = conv2d(g, p.at('conv_out'), out, h.channels, c.outChannels, { kernel: c.convOutKernel });
  g.op('Identity', [y], {}, 'out_sample');
  g.output('out_sample', 'float32', ['batch', c.outChannels, 'height', 'width']);
}
