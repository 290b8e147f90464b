/**
 * Model aliases: short names for Hub repositories, built in and extendable by the user.
 *
 * An alias names a repository (and optionally a revision). By default it installs the
 * repository's diffusion layout (select.ts: the diffusers safetensors layout when complete, else
 * the ONNX one; `"format"` forces one) into `$KILN_HOME/models/<alias>/`. An alias
 * can instead list explicit files, for things that are not diffusion pipelines (a ControlNet
 * graph, the DWPose pose estimator): those files are installed, under the names given by `as`
 * (default: their repository path), into `$KILN_HOME/models/<alias>/` or into the folder named
 * by `dir` (relative to `$KILN_HOME`, e.g. `annotators/dwpose`). External-data files an ONNX
 * file refers to come along automatically, beside it.
 *
 * The user's table is `$KILN_HOME/aliases.json`; its entries override built-in ones:
 *
 *   {
 *     "my-sdxl": "someone/sdxl-onnx@v2",
 *     "sd15": { "repo": "someone/sd15", "format": "safetensors" },
 *     "pose": { "repo": "yzd-v/DWPose", "files": ["yolox_l.onnx", "dw-ll_ucoco_384.onnx"],
 *               "kind": "annotator", "dir": "annotators/dwpose" },
 *     "cn": { "repo": "TensorStack/ControlNet-onnx",
 *             "files": [{ "path": "SD/OpenPose/model.onnx", "as": "model.onnx" }], "kind": "controlnet" },
 *     "dall-e-3": { "model": "be-stable-diffusion-xl-base-1.0" }
 *   }
 *
 * An entry with `"model"` instead of `"repo"` is a serving alias: the server answers requests
 * naming it with that model (an installed name, or a folder). Nothing is pulled for it.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { PullError } from './errors.js';
import { safeRelativeLocation } from './onnx-refs.js';
import type { LayoutFormat } from './select.js';

/** What an installed folder holds. Only `diffusion` folders are models the engine serves. */
export type InstallKind = 'diffusion' | 'controlnet' | 'annotator' | 'files';

export interface AliasFile {
  /** Path in the repository. */
  path: string;
  /** Path in the install folder (default: `path`). */
  as?: string;
}

export interface AliasEntry {
  repo: string;
  /** Branch, tag or commit (default `main`). */
  revision?: string;
  /** Explicit files; absent means "the diffusion layout of the repository". */
  files?: AliasFile[];
  /** Diffusion aliases: the layout to install (default: chosen by select.ts's chooseLayout). */
  format?: LayoutFormat;
  /** Default: `diffusion` without `files`, `files` with them. */
  kind?: InstallKind;
  /** Install folder relative to `$KILN_HOME`, for file aliases (default `models/<alias>`). */
  dir?: string;
  description?: string;
  /** Approximate download size, for people. */
  size?: string;
}

export const REFERENCE_DEFAULT_ALIAS = 'be-stable-diffusion-xl-base-1.0';

