/**
 * LoRA files, fused into a component's weights while its graph is built:
 * W' = W + scale · (alpha / rank) · up @ down, in float32, for every module a LoRA names.
 *
 * Formats read:
 * - kohya-ss (`lora_unet_*`, `lora_te_*`, `lora_te1_*` / `lora_te2_*`; `.lora_down.weight`,
 *   `.lora_up.weight`, `.alpha`), on linears, 1x1 convs and (LoCon) 3x3 convs. Module names are
 *   the model's with every `.` written `_`; since diffusers' names have `_` of their own
 *   (`down_blocks`, `to_out`), a name is resolved by matching it against the model's own module
 *   names, flattened the same way. SDXL files name UNet modules after the SGM blocks
 *   (`input_blocks_4_1_...`): those are matched through keys-ldm's UNet table.
 * - diffusers / PEFT (`unet.` / `text_encoder.` / `text_encoder_2.` + module + `.lora_A.weight`,
 *   `.lora_B.weight`, optional `.alpha`; no alpha means alpha = rank).
 *
 * The fuse follows PEFT's merge as diffusers' fuse_lora runs it: delta = (up @ down) · s with
 * s = float32(alpha / rank · scale), the rank products summed in order, then W + delta, each step
 * rounded to float32. Modules that match nothing are reported (count and names), never dropped
 * silently; a LoRA made for another family is refused.
 */
import { ModelLoadError } from '../engine/errors.js';
import { ldmUnetTable, unetLayoutFromKeys, type ModelFamily, type PrefixTable } from './keys-ldm.js';
import type { WeightEntry, WeightSource } from './weights.js';
import { bytesToFloat32, openSafetensors, readByteRange, readTensorFloat32, type SafetensorsFile, type SafetensorsTensor } from './safetensors.js';

export type LoraComponent = 'unet' | 'text_encoder' | 'text_encoder_2';
/** Families a LoRA is made for (the SDXL refiner counts as SDXL). */
export type LoraFamily = 'sd1' | 'sd2' | 'sdxl';

const FAMILY_NAMES: Record<LoraFamily, string> = { sd1: 'SD 1.x', sd2: 'SD 2.x', sdxl: 'SDXL' };

/** A readable LoRA that was made for another model (another family, or shapes that do not fit). */
export class LoraMismatchError extends ModelLoadError {
  override name = 'LoraMismatchError';
}

export interface LoraModule {
  /** The module's name in the file (`lora_unet_down_blocks_0_..._to_q`, `unet.down_blocks.0...to_q`). */
  key: string;
  component: LoraComponent;
  /** Module path inside the component as the file writes it. */
  name: string;
  /** kohya: `.` written as `_`. */
  flattened: boolean;
  down: SafetensorsTensor;
  up: SafetensorsTensor;
  alpha?: number;
  rank: number;
}

export interface LoraFile {
  path: string;
  file: SafetensorsFile;
  format: 'kohya' | 'peft';
  modules: LoraModule[];
  /** The family the file says it is for, and how it says so. */
  family?: LoraFamily;
  familyFrom?: string;
  /** Keys that belong to no LoRA module Kiln reads (LoHa, LoKr, DoRA, full diffs, ...). */
  unsupported: string[];
}

