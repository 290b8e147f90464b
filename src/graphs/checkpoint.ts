/**
 * Single-file checkpoints as models: `kiln import FILE` writes a diffusers-shaped folder holding
 * the family's configs, scheduler and tokenizers (families.ts) and the file itself, hard-linked
 * (never copied: where a hard link is impossible the folder refers to the file by its path), with
 * a `kiln.json` naming it:
 *
 *   $KILN_HOME/models/NAME/
 *     model_index.json, scheduler/, tokenizer/ (+ tokenizer_2/), unet/config.json, vae/config.json,
 *     text_encoder/config.json (+ text_encoder_2/config.json)
 *     FILE.safetensors                 the checkpoint (hard link)
 *     kiln.json                        {"checkpoint": "FILE.safetensors", "family": "sd1", ...}
 *
 * The graphs code (convert.ts) builds such a folder like any diffusers folder, reading each
 * component's weights from the checkpoint through keys-ldm's name tables. kiln.json may also
 * name a separate VAE (`"vae"`: a .safetensors file, LDM- or diffusers-named, or a diffusers
 * `vae/` folder with its config.json) and `"prediction_type"`.
 *
 * Pickle files (.ckpt, .pt, .pth, .bin, .pkl) are refused by extension and by content: loading
 * one executes the Python code it carries.
 */
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, copyFileSync, existsSync, linkSync, mkdirSync, openSync, readdirSync, readSync, realpathSync, renameSync, rmSync, statSync } from 'node:fs';
import { basename, extname, isAbsolute, join, resolve } from 'node:path';
import { InvalidOptionError, ModelLoadError } from '../engine/errors.js';
import { isValidLoraName } from '../engine/loras.js';
import { copyConfigFolder, familyFolder, PREDICTION_TYPES, readJsonObject, writeFamilyFolder, writeJson, type FolderComponent, type PredictionType } from './families.js';
import { detectFamily, ldmVaeRename, MappedWeights, singleFileSources, type DetectedFamily, type SingleFileCheckpoint, type TensorView } from './keys-ldm.js';
import { readLora } from './lora.js';
import { openSafetensors, type SafetensorsFile } from './safetensors.js';
import { componentWeights, Params, SafetensorsWeights, type WeightSource } from './weights.js';
import { buildClipText } from './clip-text.js';
import { GraphBuilder } from './onnx-builder.js';
import { buildUnet } from './unet.js';
import { buildVaeDecoder, buildVaeEncoder } from './vae.js';

export const PICKLE_EXTENSIONS = ['.ckpt', '.pt', '.pth', '.bin', '.pkl', '.pickle'] as const;
export const KILN_JSON = 'kiln.json';

/** What a pickle file is, why Kiln will not open it, and what to do instead. */
export function pickleMessage(path: string, why: string): string {
  return (
    `${path} is a pickle file (${why}): PyTorch .ckpt/.pt/.pth/.bin files are Python pickles, and loading one runs ` +
    'whatever code it carries, so Kiln never opens them. Download the .safetensors version of the model instead (most ' +
    'model pages offer one), or convert the file once, in a sandbox you trust, with the safetensors library (e.g. its ' +
    'convert script: load with torch.load(weights_only=True), save with safetensors.torch.save_file)'
  );
}

/**
 * Refuses what is not a safetensors file before anything parses it: a pickle extension, or a
 * pickle / zip (torch.save's container) at the start of a file of any name. A missing file is a
 * ModelLoadError too.
 */
export function assertNotPickle(path: string): void {
  const ext = extname(path).toLowerCase();
  if ((PICKLE_EXTENSIONS as readonly string[]).includes(ext)) throw new ModelLoadError(pickleMessage(path, `its extension is ${ext}`), path);
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch {
    throw new ModelLoadError(`${path} does not exist or cannot be read`, path);
  }
  const head = Buffer.alloc(16);
  let n: number;
  try {
    n = readSync(fd, head, 0, 16, 0);
  } finally {
    closeSync(fd);
  }
  // A safetensors header is JSON right after the 8-byte length, so byte 8 is "{".
  if (n >= 9 && head[8] === 0x7b) return;
  if (n >= 4 && head[0] === 0x50 && head[1] === 0x4b && (head[2] === 3 || head[2] === 5) && (head[3] === 4 || head[3] === 6)) {
    throw new ModelLoadError(pickleMessage(path, 'it is a zip archive, as torch.save writes, whatever its name says'), path);
  }
  if (n >= 2 && head[0] === 0x80 && head[1]! >= 2 && head[1]! <= 5) {
    throw new ModelLoadError(pickleMessage(path, 'it starts with a pickle protocol header, whatever its name says'), path);
  }
}

