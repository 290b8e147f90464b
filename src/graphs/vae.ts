/**
 * diffusers' AutoencoderKL (SD 1.x / 2.x / SDXL VAE) as two ONNX graphs, every shape from its
 * config.json, weights under diffusers' names.
 *
 * - vae_encoder: `sample` [B, in, H, W] -> `latent_parameters` [B, 2·latent, H/8, W/8], the
 *   quant_conv output (mean then logvar along channel 1). No sampling in the graph: Kiln clamps
 *   logvar and draws the noise itself (engine/vae.ts).
 * - vae_decoder: `latent_sample` [B, latent, h, w] (latents / scaling_factor) -> `sample`
 *   [B, out, 8h, 8w]; post_quant_conv is part of this graph.
 *
 * Follows diffusers v0.31 models/autoencoders/vae.py (Encoder, Decoder) and unets/unet_2d_blocks.py
 * (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D); every norm in the VAE uses eps 1e-6.
 */
import { ModelLoadError } from '../engine/errors.js';
import { attention, conv2d, groupNorm, linear, resnetBlock, silu, upsampleNearest2x } from './layers.js';
import type { GraphBuilder } from './onnx-builder.js';
import type { Params } from './weights.js';

const EPS = 1e-6;

interface VaeConfig {
  inChannels: number;
  outChannels: number;
  latentChannels: number;
  blocks: number[];
  layersPerBlock: number;
  groups: number;
  midAttention: boolean;
  quantConv: boolean;
  postQuantConv: boolean;
}

/** config.json with diffusers' AutoencoderKL defaults for absent keys. */
function vaeConfig(config: Record<string, unknown>): VaeConfig {
  const fail = (what: string): never => {
    throw new ModelLoadError(`vae: config.json ${what}`);
  };
  const int = (key: string, fallback: number): number => {
    const v = config[key] ?? fallback;
    return typeof v === 'number' && Number.isInteger(v) && v > 0 ? v : fail(`has ${key} ${JSON.stringify(v)}, expected a positive integer`);
  };
  const bool = (key: string): boolean => {
    const v = config[key] ?? true;
    return typeof v === 'boolean' ? v : fail(`has ${key} ${JSON.stringify(v)}, expected true or false`);
  };
  const blocks = (config.block_out_channels ?? [64]) as unknown;
  if (!Array.isArray(blocks) || blocks.length === 0 || !blocks.every((c) => Number.isInteger(c) && c > 0)) {
    fail(`has block_out_channels ${JSON.stringify(blocks)}, expected a list of positive integers`);
  }
  const types = (key: string, kind: string): void => {
    const v = config[key] ?? [kind];
    if (!Array.isArray(v) || v.length !== (blocks as number[]).length || v.some((t) => t !== kind)) {
      fail(`has ${key} ${JSON.stringify(v)}; Kiln builds ${(blocks as number[]).length} x ${kind}`);
    }
  };
  types('down_block_types', 'DownEncoderBlock2D');
  types('up_block_types', 'UpDecoderBlock2D');
  const act = config.act_fn ?? 'silu';
  if (act !== 'silu' && act !== 'swish') fail(`has act_fn ${JSON.stringify(act)}; Kiln builds silu`);
  return {
    inChannels: int('in_channels', 3),
    outChannels: int('out_channels', 3),
    latentChannels: int('latent_channels', 4),
    blocks: blocks as number[],
    layersPerBlock: int('layers_per_block', 1),
    groups: int('norm_num_groups', 32),
    midAttention: bool('mid_block_add_attention'),
    quantConv: bool('use_quant_conv'),
    postQuantConv: bool('use_post_quant_conv'),
  };
}

/**
 * diffusers' Attention as the VAE mid block uses it (from the old AttentionBlock): group norm,
 * [B, C, H, W] -> [B, HW, C], one head of width C (attention_head_dim = channels), q/k/v/out
 * with biases, back to NCHW, plus the input (rescale_output_factor 1).
 */
function spatialAttention(g: GraphBuilder, p: Params, x: string, channels: number, groups: number): string {
  const shape = g.op('Shape', [x]);
  const normed = groupNorm(g, p.at('group_norm'), x, channels, groups, EPS);
  const tokens = g.op('Transpose', [g.op('Reshape', [normed, g.constI64([0, 0, -1])])], { perm: [0, 2, 1] });
  const q = linear(g, p.at('to_q'), tokens, channels, channels);
  const k = linear(g, p.at('to_k'), tokens, channels, channels);
  const v = linear(g, p.at('to_v'), tokens, channels, channels);
  const heads = 1;
  const out = linear(g, p.at('to_out.0'), attention(g, q, k, v, heads, channels / heads), channels, channels);
  const back = g.op('Reshape', [g.op('Transpose', [out], { perm: [0, 2, 1] }), shape]);
  return g.op('Add', [back, x]);
}

