/**
 * From a job (names and InputStore keys) to what the engine runs (folders, files and bytes),
 * on the host that runs it: the model through this host's catalog, the uploads from the input
 * store, the pose assets and image-prompt adapters from the model's name (src/catalog).
 */
import { basename } from 'node:path';
import sharp from 'sharp';
import { detectLayout } from '../engine/model.js';
import { isModelPath } from '../engine/locate.js';
import { sizeForUpload } from '../engine/presets.js';
import type { EngineJob } from '../engine/run-job.js';
import type { ModelCatalog, ResolvedModel } from '../catalog/catalog.js';
import { ModelNotFoundError } from '../engine/errors.js';
import { resolvePoseAssets } from '../catalog/pose-assets.js';
import { resolveImagePromptAssets } from '../catalog/image-prompt-assets.js';
import type { Job } from '../jobs/types.js';
import type { InputStore } from '../store/types.js';

/** An upload a job names is gone (expired, or the store lost it): the job cannot run. */
export class InputMissingError extends Error {
  override name = 'InputMissingError';
}

async function input(inputs: InputStore | undefined, key: string | undefined, what: string): Promise<Buffer | undefined> {
  if (key === undefined) return undefined;
  const bytes = await inputs?.getInput(key);
  if (!bytes) throw new InputMissingError(`the job's ${what} is no longer in the input store (it expired before a worker took the job, or it is in a bucket this worker was not given: kiln worker --store)`);
  return bytes;
}

/** A job resolved for the engine, and what of that resolution its result reports (JobOutput). */
export interface PreparedJob {
  engineJob: EngineJob;
  /** The image prompt's adapter files by name (JobOutput.imagePromptAdapters); absent without an image prompt. */
  imagePromptAdapters?: string[];
}

/**
 * A job's model: its folder, and the name the engine reports and messages show. A name no folder
 * of this host holds may be one of its serving aliases (aliases.json): a worker announces those,
 * and an API host without the model queues the name as asked, so it is resolved here as one
 * machine's catalog resolves it before queueing (the model it stands for, under that model's name).
 * Preloading (pool.ts) looks models up here too, so that it loads what a job by that name runs.
 */
export function jobModel(ref: string, catalog: ModelCatalog): { dir: string; name: string } {
  try {
    const dir = catalog.locate(ref);
    return { dir, name: isModelPath(ref) ? basename(dir) : ref };
  } catch (err) {
    if (!(err instanceof ModelNotFoundError) || isModelPath(ref)) throw err;
    let model: ResolvedModel;
    try {
      model = catalog.resolve(ref);
    } catch {
      throw err; // not an alias either: the folder lookup's message
    }
    return { dir: catalog.dir(model), name: model.id };
  }
}

export async function toEngineJob(job: Job, catalog: ModelCatalog, inputs: InputStore | undefined): Promise<PreparedJob> {
  const { dir, name } = jobModel(job.model, catalog);
  const out: EngineJob = { mode: job.mode, model: { dir, name }, options: job.options, output: job.output };
  if (job.partialImages) out.partialImages = job.partialImages;
  if (job.strength !== undefined) out.strength = job.strength;
  const [image, mask] = await Promise.all([input(inputs, job.inputs?.image, 'image'), input(inputs, job.inputs?.mask, 'mask')]);
  if (image) out.image = image;
  // An API host without the model's folder leaves an edit's `auto` to the worker: the upload's
  // upright shape at the model's native area, as one machine does (images-service requestSize).
  if (image && job.options.size === 'auto') {
    const meta = await sharp(image).metadata();
    const upright = meta.autoOrient ?? { width: meta.width ?? 0, height: meta.height ?? 0 };
    const size = sizeForUpload(upright, detectLayout(dir));
    out.options = { ...job.options, size: `${size.width}x${size.height}` };
  }
  if (mask) out.mask = mask;
  if (job.mode === 'pose') {
    const assets = resolvePoseAssets(dir, name, catalog.home);
    out.pose = { scale: job.pose?.scale ?? 1, controlNet: assets.controlNet, dwpose: assets.dwpose };
  }
  if (job.imagePrompt) {
    const adapters = resolveImagePromptAssets(detectLayout(dir).family, name, catalog.home, job.imagePrompt);
    out.imagePrompt = { adapters: adapters.map(({ adapter, imageEncoder, weight }) => ({ adapter, imageEncoder, weight })) };
    return { engineJob: out, imagePromptAdapters: adapters.map((a) => a.name) };
  }
  return { engineJob: out };
}