const KOHYA = /^(lora_unet|lora_te1|lora_te2|lora_te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$/;
const PEFT = /^(?:(unet|text_encoder|text_encoder_2|base_model\.model)\.)?(.+)\.(lora_A(?:\.default)?\.weight|lora_B(?:\.default)?\.weight|alpha)$/;
const KOHYA_COMPONENT: Record<string, LoraComponent> = { lora_unet: 'unet', lora_te: 'text_encoder', lora_te1: 'text_encoder', lora_te2: 'text_encoder_2' };

/** Reads a LoRA file's header and groups its tensors into modules. */
export function readLora(path: string): LoraFile {
  const file = openSafetensors(path);
  const fail = (what: string): never => {
    throw new ModelLoadError(`${path} is not a LoRA file Kiln can read: ${what}`, path);
  };
  interface Parts { component: LoraComponent; name: string; flattened: boolean; down?: SafetensorsTensor; up?: SafetensorsTensor; alpha?: SafetensorsTensor }
  const groups = new Map<string, Parts>();
  const unsupported: string[] = [];
  let kohya = 0;
  let peft = 0;
  for (const t of file.tensors.values()) {
    let m = KOHYA.exec(t.name);
    let group: string;
    let part: 'down' | 'up' | 'alpha';
    let parts: Omit<Parts, 'down' | 'up' | 'alpha'>;
    if (m) {
      kohya++;
      group = `${m[1]}_${m[2]}`;
      part = m[3] === 'alpha' ? 'alpha' : m[3]!.startsWith('lora_down') ? 'down' : 'up';
      parts = { component: KOHYA_COMPONENT[m[1]!]!, name: m[2]!, flattened: true };
    } else if ((m = PEFT.exec(t.name)) && !/^lora_(unet|te\d?)_/.test(t.name)) {
      peft++;
      const prefix = m[1];
      group = prefix ? `${prefix}.${m[2]}` : m[2]!;
      part = m[3] === 'alpha' ? 'alpha' : m[3]!.startsWith('lora_A') ? 'down' : 'up';
      const component: LoraComponent =
        prefix === 'unet' || prefix === 'text_encoder' || prefix === 'text_encoder_2' ? prefix : m[2]!.startsWith('text_model.') ? 'text_encoder' : 'unet';
      parts = { component, name: m[2]!, flattened: false };
    } else {
      unsupported.push(t.name);
      continue;
    }
    const g = groups.get(group) ?? { ...parts };
    if (g[part]) fail(`module "${group}" has two ${part} tensors`);
    g[part] = t;
    groups.set(group, g);
  }
  if (groups.size === 0) {
    fail(`no lora_down/lora_up (kohya) or lora_A/lora_B (PEFT) tensors among its ${file.tensors.size} tensors${unsupported.length ? ` (e.g. "${unsupported[0]}")` : ''}`);
  }

  // A module with parts Kiln does not apply (LoCon's CP `lora_mid`, DoRA's magnitude, ...) would
  // fuse wrongly from down and up alone: refuse it rather than apply half of it.
  for (const name of unsupported) {
    for (let end = name.indexOf('.'); end > 0; end = name.indexOf('.', end + 1)) {
      const g = groups.get(name.slice(0, end));
      if (g && (g.down || g.up)) fail(`module "${name.slice(0, end)}" has "${name.slice(end + 1)}" beside its down/up matrices (e.g. LoCon's lora_mid or DoRA), which Kiln does not apply`);
    }
  }

  const modules: LoraModule[] = [];
  for (const [key, g] of groups) {
    if (!g.down || !g.up) {
      // An alpha alone (kohya writes one for modules it then skips) is not a module.
      if (!g.down && !g.up) {
        unsupported.push(g.alpha!.name);
        continue;
      }
      fail(`module "${key}" has ${g.down ? 'a down' : 'an up'} matrix but no ${g.down ? 'up' : 'down'} matrix`);
    }
    const down = g.down!;
    const up = g.up!;
    const rank = down.shape[0]!;
    const trailingOnes = up.shape.slice(2).every((d) => d === 1);
    if (down.shape.length < 2 || up.shape.length < 2 || up.shape[1] !== rank || !trailingOnes) {
      fail(`module "${key}" has down [${down.shape}] and up [${up.shape}], which do not make a rank-${rank} product`);
    }
    let alpha: number | undefined;
    if (g.alpha) {
      if (g.alpha.shape.reduce((a, b) => a * b, 1) !== 1) fail(`module "${key}" has an alpha of shape [${g.alpha.shape}], not a scalar`);
      alpha = readTensorFloat32(file, g.alpha)[0]!;
      if (!Number.isFinite(alpha)) fail(`module "${key}" has alpha ${alpha}`);
    }
    modules.push({ key, component: g.component, name: g.name, flattened: g.flattened, down, up, alpha, rank });
  }
  const { family, familyFrom } = loraFamily(file, modules);
  return { path, file, format: kohya >= peft ? 'kohya' : 'peft', modules, family, familyFrom, unsupported };
}

/** The family a LoRA names in its metadata (kohya, modelspec), else what its text encoders show. */
function loraFamily(file: SafetensorsFile, modules: LoraModule[]): { family?: LoraFamily; familyFrom?: string } {
  const md = file.metadata;
  const base = md.ss_base_model_version;
  if (base) {
    if (/^sdxl/.test(base)) return { family: 'sdxl', familyFrom: `metadata ss_base_model_version "${base}"` };
    if (/^sd_v1/.test(base)) return { family: 'sd1', familyFrom: `metadata ss_base_model_version "${base}"` };
    if (/^sd_v2/.test(base)) return { family: 'sd2', familyFrom: `metadata ss_base_model_version "${base}"` };
  }
  const arch = md['modelspec.architecture'];
  if (arch) {
    if (/^stable-diffusion-xl/.test(arch)) return { family: 'sdxl', familyFrom: `metadata modelspec.architecture "${arch}"` };
    if (/^stable-diffusion-v1/.test(arch)) return { family: 'sd1', familyFrom: `metadata modelspec.architecture "${arch}"` };
    if (/^stable-diffusion-v2/.test(arch)) return { family: 'sd2', familyFrom: `metadata modelspec.architecture "${arch}"` };
  }
  if (md.ss_v2 === 'True') return { family: 'sd2', familyFrom: 'metadata ss_v2 "True"' };
  if (modules.some((m) => m.component === 'text_encoder_2')) return { family: 'sdxl', familyFrom: 'modules for a second text encoder' };
  return {};
}

/** The family a component's weights show (undefined where the component cannot tell). */
function modelFamilyOf(base: WeightSource, component: string): LoraFamily | undefined {
  if (component === 'text_encoder_2') return 'sdxl';
  if (component !== 'unet') return undefined;
  if (base.has('add_embedding.linear_1.weight')) return 'sdxl';
  const proj = base.keys().find((k) => /attentions\.\d+\.proj_in\.weight$/.test(k));
  if (!proj) return undefined;
  return base.lookup(proj, [])!.shape.length === 4 ? 'sd1' : 'sd2';
}

const coarse = (f: ModelFamily | LoraFamily): LoraFamily => (f === 'sdxl-refiner' ? 'sdxl' : f);

// ---------------------------------------------------------------------------------------------
// Resolving module names against the model

/** Every module of a component (keys ending in `.weight`), under each name a LoRA may use. */
class ModuleIndex {
  private readonly flat = new Map<string, string | null>(); // null: two modules flatten alike
  private readonly table: PrefixTable | undefined;

  constructor(
    private readonly base: WeightSource,
    component: string,
  ) {
    const keys = base.keys();
    this.table = component === 'unet' ? ldmUnetTable(unetLayoutFromKeys(keys)) : undefined;
    for (const key of keys) {
      if (!key.endsWith('.weight')) continue;
      const module = key.slice(0, -'.weight'.length);
      this.addFlat(module, module);
      const ldm = this.table?.toLdm(module);
      if (ldm !== undefined) this.addFlat(ldm, module);
    }
  }

  private addFlat(name: string, module: string): void {
    const f = name.replace(/\./g, '_');
    const known = this.flat.get(f);
    this.flat.set(f, known === undefined || known === module ? module : null);
  }

  /** The diffusers module a LoRA module names, or undefined. */
  resolve(m: LoraModule): string | undefined {
    if (m.flattened) return this.flat.get(m.name) ?? undefined;
    if (this.base.has(`${m.name}.weight`)) return m.name;
    const viaLdm = this.table?.toDiffusers(m.name);
    return viaLdm !== undefined && this.base.has(`${viaLdm}.weight`) ? viaLdm : undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// The fused source

export interface LoraInput {
  /** A LoRA file's path, or one already read. */
  file: string | LoraFile;
  scale: number;
}

export interface LoraReport {
  path: string;
  scale: number;
  /** Modules of this component applied: file module -> diffusers module. */
  matched: { key: string; module: string }[];
  /** Modules of this component that match nothing in the model. */
  unmatched: string[];
}

/** One LoRA module's change to one weight. */
export interface LoraUpdate {
  lora: LoraFile;
  module: LoraModule;
  /** float32(alpha / rank · scale). */
  factor: number;
}

/** float32 rounding. */
const f32 = Math.fround;

/**
 * A component's weights with LoRAs fused. Changed weights are served as computed float32 values
 * (base values + each delta, computed when the graph is written); every other key is the base's
 * own entry. Throws a ModelLoadError when a LoRA is for another family or a matched module's
 * shape does not fit the model's weight.
 */
export class LoraWeights implements WeightSource {
  readonly component: string;
  readonly location: string;
  readonly reports: LoraReport[] = [];
  private readonly updates = new Map<string, LoraUpdate[]>(); // weight key -> its updates

  constructor(
    readonly base: WeightSource,
    loras: readonly LoraInput[],
    component: LoraComponent,
    options: { family?: ModelFamily } = {},
  ) {
    this.component = base.component;
    this.location = base.location;
    const modelFamily = options.family ? coarse(options.family) : modelFamilyOf(base, component);
    const index = new ModuleIndex(base, component);
    for (const input of loras) {
      const lora = typeof input.file === 'string' ? readLora(input.file) : input.file;
      if (!Number.isFinite(input.scale)) throw new ModelLoadError(`${lora.path}: LoRA scale ${input.scale} is not a number`, lora.path);
      if (lora.family && modelFamily && lora.family !== modelFamily) {
        throw new LoraMismatchError(
          `${lora.path} is a LoRA for ${FAMILY_NAMES[lora.family]} (${lora.familyFrom}) and cannot be applied to this ${FAMILY_NAMES[modelFamily]} model's ${component}`,
          lora.path,
        );
      }
      const report: LoraReport = { path: lora.path, scale: input.scale, matched: [], unmatched: [] };
      for (const m of lora.modules) {
        if (m.component !== component) continue;
        const module = index.resolve(m);
        if (module === undefined) {
          report.unmatched.push(m.key);
          continue;
        }
        const key = `${module}.weight`;
        this.checkShapes(lora, m, key);
        report.matched.push({ key: m.key, module });
        // Scale 0 leaves the weight as it is (W + 0 would turn a stored -0 into +0).
        if (input.scale === 0) continue;
        const factor = f32(((m.alpha ?? m.rank) / m.rank) * input.scale);
        const list = this.updates.get(key) ?? [];
        list.push({ lora, module: m, factor });
        this.updates.set(key, list);
      }
      this.reports.push(report);
    }
  }

  /** up [out, r(, 1, 1)] @ down [r, in(, kh, kw)] must give the weight's [out, in(, kh, kw)] elements. */
  private checkShapes(lora: LoraFile, m: LoraModule, key: string): void {
    const entry = this.base.lookup(key, []);
    const shape = entry!.shape;
    const inner = m.down.shape.slice(1).reduce((a, b) => a * b, 1);
    const baseInner = shape.slice(1).reduce((a, b) => a * b, 1);
    const kernelsAgree = shape.length < 4 || m.down.shape.length < 4 || shape.slice(2).join() === m.down.shape.slice(2).join();
    if (m.up.shape[0] !== shape[0] || inner !== baseInner || !kernelsAgree) {
      throw new LoraMismatchError(
        `${lora.path}: LoRA module "${m.key}" (down [${m.down.shape.join(', ')}], up [${m.up.shape.join(', ')}]) does not fit ${this.component} weight "${key}" of shape [${shape.join(', ')}]; the LoRA was made for another model`,
        lora.path,
      );
    }
  }

  /** Number of weights a LoRA changes. */
  get changedWeights(): number {
    return this.updates.size;
  }

  /** Weight key -> the updates it gets, in LoRA order (what lora-graph.ts writes into a graph). */
  get plan(): ReadonlyMap<string, readonly LoraUpdate[]> {
    return this.updates;
  }

  /** "N LoRA modules match nothing in the unet: a, b, c, ..." for each LoRA that has some; empty if none. */
  unmatchedSummary(examples = 5): string[] {
    return this.reports
      .filter((r) => r.unmatched.length > 0)
      .map(
        (r) =>
          `${r.path}: ${r.unmatched.length} LoRA module${r.unmatched.length === 1 ? ' matches' : 's match'} nothing in the ${this.component}: ${r.unmatched.slice(0, examples).join(', ')}${r.unmatched.length > examples ? ', ...' : ''}`,
      );
  }

  lookup(key: string, shape: readonly number[]): WeightEntry | undefined {
    const entry = this.base.lookup(key, shape);
    const updates = this.updates.get(key);
    if (!entry || !updates) return entry;
    const values = (): Float32Array => {
      const w = entryValues(entry);
      for (const u of updates) addDelta(w, u);
      return w;
    };
    return { shape: entry.shape, dtype: 'F32', source: { kind: 'values', values } };
  }

  has(key: string): boolean {
    return this.base.has(key);
  }

  keys(): string[] {
    return this.base.keys();
  }
}

/** `withLoras(base, [{ file, scale }], 'unet')`: the component's weights with the LoRAs fused. */
export function withLoras(base: WeightSource, loras: readonly LoraInput[], component: LoraComponent, options: { family?: ModelFamily } = {}): LoraWeights {
  return new LoraWeights(base, loras, component, options);
}

/** A weight entry's values as a fresh float32 array. */
export function entryValues(entry: WeightEntry): Float32Array {
  const src = entry.source;
  if (src.kind === 'values') return Float32Array.from(src.values());
  const dtype = ({ float32: 'F32', float16: 'F16', bfloat16: 'BF16' } as const)[src.dtype];
  return bytesToFloat32(readByteRange(src.path, src.begin, src.byteLength), dtype);
}

/**
 * w += float32(float32(up @ down) · factor). Each element's rank sum runs k = 0..r-1 with one
 * float32 rounding per step, as torch's CPU sgemm does (its FMA kernels accumulate along k; for
 * the usual float16 LoRA tensors every product is exact in float32, so the result is PEFT's bit
 * for bit; for float32 tensors each step is a fused multiply-add, as in those kernels). Sums and
 * float32-exact products computed in double and rounded once are the float32 operations' results.
 * Row-wise, `down` read sequentially, four ranks per pass.
 */
function addDelta(w: Float32Array, u: LoraUpdate): void {
  const up = readTensorFloat32(u.lora.file, u.module.up);
  const down = readTensorFloat32(u.lora.file, u.module.down);
  const r = u.module.rank;
  const out = u.module.up.shape[0]!;
  const n = down.length / r;
  const acc = new Float32Array(n);
  const factor = u.factor;
  for (let o = 0; o < out; o++) {
    const uo = o * r;
    const u0 = up[uo]!;
    for (let i = 0; i < n; i++) acc[i] = u0 * down[i]!;
    let k = 1;
    for (; k + 3 < r; k += 4) {
      const a = up[uo + k]!;
      const b = up[uo + k + 1]!;
      const c = up[uo + k + 2]!;
      const d = up[uo + k + 3]!;
      const at = k * n;
      for (let i = 0; i < n; i++) {
        let s = f32(acc[i]! + a * down[at + i]!);
        s = f32(s + b * down[at + n + i]!);
        s = f32(s + c * down[at + 2 * n + i]!);
        acc[i] = s + d * down[at + 3 * n + i]!;
      }
    }
    for (; k < r; k++) {
      const a = up[uo + k]!;
      const at = k * n;
      for (let i = 0; i < n; i++) acc[i] = acc[i]! + a * down[at + i]!;
    }
    const row = o * n;
    for (let i = 0; i < n; i++) w[row + i] = w[row + i]! + f32(acc[i]! * factor);
  }
}
