/**
 * Loading a diffusers/Optimum ONNX model folder: what family it is, its configs, and one
 * ONNX Runtime session per sub-model (created once, reused for every request).
 *
 * Layout (as on the Hub):
 *   model_index.json, scheduler/scheduler_config.json, tokenizer/ (+ tokenizer_2/),
 *   text_encoder/ (+ text_encoder_2/), unet/, vae_decoder/, vae_encoder/ (img2img only),
 *   each ONNX folder holding model.onnx with its external-data file beside it.
 * The family is read from the files, never from the folder's name.
 */
import { existsSync, readFileSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { ModelLoadError } from './errors.js';
import { OnnxModel, type Device, type RunStats } from './onnx.js';
import { loadClipTokenizer, type ClipTokenizer } from './tokenizer.js';
import type { SchedulerConfig } from './schedulers/index.js';
import { DEFAULT_STEPS, SIZE_STEP, type Size, type StepsByTier } from './presets.js';
import { replaceRandomNormalLike } from './seeded-sampling.js';
import { BUILD_INFO } from '../graphs/cache.js';
import { CONTROL_UNET_DIR, ensurePipelineControlUnet } from '../graphs/control-unet.js';

export type ModelFamily = 'sd1' | 'sd2' | 'sdxl';
/** How a family is named to people (logs, /v1/models, error messages). */
export const FAMILY_LABELS: Record<ModelFamily, string> = { sd1: 'SD 1.x', sd2: 'SD 2.x', sdxl: 'SDXL' };
export type Distillation = 'lcm' | 'turbo' | null;

/** What a folder is, read from its files without loading any session. */
export interface ModelLayout {
  dir: string;
  /** ONNX graphs, or safetensors weights that Kiln builds graphs from before loading. */
  format: 'onnx' | 'safetensors';
  family: ModelFamily;
  distillation: Distillation;
  /** Human label: `SD 1.x`, `SD 2.x`, `SDXL`, `LCM`, `SDXL Turbo`, ... */
  label: string;
  pipelineClass: string | undefined;
  schedulerClass: string;
  schedulerConfig: SchedulerConfig;
  vaeScalingFactor: number;
  vaeForceUpcast: boolean;
  /** SDXL: an absent negative prompt is zero embeddings (model_index.json, default true as in diffusers). */
  forceZerosForEmptyPrompt: boolean;
  hasVaeEncoder: boolean;
  /**
   * The size `auto` means: kiln.json's `native_size`, else unet/config.json's sample_size x 8,
   * else 1024 (SDXL) or 512 (SD).
   */
  nativeSize: Size;
  defaults: ModelDefaults;
}

/** Generation defaults; a model folder may override them in an optional `kiln.json`. */
export interface ModelDefaults {
  steps: StepsByTier;
  guidanceScale: number;
  /** Scheduler to use when the request names none (alias or diffusers class name). */
  scheduler: string | undefined;
  /**
   * kiln.json's `native_size`: the model draws well only at this size, so every request is
   * denoised at this area (with the requested aspect ratio) and the picture resized to the
   * requested size (pipeline.ts denoiseSize). Absent: the model denoises at the requested size.
   */
  nativeSize?: Size;
}

const SD_SCALING_FACTOR = 0.18215;

function readJson(path: string, label: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch {
    throw new ModelLoadError(`missing file ${label}`, path);
  }
  try {
    const value = JSON.parse(text) as unknown;
    if (value && typeof value === 'object' && !Array.isArray(value)) return value as Record<string, unknown>;
  } catch {
    // fall through
  }
  throw new ModelLoadError(`${label} is not a JSON object`, path);
}

function readOptionalJson(path: string, label: string): Record<string, unknown> | undefined {
  return existsSync(path) ? readJson(path, label) : undefined;
}

/** Files every model folder needs (img2img adds vae_encoder/), and those SDXL adds. */
export const REQUIRED_FILES = [
  'model_index.json',
  'scheduler/scheduler_config.json',
  'tokenizer/vocab.json',
  'tokenizer/merges.txt',
  'text_encoder/model.onnx',
  'unet/model.onnx',
  'vae_decoder/model.onnx',
] as const;
export const SECOND_ENCODER_FILES = ['tokenizer_2/vocab.json', 'tokenizer_2/merges.txt', 'text_encoder_2/model.onnx'] as const;

/**
 * The same for a diffusers folder with safetensors weights (Kiln builds its ONNX graphs,
 * src/graphs/convert.ts): each component's config.json; the weights are checked when built.
 */
export const SAFETENSORS_REQUIRED_FILES = [
  'model_index.json',
  'scheduler/scheduler_config.json',
  'tokenizer/vocab.json',
  'tokenizer/merges.txt',
  'text_encoder/config.json',
  'unet/config.json',
  'vae/config.json',
] as const;
export const SAFETENSORS_SECOND_ENCODER_FILES = ['tokenizer_2/vocab.json', 'tokenizer_2/merges.txt', 'text_encoder_2/config.json'] as const;

/** Whether a pipeline folder holds diffusers safetensors weights rather than ONNX graphs (no unet/model.onnx). */
export function isSafetensorsLayout(dir: string): boolean {
  return (
    existsSync(join(dir, 'model_index.json')) &&
    !existsSync(join(dir, 'unet/model.onnx')) &&
    existsSync(join(dir, 'unet/config.json')) &&
    existsSync(join(dir, 'vae/config.json'))
  );
}

/** Inspects a folder and says what model it holds, or throws one clear ModelLoadError. */
export function detectLayout(dirArg: string): ModelLayout {
  const dir = resolve(dirArg);
  if (!existsSync(dir)) throw new ModelLoadError(`model folder ${dir} does not exist`, dir);
  const format = isSafetensorsLayout(dir) ? 'safetensors' : 'onnx';
  const required: string[] = format === 'onnx' ? [...REQUIRED_FILES] : [...SAFETENSORS_REQUIRED_FILES];
  const index = readJson(join(dir, 'model_index.json'), `model_index.json in ${dir}`);
  const hasSecondEncoder = existsSync(join(dir, 'text_encoder_2')) || 'text_encoder_2' in index;
  if (hasSecondEncoder) required.push(...(format === 'onnx' ? SECOND_ENCODER_FILES : SAFETENSORS_SECOND_ENCODER_FILES));
  const missing = required.filter((p) => !existsSync(join(dir, p)));
  if (missing.length) {
    throw new ModelLoadError(
      `model folder ${dir} is not a usable diffusers ${format === 'onnx' ? 'ONNX' : 'safetensors'} layout: missing ${missing.join(', ')}`,
      join(dir, missing[0]!),
    );
  }

  const schedulerConfig = readJson(join(dir, 'scheduler/scheduler_config.json'), 'scheduler/scheduler_config.json');
  const schedulerClass = typeof schedulerConfig._class_name === 'string' ? schedulerConfig._class_name : 'PNDMScheduler';
  const unetConfig = readOptionalJson(join(dir, 'unet/config.json'), 'unet/config.json') ?? {};
  const vaeConfig =
    readOptionalJson(join(dir, 'vae_decoder/config.json'), 'vae_decoder/config.json') ??
    readOptionalJson(join(dir, 'vae/config.json'), 'vae/config.json') ??
    {};
  const textConfig = readOptionalJson(join(dir, 'text_encoder/config.json'), 'text_encoder/config.json') ?? {};

  const family: ModelFamily = hasSecondEncoder
    ? 'sdxl'
    : textConfig.hidden_size === 1024 || unetConfig.cross_attention_dim === 1024 || schedulerConfig.prediction_type === 'v_prediction'
      ? 'sd2'
      : 'sd1';

  // LCM: a guidance-embedding UNet (confirmed later from the session's `timestep_cond` input).
  // Turbo: adversarially distilled models ship an Euler scheduler with trailing spacing.
  let distillation: Distillation = null;
  if (schedulerClass === 'LCMScheduler' || typeof unetConfig.time_cond_proj_dim === 'number') distillation = 'lcm';
  else if (
    schedulerConfig.timestep_spacing === 'trailing' &&
    /^Euler(Ancestral)?DiscreteScheduler$/.test(schedulerClass)
  ) {
    distillation = 'turbo';
  }

  const scaling = typeof vaeConfig.scaling_factor === 'number' ? vaeConfig.scaling_factor : SD_SCALING_FACTOR;
  const familyLabel = FAMILY_LABELS[family];
  const label =
    distillation === 'lcm' ? (family === 'sdxl' ? 'LCM (SDXL)' : 'LCM') : distillation === 'turbo' ? `${family === 'sdxl' ? 'SDXL' : 'SD'} Turbo` : familyLabel;

  const defaults = readDefaults(dir, family, distillation);
  return {
    dir,
    format,
    family,
    distillation,
    label,
    pipelineClass: typeof index._class_name === 'string' ? index._class_name : undefined,
    schedulerClass,
    schedulerConfig,
    vaeScalingFactor: scaling,
    vaeForceUpcast: vaeConfig.force_upcast === true,
    forceZerosForEmptyPrompt: index.force_zeros_for_empty_prompt !== false,
    hasVaeEncoder: format === 'safetensors' || existsSync(join(dir, 'vae_encoder/model.onnx')),
    nativeSize: defaults.nativeSize ? { ...defaults.nativeSize } : nativeSize(unetConfig.sample_size, family),
    defaults,
  };
}

/** sample_size is the latent side (or [height, width]); the VAE scales it by 8. */
function nativeSize(sampleSize: unknown, family: ModelFamily): Size {
  const latent = (v: unknown) => (Number.isInteger(v) && (v as number) > 0 ? (v as number) : undefined);
  const [h, w] = Array.isArray(sampleSize) ? [latent(sampleSize[0]), latent(sampleSize[1])] : [latent(sampleSize), latent(sampleSize)];
  if (h !== undefined && w !== undefined) return { width: w * 8, height: h * 8 };
  const side = family === 'sdxl' ? 1024 : 512;
  return { width: side, height: side };
}

function readDefaults(dir: string, family: ModelFamily, distillation: Distillation): ModelDefaults {
  const base: ModelDefaults = {
    steps: { ...(distillation ? DEFAULT_STEPS.distilled : DEFAULT_STEPS.full) },
    // Turbo runs without CFG; LCM's guidance goes in through its embedding (w = g - 1).
    guidanceScale: distillation === 'turbo' ? 0 : distillation === 'lcm' ? 8 : family === 'sdxl' ? 7 : 7.5,
    scheduler: undefined,
  };
  const own = readOptionalJson(join(dir, 'kiln.json'), 'kiln.json');
  if (!own) return base;
  const steps = own.steps as Partial<StepsByTier> | undefined;
  if (steps && typeof steps === 'object') {
    for (const tier of ['draft', 'smooth', 'hd'] as const) {
      const n = steps[tier];
      if (Number.isInteger(n) && (n as number) > 0) base.steps[tier] = n as number;
    }
  }
  if (typeof own.guidance_scale === 'number') base.guidanceScale = own.guidance_scale;
  if (typeof own.scheduler === 'string') base.scheduler = own.scheduler;
  if (own.native_size !== undefined) base.nativeSize = declaredNativeSize(own.native_size, join(dir, 'kiln.json'));
  return base;
}

/**
 * kiln.json `native_size`: a side (`256`, a square) or `"WxH"` (`"768x512"`), each a positive
 * multiple of 64. A malformed value fails the load: silently ignoring it would bring back the
 * very pictures it is there to prevent.
 */
function declaredNativeSize(value: unknown, path: string): Size {
  let size: Size | undefined;
  if (typeof value === 'number') size = { width: value, height: value };
  else if (typeof value === 'string') {
    const m = /^\s*(\d+)\s*x\s*(\d+)\s*$/i.exec(value);
    if (m) size = { width: Number(m[1]), height: Number(m[2]) };
  }
  const ok = (v: number) => Number.isInteger(v) && v > 0 && v % SIZE_STEP === 0;
  if (!size || !ok(size.width) || !ok(size.height)) {
    throw new ModelLoadError(
      `kiln.json "native_size" must be a side in pixels (e.g. 256) or "WxH" (e.g. "768x512"), each a positive multiple of ${SIZE_STEP}; got ${JSON.stringify(value)}`,
      path,
    );
  }
  return size;
}

export interface LoadOptions {
  device?: Device;
  /** Name the model is known by (defaults to the folder name). */
  name?: string;
  stats?: RunStats;
}

/** A loaded model: its layout, tokenizers and live sessions. */
/** A VAE encoder session and the noise inputs that replaced its in-graph sampling, if any. */
export interface VaeEncoder {
  model: OnnxModel;
  noiseInputs: string[];
}

/** Kiln's convention for an inpainting UNet shipped beside a model's own UNet. */
export const INPAINT_UNET_PATH = 'inpaint_unet/model.onnx';
/** The UNet that takes ControlNet residuals (TensorStack's split layout keeps it here). */
export const CONTROL_UNET_PATH = `${CONTROL_UNET_DIR}/model.onnx`;

export class DiffusionModel {
  private vaeEncoderPromise: Promise<VaeEncoder> | undefined;
  private inpaintUnetPromise: Promise<OnnxModel | undefined> | undefined;
  private controlUnetPromise: Promise<OnnxModel | undefined> | undefined;

  private constructor(
    readonly name: string,
    readonly layout: ModelLayout,
    readonly device: Device,
    readonly tokenizer: ClipTokenizer,
    readonly tokenizer2: ClipTokenizer | undefined,
    readonly textEncoder: OnnxModel,
    readonly textEncoder2: OnnxModel | undefined,
    readonly unet: OnnxModel,
    readonly vaeDecoder: OnnxModel,
    readonly stats: RunStats,
  ) {}

  static async load(dir: string, options: LoadOptions = {}): Promise<DiffusionModel> {
    const layout = detectLayout(dir);
    if (layout.format === 'safetensors') {
      throw new ModelLoadError(`${layout.dir} holds safetensors weights: build its graphs first (Engine does, or \`kiln convert\`)`, layout.dir);
    }
    const device = options.device ?? 'cpu';
    const stats = options.stats ?? { sessionRunMs: 0, runs: 0 };
    const sessionOptions = { device, stats };
    const root = layout.dir;
    const isXL = layout.family === 'sdxl';
    const [tokenizer, tokenizer2] = await Promise.all([
      loadClipTokenizer(join(root, 'tokenizer')),
      isXL ? loadClipTokenizer(join(root, 'tokenizer_2')) : Promise.resolve(undefined),
    ]);
    // Sequential: loading several large sessions at once would multiply peak memory.
    const textEncoder = await OnnxModel.load(join(root, 'text_encoder/model.onnx'), root, sessionOptions);
    const textEncoder2 = isXL ? await OnnxModel.load(join(root, 'text_encoder_2/model.onnx'), root, sessionOptions) : undefined;
    const unet = await OnnxModel.load(join(root, 'unet/model.onnx'), root, sessionOptions);
    const vaeDecoder = await OnnxModel.load(join(root, 'vae_decoder/model.onnx'), root, sessionOptions);

    const model = new DiffusionModel(
      options.name ?? basename(root),
      layout,
      device,
      tokenizer,
      tokenizer2,
      textEncoder,
      textEncoder2,
      unet,
      vaeDecoder,
      stats,
    );
    model.validate();
    return model;
  }

  /** Checks every contract the pipeline relies on, so a bad folder fails at load, not mid-request. */
  private validate(): void {
    const need = (m: OnnxModel, kind: 'input' | 'output', name: string, why = '') => {
      const ok = kind === 'input' ? m.hasInput(name) : m.hasOutput(name);
      if (!ok) {
        const have = kind === 'input' ? [...m.inputs.keys()] : [...m.outputs.keys()];
        throw new ModelLoadError(`${m.label} in ${this.layout.dir} has no ${kind} "${name}"${why} (it has: ${have.join(', ')})`);
      }
    };
    need(this.textEncoder, 'input', 'input_ids');
    need(this.unet, 'input', 'sample');
    need(this.unet, 'input', 'timestep');
    need(this.unet, 'input', 'encoder_hidden_states');
    this.unetOutputName(); // throws when ambiguous
    need(this.vaeDecoder, 'input', 'latent_sample');
    this.vaeDecoderOutputName();
    if (this.layout.family === 'sdxl') {
      const te2 = this.textEncoder2!;
      need(te2, 'input', 'input_ids');
      need(te2, 'output', 'text_embeds', ' (the pooled embedding SDXL needs)');
      need(this.unet, 'input', 'text_embeds', ' (SDXL UNets take the pooled embedding)');
      need(this.unet, 'input', 'time_ids', ' (SDXL UNets take size conditioning)');
    } else {
      need(this.textEncoder, 'output', 'last_hidden_state');
    }
    // The session settles LCM: a guidance-embedding input, or an LCM scheduler on a plain UNet
    // (LCM-LoRA fused without the embedding) both run without the CFG batch. A config that
    // names time_cond_proj_dim on a UNet without the input is not LCM.
    if (this.unet.hasInput('timestep_cond') || this.layout.schedulerClass === 'LCMScheduler') this.layout.distillation = 'lcm';
    else if (this.layout.distillation === 'lcm') this.layout.distillation = null;
  }

  /** The UNet's noise-prediction output: `out_sample` (diffusers/optimum) or the only output. */
  unetOutputName(): string {
    return unetOutputName(this.unet);
  }

  vaeDecoderOutputName(): string {
    return pickOutput(this.vaeDecoder, ['sample']);
  }

  get isXL(): boolean {
    return this.layout.family === 'sdxl';
  }

  /**
   * The VAE encoder, loaded on first use (only img2img and inpainting need it). An encoder
   * that samples inside the graph is patched so that its noise comes from Kiln's seeded RNG.
   */
  vaeEncoder(): Promise<VaeEncoder> {
    if (!this.layout.hasVaeEncoder) {
      return Promise.reject(new ModelLoadError(`model ${this.name} has no vae_encoder/model.onnx (needed for image edits)`));
    }
    if (this.base) return this.base.vaeEncoder(); // shared with the model a variant comes from
    this.vaeEncoderPromise ??= this.loadVaeEncoder();
    return this.vaeEncoderPromise;
  }

  private async loadVaeEncoder(): Promise<VaeEncoder> {
    const root = this.layout.dir;
    const path = join(root, 'vae_encoder/model.onnx');
    const options = { device: this.device, stats: this.stats };
    const patched = replaceRandomNormalLike(await readFile(path));
    if (!patched) return { model: await OnnxModel.load(path, root, options), noiseInputs: [] };
    let model: OnnxModel;
    if (patched.externalData) {
      // External-data locations are relative to the graph file: the patched graph sits beside it.
      const seededPath = join(root, 'vae_encoder/model.kiln-seeded.onnx');
      await writeFile(seededPath, patched.bytes);
      model = await OnnxModel.load(seededPath, root, options);
    } else {
      model = await OnnxModel.fromBytes(patched.bytes, 'vae_encoder/model.onnx', path, options);
    }
    return { model, noiseInputs: patched.noiseInputs };
  }

  /**
   * A UNet's `sample` channel count: from the graph when it is a fixed number, else from the
   * `in_channels` of the config.json beside it (the diffusers script leaves it symbolic).
   */
  sampleChannels(unet: OnnxModel): number | undefined {
    const dim = unet.input('sample').shape[1];
    if (typeof dim === 'number' && dim > 0) return dim;
    // Asked several times per request (inpainting, the denoising loop): read the config once per UNet.
    if (!this.configChannels.has(unet)) {
      const configPath = join(this.layout.dir, dirname(unet.label), 'config.json');
      const config = readOptionalJson(configPath, `${dirname(unet.label)}/config.json`);
      this.configChannels.set(unet, typeof config?.in_channels === 'number' ? config.in_channels : undefined);
    }
    return this.configChannels.get(unet);
  }

  private readonly configChannels = new WeakMap<OnnxModel, number | undefined>();

  /** Whether a UNet takes the 9-channel inpainting input (latents, mask, masked-image latents). */
  isInpaintingUnet(unet: OnnxModel): boolean {
    return this.sampleChannels(unet) === 9;
  }

  /**
   * The dedicated inpainting UNet, if the folder has one: the model's own UNet when it is a
   * 9-channel inpainting model, else `inpaint_unet/model.onnx` beside it (loaded on first use).
   */
  inpaintUnet(): Promise<OnnxModel | undefined> {
    if (this.isInpaintingUnet(this.unet)) return Promise.resolve(this.unet);
    const path = join(this.layout.dir, INPAINT_UNET_PATH);
    this.inpaintUnetPromise ??= existsSync(path)
      ? OnnxModel.load(path, this.layout.dir, { device: this.device, stats: this.stats })
      : Promise.resolve(undefined);
    return this.inpaintUnetPromise;
  }

  /**
   * The residual-taking UNet of the split ControlNet layout: the folder's own, or for a model
   * Kiln built, its UNet with residual inputs, built into the cache entry on first use
   * (graphs/control-unet.ts); undefined when there is none. A LoRA variant gets it with its LoRAs.
   */
  controlUnet(): Promise<OnnxModel | undefined> {
    if (this.base) {
      const base = this.base;
      return base.controlUnetFile().then(async (file) => (file ? await this.withLoras(file) : undefined) ?? base.controlUnet());
    }
    this.controlUnetPromise ??= this.controlUnetFile().then((file) => file === undefined ? undefined : OnnxModel.load(file, this.layout.dir, { device: this.device, stats: this.stats }));
    // A failed build or load is not kept: a fixed folder is tried again.
    const loading = this.controlUnetPromise;
    loading.catch(() => {
      if (this.controlUnetPromise === loading) this.controlUnetPromise = undefined;
    });
    return loading;
  }

  /** Where the ControlNet-UNet's graph is (see controlUnet), built first when Kiln builds it. */
  private async controlUnetFile(): Promise<string | undefined> {
    if (existsSync(join(this.layout.dir, BUILD_INFO))) return ensurePipelineControlUnet(this.layout.dir);
    const path = join(this.layout.dir, CONTROL_UNET_PATH);
    return existsSync(path) ? path : undefined;
  }

  /** The model a variant was made from (withSessions): it owns the shared sessions. */
  private base: DiffusionModel | undefined;
  /** A LoRA variant's rule for its other UNet graphs (withSessions' `loras`). */
  private loraGraph: ((graph: string) => string) | undefined;
  private readonly loraUnets = new Map<string, Promise<OnnxModel | undefined>>();

  /**
   * This model with other text encoder / UNet sessions (a LoRA variant, src/engine/loras.ts):
   * everything else is shared with this model, and the variant's release() frees only the
   * sessions it was given (and those withLoras loaded). `loras` writes another UNet graph of
   * the model (its ControlNet-UNet, an image-prompt UNet: the same weight names) with the
   * variant's LoRAs and returns the file to load (the graph itself when nothing changes).
   */
  withSessions(replace: { textEncoder?: OnnxModel; textEncoder2?: OnnxModel; unet?: OnnxModel }, loras?: (graph: string) => string): DiffusionModel {
    const root = this.base ?? this;
    const v = new DiffusionModel(this.name, this.layout, this.device, this.tokenizer, this.tokenizer2, replace.textEncoder ?? root.textEncoder, replace.textEncoder2 ?? root.textEncoder2, replace.unet ?? root.unet, this.vaeDecoder, this.stats);
    v.base = root;
    v.loraGraph = loras;
    return v;
  }

  /** Whether `other` is this model or another variant of the same loaded model. */
  sameModelAs(other: DiffusionModel): boolean {
    return (this.base ?? this) === (other.base ?? other);
  }

  /**
   * Another UNet graph of this model as this model runs its own UNet: with a LoRA variant's
   * LoRAs folded in (loaded once per variant and graph), or undefined when this model applies none
   * to it (the caller runs the graph as it is).
   */
  withLoras(graph: string): Promise<OnnxModel | undefined> {
    const rule = this.loraGraph;
    if (!rule) return Promise.resolve(undefined);
    let loading = this.loraUnets.get(graph);
    if (!loading) {
      const made = Promise.resolve().then(() => {
        const file = rule(graph);
        return file === graph ? undefined : OnnxModel.load(file, dirname(dirname(graph)), { device: this.device, stats: this.stats });
      });
      this.loraUnets.set(graph, made);
      made.catch(() => {
        if (this.loraUnets.get(graph) === made) this.loraUnets.delete(graph);
      });
      loading = made;
    }
    return loading;
  }

  async release(): Promise<void> {
    if (this.base) {
      const base = this.base;
      const own = [this.textEncoder, this.textEncoder2, this.unet].filter((s, i) => s && s !== [base.textEncoder, base.textEncoder2, base.unet][i]);
      const derived = await Promise.all([...this.loraUnets.values()].map((p) => p.catch(() => undefined)));
      this.loraUnets.clear();
      await Promise.all([...own, ...derived].map((s) => s?.release()));
      return;
    }
    const sessions = [this.textEncoder, this.textEncoder2, this.unet, this.vaeDecoder];
    if (this.controlUnetPromise) sessions.push(await this.controlUnetPromise.catch(() => undefined));
    if (this.vaeEncoderPromise) sessions.push((await this.vaeEncoderPromise.catch(() => undefined))?.model);
    if (this.inpaintUnetPromise) {
      const inpaint = await this.inpaintUnetPromise.catch(() => undefined);
      if (inpaint !== this.unet) sessions.push(inpaint);
    }
    await Promise.all(sessions.map((s) => s?.release()));
  }
}

/** A UNet's noise-prediction output: `out_sample` (diffusers/optimum) or its only output. */
export function unetOutputName(unet: OnnxModel): string {
  return pickOutput(unet, ['out_sample', 'noise_pred', 'sample']);
}

function pickOutput(model: OnnxModel, preferred: string[]): string {
  for (const name of preferred) if (model.hasOutput(name)) return name;
  const names = [...model.outputs.keys()];
  if (names.length === 1) return names[0]!;
  throw new ModelLoadError(`${model.label} has none of the outputs ${preferred.join(', ')} (it has: ${names.join(', ')})`);
}
