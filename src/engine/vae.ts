/**
 * The VAE ends of the pipeline: latents -> RGB pixels (decode) and pixels -> latents (encode).
 */
import sharp from 'sharp';
import type { DiffusionModel } from './model.js';
import { NumericalError } from './errors.js';
import type { Rng } from './rng.js';
import type { Feed } from './onnx.js';
import type { UnetBatcher } from './unet-batcher.js';

/** An 8-bit RGB image, row-major, 3 bytes per pixel. */
export interface RgbImage {
  width: number;
  height: number;
  pixels: Uint8Array;
}

/** The filter that brings a picture between a model's native size and the requested one. */
export const RESIZE_KERNEL = 'lanczos3';

/**
 * Resizes an RGB picture to exactly width x height (Lanczos 3, sides scaled independently: a
 * native-size picture has the request's aspect ratio to within a few percent). Same size: the
 * picture itself.
 */
export async function resizeImage(image: RgbImage, width: number, height: number): Promise<RgbImage> {
  if (image.width === width && image.height === height) return image;
  const data = await sharp(image.pixels, { raw: { width: image.width, height: image.height, channels: 3 } })
    .resize(width, height, { fit: 'fill', kernel: RESIZE_KERNEL })
    .raw()
    .toBuffer();
  return { width, height, pixels: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

/** Decoded pixels one batched VAE run may make (its activations are the largest a generation holds). */
const DECODE_BATCH_PIXELS = 2 ** 21;

/**
 * Decodes latents [1,4,h,w] (already denoised, *not* divided by the scaling factor). With a
 * batcher that batches decodes, decodes of concurrent generations finishing together share a
 * run, up to 2 MP of output in all (8 pictures of 512x512, 2 of 1024x1024).
 */
export async function decodeLatents(model: DiffusionModel, latents: Float32Array, dims: number[], batcher?: UnetBatcher): Promise<RgbImage> {
  const scale = model.layout.vaeScalingFactor;
  const scaled = new Float32Array(latents.length);
  for (let i = 0; i < latents.length; i++) scaled[i] = latents[i]! / scale;
  const outName = model.vaeDecoderOutputName();
  const feeds = { latent_sample: { data: scaled, dims } };
  const maxRows = Math.floor(DECODE_BATCH_PIXELS / (dims[2]! * dims[3]! * 64));
  const out = batcher?.batchDecodes && maxRows >= 2 ? await batcher.run(model.vaeDecoder, feeds, [outName], { rows: 1, maxRows }) : await model.vaeDecoder.run(feeds, [outName]);
  const { data, dims: outDims } = out[outName]!;
  const [, channels, height, width] = outDims as [number, number, number, number];
  if (channels !== 3) throw new NumericalError(`${model.vaeDecoder.label} returned ${channels} channels, expected 3`);
  const plane = width * height;
  const pixels = new Uint8Array(plane * 3);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const v = data[c * plane + i]!;
      if (!Number.isFinite(v)) {
        throw new NumericalError(
          `the VAE decoder produced non-finite values${model.layout.vaeForceUpcast ? ' (this VAE needs fp32; an fp16 SDXL VAE needs the fp16-fix weights)' : ''}`,
        );
      }
      // [-1, 1] -> [0, 255], rounded as diffusers does.
      const x = Math.min(1, Math.max(0, v / 2 + 0.5));
      pixels[i * 3 + c] = Math.round(x * 255);
    }
  }
  return { width, height, pixels };
}

/**
 * Encodes an RGB image to scaled latents [1,4,h,w]. Both encoder forms are deterministic:
 * `latent_parameters` (mean ‖ logvar) is sampled here from `rng`; an in-graph sample
 * (`latent_sample`) has had its RandomNormalLike replaced by a noise input fed from `rng`.
 * With `rng` null the latent is the distribution's mean (its mode).
 */
export async function encodeImageToLatents(
  model: DiffusionModel,
  image: RgbImage,
  rng: Rng | null,
): Promise<{ latents: Float32Array; dims: number[] }> {
  const { model: encoder, noiseInputs } = await model.vaeEncoder();
  const { width, height, pixels } = image;
  const plane = width * height;
  const input = new Float32Array(plane * 3);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) input[c * plane + i] = (pixels[i * 3 + c]! / 255) * 2 - 1;
  }
  const latentDims = [1, 4, height / 8, width / 8];
  const latentSize = latentDims.reduce((a, b) => a * b, 1);
  const feeds: Record<string, Feed> = { sample: { data: input, dims: [1, 3, height, width] } };
  for (const name of noiseInputs) {
    feeds[name] = { data: rng ? rng.normals(latentSize) : new Float32Array(latentSize), dims: latentDims };
  }
  const outName = encoder.hasOutput('latent_parameters') ? 'latent_parameters' : encoder.hasOutput('latent_sample') ? 'latent_sample' : [...encoder.outputs.keys()][0]!;
  const out = await encoder.run(feeds, [outName]);
  const { data, dims } = out[outName]!;
  const scale = model.layout.vaeScalingFactor;
  if (outName === 'latent_parameters' || dims[1] === 8) {
    const [, , h, w] = dims as [number, number, number, number];
    const half = 4 * h * w;
    const latents = new Float32Array(half);
    for (let i = 0; i < half; i++) {
      const mean = data[i]!;
      const logvar = Math.min(20, Math.max(-30, data[half + i]!));
      latents[i] = (rng ? mean + Math.exp(0.5 * logvar) * rng.normal() : mean) * scale;
    }
    return { latents, dims: [1, 4, h, w] };
  }
  const latents = new Float32Array(data.length);
  for (let i = 0; i < data.length; i++) latents[i] = data[i]! * scale;
  return { latents, dims };
}