/** Opens a safetensors file after the pickle check. */
export function openWeightsFile(path: string): SafetensorsFile {
  assertNotPickle(path);
  return openSafetensors(path);
}

// ---------------------------------------------------------------------------------------------
// kiln.json

export interface LoraRef {
  name: string;
  scale: number;
}

/** The keys of a model's kiln.json that Kiln's graphs read (generation defaults are model.ts's). */
export interface ModelSettingsFile {
  checkpoint?: string;
  vae?: string;
  prediction_type?: PredictionType;
  loras?: LoraRef[];
  [key: string]: unknown;
}

/** A model folder's kiln.json, checked (undefined when absent). */
export function readKilnJson(dir: string): ModelSettingsFile | undefined {
  const path = join(dir, KILN_JSON);
  if (!existsSync(path)) return undefined;
  const raw = readJsonObject(path, `${KILN_JSON} of ${dir}`) as ModelSettingsFile;
  const fail = (what: string): never => {
    throw new ModelLoadError(`${path}: ${what}`, path);
  };
  for (const key of ['checkpoint', 'vae'] as const) if (raw[key] !== undefined && (typeof raw[key] !== 'string' || raw[key] === '')) fail(`"${key}" must be a file path`);
  if (raw.prediction_type !== undefined && !PREDICTION_TYPES.includes(raw.prediction_type)) fail(`"prediction_type" is one of ${PREDICTION_TYPES.join(', ')}`);
  if (raw.loras !== undefined) {
    if (!Array.isArray(raw.loras)) fail('"loras" must be a list of { "name", "scale" }');
    for (const l of raw.loras as unknown[]) {
      const o = l as Partial<LoraRef> | null;
      if (!o || typeof o !== 'object' || typeof o.name !== 'string' || (o.scale !== undefined && (typeof o.scale !== 'number' || !Number.isFinite(o.scale)))) {
        fail(`each of "loras" is { "name": string, "scale": number }, got ${JSON.stringify(l)}`);
      }
    }
    raw.loras = (raw.loras as Partial<LoraRef>[]).map((l) => ({ name: l.name!, scale: l.scale ?? 1 }));
  }
  return raw;
}

/** A path kiln.json gives: absolute, or relative to the model folder. */
export function settingsPath(dir: string, value: string): string {
  return isAbsolute(value) ? value : resolve(dir, value);
}

// ---------------------------------------------------------------------------------------------
// Weight sources of a checkpoint folder

export interface FolderSources {
  sources: Partial<Record<FolderComponent, WeightSource>>;
  /** Stored tensors that no rule maps (reported, not fatal: the pages say what is missing). */
  warnings: string[];
  /** The checkpoint's detected family, when the weights come from one. */
  detected?: DetectedFamily;
}

const examples = (names: string[], n = 5): string => `${names.slice(0, n).join(', ')}${names.length > n ? ', ...' : ''}`;

/**
 * The weights of each component of a pipeline folder: its component folders' safetensors, or
 * the single file kiln.json names (read with the folder's unet/vae configs), and kiln.json's
 * separate VAE over either.
 */
export function folderSources(src: string, components: readonly FolderComponent[], configs: Partial<Record<FolderComponent, Record<string, unknown>>>): FolderSources {
  const settings = readKilnJson(src);
  const out: FolderSources = { sources: {}, warnings: [] };
  let ck: SingleFileCheckpoint | undefined;
  if (settings?.checkpoint) {
    const path = settingsPath(src, settings.checkpoint);
    assertNotPickle(path);
    ck = singleFileSources(path, { unet: configs.unet ?? {}, vae: configs.vae });
    out.detected = ck.detected;
    if (ck.unmapped.length) out.warnings.push(`${path}: ${ck.unmapped.length} tensor(s) match no component and are left out: ${examples(ck.unmapped)}`);
  }
  for (const c of components) {
    if (c === 'vae' && settings?.vae) {
      out.sources.vae = vaeSource(settingsPath(src, settings.vae), configs.vae, out.warnings);
    } else if (ck) {
      const source = ck[c];
      if (!source) {
        throw new ModelLoadError(
          c === 'vae'
            ? `${ck.file.path} holds no VAE (first_stage_model.*): give one with \`kiln import --vae FILE\` or "vae" in kiln.json`
            : `${ck.file.path} (${ck.detected.description}) has no ${c} weights, which this folder's model_index.json needs`,
          ck.file.path,
        );
      }
      out.sources[c] = source;
    } else {
      out.sources[c] = componentWeights(join(src, c), c);
    }
  }
  return out;
}

