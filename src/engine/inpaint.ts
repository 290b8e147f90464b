/**
 * Inpainting: repaint the masked part of a picture, keep the rest.
 *
 * Masks, in both conventions users bring (the rule, as documented in the README):
 * - OpenAI's: a PNG with transparency; fully transparent pixels (alpha 0) are replaced.
 * - The common black/white one, for masks with no transparency: white (luminance >= 128) is
 *   replaced, black is kept.
 * The mask must have the input image's dimensions; it is then cropped and resized exactly like
 * the image (centre square, output size).
 *
 * Any model works by latent blending: after each step the unmasked latents are reset to the
 * input's latents noised to that step's level. A dedicated 9-channel inpainting UNet, where the
 * model has one, is fed [latents, mask, masked-image latents] instead. Finally the decoded
 * picture is blended back onto the input through a softened mask, so unmasked pixels stay the
 * input's own.
 *
 * On a model that declares a native size (kiln.json `native_size`) the image and mask are
 * brought down to the size denoised at and the result back up to the input's size, and the
 * blend-back happens at the input's size: unmasked pixels still equal the input's.
 */
import sharp from 'sharp';
import { denoiseSize, runDiffusion, type GenerateResult, type StartContext } from './pipeline.js';
import { checkStrength, noisedImageLatents, type Img2ImgOptions } from './img2img.js';
import { encodeImageToLatents, resizeImage, type RgbImage } from './vae.js';
import { DiffusionModel } from './model.js';
import { InvalidOptionError } from './errors.js';

/** Mask blur (in output pixels) for the final blend: hides the seam without eating detail. */
const BLEND_SIGMA = 3;

export interface InpaintOptions extends Img2ImgOptions {
  /** width·height values in [0, 1], 1 = repaint (see prepareMask). Default strength is 1. */
  mask: Float32Array;
}

/** Size of an upload (any image sharp reads) as used, upright: for the mask-matches-image check. */
async function dimensions(input: Buffer): Promise<{ width: number; height: number }> {
  const meta = await sharp(input).metadata();
  return meta.autoOrient ?? { width: meta.width ?? 0, height: meta.height ?? 0 };
}

/** Throws InvalidOptionError(param "mask") when the mask's dimensions differ from the image's. */
export async function checkMaskMatchesImage(image: Buffer, mask: Buffer): Promise<void> {
  const [a, b] = await Promise.all([dimensions(image), dimensions(mask)]);
  if (a.width !== b.width || a.height !== b.height) {
    throw new InvalidOptionError(`mask is ${b.width}x${b.height} but the image is ${a.width}x${a.height}; they must match`, 'mask');
  }
}

/**
 * Turns a mask upload into width·height repaint weights (1 = repaint), applying the
 * convention rule above at the upload's resolution, then the image's crop and resize.
 */
export async function prepareMask(input: Buffer, width: number, height: number): Promise<Float32Array> {
  const { data, info } = await sharp(input).rotate().ensureAlpha().raw().toBuffer({ resolveWithObject: true });
  const pixels = info.width * info.height;
  let transparent = false;
  for (let i = 0; i < pixels && !transparent; i++) transparent = data[i * 4 + 3]! < 255;
  const binary = Buffer.alloc(pixels);
  for (let i = 0; i < pixels; i++) {
    const [r, g, b, a] = [data[i * 4]!, data[i * 4 + 1]!, data[i * 4 + 2]!, data[i * 4 + 3]!];
    const repaint = transparent ? a === 0 : 0.299 * r + 0.587 * g + 0.114 * b >= 128;
    binary[i] = repaint ? 255 : 0;
  }
  const resized = await sharp(binary, { raw: { width: info.width, height: info.height, channels: 1 } })
    .resize(width, height, { fit: 'cover', position: 'centre', kernel: 'linear' })
    .extractChannel(0) // sharp would otherwise hand back sRGB
    .raw()
    .toBuffer();
  return Float32Array.from(resized, (v) => v / 255);
}

/**
 * The mask at latent resolution: a latent cell is repainted if any of its 8x8 pixels is. `grid`
 * (latent width and height) maps a mask of another size onto the latents (a native-size model):
 * a cell is repainted if any mask pixel that falls in it is.
 */
export function latentMask(
  mask: Float32Array,
  width: number,
  height: number,
  factor = 8,
  grid: { width: number; height: number } = { width: width / factor, height: height / factor },
): Float32Array {
  const { width: w, height: h } = grid;
  const out = new Float32Array(w * h);
  for (let y = 0; y < height; y++) {
    const row = Math.floor((y * h) / height) * w;
    for (let x = 0; x < width; x++) {
      if (mask[y * width + x]! >= 0.5) out[row + Math.floor((x * w) / width)] = 1;
    }
  }
  return out;
}

