/**
 * The decoder of diffusers' AutoencoderTiny (TAESD, TAESDXL: madebyollin/taesd, madebyollin/taesdxl)
 * as one ONNX graph, every shape from its config.json, weights under diffusers' names. Kiln uses it
 * for previews that look like the final image (engine/tiny-decoder.ts); only the decoder is built.
 *
 * - taesd_decoder: `latent_sample` [B, latent, h, w] (the diffusion latents / scaling_factor, as
 *   AutoencoderTiny.decode takes them; TAESD's scaling_factor is 1) -> `sample` [B, out, f^n h, f^n w]
 *   in [-1, 1] like the full VAE's (f = upsampling_scaling_factor, n = stages - 1).
 *
 * Follows diffusers v0.31 models/autoencoders/vae.py (DecoderTiny) and unets/unet_2d_blocks.py
 * (AutoencoderTinyBlock). The decoder is one nn.Sequential, so every weight is `decoder.layers.<i>`
 * with i counting every module, activations and upsamplers included:
 *   0 conv_in, 1 act; then per stage s: num_blocks[s] x block (conv.0, act, conv.2, act, conv.4,
 *   + input, ReLU), an upsampler unless last, and a 3x3 conv (no bias, except the last: to RGB).
 * The input is soft-clamped first (tanh(x / 3) · 3, a fixed 3 whatever latent_magnitude says), and
 * the [0, 1] output mapped to [-1, 1].
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ModelLoadError } from '../engine/errors.js';
import { buildGraph, checkClass, writeBuiltGraph, type ConvertOptions, type ConvertResult } from './convert.js';
import { conv2d } from './layers.js';
import type { GraphBuilder } from './onnx-builder.js';
import { componentWeights, type Params } from './weights.js';

export interface TinyDecoderConfig {
  latentChannels: number;
  outChannels: number;
  /** decoder_block_out_channels: one width per stage (all equal: see tinyDecoderConfig). */
  channels: number[];
  /** num_decoder_blocks: AutoencoderTinyBlocks per stage. */
  blocks: number[];
  upsampleFactor: number;
  act: 'relu' | 'silu';
  /** How the diffusion latents map to the decoder's input: latents / scalingFactor + shiftFactor. */
  scalingFactor: number;
  shiftFactor: number;
}

/** config.json with diffusers' AutoencoderTiny defaults for absent keys. */
export function tinyDecoderConfig(config: Record<string, unknown>): TinyDecoderConfig {
  const fail = (what: string): never => {
    throw new ModelLoadError(`taesd: config.json ${what}`);
  };
  const int = (key: string, fallback: number): number => {
    const v = config[key] ?? fallback;
    return typeof v === 'number' && Number.isInteger(v) && v > 0 ? v : fail(`has ${key} ${JSON.stringify(v)}, expected a positive integer`);
  };
  const num = (key: string, fallback: number): number => {
    const v = config[key] ?? fallback;
    return typeof v === 'number' && Number.isFinite(v) ? v : fail(`has ${key} ${JSON.stringify(v)}, expected a number`);
  };
  const list = (key: string, fallback: number[], min: number): number[] => {
    const v = (config[key] ?? fallback) as unknown;
    if (!Array.isArray(v) || v.length === 0 || !v.every((c) => Number.isInteger(c) && c >= min)) {
      fail(`has ${key} ${JSON.stringify(v)}, expected a list of integers >= ${min}`);
    }
    return v as number[];
  };
  const channels = list('decoder_block_out_channels', [64, 64, 64, 64], 1);
  const blocks = list('num_decoder_blocks', [3, 3, 3, 1], 0);
  if (channels.length !== blocks.length) fail(`has ${channels.length} decoder_block_out_channels but ${blocks.length} num_decoder_blocks`);
  // Each stage's closing conv keeps that stage's width and feeds the next stage's blocks as they
  // are: with unequal widths diffusers' own decoder fails on its first call.
  if (channels.some((c) => c !== channels[0])) fail(`has decoder_block_out_channels ${JSON.stringify(channels)}; DecoderTiny runs only with equal widths`);
  const act = config.act_fn ?? 'relu';
  if (act !== 'relu' && act !== 'silu' && act !== 'swish') fail(`has act_fn ${JSON.stringify(act)}; Kiln builds relu or silu`);
  const upsample = config.upsample_fn ?? 'nearest';
  if (upsample !== 'nearest') fail(`has upsample_fn ${JSON.stringify(upsample)}; Kiln builds nearest`);
  const scalingFactor = num('scaling_factor', 1);
  if (scalingFactor === 0) fail('has scaling_factor 0');
  return {
    latentChannels: int('latent_channels', 4),
    outChannels: int('out_channels', 3),
    channels,
    blocks,
    upsampleFactor: int('upsampling_scaling_factor', 2),
    act: act === 'relu' ? 'relu' : 'silu',
    scalingFactor,
    shiftFactor: num('shift_factor', 0),
  };
}

