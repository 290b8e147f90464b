/**
 * The job: what the API asks a worker to make, as plain serializable data, so it can wait in
 * memory (one machine) or in Redis (scale-out) and run on any host. Its mode is explicit; its
 * inputs are InputStore keys (src/store), never bytes; its models are names the worker's
 * catalog resolves (src/catalog), never paths of the API host. The worker resolves pose assets
 * and image-prompt adapters from the model's name itself.
 */
import type { OutputFormat } from '../engine/image-codec.js';
import type { EngineJob } from '../engine/run-job.js';

/**
 * - generate: text to image;
 * - img2img: from the upload, at `strength`;
 * - inpaint: the upload's masked part redrawn;
 * - pose: the upload's pose (DWPose) steering a ControlNet;
 * - image_prompt: from noise, steered by the upload (IP-Adapter).
 * img2img and inpaint may carry an image prompt too (`imagePrompt`).
 */
export const JOB_MODES = ['generate', 'img2img', 'inpaint', 'pose', 'image_prompt'] as const;
export type JobMode = (typeof JOB_MODES)[number];

/** Plain, serializable generation options (the engine's GenerateOptions minus callbacks): the engine entry point's own. */
export type JobOptions = EngineJob['options'];

/** An image prompt's weight per adapter role, and the field that asked for it (for 400s). */
export interface ImagePromptWeights {
  style: number;
  face?: number;
  from: 'user' | 'style';
  /** The style weight is the default because neither `user` nor the field gave one. */
  styleDefault?: boolean;
}

export interface Job {
  mode: JobMode;
  /** A model name the worker's catalog knows (or a folder the operator configured, on a shared host). */
  model: string;
  options: JobOptions;
  /** InputStore keys of the uploads: every mode but generate has `image`; inpaint has `mask`. */
  inputs?: { image?: string; mask?: string };
  /** img2img and inpaint (0 < s <= 1). */
  strength?: number;
  /** Pose mode: the ControlNet conditioning scale. */
  pose?: { scale: number };
  /** An image prompt (mode image_prompt, or img2img/inpaint steered by the upload too). */
  imagePrompt?: ImagePromptWeights;
  output: { format: OutputFormat; quality?: number };
  /** Streaming: how many partial images to make while it runs (0 or absent: none). */
  partialImages?: number;
}

/** The endpoint a job came from, for metrics and logs. */
export function jobKind(job: Pick<Job, 'mode'>): 'generate' | 'edit' {
  return job.mode === 'generate' ? 'generate' : 'edit';
}