/** The built-in aliases. Sizes are approximate, from the Hub listings in the contracts reference (§6). */
export const BUILTIN_ALIASES: Readonly<Record<string, AliasEntry>> = Object.freeze({
  [REFERENCE_DEFAULT_ALIAS]: {
    repo: 'stabilityai/stable-diffusion-xl-base-1.0',
    // The fp16 safetensors (unet 5.14 GB, text encoders 1.39 GB + 246 MB, vae 167 MB) are half
    // the size of the repository's fp32 ONNX export (~14 GB); Kiln builds its graphs from them.
    format: 'safetensors',
    description: "SDXL base 1.0, the reference's default: the fp16 safetensors weights in Stability AI's official repository (Kiln builds the ONNX graphs)",
    size: '~6.9 GB',
  },
  'stable-diffusion-v1-5': {
    repo: 'onnx-community/stable-diffusion-v1-5-ONNX',
    description: 'Stable Diffusion 1.5, fp32 (diffusers conversion script layout, unet weights.pb)',
    size: '~4.3 GB',
  },
  'stable-diffusion-v1-5-controlnet': {
    repo: 'TensorStack/stable-diffusion-v1-5-onnx',
    description: 'Stable Diffusion 1.5, fp16 weights (OnnxStack), with the controlnet/ UNet that the controlnet-openpose graph plugs into',
    size: '~4 GB',
  },
  'lcm-dreamshaper-v7': {
    repo: 'SimianLuo/LCM_Dreamshaper_v7',
    description: 'LCM Dreamshaper v7 (optimum ONNX): 4-8 step latent consistency model',
    size: '~4.3 GB',
  },
  'controlnet-openpose': {
    repo: 'TensorStack/ControlNet-onnx',
    files: [{ path: 'SD/OpenPose/model.onnx', as: 'model.onnx' }],
    kind: 'controlnet',
    description: 'OpenPose ControlNet for SD 1.5 (split layout: pairs with stable-diffusion-v1-5-controlnet)',
    size: '~740 MB',
  },
  'controlnet-openpose-sdxl': {
    repo: 'TensorStack/ControlNet-amuse',
    files: [{ path: 'StableDiffusionXL/OpenPose/model.onnx', as: 'model.onnx' }],
    kind: 'controlnet',
    description: 'OpenPose ControlNet for SDXL (split layout, 9+1 residuals; its model.onnx.data comes along)',
    size: '~2.5 GB',
  },
  dwpose: {
    repo: 'yzd-v/DWPose',
    files: [{ path: 'yolox_l.onnx' }, { path: 'dw-ll_ucoco_384.onnx' }],
    kind: 'annotator',
    description: 'DWPose: YOLOX-L person detector + RTMPose-l whole-body pose (for OpenPose ControlNet edits)',
    size: '~350 MB',
  },
  // Image prompts (src/catalog/image-prompt-assets.ts): h94's files under $KILN_HOME/ip-adapters/,
  // each pull in its own folder (a pull replaces its whole folder), the encoders where h94 keeps them.
  ...ipAdapterAliases(),
  // Tiny decoders for previews (src/engine/tiny-decoder.ts), each in $KILN_HOME/previews/<alias>/:
  // the diffusers AutoencoderTiny files (config + safetensors; Kiln builds its decoder graph).
  ...previewDecoderAliases(),
} satisfies Record<string, AliasEntry>);

function previewDecoderAliases(): Record<string, AliasEntry> {
  const decoder = (alias: string, repo: string, description: string): [string, AliasEntry] => [
    alias,
    { repo, files: [{ path: 'config.json' }, { path: 'diffusion_pytorch_model.safetensors' }], kind: 'files', dir: `previews/${alias}`, description, size: '~10 MB' },
  ];
  return Object.fromEntries([
    decoder('taesd', 'madebyollin/taesd', 'TAESD, the tiny VAE decoder of SD 1.x / 2.x latents: streamed previews that look like the final image'),
    decoder('taesdxl', 'madebyollin/taesdxl', 'TAESDXL, the tiny VAE decoder of SDXL latents: streamed previews that look like the final image'),
  ]);
}

