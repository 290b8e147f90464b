/**
 * The building blocks every model page shares, each written as the PyTorch module it stands for
 * (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, attention, diffusers' ResnetBlock2D), taking
 * its weights from a Params view in PyTorch layout.
 *
 * Why these ops:
 * - Linear is ONNX Runtime's FusedMatMul with transB: the [out, in] weight is used as stored, so
 *   it can stay inside the safetensors file (no transposed copy on disk or at load), and it
 *   batches over leading dims like MatMul.
 * - GroupNorm is InstanceNormalization over [B, groups, rest] (opset 17 has no GroupNormalization),
 *   then the per-channel affine, as torch.onnx exports it.
 * - Nearest upsampling resizes to an explicit size (the skip connection's), which is what
 *   diffusers' `upsample_size` does for latents not divisible by 2^levels, and equals 2x otherwise.
 */
import { float, type GraphBuilder } from './onnx-builder.js';
import type { Params } from './weights.js';

/** nn.Linear: x [..., inF] -> [..., outF]. */
export function linear(g: GraphBuilder, p: Params, x: string, inF: number, outF: number, bias = true): string {
  const w = p.get('weight', [outF, inF]);
  const y = g.node('FusedMatMul', [x, w], { transB: 1 }, { domain: 'com.microsoft' })[0]!;
  return bias ? g.op('Add', [y, p.get('bias', [outF])]) : y;
}

export interface ConvOptions {
  kernel?: number;
  stride?: number;
  /** Symmetric padding (default kernel >> 1); pass `pads` for asymmetric. */
  padding?: number;
  pads?: [number, number, number, number];
  bias?: boolean;
}

/** nn.Conv2d on NCHW. */
export function conv2d(g: GraphBuilder, p: Params, x: string, inC: number, outC: number, options: ConvOptions = {}): string {
  const k = options.kernel ?? 3;
  const pad = options.padding ?? k >> 1;
  const pads = options.pads ?? [pad, pad, pad, pad];
  const inputs = [x, p.get('weight', [outC, inC, k, k])];
  if (options.bias !== false) inputs.push(p.get('bias', [outC]));
  return g.op('Conv', inputs, { kernel_shape: [k, k], strides: [options.stride ?? 1, options.stride ?? 1], pads, dilations: [1, 1], group: 1 });
}

/** Per-channel vector [C] as [C, 1, 1], to broadcast over NCHW. */
function perChannel(g: GraphBuilder, v: string): string {
  return g.op('Unsqueeze', [v, g.constI64([1, 2])]);
}

/** nn.GroupNorm(groups, C, eps, affine) on NCHW (any spatial size). */
export function groupNorm(g: GraphBuilder, p: Params, x: string, channels: number, groups: number, eps: number): string {
  const shape = g.op('Shape', [x]);
  const grouped = g.op('Reshape', [x, g.constI64([0, groups, -1])]);
  const normed = g.op('InstanceNormalization', [grouped, g.constF32(new Float32Array(groups).fill(1)), g.constF32(new Float32Array(groups))], {
    epsilon: float(eps),
  });
  const back = g.op('Reshape', [normed, shape]);
  const scaled = g.op('Mul', [back, perChannel(g, p.get('weight', [channels]))]);
  return g.op('Add', [scaled, perChannel(g, p.get('bias', [channels]))]);
}

/** nn.LayerNorm over the last axis. */
export function layerNorm(g: GraphBuilder, p: Params, x: string, dim: number, eps: number): string {
  return g.op('LayerNormalization', [x, p.get('weight', [dim]), p.get('bias', [dim])], { axis: -1, epsilon: float(eps) });
}

/** Exact GELU: x/2 · (1 + erf(x/√2)) (ONNX Runtime fuses this pattern into its Gelu kernel). */
export function gelu(g: GraphBuilder, x: string): string {
  const erf = g.op('Erf', [g.op('Div', [x, g.constF32([Math.SQRT2], [])])]);
  const onePlus = g.op('Add', [erf, g.constF32([1], [])]);
  return g.op('Mul', [g.op('Mul', [x, onePlus]), g.constF32([0.5], [])]);
}

/** CLIP's quick_gelu: x · sigmoid(1.702 x). */
export function quickGelu(g: GraphBuilder, x: string): string {
  return g.op('Mul', [x, g.op('Sigmoid', [g.op('Mul', [x, g.constF32([1.702], [])])])]);
}

export function silu(g: GraphBuilder, x: string): string {
  return g.silu(x);
}