/** The config a separate VAE folder carries (a diffusers `vae/` folder), else undefined. */
export function vaeFolderConfig(path: string): Record<string, unknown> | undefined {
  return existsSync(path) && statSync(path).isDirectory() ? readJsonObject(join(path, 'config.json'), `the VAE folder's config.json`) : undefined;
}

/**
 * A separate VAE: a diffusers `vae/` folder, a diffusers-named AutoencoderKL file, or an LDM-named
 * one (`encoder.down.0...`, with or without `first_stage_model.`, as the VAE files on model sites).
 */
export function vaeSource(path: string, config: Record<string, unknown> | undefined, warnings: string[] = []): WeightSource {
  if (existsSync(path) && statSync(path).isDirectory()) return componentWeights(path, 'vae');
  const file = openWeightsFile(path);
  const names = [...file.tensors.keys()];
  if (names.some((n) => /^(encoder\.down_blocks|decoder\.up_blocks)\./.test(n))) return new SafetensorsWeights('vae', path, [file]);
  const prefix = names.some((n) => n.startsWith('first_stage_model.')) ? 'first_stage_model.' : '';
  const blocks = Array.isArray(config?.block_out_channels) ? config.block_out_channels.length : 1 + Math.max(0, ...names.map((n) => Number(/encoder\.down\.(\d+)\./.exec(n)?.[1] ?? -1)));
  const views = new Map<string, TensorView>();
  const unmapped: string[] = [];
  for (const t of file.tensors.values()) {
    if (!t.name.startsWith(prefix)) continue;
    const rel = t.name.slice(prefix.length);
    if (/^(loss\.|model_ema\.)/.test(rel)) continue; // training leftovers
    const renamed = ldmVaeRename(rel, t.shape, blocks);
    if (!renamed) {
      unmapped.push(t.name);
      continue;
    }
    for (const { key, view } of renamed) views.set(key, { tensor: t, ...view });
  }
  if (views.size === 0) {
    throw new ModelLoadError(`${path} is not a VAE Kiln can read: none of its ${names.length} tensors are AutoencoderKL weights (e.g. "${names[0] ?? ''}")`, path);
  }
  if (unmapped.length) warnings.push(`${path}: ${unmapped.length} tensor(s) are not VAE weights and are left out: ${examples(unmapped)}`);
  return new MappedWeights('vae', path, file, views);
}

// ---------------------------------------------------------------------------------------------
// Importing

export interface ImportOptions {
  /** Folder to create (must not exist unless `force`). */
  dir: string;
  /** A separate VAE (file or diffusers folder), hard-linked into the folder when a file. */
  vae?: string;
  /** A diffusers folder to take every config from (instead of Kiln's shipped family configs). */
  config?: string;
  predictionType?: PredictionType;
  /** Replace an existing folder. */
  force?: boolean;
  /** Refer to the file by path instead of hard-linking it (`--model FILE` uses this). */
  reference?: boolean;
  /** Extra kiln.json keys (e.g. where a pull came from). */
  extra?: Record<string, unknown>;
}

export interface ImportResult {
  dir: string;
  detected: DetectedFamily;
  /** How the checkpoint is held: a hard link in the folder, or a reference to its path. */
  held: 'link' | 'reference' | 'moved';
  checkpoint: string;
}

/** The components a family's folder has. */
function componentsOf(detected: DetectedFamily): FolderComponent[] {
  return detected.family === 'sdxl' ? ['unet', 'vae', 'text_encoder', 'text_encoder_2'] : ['unet', 'vae', 'text_encoder'];
}

const PAGES: Record<FolderComponent, ((g: GraphBuilder, config: Record<string, unknown>, p: Params) => unknown)[]> = {
  unet: [buildUnet],
  vae: [buildVaeEncoder, buildVaeDecoder],
  text_encoder: [buildClipText],
  text_encoder_2: [buildClipText],
};