function ipAdapterAliases(): Record<string, AliasEntry> {
  const adapter = (alias: string, path: string, description: string, size: string): [string, AliasEntry] => [
    alias,
    { repo: 'h94/IP-Adapter', files: [{ path, as: path.split('/').at(-1)! }], kind: 'files', dir: `ip-adapters/${alias}`, description, size },
  ];
  const encoder = (alias: string, dir: string, description: string, size: string): [string, AliasEntry] => [
    alias,
    {
      repo: 'h94/IP-Adapter',
      files: ['config.json', 'model.safetensors'].map((f) => ({ path: `${dir}/${f}`, as: f })),
      kind: 'files',
      dir: `ip-adapters/${dir}`,
      description,
      size,
    },
  ];
  return Object.fromEntries([
    adapter('ip-adapter-sd15', 'models/ip-adapter_sd15.safetensors', 'IP-Adapter for SD 1.5 (image prompts: the style weight); needs ip-adapter-image-encoder', '~45 MB'),
    adapter('ip-adapter-plus-face-sd15', 'models/ip-adapter-plus-face_sd15.safetensors', 'IP-Adapter Plus Face for SD 1.5 (image prompts: the face weight); needs ip-adapter-image-encoder', '~98 MB'),
    adapter('ip-adapter-sdxl-vit-h', 'sdxl_models/ip-adapter_sdxl_vit-h.safetensors', 'IP-Adapter for SDXL, ViT-H encoder (image prompts: the style weight); needs ip-adapter-image-encoder', '~700 MB'),
    adapter('ip-adapter-sdxl', 'sdxl_models/ip-adapter_sdxl.safetensors', 'IP-Adapter for SDXL, bigG encoder (the style weight, when ip-adapter-sdxl-vit-h is absent); needs ip-adapter-image-encoder-sdxl', '~700 MB'),
    adapter('ip-adapter-plus-face-sdxl-vit-h', 'sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors', 'IP-Adapter Plus Face for SDXL (image prompts: the face weight); needs ip-adapter-image-encoder', '~850 MB'),
    encoder('ip-adapter-image-encoder', 'models/image_encoder', 'CLIP ViT-H/14 image encoder of the SD 1.5 and *_vit-h SDXL IP-Adapters', '~2.5 GB'),
    encoder('ip-adapter-image-encoder-sdxl', 'sdxl_models/image_encoder', 'CLIP ViT-bigG/14 image encoder of ip-adapter-sdxl', '~3.7 GB'),
  ]);
}

export const ALIAS_FILE = 'aliases.json';

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const REPO_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,95}\/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$/;
const REVISION_RE = /^[A-Za-z0-9._\/-]{1,255}$/;
const KINDS: readonly InstallKind[] = ['diffusion', 'controlnet', 'annotator', 'files'];
const FORMATS: readonly LayoutFormat[] = ['onnx', 'safetensors'];

/** Whether `name` can be a folder name under models/ (and so an alias or `--name`). */
export function isValidModelName(name: string): boolean {
  return NAME_RE.test(name) && name !== '.' && name !== '..' && !name.endsWith('.lock');
}

function checkRelative(path: string, what: string, file: string): string {
  const norm = safeRelativeLocation(path);
  if (norm === undefined) {
    throw new PullError(`${file}: ${what} "${path}" must be a relative path inside its folder`, 'alias-file');
  }
  return norm;
}

