/**
 * Which files of a Hub repository `kiln pull` fetches.
 *
 * The diffusers ONNX layout rule (what the engine's detectLayout needs, nothing more):
 *   - `model_index.json`, plus the top-level `README.md` and `LICENSE*` (model card and terms);
 *   - everything in `scheduler/` and in each `tokenizer*` folder;
 *   - for each top-level folder holding a `model.onnx` (text_encoder, text_encoder_2, unet, vae_encoder,
 *     vae_decoder, controlnet, ...): that `model.onnx`, its `config.json`, and its external-data
 *     file(s) under their original names. Data files are first guessed from the listing (for the
 *     size and disk estimate), then read from `model.onnx` itself once it is downloaded
 *     (onnx-refs.ts): only what the graph refers to is fetched;
 *   - `config.json` of any other component folder (e.g. the PyTorch `vae/` next to ONNX folders);
 *   - never weights of other frameworks: `.safetensors`, `.bin`, `.msgpack`, `.pt(h)`, `.ckpt`,
 *     `.h5`, `.gguf`, OpenVINO `.xml`/`.bin`, other `.onnx` variants (`model_fp16.onnx`, ...);
 *     never `safety_checker/` (Kiln runs no safety checker) or `feature_extractor/`.
 */
import { posix } from 'node:path';
import type { AliasFile } from './aliases.js';
import { PullError } from './errors.js';
import type { RepoFile } from './hub.js';
import { REQUIRED_FILES, SECOND_ENCODER_FILES } from '../engine/model.js';

export type FileRole = 'file' | 'onnx' | 'external';

export interface PlannedFile {
  /** Path in the repository. */
  path: string;
  /** Path in the install folder. */
  target: string;
  size: number;
  /** LFS sha256, when the Hub reports one. */
  sha256?: string;
  /** Git blob sha1, for files stored in git (checked when there is no sha256). */
  gitOid?: string;
  role: FileRole;
  /** An external-data file guessed from its name, confirmed or dropped once its model.onnx is read. */
  guessed?: boolean;
}

export interface Plan {
  files: PlannedFile[];
  /** Repository files left out, for `--dry-run`. */
  skipped: string[];
}

const WEIGHT_EXTENSIONS = /\.(safetensors|bin|msgpack|pt|pth|ckpt|h5|ot|gguf|pkl|npz|tflite|mlmodel|engine|plan|xml)$/i;
const EXCLUDED_FOLDERS = new Set(['safety_checker', 'feature_extractor']);
const NOT_DATA = /\.(json|txt|md|py|yaml|yml|png|jpe?g|gif|webp|onnx)$/i;

export function plannedFile(f: RepoFile, role: FileRole, target = f.path, guessed = false): PlannedFile {
  const p: PlannedFile = { path: f.path, target, size: f.size, role };
  if (f.lfs?.oid && /^[0-9a-f]{64}$/i.test(f.lfs.oid)) p.sha256 = f.lfs.oid.toLowerCase();
  // A git blob sha1 describes the file's bytes only for files stored in git (a xet- or
  // LFS-backed file's oid is its pointer's); without either hash the size is what is checked.
  else if (!f.xetHash && f.oid && /^[0-9a-f]{40}$/i.test(f.oid)) p.gitOid = f.oid.toLowerCase();
  if (guessed) p.guessed = true;
  return p;
}

/** A file name that is never part of an ONNX install (other frameworks' weights, dot files). */
export function isForeignFile(name: string): boolean {
  return name.startsWith('.') || WEIGHT_EXTENSIONS.test(name) || /^openvino/i.test(name);
}

/**
 * Whether `name`, in an ONNX folder, may be `model.onnx`'s external data: not a known non-data
 * type, and not the data of another .onnx file in the folder (`model_fp16.onnx_data`).
 */
function mayBeExternalData(name: string): boolean {
  if (isForeignFile(name) || NOT_DATA.test(name)) return false;
  const m = /^(.*)\.onnx([._].*)?$/i.exec(name);
  return !m || m[1] === 'model';
}

const isTokenizerFolder = (folder: string) => /^tokenizer(_\d+)?$/.test(folder);