/**
 * Builds every graph of a folder in memory (weights stay where they are, only their names and
 * shapes are read): a checkpoint that does not fit its configs fails here, naming what differs.
 */
function checkFolder(dir: string, components: readonly FolderComponent[], file: string, configsName: string): void {
  const configs = Object.fromEntries(components.map((c) => [c, readJsonObject(join(dir, c, 'config.json'), `${c}/config.json`)]));
  const vae = readKilnJson(dir)?.vae;
  const vaeConfig = vae ? vaeFolderConfig(settingsPath(dir, vae)) : undefined;
  if (vaeConfig) configs.vae = vaeConfig;
  const unetKeys = (): string[] => singleFileSources(settingsPath(dir, readKilnJson(dir)!.checkpoint!), { unet: configs.unet! }).unmapped.filter((n) => n.startsWith('model.diffusion_model.'));
  const hint = 'for a model of another shape, import it with `kiln import FILE --config DIR`, DIR a diffusers folder of that model (its configs are used)';
  const unmapped = unetKeys();
  if (unmapped.length) {
    throw new ModelLoadError(`${file}: ${unmapped.length} UNet tensors do not fit ${configsName} (e.g. ${examples(unmapped, 3)}); ${hint}`, file);
  }
  const { sources } = folderSources(dir, components, configs);
  for (const c of components) {
    for (const page of PAGES[c]) {
      const g = new GraphBuilder(c);
      try {
        page(g, configs[c]!, Params.of(g, sources[c]!));
      } catch (err) {
        // Named by the file people gave, not by its link in the folder being written.
        const linked = settingsPath(dir, readKilnJson(dir)!.checkpoint!);
        if (err instanceof ModelLoadError) throw new ModelLoadError(`${file} does not fit ${configsName}: ${err.message.split(linked).join(file)}; ${hint}`, file);
        throw err;
      }
    }
  }
}

/** Hard-links `from` to `to`; false when the file systems differ (or links are refused). */
function tryLink(from: string, to: string): boolean {
  try {
    linkSync(from, to);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EXDEV' || code === 'EPERM' || code === 'EMLINK' || code === 'ENOTSUP' || code === 'EOPNOTSUPP') return false;
    throw err;
  }
}

/**
 * Installs single-file checkpoint `file` as a model folder (see the file comment). Everything is
 * written into a temporary folder beside `dir` and renamed into place, so a failed import leaves
 * nothing behind. `move`: the file is renamed into the folder (a finished download).
 */