/** Parses `owner/name[@revision]` (or an alias value) into repo and revision. */
export function parseRepoSpec(spec: string): { repo: string; revision: string | undefined } {
  let s = spec.trim().replace(/^https?:\/\/(www\.)?(huggingface\.co|hf\.co)\//, '').replace(/^hf\.co\//, '');
  let revision: string | undefined;
  const at = s.indexOf('@');
  if (at >= 0) {
    revision = s.slice(at + 1);
    s = s.slice(0, at);
    if (!REVISION_RE.test(revision) || revision.includes('..')) throw new PullError(`invalid revision "${revision}" in "${spec}"`, 'bad-spec');
  }
  // A pasted Hub page URL may end in /tree/<revision>.
  const tree = /^([^/]+\/[^/]+)\/tree\/(.+)$/.exec(s);
  if (tree && !revision) {
    s = tree[1]!;
    revision = decodeURIComponent(tree[2]!);
  }
  s = s.replace(/\/+$/, '');
  return { repo: s, revision };
}

function validateEntry(name: string, raw: unknown, file: string): AliasEntry {
  if (typeof raw === 'string') {
    const { repo, revision } = parseRepoSpec(raw);
    if (!REPO_RE.test(repo)) throw new PullError(`${file}: alias "${name}": "${raw}" is not an owner/name repository id`, 'alias-file');
    return { repo, revision };
  }
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) {
    throw new PullError(`${file}: alias "${name}" must be a "owner/name[@revision]" string or an object with "repo"`, 'alias-file');
  }
  const o = raw as Record<string, unknown>;
  if (typeof o.repo !== 'string') throw new PullError(`${file}: alias "${name}" has no "repo"`, 'alias-file');
  const parsed = parseRepoSpec(o.repo);
  if (!REPO_RE.test(parsed.repo)) throw new PullError(`${file}: alias "${name}": "${o.repo}" is not an owner/name repository id`, 'alias-file');
  const entry: AliasEntry = { repo: parsed.repo, revision: parsed.revision };
  if (o.revision !== undefined) {
    if (typeof o.revision !== 'string' || !REVISION_RE.test(o.revision)) throw new PullError(`${file}: alias "${name}": bad "revision"`, 'alias-file');
    entry.revision = o.revision;
  }
  if (o.files !== undefined) {
    if (!Array.isArray(o.files) || o.files.length === 0) throw new PullError(`${file}: alias "${name}": "files" must be a non-empty list`, 'alias-file');
    entry.files = o.files.map((f: unknown) => {
      if (typeof f === 'string') return { path: checkRelative(f, 'file', file) };
      if (f && typeof f === 'object' && typeof (f as AliasFile).path === 'string') {
        const { path, as } = f as AliasFile;
        if (as !== undefined && typeof as !== 'string') throw new PullError(`${file}: alias "${name}": "as" must be a string`, 'alias-file');
        return { path: checkRelative(path, 'file', file), ...(as !== undefined ? { as: checkRelative(as, '"as"', file) } : {}) };
      }
      throw new PullError(`${file}: alias "${name}": each file is a path or { "path", "as" }`, 'alias-file');
    });
  }
  if (o.kind !== undefined) {
    if (!KINDS.includes(o.kind as InstallKind)) throw new PullError(`${file}: alias "${name}": "kind" is one of ${KINDS.join(', ')}`, 'alias-file');
    entry.kind = o.kind as InstallKind;
  }
  if (entry.kind === 'diffusion' && entry.files) throw new PullError(`${file}: alias "${name}": a diffusion alias takes no "files"`, 'alias-file');
  if (entry.kind && entry.kind !== 'diffusion' && !entry.files) throw new PullError(`${file}: alias "${name}": kind "${entry.kind}" needs "files"`, 'alias-file');
  if (o.format !== undefined) {
    if (!FORMATS.includes(o.format as LayoutFormat)) throw new PullError(`${file}: alias "${name}": "format" is one of ${FORMATS.join(', ')}`, 'alias-file');
    if (entry.files) throw new PullError(`${file}: alias "${name}": "format" is for diffusion aliases, not file lists`, 'alias-file');
    entry.format = o.format as LayoutFormat;
  }
  if (o.dir !== undefined) {
    if (typeof o.dir !== 'string' || !entry.files) throw new PullError(`${file}: alias "${name}": "dir" is a folder for file aliases`, 'alias-file');
    entry.dir = checkRelative(o.dir, '"dir"', file);
  }
  if (typeof o.description === 'string') entry.description = o.description;
  if (typeof o.size === 'string') entry.size = o.size;
  return entry;
}

/** Whether an aliases.json value is a serving alias (`{ "model": ... }`, no `repo`). */
function isModelAliasValue(value: unknown): value is { model: unknown } {
  return !!value && typeof value === 'object' && !Array.isArray(value) && 'model' in value && !('repo' in value);
}

/** The entries of `$KILN_HOME/aliases.json` (empty when the file is absent), names checked. Throws on a malformed file. */
function readAliasFile(home: string): { file: string; entries: [string, unknown][] } {
  const file = join(home, ALIAS_FILE);
  if (!existsSync(file)) return { file, entries: [] };
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new PullError(`${file} is not valid JSON: ${(err as Error).message}`, 'alias-file');
  }
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) throw new PullError(`${file} must hold a JSON object of aliases`, 'alias-file');
  const table = (raw as { aliases?: unknown }).aliases && typeof (raw as { aliases?: unknown }).aliases === 'object' ? (raw as { aliases: object }).aliases : raw;
  const entries: [string, unknown][] = [];
  for (const [name, value] of Object.entries(table as Record<string, unknown>)) {
    if (name.startsWith('$') || name === 'aliases') continue; // room for "$schema"/comments
    if (!isValidModelName(name)) throw new PullError(`${file}: "${name}" is not a valid alias name (letters, digits, . _ -)`, 'alias-file');
    entries.push([name, value]);
  }
  return { file, entries };
}

