/**
 * Which files of a Hub repository `kiln pull` fetches. A diffusion repository is installed in one
 * of two layouts, chosen by `chooseLayout` (see there): the diffusers ONNX layout, or the diffusers
 * safetensors layout that Kiln builds its ONNX graphs from.
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
 *
 * The diffusers safetensors layout rule (planSafetensors):
 *   - `model_index.json`, `README.md`, `LICENSE*`, everything in `scheduler/` and in each
 *     `tokenizer*` folder, as above;
 *   - for each component Kiln builds (text_encoder, text_encoder_2, unet, vae): its `config.json`
 *     and ONE precision of weights: the `fp16` variant (`<stem>.fp16.safetensors`, or its shard
 *     index and the shards the index names) when the repository has it complete, else the plain
 *     `<stem>.safetensors` (or sharded). `<stem>` is `diffusion_pytorch_model` or `model`;
 *   - nothing else: no `.bin`/`.ckpt`/flax/ONNX/OpenVINO files, no other precision, no other
 *     folder (`vae_1_0/`, `safety_checker/`, `feature_extractor/`, `image_encoder/`).
 *   A variant shard index named the diffusers/transformers way (`<stem>.safetensors.index.fp16.json`)
 *   is installed as `<stem>.fp16.safetensors.index.json`, the name Kiln's weight reader looks for.
 */
import { posix } from 'node:path';
import type { AliasFile } from './aliases.js';
import { PullError } from './errors.js';
import type { RepoFile } from './hub.js';
import { REQUIRED_FILES, SECOND_ENCODER_FILES } from '../engine/model.js';

/**
 * `file`: fetched as is (configs, tokenizers, ...); `onnx`: a graph, read for its external data;
 * `external`: an ONNX external-data file; `weights`: a safetensors file; `index`: a safetensors
 * shard index, read for its shards; `shard`: a safetensors shard an index names.
 */
export type FileRole = 'file' | 'onnx' | 'external' | 'weights' | 'index' | 'shard';

/** The two installable forms of a diffusion repository. */
export type LayoutFormat = 'onnx' | 'safetensors';
/** What `kiln pull --format` asks for; `auto` is chooseLayout's rule. */
export type FormatChoice = LayoutFormat | 'auto';
export const FORMAT_CHOICES: readonly FormatChoice[] = ['auto', 'onnx', 'safetensors'];

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
  /**
   * An external-data file (or shard) guessed from its name, confirmed or dropped once its
   * model.onnx (or shard index) is read.
   */
  guessed?: boolean;
}

export interface Plan {
  files: PlannedFile[];
  /** Repository files left out, for `--dry-run`. */
  skipped: string[];
}