/** How many pixels one latent cell becomes. */
export function tinyDecoderScale(c: TinyDecoderConfig): number {
  return c.upsampleFactor ** (c.channels.length - 1);
}

/** The `taesd_decoder` graph; `p` views the whole AutoencoderTiny's weights (the encoder's are left unused). */
export function buildTinyDecoder(g: GraphBuilder, config: Record<string, unknown>, p: Params): void {
  const c = tinyDecoderConfig(config);
  const layers = p.at('decoder.layers');
  const act = (x: string) => (c.act === 'relu' ? g.op('Relu', [x]) : g.silu(x));
  let index = 0; // the nn.Sequential's module index
  const next = () => layers.at(index++);

  const latent = g.input('latent_sample', 'float32', ['batch', c.latentChannels, 'latent_height', 'latent_width']);
  const three = g.constF32([3], []);
  let h = g.op('Mul', [g.op('Tanh', [g.op('Div', [latent, three])]), three]);
  const width = c.channels[0]!;
  h = act(conv2d(g, next(), h, c.latentChannels, width));
  index++; // the activation
  c.channels.forEach((channels, stage) => {
    const last = stage === c.channels.length - 1;
    h = g.scope(`stage${stage}`, () => {
      let y = h;
      for (let b = 0; b < c.blocks[stage]!; b++) {
        const block = next().at('conv');
        let r = act(conv2d(g, block.at(0), y, channels, channels));
        r = act(conv2d(g, block.at(2), r, channels, channels));
        r = conv2d(g, block.at(4), r, channels, channels);
        // in == out channels in every block DecoderTiny makes: the skip is the identity.
        y = g.op('Relu', [g.op('Add', [r, y])]);
      }
      if (!last) {
        const f = c.upsampleFactor;
        y = g.op('Resize', [y, '', g.constF32([1, 1, f, f])], { mode: 'nearest', coordinate_transformation_mode: 'asymmetric', nearest_mode: 'floor' });
        index++; // the upsampler
      }
      return conv2d(g, next(), y, channels, last ? c.outChannels : channels, { bias: last });
    });
  });
  // [0, 1] -> [-1, 1], as diffusers' DecoderTiny returns it.
  const out = g.op('Sub', [g.op('Mul', [h, g.constF32([2], [])]), g.constF32([1], [])]);
  g.op('Identity', [out], {}, 'sample');
  g.output('sample', 'float32', ['batch', c.outChannels, 'height', 'width']);
}

/**
 * An AutoencoderTiny folder (config.json + diffusers safetensors weights: what `kiln pull taesd`
 * installs) -> `out/model.onnx` (the decoder) beside a copy of its config. Cached by cache.ts's
 * ensureBuilt with kind `taesd-decoder`.
 */
export function convertTinyDecoder(src: string, out: string, options: ConvertOptions = {}): ConvertResult {
  const path = join(src, 'config.json');
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
  } catch {
    throw new ModelLoadError(`taesd: ${path} is missing or not JSON`, path);
  }
  if (!config || typeof config !== 'object' || Array.isArray(config)) throw new ModelLoadError(`taesd: ${path} is not a JSON object`, path);
  checkClass(config, ['AutoencoderTiny'], 'taesd', path);
  const built = buildGraph({ build: buildTinyDecoder }, 'taesd_decoder', config, componentWeights(src, 'taesd'), { dtype: options.dtype });
  const written = writeBuiltGraph(built, out, options);
  writeFileSync(join(out, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
  return { components: [{ name: 'taesd_decoder', ...written }], warnings: [] };
}