/** The user's pull aliases from `$KILN_HOME/aliases.json` (serving aliases left out). Throws on a malformed file. */
export function readUserAliases(home: string): Record<string, AliasEntry> {
  const { file, entries } = readAliasFile(home);
  const out: Record<string, AliasEntry> = {};
  for (const [name, value] of entries) {
    if (isModelAliasValue(value)) continue;
    out[name] = validateEntry(name, value, file);
  }
  return out;
}

/**
 * The user's serving aliases from `$KILN_HOME/aliases.json`: `{ "dall-e-3": { "model": "sdxl" } }`
 * gives `{ "dall-e-3": "sdxl" }`. Throws on a malformed file.
 */
export function readModelAliases(home: string): Record<string, string> {
  const { file, entries } = readAliasFile(home);
  const out: Record<string, string> = {};
  for (const [name, value] of entries) {
    if (!isModelAliasValue(value)) continue;
    const target = value.model;
    if (typeof target !== 'string' || target.trim() === '' || target.length > 1024) {
      throw new PullError(`${file}: alias "${name}": "model" must name an installed model or a model folder`, 'alias-file');
    }
    out[name] = target;
  }
  return out;
}

/** Built-in aliases overlaid with the user's. */
export function aliasTable(home: string): Record<string, AliasEntry> {
  return { ...BUILTIN_ALIASES, ...readUserAliases(home) };
}

/** The alias table, or only the built-in one when the user's file is malformed (for read paths that must not fail). */
export function aliasTableLenient(home: string): Record<string, AliasEntry> {
  try {
    return aliasTable(home);
  } catch {
    return { ...BUILTIN_ALIASES };
  }
}

/** What `kiln pull SPEC` fetches. */
export interface PullTarget {
  repo: string;
  revision: string;
  /** The alias SPEC named, if any. */
  alias?: string;
  files?: AliasFile[];
  kind: InstallKind;
  /** The layout the alias asks for (diffusion aliases). */
  format?: LayoutFormat;
  /** The install name (folder under models/) used when --name is not given. */
  defaultName: string;
  /** For file aliases with `dir`: the install folder relative to $KILN_HOME. */
  dir?: string;
}

/** Turns `owner/name[@rev]`, a Hub URL, or `alias[@rev]` into what to fetch. */
export function resolvePullSpec(spec: string, home: string): PullTarget {
  const { repo, revision } = parseRepoSpec(spec);
  if (repo.includes('/')) {
    if (!REPO_RE.test(repo)) throw new PullError(`"${spec}" is not a Hub repository id (owner/name[@revision])`, 'bad-spec');
    return { repo, revision: revision ?? 'main', kind: 'diffusion', defaultName: repo.split('/')[1]! };
  }
  const table = aliasTable(home);
  const key = table[repo] ? repo : Object.keys(table).find((k) => k.toLowerCase() === repo.toLowerCase());
  const entry = key ? table[key] : undefined;
  if (!key || !entry) {
    const served = readModelAliases(home)[repo];
    if (served !== undefined) {
      throw new PullError(`"${repo}" is a serving alias for "${served}" in ${join(home, ALIAS_FILE)}: there is nothing to pull for it`, 'unknown-alias');
    }
    throw new PullError(
      `"${repo}" is neither an alias nor an owner/name repository id. Aliases: ${Object.keys(table).sort().join(', ')} ` +
        `(add your own in ${join(home, ALIAS_FILE)})`,
      'unknown-alias',
    );
  }
  return {
    repo: entry.repo,
    revision: revision ?? entry.revision ?? 'main',
    alias: key,
    files: entry.files,
    kind: entry.kind ?? (entry.files ? 'files' : 'diffusion'),
    ...(entry.format ? { format: entry.format } : {}),
    defaultName: key,
    dir: entry.dir,
  };
}
