/**
 * Pose-guided generation (the API's `user="cn"`): DWPose finds the people in the uploaded
 * picture, their OpenPose skeleton is drawn as ControlNet-OpenPose was trained on, and the
 * OpenPose ControlNet conditions the generation on it. The skeleton picture is returned too.
 * The skeleton is drawn at the output size; on a model that declares a native size the pipeline
 * resizes it to the size denoised at, like the picture it conditions (pipeline.ts). With an image
 * prompt (GenerateOptions.imagePrompt, `face:0.5,style:0.6,pose:1.0`) the adapter UNet's
 * residual-taking build runs in place of the ControlNet-UNet (image-prompt.ts).
 */
import { generateWithControl, prepareControl } from './controlnet.js';
import type { DiffusionModel } from './model.js';
import type { OnnxModel } from './onnx.js';
import { resolveModelSize, type GenerateOptions, type GenerateResult } from './pipeline.js';
import { drawSkeleton, estimatePose } from './pose/index.js';
import type { RgbImage } from './vae.js';
import { InvalidOptionError } from './errors.js';

export interface PoseAssets {
  controlNet: OnnxModel;
  detector: OnnxModel;
  poseNet: OnnxModel;
}

export interface PoseGenerateOptions extends GenerateOptions {
  /** The uploaded picture, any size (pose is estimated on it as it is). */
  image: RgbImage;
  /** ControlNet conditioning scale (1.0 for `cn`, w for `pose:w`). */
  controlScale?: number;
}

export interface PoseGenerateResult extends GenerateResult {
  /** The skeleton picture the generation followed, at the output size. */
  pose: RgbImage;
  people: number;
}

/** Raised when the picture has no detectable person: pose cannot be applied. */
export class NoPersonError extends InvalidOptionError {
  override name = 'NoPersonError';
  constructor() {
    super('no person was found in the image, so the pose cannot be applied; upload a picture with a clearly visible person', 'image');
  }
}

export async function poseGenerate(model: DiffusionModel, assets: PoseAssets, options: PoseGenerateOptions): Promise<PoseGenerateResult> {
  const { width, height } = resolveModelSize(model, options);
  // Refuse a ControlNet that cannot be used before spending the pose estimation on it.
  const control = await prepareControl(model, assets.controlNet, options.controlScale, options.imagePrompt);
  const people = await estimatePose(assets.detector, assets.poseNet, options.image);
  if (!people.length) throw new NoPersonError();
  const pose = drawSkeleton(people, width, height);
  const result = await generateWithControl(model, control, { ...options, controlImage: pose });
  return { ...result, pose, people: people.length };
}
