/**
 * Pose mode (`user=cn`, `pose:<w>`): finding the three things it needs for a model, before any
 * work is queued, so a request that cannot be honoured gets a 400 that says what is missing
 * (never an image that silently ignored the pose).
 *
 * The documented order (README, Server section):
 *
 * 1. ControlNet-UNet (required): `<model>/controlnet/model.onnx`, the UNet that takes the
 *    ControlNet's residuals (split layout); a model Kiln builds from safetensors gets its own,
 *    built with its graphs on first use (graphs/control-unet.ts).
 * 2. OpenPose ControlNet graph:
 *    a. `<model>/controlnet-openpose/model.onnx`;
 *    b. else the `controlnet_openpose` key of the model's `kiln.json`: a path (absolute, or
 *       relative to the model folder; a folder holding `model.onnx`, or the `.onnx` file itself)
 *       or the name of an installed model; when set it must exist (no silent fallback);
 *    c. else the installed model `controlnet-openpose` (SD 1.x/2.x) or `controlnet-openpose-sdxl`
 *       (SDXL).
 * 3. DWPose (`yolox_l.onnx` + `dw-ll_ucoco_384.onnx`, both in one folder):
 *    a. `<model>/annotators/dwpose/`;
 *    b. else the chosen ControlNet folder's `annotators/dwpose/`;
 *    c. else the installed `dwpose`;
 *    d. else `$KILN_HOME/annotators/dwpose/`.
 *
 * "Installed" means `$KILN_HOME/models/<name>/` (or an alias of that name installed elsewhere by
 * `kiln pull`, as `kiln models` lists it).
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { detectLayout, isSafetensorsLayout, CONTROL_UNET_PATH, type ModelFamily } from '../engine/model.js';
import { DWPOSE_DETECTOR_FILE, DWPOSE_POSE_FILE } from '../engine/pose/index.js';
import { builtinModelsDir } from '../engine/locate.js';
import { findInstalled } from '../models/installed.js';
import { AssetUnavailableError } from './errors.js';

export const OPENPOSE_FOLDER = 'controlnet-openpose';
export const OPENPOSE_KILN_KEY = 'controlnet_openpose';
export const DWPOSE_NAME = 'dwpose';
export const ANNOTATOR_DIR = join('annotators', 'dwpose');
/** The built-in alias of an SD 1.5 model with a ControlNet-UNet. */
export const SD15_CONTROLNET_MODEL = 'stable-diffusion-v1-5-controlnet';

/** The installed name of the OpenPose ControlNet for a model family (also the `kiln pull` alias). */
export function openposeAlias(family: ModelFamily): string {
  return family === 'sdxl' ? 'controlnet-openpose-sdxl' : 'controlnet-openpose';
}

/** The pulls that give SD 1.5 pose mode (every piece has a built-in alias). */
const SD15_POSE = `\`kiln pull ${SD15_CONTROLNET_MODEL} && kiln pull ${openposeAlias('sd1')} && kiln pull ${DWPOSE_NAME}\`, then send model=${SD15_CONTROLNET_MODEL}`;

/** What would make pose mode work, for a model that lacks a ControlNet-UNet. */
export function poseRecipe(family: ModelFamily, builtin: boolean): string {
  if (builtin) return `Kiln's built-in models have no pose models; pose mode works with SD 1.5: ${SD15_POSE}.`;
  // Models Kiln builds from safetensors get a ControlNet-UNet built: only ONNX exports lack one.
  const built = 'or serve the model as diffusers safetensors weights, for which Kiln builds the ControlNet-UNet';
  if (family === 'sd1') return `For SD 1.x: ${SD15_POSE}; or give this model a ${CONTROL_UNET_PATH} of its own; ${built}.`;
  if (family === 'sdxl') {
    return (
      `None of the models \`kiln pull\` knows ships an SDXL ControlNet-UNet: pose mode on SDXL needs a model folder in the split layout ` +
      `(${CONTROL_UNET_PATH}, as in TensorStack/OnnxStack exports) ${built}, then \`kiln pull ${openposeAlias('sdxl')} && kiln pull ${DWPOSE_NAME}\`. ` +
      `Or use SD 1.5: ${SD15_POSE}.`
    );
  }
  return `Kiln knows no pose models for SD 2.x; pose mode works with SD 1.5: ${SD15_POSE}.`;
}

export interface PoseAssetPaths {
  /** `<model>/controlnet/model.onnx` (loaded by the engine as the model's controlUnet()); undefined where Kiln builds it. */
  controlUnet?: string;
  /** The OpenPose ControlNet graph (`.../model.onnx`). */
  controlNet: string;
  /** A folder holding `yolox_l.onnx` and `dw-ll_ucoco_384.onnx`. */
  dwpose: string;
  /** Where each came from, for logs. */
  sources: { controlNet: string; dwpose: string };
}

/** 400 `pose_model_missing`, param `user`: pose mode was asked for and cannot be applied. */
export class PoseUnavailableError extends AssetUnavailableError {
  override name = 'PoseUnavailableError';
  constructor(message: string) {
    super(message, 'user', 'pose_model_missing');
  }
}

const isFile = (path: string) => {
  try {
    return statSync(path).isFile();
  } catch {
    return false;
  }
};

const hasDwpose = (dir: string) => isFile(join(dir, DWPOSE_DETECTOR_FILE)) && isFile(join(dir, DWPOSE_POSE_FILE));

/** An installed folder by name: `$KILN_HOME/models/<name>/` first (cheap), else what `kiln models` knows by that name. */
function installedDir(name: string, home: string, holds: (dir: string) => boolean): string | undefined {
  const direct = join(home, 'models', name);
  if (holds(direct)) return direct;
  let found: string | undefined;
  try {
    found = findInstalled(name, { home })?.dir;
  } catch {
    found = undefined;
  }
  return found && holds(found) ? found : undefined;
}