/** UNetMidBlock2D without time embedding: resnet, (attention), resnet, all at `channels`. */
function midBlock(g: GraphBuilder, p: Params, x: string, c: VaeConfig): string {
  const channels = c.blocks.at(-1)!;
  const opts = { groups: c.groups, eps: EPS };
  const m = p.at('mid_block');
  return g.scope('mid_block', () => {
    let h = resnetBlock(g, m.at('resnets.0'), x, channels, channels, opts);
    if (c.midAttention) h = spatialAttention(g, m.at('attentions.0'), h, channels, c.groups);
    return resnetBlock(g, m.at('resnets.1'), h, channels, channels, opts);
  });
}

/** GroupNorm, SiLU, 3x3 conv: the tail of both halves. */
function outHead(g: GraphBuilder, p: Params, x: string, inC: number, outC: number, groups: number): string {
  return conv2d(g, p.at('conv_out'), silu(g, groupNorm(g, p.at('conv_norm_out'), x, inC, groups, EPS)), inC, outC);
}

/** The `vae_encoder` graph (encoder + quant_conv); `p` views the whole AutoencoderKL's weights. */
export function buildVaeEncoder(g: GraphBuilder, config: Record<string, unknown>, p: Params): void {
  const c = vaeConfig(config);
  const e = p.at('encoder');
  const opts = { groups: c.groups, eps: EPS };
  const sample = g.input('sample', 'float32', ['batch', c.inChannels, 'height', 'width']);
  let h = conv2d(g, e.at('conv_in'), sample, c.inChannels, c.blocks[0]!);
  let channels = c.blocks[0]!;
  c.blocks.forEach((outC, i) => {
    const b = e.at(`down_blocks.${i}`);
    h = g.scope(`down_blocks.${i}`, () => {
      let y = h;
      for (let j = 0; j < c.layersPerBlock; j++) {
        y = resnetBlock(g, b.at(`resnets.${j}`), y, j === 0 ? channels : outC, outC, opts);
      }
      // Downsample2D with padding 0: pad right and bottom by one, then a stride-2 3x3 conv.
      if (i < c.blocks.length - 1) {
        y = conv2d(g, b.at('downsamplers.0.conv'), y, outC, outC, { stride: 2, pads: [0, 0, 1, 1] });
      }
      return y;
    });
    channels = outC;
  });
  h = midBlock(g, e, h, c);
  const moments = 2 * c.latentChannels;
  h = outHead(g, e, h, channels, moments, c.groups);
  if (c.quantConv) h = conv2d(g, p.at('quant_conv'), h, moments, moments, { kernel: 1 });
  g.op('Identity', [h], {}, 'latent_parameters');
  g.output('latent_parameters', 'float32', ['batch', moments, 'latent_height', 'latent_width']);
}

/** The `vae_decoder` graph (post_quant_conv + decoder); `p` views the whole AutoencoderKL's weights. */
export function buildVaeDecoder(g: GraphBuilder, config: Record<string, unknown>, p: Params): void {
  const c = vaeConfig(config);
  const d = p.at('decoder');
  const opts = { groups: c.groups, eps: EPS };
  const latent = g.input('latent_sample', 'float32', ['batch', c.latentChannels, 'latent_height', 'latent_width']);
  let h = latent;
  if (c.postQuantConv) h = conv2d(g, p.at('post_quant_conv'), h, c.latentChannels, c.latentChannels, { kernel: 1 });
  const reversed = [...c.blocks].reverse();
  let channels = reversed[0]!;
  h = conv2d(g, d.at('conv_in'), h, c.latentChannels, channels);
  h = midBlock(g, d, h, c);
  // up_blocks run from the widest level back to the first: block i has reversed[i] channels.
  reversed.forEach((outC, i) => {
    const b = d.at(`up_blocks.${i}`);
    h = g.scope(`up_blocks.${i}`, () => {
      let y = h;
      for (let j = 0; j <= c.layersPerBlock; j++) {
        y = resnetBlock(g, b.at(`resnets.${j}`), y, j === 0 ? channels : outC, outC, opts);
      }
      if (i < reversed.length - 1) y = conv2d(g, b.at('upsamplers.0.conv'), upsampleNearest2x(g, y), outC, outC);
      return y;
    });
    channels = outC;
  });
  h = outHead(g, d, h, channels, c.outChannels, c.groups);
  g.op('Identity', [h], {}, 'sample');
  g.output('sample', 'float32', ['batch', c.outChannels, 'height', 'width']);
}