/** [B, S, H·D] -> [B, H, S, D]. */
export function splitHeads(g: GraphBuilder, x: string, heads: number, headDim: number): string {
  const r = g.op('Reshape', [x, g.constI64([0, 0, heads, headDim])]);
  return g.op('Transpose', [r], { perm: [0, 2, 1, 3] });
}

/** [B, H, S, D] -> [B, S, H·D]. */
export function mergeHeads(g: GraphBuilder, x: string, heads: number, headDim: number): string {
  const t = g.op('Transpose', [x], { perm: [0, 2, 1, 3] });
  return g.op('Reshape', [t, g.constI64([0, 0, heads * headDim])]);
}

export interface AttentionOptions {
  /** Added to the scores before the softmax (CLIP's causal mask). */
  mask?: string;
  /**
   * Where the 1/√D scale is applied: to the scores (diffusers' baddbmm(alpha=scale)) or to q
   * before the product (transformers' eager CLIP). Same maths, different float rounding.
   */
  scaleQuery?: boolean;
}

/** Scaled dot-product attention on [B, S, H·D] projections: softmax(q kᵀ / √D [+ mask]) v, per head. */
export function attention(g: GraphBuilder, q: string, k: string, v: string, heads: number, headDim: number, options: AttentionOptions = {}): string {
  const scale = g.constF32([1 / Math.sqrt(headDim)], []);
  const qh = splitHeads(g, options.scaleQuery ? g.op('Mul', [q, scale]) : q, heads, headDim);
  const kh = splitHeads(g, k, heads, headDim);
  const vh = splitHeads(g, v, heads, headDim);
  const kt = g.op('Transpose', [kh], { perm: [0, 1, 3, 2] });
  let scores = g.op('MatMul', [qh, kt]);
  if (!options.scaleQuery) scores = g.op('Mul', [scores, scale]);
  if (options.mask) scores = g.op('Add', [scores, options.mask]);
  const probs = g.op('Softmax', [scores], { axis: -1 });
  return mergeHeads(g, g.op('MatMul', [probs, vh]), heads, headDim);
}

/** Nearest-neighbour resize of NCHW `x` to the spatial size of `like` (torch F.interpolate nearest). */
export function upsampleNearestLike(g: GraphBuilder, x: string, like: string): string {
  const batchChannels = g.op('Slice', [g.op('Shape', [x]), g.constI64([0]), g.constI64([2])]);
  const spatial = g.op('Slice', [g.op('Shape', [like]), g.constI64([2]), g.constI64([4])]);
  const sizes = g.op('Concat', [batchChannels, spatial], { axis: 0 });
  return g.op('Resize', [x, '', '', sizes], { mode: 'nearest', coordinate_transformation_mode: 'asymmetric', nearest_mode: 'floor' });
}

/** Nearest-neighbour 2x upsampling of NCHW `x`. */
export function upsampleNearest2x(g: GraphBuilder, x: string): string {
  return g.op('Resize', [x, '', g.constF32([1, 1, 2, 2])], { mode: 'nearest', coordinate_transformation_mode: 'asymmetric', nearest_mode: 'floor' });
}

export interface ResnetOptions {
  groups: number;
  eps: number;
  /** Time embedding [B, T] and its width (UNet); absent in the VAE. */
  temb?: { value: string; channels: number };
  /** diffusers' output_scale_factor (1 in SD/SDXL). */
  outputScale?: number;
}

/**
 * diffusers' ResnetBlock2D (the "default" time-embedding norm): norm1, SiLU, conv1, + time
 * projection, norm2, SiLU, conv2, plus the input (through a 1x1 conv_shortcut when the widths differ).
 */
export function resnetBlock(g: GraphBuilder, p: Params, x: string, inC: number, outC: number, options: ResnetOptions): string {
  let h = silu(g, groupNorm(g, p.at('norm1'), x, inC, options.groups, options.eps));
  h = conv2d(g, p.at('conv1'), h, inC, outC);
  if (options.temb) {
    const t = linear(g, p.at('time_emb_proj'), silu(g, options.temb.value), options.temb.channels, outC);
    h = g.op('Add', [h, g.op('Unsqueeze', [t, g.constI64([2, 3])])]);
  }
  h = silu(g, groupNorm(g, p.at('norm2'), h, outC, options.groups, options.eps));
  h = conv2d(g, p.at('conv2'), h, outC, outC);
  const shortcut = inC !== outC ? conv2d(g, p.at('conv_shortcut'), x, inC, outC, { kernel: 1 }) : x;
  const sum = g.op('Add', [shortcut, h]);
  const scale = options.outputScale ?? 1;
  return scale === 1 ? sum : g.op('Div', [sum, g.constF32([scale], [])]);
}