/** The diffusers ONNX layout selection from a repository listing (see the file comment). */
export function planDiffusion(listing: readonly RepoFile[]): Plan {
  const files: PlannedFile[] = [];
  const skipped: string[] = [];
  const onnxFolders = new Set<string>();
  for (const f of listing) {
    const parts = f.path.split('/');
    if (parts.length === 2 && parts[1] === 'model.onnx' && !EXCLUDED_FOLDERS.has(parts[0]!)) onnxFolders.add(parts[0]!);
  }
  for (const f of listing) {
    const parts = f.path.split('/');
    const name = parts[parts.length - 1]!;
    let role: FileRole | undefined;
    let guessed = false;
    if (parts.length === 1) {
      if (name === 'model_index.json' || name === 'README.md' || /^LICEN[SC]E/i.test(name)) role = 'file';
    } else if (parts.length === 2 && !isForeignFile(name)) {
      const folder = parts[0]!;
      if (EXCLUDED_FOLDERS.has(folder) || /^(openvino|\.)/i.test(folder)) role = undefined;
      else if (folder === 'scheduler' || isTokenizerFolder(folder)) role = 'file';
      else if (onnxFolders.has(folder)) {
        if (name === 'model.onnx') role = 'onnx';
        else if (name === 'config.json') role = 'file';
        else if (mayBeExternalData(name)) {
          role = 'external';
          guessed = true;
        }
      } else if (name === 'config.json') role = 'file';
    }
    if (role) files.push(plannedFile(f, role, f.path, guessed));
    else skipped.push(f.path);
  }
  return { files, skipped };
}

/**
 * What a listing lacks to be a layout the engine loads (the same files detectLayout requires),
 * `[]` when nothing. `modelIndex` (the parsed model_index.json, when available) tells whether
 * the pipeline has a second text encoder, as its folder does.
 */
export function missingLayoutFiles(listing: readonly RepoFile[], modelIndex?: Record<string, unknown>): string[] {
  const paths = new Set(listing.map((f) => f.path));
  const required: string[] = [...REQUIRED_FILES];
  const second = listing.some((f) => f.path.startsWith('text_encoder_2/')) || (modelIndex !== undefined && 'text_encoder_2' in modelIndex);
  if (second) required.push(...SECOND_ENCODER_FILES);
  return required.filter((p) => !paths.has(p));
}

/** A hint for a repository that has no ONNX layout: it has PyTorch weights, or ONNX files elsewhere. */
export function layoutHint(listing: readonly RepoFile[]): string {
  const onnx = listing.filter((f) => f.path.endsWith('.onnx'));
  const layoutOnnx = onnx.filter((f) => /^[^/]+\/model\.onnx$/.test(f.path) && !EXCLUDED_FOLDERS.has(f.path.split('/')[0]!));
  if (layoutOnnx.length === 0 && listing.some((f) => /\.(safetensors|bin|ckpt)$/.test(f.path))) {
    return ' It holds PyTorch/safetensors weights only: Kiln needs an ONNX export (look for an "-onnx" repository or an "onnx" revision).';
  }
  const nested = onnx.filter((f) => f.path.split('/').length > 2).slice(0, 3);
  if (nested.length) return ` Its ONNX files are not in the diffusers layout (e.g. ${nested.map((f) => f.path).join(', ')}).`;
  return '';
}

/** The explicit file list of an alias, each of which must exist in the listing. */
export function planFiles(listing: readonly RepoFile[], wanted: readonly AliasFile[], what: string): Plan {
  const byPath = new Map(listing.map((f) => [f.path, f]));
  const missing = wanted.filter((w) => !byPath.has(w.path)).map((w) => w.path);
  if (missing.length) {
    throw new PullError(`${what} has no ${missing.join(', ')}`, 'layout');
  }
  const files = wanted.map((w) => {
    const f = byPath.get(w.path)!;
    return plannedFile(f, f.path.endsWith('.onnx') ? 'onnx' : 'file', w.as ?? w.path);
  });
  const targets = new Set<string>();
  for (const f of files) {
    if (targets.has(f.target)) throw new PullError(`${what}: two files would be installed as ${f.target}`, 'bad-spec');
    targets.add(f.target);
  }
  const taken = new Set(wanted.map((w) => w.path));
  return { files, skipped: listing.map((f) => f.path).filter((p) => !taken.has(p)) };
}

/** The install path of an external-data file `location` of the ONNX file planned as `onnx`. */
export function externalTarget(onnx: PlannedFile, location: string): { path: string; target: string } {
  return {
    path: posix.join(posix.dirname(onnx.path), location),
    target: posix.join(posix.dirname(onnx.target), location),
  };
}