export function importCheckpoint(file: string, options: ImportOptions & { move?: boolean }): ImportResult {
  const path = resolve(file);
  const ck = openWeightsFile(path);
  let detected: DetectedFamily;
  try {
    detected = detectFamily(ck);
  } catch (err) {
    // A LoRA or a VAE given as a model gets the command that takes it.
    if (err instanceof ModelLoadError && /looks like a LoRA file/.test(err.message)) {
      throw new ModelLoadError(`${err.message}. Install it with \`kiln import --lora ${file}\``, path);
    }
    throw err;
  }
  const components = componentsOf(detected);
  const dir = resolve(options.dir);
  if (existsSync(dir) && !options.force) throw new InvalidOptionError(`${dir} already exists (pass --force to replace it, or --name another name)`, '--name');
  const parent = resolve(dir, '..');
  mkdirSync(parent, { recursive: true });
  const tmp = join(parent, `.import-${basename(dir)}-${randomBytes(4).toString('hex')}`);
  mkdirSync(tmp);
  try {
    if (options.config) {
      copyConfigFolder(resolve(options.config), tmp, components);
      // The input channels are the file's (an inpainting file read with a text-to-image folder's configs).
      const unetPath = join(tmp, 'unet', 'config.json');
      writeJson(unetPath, { ...readJsonObject(unetPath, 'unet/config.json'), in_channels: detected.inChannels });
    } else writeFamilyFolder(tmp, familyFolder(detected, options.predictionType));
    const settings: ModelSettingsFile = { ...options.extra, family: detected.family, description: detected.description };
    let held: ImportResult['held'];
    const name = basename(path);
    if (options.move) {
      renameSync(path, join(tmp, name));
      settings.checkpoint = name;
      held = 'moved';
    } else if (!options.reference && tryLink(path, join(tmp, name))) {
      settings.checkpoint = name;
      held = 'link';
    } else {
      settings.checkpoint = path;
      held = 'reference';
    }
    if (options.vae) {
      const vae = resolve(options.vae);
      if (!existsSync(vae)) throw new ModelLoadError(`the VAE ${vae} does not exist`, vae);
      if (statSync(vae).isDirectory()) {
        settings.vae = vae;
      } else {
        vaeSource(vae, undefined); // a bad file fails here, not at the first build
        const vaeName = `vae-${basename(vae)}`;
        settings.vae = !options.reference && tryLink(vae, join(tmp, vaeName)) ? vaeName : vae;
      }
    }
    if (options.predictionType || (detected.family === 'sd2' && !options.config)) {
      // Written out so that people see the assumption and can flip it.
      settings.prediction_type = options.predictionType ?? (familyFolder(detected).scheduler.prediction_type as PredictionType);
    }
    writeJson(join(tmp, KILN_JSON), settings);
    // The weights must fit the configs now, not at the first generation.
    checkFolder(tmp, components, path, options.config ? `the configs of ${options.config}` : `Kiln's ${detected.description} configs`);
    if (existsSync(dir)) rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
    return { dir, detected, held, checkpoint: settings.checkpoint === name ? join(dir, name) : path };
  } catch (err) {
    if (options.move && existsSync(join(tmp, basename(path))) && !existsSync(path)) renameSync(join(tmp, basename(path)), path);
    rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
}

/**
 * The model folder Kiln keeps for a checkpoint file given as a model (`--model FILE`): imported
 * once under `<cacheDir>/checkpoints/<hash of its path>/<file stem>/`, by reference, and imported
 * again when the file changes.
 */
export function fileModelFolder(file: string, cacheDir: string): string {
  const path = resolve(file);
  assertNotPickle(path);
  const real = realpathSync(path);
  const st = statSync(real);
  const stamp = `${st.size}:${st.mtimeMs}:${st.ino}`;
  const root = join(cacheDir, 'checkpoints', createHash('sha256').update(real).digest('hex').slice(0, 16));
  const stem = basename(real).replace(/\.safetensors$/i, '') || 'model';
  const dir = join(root, stem.replace(/[^\w.+-]/g, '_'));
  const current = existsSync(dir) ? readKilnJson(dir) : undefined;
  if (current && current.source_stamp === stamp) return dir;
  if (existsSync(root)) for (const f of readdirSync(root)) if (f !== basename(dir)) rmSync(join(root, f), { recursive: true, force: true });
  importCheckpoint(real, { dir, reference: true, force: true, extra: { source_stamp: stamp } });
  return dir;
}

/** Whether what a user typed names a weights file (a checkpoint or a pickle) rather than a model folder or name. */
export function isWeightsFilePath(nameOrPath: string): boolean {
  const ext = extname(nameOrPath).toLowerCase();
  return ext === '.safetensors' || (PICKLE_EXTENSIONS as readonly string[]).includes(ext);
}

// ---------------------------------------------------------------------------------------------
// LoRA files

/**
 * Installs a LoRA file as `<lorasDir>/<name>.safetensors` (hard link, else a copy: LoRA files are
 * small). The file must read as a LoRA.
 */
export function importLora(file: string, options: { lorasDir: string; name?: string; force?: boolean; move?: boolean }): { name: string; path: string; modules: number } {
  const path = resolve(file);
  assertNotPickle(path);
  const lora = readLora(path);
  const name = options.name ?? basename(path).replace(/\.safetensors$/i, '');
  if (!isValidLoraName(name)) throw new InvalidOptionError(`"${name}" is not a valid LoRA name (letters, digits, . _ + -; pass --name)`, '--name');
  mkdirSync(options.lorasDir, { recursive: true });
  const target = join(options.lorasDir, `${name}.safetensors`);
  if (existsSync(target) && !options.force) throw new InvalidOptionError(`${target} already exists (pass --force to replace it, or --name another name)`, '--name');
  const tmp = `${target}.${randomBytes(4).toString('hex')}.tmp`;
  if (options.move) renameSync(path, tmp);
  else if (!tryLink(path, tmp)) copyFileSync(path, tmp); // across file systems: one copy of a small file
  renameSync(tmp, target);
  return { name, path: target, modules: lora.modules.length };
}
