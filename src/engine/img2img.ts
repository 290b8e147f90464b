/**
 * Image-to-image: the input picture, VAE-encoded, is noised to `strength` and denoised over
 * the remaining steps (diffusers' StableDiffusionImg2ImgPipeline semantics). On a model that
 * declares a native size the input is resized down to the size denoised at, and the result
 * back up to the input's (pipeline.ts).
 */
import sharp from 'sharp';
import { runDiffusion, type GenerateOptions, type GenerateResult, type StartContext } from './pipeline.js';
import { encodeImageToLatents, resizeImage, type RgbImage } from './vae.js';
import type { DiffusionModel } from './model.js';
import { InvalidOptionError } from './errors.js';

export const DEFAULT_STRENGTH = 0.75;

export interface Img2ImgOptions extends GenerateOptions {
  /** The input at the output size (see prepareInitImage). */
  image: RgbImage;
  /** 0 < strength <= 1: the share of the schedule that is re-run; 1 ignores the input's content. */
  strength?: number;
}

/**
 * Brings an uploaded picture to the requested size. The documented rule: the EXIF orientation is
 * applied, alpha is composited on white, then the largest centred region of the output's shape
 * is cropped and resized (Lanczos) to width x height.
 */
export async function prepareInitImage(input: Buffer, width: number, height: number): Promise<RgbImage> {
  const { data, info } = await sharp(input)
    .rotate()
    .flatten({ background: '#ffffff' })
    .resize(width, height, { fit: 'cover', position: 'centre', kernel: 'lanczos3' })
    .removeAlpha()
    .raw()
    .toBuffer({ resolveWithObject: true });
  if (info.channels !== 3) throw new Error(`expected RGB after conversion, got ${info.channels} channels`);
  return { width: info.width, height: info.height, pixels: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

/** The timesteps img2img runs: the last `strength` share of the schedule (at least one). */
export function img2imgTimesteps(ctx: StartContext, strength: number): { timesteps: number[]; beginIndex: number } {
  const { scheduler, settings } = ctx;
  const initTimestep = Math.min(Math.floor(settings.steps * strength), settings.steps);
  const tStart = Math.max(settings.steps - Math.max(initTimestep, 1), 0);
  const beginIndex = tStart * scheduler.order;
  return { timesteps: scheduler.timesteps.slice(beginIndex), beginIndex };
}

export function checkStrength(strength: number | undefined): number {
  const s = strength ?? DEFAULT_STRENGTH;
  if (!Number.isFinite(s) || s <= 0 || s > 1) {
    throw new InvalidOptionError('strength must be a number greater than 0 and at most 1', 'strength');
  }
  return s;
}

/**
 * Encodes the input (at the output size, brought to the size denoised at) and noises it to the
 * first timestep to be run.
 */
export async function noisedImageLatents(model: DiffusionModel, image: RgbImage, ctx: StartContext, strength: number) {
  const { settings, scheduler, rng, size } = ctx;
  if (image.width !== settings.width || image.height !== settings.height) {
    throw new InvalidOptionError(`input image is ${image.width}x${image.height}, expected ${settings.width}x${settings.height}`, 'image');
  }
  const { timesteps, beginIndex } = img2imgTimesteps(ctx, strength);
  const { latents: clean } = await encodeImageToLatents(model, await resizeImage(image, size.width, size.height), rng);
  const noise = rng.normals(clean.length);
  scheduler.setBeginIndex(beginIndex);
  return { clean, noise, latents: scheduler.addNoise(clean, noise, timesteps[0]!), timesteps };
}

export async function img2img(model: DiffusionModel, options: Img2ImgOptions): Promise<GenerateResult> {
  const strength = checkStrength(options.strength);
  return runDiffusion(
    model,
    options,
    async (ctx) => {
      const { latents, timesteps } = await noisedImageLatents(model, options.image, ctx, strength);
      return { latents, timesteps };
    },
    { settings: { strength } },
  );
}