/** A diffusion layout chosen for a repository. */
export interface LayoutPlan extends Plan {
  format: LayoutFormat;
  /** Safetensors layout: the precision taken for each component (`fp16` or `default`, the plain files). */
  components?: Record<string, WeightVariant>;
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

/** A hint for a repository that has no ONNX layout: it has other weights, or ONNX files elsewhere. */
export function layoutHint(listing: readonly RepoFile[]): string {
  const onnx = listing.filter((f) => f.path.endsWith('.onnx'));
  const layoutOnnx = onnx.filter((f) => /^[^/]+\/model\.onnx$/.test(f.path) && !EXCLUDED_FOLDERS.has(f.path.split('/')[0]!));
  if (layoutOnnx.length === 0 && listing.some((f) => /\.(bin|ckpt|pt|pth)$/.test(f.path)) && !hasComponentSafetensors(listing)) {
    return ' It holds PyTorch .bin/.ckpt weights only: Kiln reads an ONNX export or diffusers safetensors weights.';
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

// ---- The diffusers safetensors layout ----

/** Precision of a component's weights in a safetensors install: the fp16 variant files, or the plain ones. */
export type WeightVariant = 'fp16' | 'default';

/** The components Kiln builds graphs for, with the weight file stem their library writes. */
export const KILN_COMPONENTS: Readonly<Record<string, string>> = Object.freeze({
  text_encoder: 'model',
  text_encoder_2: 'model',
  unet: 'diffusion_pytorch_model',
  vae: 'diffusion_pytorch_model',
});
const STEMS = ['diffusion_pytorch_model', 'model'];
const FP16 = 'fp16';
const NOT_READ = /\.(bin|ckpt|pt|pth|msgpack|h5)$/i;

interface WeightName {
  stem: string;
  variant: string | undefined;
  index: boolean;
  /** Shard number and count, as written (`00001`, `00003`). */
  shard?: [string, string];
}

/**
 * `<stem>[.<variant>].safetensors`, shards `<stem>[.<variant>]-00001-of-00003.safetensors` (the
 * variant may also follow the shard number), and shard indexes `<stem>.safetensors.index[.<variant>].json`
 * (diffusers' and transformers' naming) or `<stem>[.<variant>].safetensors.index.json`.
 */
function parseWeightName(name: string): WeightName | undefined {
  const idx = /^(diffusion_pytorch_model|model)(?:\.(\w+))?\.safetensors\.index(?:\.(\w+))?\.json$/.exec(name);
  if (idx) return idx[2] && idx[3] ? undefined : { stem: idx[1]!, variant: idx[2] ?? idx[3], index: true };
  const w = /^(diffusion_pytorch_model|model)(?:\.(\w+))?(?:-(\d+)-of-(\d+))?(?:\.(\w+))?\.safetensors$/.exec(name);
  if (!w || (w[2] && w[5])) return undefined;
  return { stem: w[1]!, variant: w[2] ?? w[5], index: false, ...(w[3] ? { shard: [w[3], w[4]!] as [string, string] } : {}) };
}

interface WeightChoice {
  variant: WeightVariant;
  /** The single weights file, or the shard index (with the shards guessed from the listing). */
  single?: RepoFile;
  index?: RepoFile;
  shards: RepoFile[];
  stem: string;
}

/**
 * One precision of a component's weights: fp16 when complete, else the plain files. A single
 * file beats an index of the same precision. `missing` names what the best candidate lacks.
 */
function chooseWeights(component: string, files: readonly RepoFile[]): { choice?: WeightChoice; missing: string[] } {
  const std = KILN_COMPONENTS[component] ?? 'model';
  const parsed = files.flatMap((f) => {
    const n = parseWeightName(posix.basename(f.path));
    return n ? [{ f, n }] : [];
  });
  let firstMissing: string[] | undefined;
  for (const variant of [FP16, undefined]) {
    for (const stem of [std, ...STEMS.filter((s) => s !== std)]) {
      const mine = parsed.filter((x) => x.n.stem === stem && x.n.variant === variant);
      const v: WeightVariant = variant ? 'fp16' : 'default';
      const single = mine.find((x) => !x.n.index && !x.n.shard);
      if (single) return { choice: { variant: v, single: single.f, shards: [], stem }, missing: [] };
      const index = mine.find((x) => x.n.index);
      if (!index) continue;
      const shards = mine.filter((x) => x.n.shard);
      const base = `${component}/${stem}${variant ? `.${variant}` : ''}`;
      const missing: string[] = [];
      if (shards.length === 0) missing.push(`${base}-*.safetensors (the shards ${index.f.path} lists)`);
      else {
        const count = shards[0]!.n.shard![1];
        const have = new Set(shards.filter((x) => x.n.shard![1] === count).map((x) => Number(x.n.shard![0])));
        for (let i = 1; i <= Number(count); i++) {
          if (!have.has(i)) missing.push(`${base}-${String(i).padStart(count.length, '0')}-of-${count}.safetensors`);
        }
      }
      if (missing.length === 0) return { choice: { variant: v, index: index.f, shards: shards.map((x) => x.f), stem }, missing };
      firstMissing ??= missing;
    }
  }
  return { missing: firstMissing ?? [`${component}/${std}.safetensors`] };
}

/** Whether a model_index.json entry names a component (`["diffusers", "X"]`, not `[null, null]`). */
function namesComponent(modelIndex: Record<string, unknown> | undefined, name: string): boolean {
  const v = modelIndex?.[name];
  return Array.isArray(v) && v.some((x) => x !== null);
}

/** The components a safetensors install needs: text_encoder, unet, vae, and text_encoder_2 for SDXL. */
export function safetensorsComponents(listing: readonly RepoFile[], modelIndex?: Record<string, unknown>): string[] {
  const second = listing.some((f) => f.path.startsWith('text_encoder_2/')) || namesComponent(modelIndex, 'text_encoder_2');
  return second ? ['text_encoder', 'text_encoder_2', 'unet', 'vae'] : ['text_encoder', 'unet', 'vae'];
}

/** Whether any component Kiln builds has `.safetensors` files in the listing. */
export function hasComponentSafetensors(listing: readonly RepoFile[]): boolean {
  return listing.some((f) => {
    const parts = f.path.split('/');
    return parts.length === 2 && parts[0]! in KILN_COMPONENTS && parts[1]!.endsWith('.safetensors');
  });
}

export interface SafetensorsPlan extends Plan {
  /** What the listing lacks to be a complete safetensors layout; `[]` when nothing. */
  missing: string[];
  components: Record<string, WeightVariant>;
}

/** The diffusers safetensors layout selection from a repository listing (see the file comment). */
export function planSafetensors(listing: readonly RepoFile[], modelIndex?: Record<string, unknown>): SafetensorsPlan {
  const paths = new Set(listing.map((f) => f.path));
  const components = safetensorsComponents(listing, modelIndex);
  const missing = ['model_index.json', 'scheduler/scheduler_config.json', 'tokenizer/vocab.json', 'tokenizer/merges.txt'].filter((p) => !paths.has(p));
  if (components.includes('text_encoder_2')) missing.push(...['tokenizer_2/vocab.json', 'tokenizer_2/merges.txt'].filter((p) => !paths.has(p)));
  const chosen = new Map<string, PlannedFile>();
  const variants: Record<string, WeightVariant> = {};
  for (const c of components) {
    if (!paths.has(`${c}/config.json`)) missing.push(`${c}/config.json`);
    const { choice, missing: lacks } = chooseWeights(c, listing.filter((f) => posix.dirname(f.path) === c));
    missing.push(...lacks);
    if (!choice) continue;
    variants[c] = choice.variant;
    if (choice.single) chosen.set(choice.single.path, plannedFile(choice.single, 'weights'));
    if (choice.index) {
      // Installed under the name Kiln's weight reader looks for: <stem>[.fp16].safetensors.index.json.
      const target = `${c}/${choice.stem}${choice.variant === 'fp16' ? `.${FP16}` : ''}.safetensors.index.json`;
      chosen.set(choice.index.path, plannedFile(choice.index, 'index', target));
      for (const s of choice.shards) chosen.set(s.path, plannedFile(s, 'shard', s.path, true));
    }
  }
  const files: PlannedFile[] = [];
  const skipped: string[] = [];
  for (const f of listing) {
    const parts = f.path.split('/');
    const name = parts[parts.length - 1]!;
    const weights = chosen.get(f.path);
    if (weights) files.push(weights);
    else if (parts.length === 1 && (name === 'model_index.json' || name === 'README.md' || /^LICEN[SC]E/i.test(name))) files.push(plannedFile(f, 'file'));
    else if (parts.length === 2 && !isForeignFile(name) && (parts[0] === 'scheduler' || isTokenizerFolder(parts[0]!))) files.push(plannedFile(f, 'file'));
    else if (parts.length === 2 && name === 'config.json' && components.includes(parts[0]!)) files.push(plannedFile(f, 'file'));
    else skipped.push(f.path);
  }
  return { files, skipped, missing, components: variants };
}

/** " Kiln reads safetensors weights only, not the .bin files in text_encoder/." for components that lack weights. */
function notReadHint(listing: readonly RepoFile[], missing: readonly string[]): string {
  const folders = [...new Set(missing.filter((m) => m.includes('.safetensors')).map((m) => m.split('/')[0]!))].filter((c) => c in KILN_COMPONENTS);
  const found = folders.flatMap((c) => {
    const exts = [...new Set(listing.filter((f) => posix.dirname(f.path) === c && NOT_READ.test(f.path)).map((f) => posix.extname(f.path)))];
    return exts.length ? [`the ${exts.join('/')} files in ${c}/`] : [];
  });
  return found.length ? ` Kiln reads safetensors weights only, not ${found.join(', ')}.` : '';
}

/**
 * Which layout of a diffusion repository to install. `auto`: the safetensors layout when it is
 * complete (with the fp16 variant it is the smaller download: about 6.9 GB instead of 14 GB for
 * SDXL base, whose ONNX export is fp32), else the ONNX layout. `onnx` / `safetensors` force one.
 * A repository with neither complete is refused with one PullError saying what each one lacks.
 */
export function chooseLayout(listing: readonly RepoFile[], format: FormatChoice, what: string, modelIndex?: Record<string, unknown>): LayoutPlan {
  const st = planSafetensors(listing, modelIndex);
  if (format === 'safetensors' || (format === 'auto' && st.missing.length === 0)) {
    if (st.missing.length) {
      throw new PullError(`${what} is not a complete diffusers safetensors layout: missing ${st.missing.join(', ')}.${notReadHint(listing, st.missing)}`, 'layout');
    }
    return { format: 'safetensors', files: st.files, skipped: st.skipped, components: st.components };
  }
  const missing = missingLayoutFiles(listing, modelIndex);
  if (missing.length === 0) return { format: 'onnx', ...planDiffusion(listing) };
  const onnx = `${what} is not a usable diffusers ONNX layout: missing ${missing.join(', ')}.`;
  if (format === 'onnx') {
    const other = st.missing.length === 0 ? ' Its diffusers safetensors layout is complete: pull it with --format safetensors (or auto).' : '';
    throw new PullError(`${onnx}${layoutHint(listing)}${other}`, 'layout');
  }
  if (!hasComponentSafetensors(listing)) throw new PullError(`${onnx}${layoutHint(listing)}`, 'layout');
  throw new PullError(
    `${onnx} Its PyTorch/safetensors weights are not a complete diffusers safetensors layout either: missing ${st.missing.join(', ')}.` +
      notReadHint(listing, st.missing),
    'layout',
  );
}

/** The shard file names a safetensors index's `weight_map` refers to (each once, sorted). Throws on a malformed index. */
export function shardIndexFiles(text: string): string[] {
  let map: unknown;
  try {
    map = (JSON.parse(text) as { weight_map?: unknown }).weight_map;
  } catch {
    throw new Error('it is not JSON');
  }
  if (!map || typeof map !== 'object' || Array.isArray(map)) throw new Error('it has no weight_map object');
  const names = [...new Set(Object.values(map as Record<string, unknown>))];
  for (const n of names) {
    if (typeof n !== 'string' || !n.endsWith('.safetensors') || n.includes('/') || n.includes('\\') || n.startsWith('.')) {
      throw new Error(`its weight_map names ${JSON.stringify(n)}, not a .safetensors file beside it`);
    }
  }
  return (names as string[]).sort();
}