/** A path or a folder holding model.onnx -> the graph file, if it exists. */
function graphAt(path: string): string | undefined {
  if (path.endsWith('.onnx')) return isFile(path) ? path : undefined;
  const inside = join(path, 'model.onnx');
  return isFile(inside) ? inside : undefined;
}

function kilnJsonValue(modelDir: string): unknown {
  const path = join(modelDir, 'kiln.json');
  if (!existsSync(path)) return undefined;
  try {
    const json = JSON.parse(readFileSync(path, 'utf8')) as unknown;
    return json && typeof json === 'object' && !Array.isArray(json) ? (json as Record<string, unknown>)[OPENPOSE_KILN_KEY] : undefined;
  } catch {
    return undefined; // a malformed kiln.json is reported when the model loads
  }
}

/**
 * Resolves the pose assets of the model in `modelDir` (shown to clients as `modelName`), or throws
 * PoseUnavailableError naming what is missing and how to install it.
 */
export function resolvePoseAssets(modelDir: string, modelName: string, home: string): PoseAssetPaths {
  const family = detectLayout(modelDir).family;
  const familyLabel = family === 'sdxl' ? 'SDXL' : 'SD 1.x/2.x';
  const alias = openposeAlias(family);
  const prefix = `Pose mode (user=cn / pose:<w>) cannot be used with the model '${modelName}'`;

  const kilnBuilt = isSafetensorsLayout(modelDir);
  const controlUnet = kilnBuilt ? undefined : join(modelDir, CONTROL_UNET_PATH);
  if (controlUnet && !isFile(controlUnet)) {
    throw new PoseUnavailableError(
      `${prefix}: it has no ControlNet-UNet (${CONTROL_UNET_PATH} in its folder, the UNet that takes ControlNet residuals). ` +
        poseRecipe(family, resolve(modelDir).startsWith(builtinModelsDir())),
    );
  }

  let controlNet: string | undefined;
  let controlNetSource = '';
  const own = graphAt(join(modelDir, OPENPOSE_FOLDER));
  if (own) {
    controlNet = own;
    controlNetSource = `${OPENPOSE_FOLDER}/ in the model folder`;
  } else {
    const configured = kilnJsonValue(modelDir);
    if (configured !== undefined && configured !== null) {
      const value = typeof configured === 'string' ? configured.trim() : '';
      const asPath = value !== '' && (/[\\/]/.test(value) || value.startsWith('.') || value.endsWith('.onnx'));
      if (value !== '') {
        const dir = asPath ? (isAbsolute(value) ? value : resolve(modelDir, value)) : installedDir(value, home, (d) => graphAt(d) !== undefined);
        controlNet = dir === undefined ? undefined : graphAt(dir);
      }
      if (!controlNet) {
        throw new PoseUnavailableError(
          `${prefix}: its kiln.json sets ${OPENPOSE_KILN_KEY} to ${JSON.stringify(configured)}, which is not ` +
            (asPath ? 'a model.onnx file or a folder holding one' : 'an installed OpenPose ControlNet') +
            `. Fix kiln.json, or install one with \`kiln pull ${asPath || value === '' ? alias : value}\`.`,
        );
      }
      controlNetSource = `kiln.json ${OPENPOSE_KILN_KEY}`;
    } else {
      const dir = installedDir(alias, home, (d) => graphAt(d) !== undefined);
      if (dir) {
        controlNet = graphAt(dir)!;
        controlNetSource = `installed ${alias}`;
      }
    }
  }
  if (!controlNet) {
    throw new PoseUnavailableError(
      `${prefix}: no OpenPose ControlNet is installed for it (${familyLabel}). Install it with \`kiln pull ${alias}\` ` +
        `(looked for ${OPENPOSE_FOLDER}/model.onnx in the model folder, ${OPENPOSE_KILN_KEY} in its kiln.json, and the installed model '${alias}').`,
    );
  }

  const graph = controlNet;
  // In order, each looked at only when the ones before it are missing.
  const candidates: [() => string | undefined, string][] = [
    [() => join(modelDir, ANNOTATOR_DIR), `${ANNOTATOR_DIR}/ in the model folder`],
    [() => join(dirname(graph), ANNOTATOR_DIR), `${ANNOTATOR_DIR}/ beside the ControlNet`],
    [() => installedDir(DWPOSE_NAME, home, hasDwpose), `installed ${DWPOSE_NAME}`],
    [() => join(home, ANNOTATOR_DIR), `$KILN_HOME/${ANNOTATOR_DIR}`],
  ];
  let dwpose: [string, string] | undefined;
  for (const [dirOf, source] of candidates) {
    const dir = dirOf();
    if (dir !== undefined && hasDwpose(dir)) {
      dwpose = [dir, source];
      break;
    }
  }
  if (!dwpose) {
    throw new PoseUnavailableError(
      `${prefix}: the DWPose pose estimator (${DWPOSE_DETECTOR_FILE} and ${DWPOSE_POSE_FILE}) is not installed. ` +
        `Install it with \`kiln pull ${DWPOSE_NAME}\` (looked in the model's ${ANNOTATOR_DIR}/, the ControlNet's ${ANNOTATOR_DIR}/, ` +
        `the installed model '${DWPOSE_NAME}' and $KILN_HOME/${ANNOTATOR_DIR}/).`,
    );
  }
  return { controlUnet, controlNet: graph, dwpose: dwpose[0], sources: { controlNet: controlNetSource, dwpose: dwpose[1] } };
}