/** A mask of repaint weights resized like pictures are (linear: weights stay within [0, 1]). */
async function resizeMask(mask: Float32Array, width: number, height: number, to: { width: number; height: number }): Promise<Float32Array> {
  if (width === to.width && height === to.height) return mask;
  const bytes = Buffer.from(Uint8Array.from(mask, (v) => Math.round(v * 255)));
  const resized = await sharp(bytes, { raw: { width, height, channels: 1 } })
    .resize(to.width, to.height, { fit: 'fill', kernel: 'linear' })
    .extractChannel(0)
    .raw()
    .toBuffer();
  return Float32Array.from(resized, (v) => v / 255);
}

async function softenedMask(mask: Float32Array, width: number, height: number): Promise<Float32Array> {
  const bytes = Buffer.from(Uint8Array.from(mask, (v) => Math.round(v * 255)));
  const blurred = await sharp(bytes, { raw: { width, height, channels: 1 } }).blur(BLEND_SIGMA).extractChannel(0).raw().toBuffer();
  return Float32Array.from(blurred, (v) => v / 255);
}

function blendPixels(generated: RgbImage, input: RgbImage, soft: Float32Array): RgbImage {
  const pixels = new Uint8Array(generated.pixels.length);
  for (let i = 0; i < soft.length; i++) {
    const m = soft[i]!;
    for (let c = 0; c < 3; c++) {
      const k = i * 3 + c;
      pixels[k] = Math.round(m * generated.pixels[k]! + (1 - m) * input.pixels[k]!);
    }
  }
  return { ...generated, pixels };
}

export async function inpaint(model: DiffusionModel, options: InpaintOptions): Promise<GenerateResult> {
  const strength = checkStrength(options.strength ?? 1);
  const { image, mask } = options;
  if (mask.length !== image.width * image.height) {
    throw new InvalidOptionError(`mask has ${mask.length} values for a ${image.width}x${image.height} image`, 'mask');
  }
  // The blend-back works at the input's size; the latents at the size denoised at.
  const soft = await softenedMask(mask, image.width, image.height);
  const inpaintUnet = await model.inpaintUnet();
  const size = denoiseSize(model, image);
  const small = latentMask(mask, image.width, image.height, 8, { width: size.width / 8, height: size.height / 8 });

  // 9-channel UNets also see the mask and the latents of the input with the hole blanked out
  // (diffusers: image * (mask < 0.5), i.e. mid-grey in [-1, 1] space).
  let extraChannels: Float32Array | undefined;
  if (inpaintUnet) {
    const work = await resizeImage(image, size.width, size.height);
    const workMask = await resizeMask(mask, image.width, image.height, size);
    const holed = new Uint8Array(work.pixels);
    for (let i = 0; i < workMask.length; i++) {
      if (workMask[i]! >= 0.5) holed.fill(128, i * 3, i * 3 + 3);
    }
    // The masked-image latents use the mean path: no extra randomness to keep deterministic.
    const { latents } = await encodeImageToLatents(model, { ...work, pixels: holed }, null);
    extraChannels = new Float32Array(small.length + latents.length);
    extraChannels.set(small);
    extraChannels.set(latents, small.length);
  }

  let clean: Float32Array;
  let noise: Float32Array;
  let timesteps: number[];
  let scheduler: StartContext['scheduler'];
  return runDiffusion(
    model,
    options,
    async (ctx) => {
      const start = await noisedImageLatents(model, image, ctx, strength);
      ({ clean, noise, timesteps } = start);
      scheduler = ctx.scheduler;
      return start;
    },
    {
      settings: { strength },
      unet: inpaintUnet,
      extraChannels,
      // Latent blending, for UNets that do not know about masks.
      afterStep: inpaintUnet
        ? undefined
        : (latents, i) => {
            const next = timesteps[i + 1];
            const known = next === undefined ? clean : scheduler.addNoise(clean, noise, next);
            const plane = small.length;
            const out = new Float32Array(latents.length);
            for (let k = 0; k < latents.length; k++) {
              const m = small[k % plane]!;
              out[k] = m * latents[k]! + (1 - m) * known[k]!;
            }
            return out;
          },
      afterDecode: (generated) => blendPixels(generated, image, soft),
    },
  );
}
