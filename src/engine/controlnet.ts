/**
 * ControlNet-guided text-to-image (the split layout published ONNX conversions use): each
 * step runs the ControlNet on the conditioning picture, then a UNet that takes its residuals
 * (`down_block_N_additional_residual`, `mid_block_additional_residual`) by name.
 */
import { RESIDUAL_OUTPUT, noiseStart, runDiffusion, type GenerateOptions, type GenerateResult } from './pipeline.js';
import { FAMILY_LABELS, type DiffusionModel } from './model.js';
import type { OnnxModel } from './onnx.js';
import type { RgbImage } from './vae.js';
import { InvalidOptionError, ModelLoadError } from './errors.js';
import { imagePromptActive, type ImagePrompt } from './image-prompt.js';

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

/** A ControlNet checked against a model: its ControlNet-UNet and the conditioning scale. */
export interface PreparedControl {
  net: OnnxModel;
  unet: OnnxModel;
  scale: number;
}

/**
 * Everything about a ControlNet request that can be refused before any work: the scale, the
 * model's ControlNet-UNet, and whether the ControlNet fits it (pose mode calls this before
 * running pose estimation). With an image prompt that steers (a weight above 0) the UNet is the
 * adapter UNet's residual-taking build, which replaces the ControlNet-UNet (pipeline.ts): the
 * ControlNet is checked against it, and the ControlNet-UNet is not loaded.
 */
export async function prepareControl(model: DiffusionModel, controlNet: OnnxModel, controlScale = 1, imagePrompt?: ImagePrompt): Promise<PreparedControl> {
  if (!Number.isFinite(controlScale) || controlScale < 0 || controlScale > 2) {
    throw new InvalidOptionError('the ControlNet conditioning scale must be a number from 0 to 2', 'user');
  }
  const unet = imagePromptActive(imagePrompt) ? await imagePrompt.runner.unetFor(model, true) : await model.controlUnet();
  if (!unet) {
    throw new ModelLoadError(`model ${model.name} has no controlnet/model.onnx (the UNet that takes ControlNet residuals)`);
  }
  checkControlNetFits(model, controlNet, unet);
  return { net: controlNet, unet, scale: controlScale };
}

export async function controlnetGenerate(model: DiffusionModel, controlNet: OnnxModel, options: ControlNetOptions): Promise<GenerateResult> {
  return generateWithControl(model, await prepareControl(model, controlNet, options.controlScale, options.imagePrompt), options);
}

/** ControlNet-guided generation with a prepared ControlNet; `controlImage` at the output size. */
export function generateWithControl(model: DiffusionModel, control: PreparedControl, options: GenerateOptions & { controlImage: RgbImage }): Promise<GenerateResult> {
  const { net, unet, scale } = control;
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
    { unet, control: { net, image: data, imageDims: dims, scale } },
  );
}

/** Inputs a ControlNet gets from Kiln itself rather than from the UNet's feeds. */
const CONTROL_OWN_INPUTS = new Set(['timestep', 'controlnet_cond', 'conditioning_scale']);

/**
 * A ControlNet fits a ControlNet-UNet when it produces exactly the residuals the UNet takes and
 * needs no input the UNet is not fed (an SDXL ControlNet wants text_embeds/time_ids) with the
 * same text width. A ControlNet of the other family fails here, before any step, with a message
 * for people (param `user`: the field that asked for pose) instead of a shape error mid-run.
 */
export function checkControlNetFits(model: DiffusionModel, controlNet: OnnxModel, unet: OnnxModel): void {
  const problems: string[] = [];
  const produced = controlNet.outputNames(RESIDUAL_OUTPUT);
  const taken = [...unet.inputs.keys()].filter((n) => RESIDUAL_OUTPUT.test(n));
  if (produced.length !== taken.length || produced.some((n) => !unet.hasInput(n))) {
    problems.push(`it produces ${produced.length} residuals, the model's ControlNet-UNet takes ${taken.length}`);
  }
  const foreign = [...controlNet.inputs.keys()].filter((n) => !CONTROL_OWN_INPUTS.has(n) && !unet.hasInput(n));
  if (foreign.length) problems.push(`it takes ${foreign.join(', ')}, which this model does not have`);
  const width = (m: OnnxModel) => (m.hasInput('encoder_hidden_states') ? m.input('encoder_hidden_states').shape.at(-1) : undefined);
  const [cw, uw] = [width(controlNet), width(unet)];
  if (typeof cw === 'number' && typeof uw === 'number' && cw > 0 && uw > 0 && cw !== uw) {
    problems.push(`its text width is ${cw}, the model's is ${uw}`);
  }
  if (problems.length) {
    const family = FAMILY_LABELS[model.layout.family];
    throw new InvalidOptionError(
      `the OpenPose ControlNet (${controlNet.label}) does not fit model ${model.name} (${family}): ` +
        `${problems.join('; ')}. It is probably for another model family; install or configure the one for ${family}.`,
      'user',
    );
  }
}
