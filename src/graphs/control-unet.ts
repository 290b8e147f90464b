/**
 * ControlNet-UNets for models Kiln builds: the model's UNet with ControlNet residual inputs
 * (unet.ts, UnetBuildOptions.controlResiduals), the split layout's `controlnet/model.onnx`
 * (contracts §4.1), so that the engine's ControlNet path (engine/controlnet.ts) drives a Kiln-built
 * UNet exactly as it drives an exported one.
 *
 * Built on first use only, into the build entry it belongs to (`<entry>/controlnet/`, beside the
 * entry's `unet/`): the plain UNet stays as it was, so the entries' keys and formats are unchanged
 * and every other request feeds no residuals (all-zero residual inputs on every UNet would cost
 * their Adds and feeds each step: measured +5.5% per step on the golden tiny SD 1.5 UNet at 64x64
 * latents, batch 2, CPU; on a GPU each step would also upload ~54 MB of zeros for SD 1.5 at
 * 512x512), and an entry never gets a ControlNet-UNet from other weights, since it is built from
 * the entry's own source. The folder is written under a
 * temporary name and renamed into place with a `kiln-control.json` stamp written last; a folder
 * without the current CONTROL_UNET_FORMAT stamp is rebuilt.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ModelLoadError } from '../engine/errors.js';
import { BUILD_INFO } from './cache.js';
import { folderSources } from './checkpoint.js';
import { buildGraph, writeBuiltGraph, type BuiltGraph, type GraphDtype } from './convert.js';
import { buildUnet } from './unet.js';
import { GRAPH_FILE } from './write.js';

/** Bump when the ControlNet-UNets written here change, so that old ones are rebuilt. */
export const CONTROL_UNET_FORMAT = 1;
/** The split layout's folder (engine/model.ts CONTROL_UNET_PATH). */
export const CONTROL_UNET_DIR = 'controlnet';
const STAMP = 'kiln-control.json';

/** Whether `<entry>/controlnet/` is a current ControlNet-UNet written here. */
function current(dir: string): boolean {
  try {
    return (JSON.parse(readFileSync(join(dir, STAMP), 'utf8')) as { format?: unknown }).format === CONTROL_UNET_FORMAT;
  } catch {
    return false;
  }
}

/**
 * `<entry>/controlnet/model.onnx`, built by `build` (with `config` written beside it) unless a
 * current one is there. Concurrent builders (worker threads, processes) each write their own
 * temporary folder; the first rename wins and the others' copies are dropped.
 */
export function ensureEntryControlUnet(entry: string, config: Record<string, unknown>, build: () => BuiltGraph): string {
  const dir = join(entry, CONTROL_UNET_DIR);
  if (current(dir)) return join(dir, GRAPH_FILE);
  const partial = join(entry, `.partial-${CONTROL_UNET_DIR}-${process.pid}-${randomBytes(4).toString('hex')}`);
  try {
    writeBuiltGraph(build(), partial);
    writeFileSync(join(partial, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
    writeFileSync(join(partial, STAMP), `${JSON.stringify({ format: CONTROL_UNET_FORMAT })}\n`);
    if (existsSync(dir) && !current(dir)) rmSync(dir, { recursive: true, force: true });
    try {
      renameSync(partial, dir);
    } catch (err) {
      if (!current(dir)) throw err; // another builder's rename came first
    }
  } finally {
    rmSync(partial, { recursive: true, force: true });
  }
  return join(dir, GRAPH_FILE);
}

/**
 * The ControlNet-UNet of a pipeline Kiln built into the cache (`entry` holds kiln-build.json):
 * the entry's UNet config and its source's UNet weights (a diffusers folder or the single-file
 * checkpoint its kiln.json names), with residual inputs, in the entry's precision.
 */
export function ensurePipelineControlUnet(entry: string): string {
  let info: { source?: unknown; dtype?: unknown };
  try {
    info = JSON.parse(readFileSync(join(entry, BUILD_INFO), 'utf8')) as typeof info;
  } catch {
    throw new ModelLoadError(`${entry} is not a graph folder Kiln built (no readable ${BUILD_INFO}), so Kiln cannot build its ControlNet-UNet`, entry);
  }
  const source = typeof info.source === 'string' ? resolve(info.source) : undefined;
  if (!source || !existsSync(source)) {
    throw new ModelLoadError(`the source of ${entry} (${String(info.source)}) is gone, so Kiln cannot build its ControlNet-UNet`, entry);
  }
  const dtype: GraphDtype = info.dtype === 'fp16' ? 'fp16' : 'fp32';
  const config = JSON.parse(readFileSync(join(entry, 'unet', 'config.json'), 'utf8')) as Record<string, unknown>;
  return ensureEntryControlUnet(entry, config, () => {
    const weights = folderSources(source, ['unet'], { unet: config }).sources.unet!;
    return buildGraph({ build: (g, c, p) => buildUnet(g, c, p, { controlResiduals: true }) }, 'unet', config, weights, { dtype });
  });
}
