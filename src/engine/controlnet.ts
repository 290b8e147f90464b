/**
 * ControlNet-guided text-to-image (the split layout published ONNX conversions use): each
 * step runs the ControlNet on the conditioning picture, then a UNet that takes its residuals
 * (`down_block_N_additional_residual`, `mid_block_additional_residual`) by name.
 */
import { noiseStart, runDiffusion, type GenerateOptions, type GenerateResult } from './pipeline.js';
import type { DiffusionModel } from './model.js';
import type { OnnxModel } from './onnx.js';
import type { RgbImage } from './vae.js';
import { InvalidOptionError, ModelLoadError } from './errors.js';

export interface ControlNetOptions extends GenerateOptions {
  /** The conditioning picture (e.g. an OpenPose skeleton) at the output size. */
  controlImage: RgbImage;
  /** Conditioning scale: 1.0 for `cn`, w for `pose:w`. */
  controlScale?: number;
}

/** RGB bytes -> [1,3,H,W] in [0, 1] (ControlNet conditioning is not normalised to [-1, 1]). */
export function controlImageTensor(image: RgbImage): { data: Float32Array; dims: number[] } {
  const plane = image.width * image.height;
  const data = new Float32Array(plane * 3);
  for (let i = 0; i < plane; i++) for (let c = 0; c < 3; c++) data[c * plane + i] = image.pixels[i * 3 + c]! / 255;
  return { data, dims: [1, 3, image.height, image.width] };
}

export async function controlnetGenerate(model: DiffusionModel, controlNet: OnnxModel, options: ControlNetOptions): Promise<GenerateResult> {
  const scale = options.controlScale ?? 1;
  if (!Number.isFinite(scale) || scale < 0 || scale > 2) {
    throw new InvalidOptionError('the ControlNet conditioning scale must be a number from 0 to 2', 'user');
  }
  const unet = await model.controlUnet();
  if (!unet) {
    throw new ModelLoadError(`model ${model.name} has no controlnet/model.onnx (the UNet that takes ControlNet residuals)`);
  }
  const { data, dims } = controlImageTensor(options.controlImage);
  return runDiffusion(
    model,
    options,
    (ctx) => {
      if (options.controlImage.width !== ctx.settings.width || options.controlImage.height !== ctx.settings.height) {
        throw new InvalidOptionError('the control picture must have the output size', 'image');
      }
      return noiseStart(ctx);
    },
    { unet, control: { net: controlNet, image: data, imageDims: dims, scale } },
  );
}
