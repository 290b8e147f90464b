/**
 * A diffusers pipeline folder with safetensors weights -> the diffusers ONNX layout the engine
 * loads (onnx-model-contracts.md §2): text_encoder[_2]/, unet/, vae_encoder/, vae_decoder/, each
 * a model.onnx built by the model pages from the component's own config.json, beside that
 * config; tokenizers, scheduler and model_index.json are copied as they are.
 *
 * The weights come from each component folder, or from the single-file checkpoint the folder's
 * kiln.json names (`kiln import`, checkpoint.ts), with kiln.json's `vae` (a separate VAE) over
 * either; kiln.json's `prediction_type` is written into the scheduler config, and its generation
 * defaults (steps, guidance_scale, scheduler) travel with the graphs.
 *
 * Components are built one at a time (one graph in memory at once); weights stay in the source
 * files (hard-linked) unless a cast is needed (write.ts).
 */
import { randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ModelLoadError } from '../engine/errors.js';
import { folderSources, KILN_JSON, readKilnJson, settingsPath, vaeFolderConfig } from './checkpoint.js';
import { buildClipText } from './clip-text.js';
import type { FolderComponent } from './families.js';
import { toFloat16Graph } from './float16.js';
import { GraphBuilder } from './onnx-builder.js';
import { buildUnet } from './unet.js';
import { buildVaeDecoder, buildVaeEncoder } from './vae.js';
import { componentWeights, Params, type WeightSource } from './weights.js';
import { writeGraph, type WriteStats } from './write.js';

export type GraphDtype = 'fp32' | 'fp16';

export interface ConvertOptions {
  dtype?: GraphDtype;
  /**
   * Text encoders also take `attention_mask` (compel's down-weighting masks tokens with it,
   * engine/weighting.ts). Off by default: the contract's encoders take `input_ids` alone, which is
   * all other ONNX consumers feed. Kiln's own cache builds turn it on.
   */
  textAttentionMask?: boolean;
  /** Called as weights are written: the component, bytes done and bytes in all for that component. */
  onProgress?: (event: { component: string; done: number; total: number }) => void;
  /** Told what a build leaves out (tensors of a checkpoint that match no component). */
  onWarning?: (message: string) => void;
}

export interface ConvertResult {
  components: { name: string; parameters: number; stats: WriteStats }[];
  warnings: string[];
}

/** A component folder of the source, what it becomes, and which page builds it. */
interface ComponentPlan {
  source: string;
  target: string;
  build: (g: GraphBuilder, config: Record<string, unknown>, p: Params) => void;
  /** Keep this graph in fp32 even for fp16 builds (it overflows in fp16). */
  fp32?: (config: Record<string, unknown>) => boolean;
  /** The classes the page implements (config.json's `_class_name`, or transformers' `architectures`). */
  classes: string[];
}

const CLIP_TEXT = ['CLIPTextModel', 'CLIPTextModelWithProjection'];
const CLIP_TEXT_SOURCES = ['text_encoder', 'text_encoder_2'];

const buildTextEncoder = (attentionMask: boolean, withProjection?: boolean) => (g: GraphBuilder, config: Record<string, unknown>, p: Params) =>
  void buildClipText(g, config, p, { attentionMask, withProjection });

const COMPONENTS: ComponentPlan[] = [
  { source: 'text_encoder', target: 'text_encoder', build: buildClipText, classes: CLIP_TEXT },
  { source: 'text_encoder_2', target: 'text_encoder_2', build: buildClipText, classes: CLIP_TEXT },
  { source: 'unet', target: 'unet', build: buildUnet, classes: ['UNet2DConditionModel'] },
  // SDXL's VAE (force_upcast) overflows in fp16 unless it is an fp16-fixed VAE (force_upcast false).
  { source: 'vae', target: 'vae_encoder', build: buildVaeEncoder, fp32: (c) => c.force_upcast === true, classes: ['AutoencoderKL'] },
  { source: 'vae', target: 'vae_decoder', build: buildVaeDecoder, fp32: (c) => c.force_upcast === true, classes: ['AutoencoderKL'] },
];

/** Refuses a config whose class is not the one the page builds (a ControlNet in unet/, say). */
export function checkClass(config: Record<string, unknown>, classes: readonly string[], component: string, path: string): void {
  const named = typeof config._class_name === 'string' ? [config._class_name] : Array.isArray(config.architectures) ? config.architectures.map(String) : [];
  if (named.length && !named.some((n) => classes.includes(n))) {
    throw new ModelLoadError(`${component}: config.json names ${named.join(', ')}; Kiln builds ${classes.join(' or ')} here`, path);
  }
}

/** Non-weight folders copied as they are. */
const COPIED_FOLDERS = ['scheduler', 'tokenizer', 'tokenizer_2'];

function readConfig(path: string, component: string): Record<string, unknown> {
  try {
    const value = JSON.parse(readFileSync(path, 'utf8')) as unknown;
    if (value && typeof value === 'object' && !Array.isArray(value)) return value as Record<string, unknown>;
  } catch {
    // reported below
  }
  throw new ModelLoadError(`${component}: ${path} is missing or not a JSON object`, path);
}

/** The component folders a pipeline needs, from its model_index.json (text_encoder_2 for SDXL). */
function componentsOf(src: string): ComponentPlan[] {
  const index = readConfig(join(src, 'model_index.json'), 'model_index.json');
  return COMPONENTS.filter((c) => c.source !== 'text_encoder_2' || 'text_encoder_2' in index || existsSync(join(src, 'text_encoder_2')));
}

/** A component graph built in memory (weights still deferred), ready to be written. */
export interface BuiltGraph {
  name: string;
  g: GraphBuilder;
  parameters: number;
  location: string;
}

/** Builds one component graph from a config and weights (nothing is written yet). */
export function buildGraph(
  plan: Pick<ComponentPlan, 'build' | 'fp32'>,
  name: string,
  config: Record<string, unknown>,
  weights: WeightSource,
  options: Pick<ConvertOptions, 'dtype'> = {},
): BuiltGraph {
  const g = new GraphBuilder(name);
  const p = Params.of(g, weights);
  plan.build(g, config, p);
  if (options.dtype === 'fp16' && !plan.fp32?.(config)) toFloat16Graph(g);
  return { name, g, parameters: p.parameterCount, location: weights.location };
}

/** Writes a built graph into `dir` as model.onnx with its weights as external data. */
export function writeBuiltGraph(built: BuiltGraph, dir: string, options: Pick<ConvertOptions, 'onProgress'> = {}): { parameters: number; stats: WriteStats } {
  mkdirSync(dir, { recursive: true });
  const stats = writeGraph(built.g, dir, {
    meta: { producerName: 'kiln', docString: `${built.name}, built by Kiln from ${built.location}` },
    onProgress: (done, total) => options.onProgress?.({ component: built.name, done, total }),
  });
  return { parameters: built.parameters, stats };
}

/** Builds one component graph and writes it into `dir`. */
export function buildComponent(
  plan: Pick<ComponentPlan, 'build' | 'fp32'>,
  name: string,
  config: Record<string, unknown>,
  weights: WeightSource,
  dir: string,
  options: ConvertOptions = {},
): { parameters: number; stats: WriteStats } {
  return writeBuiltGraph(buildGraph(plan, name, config, weights, options), dir, options);
}

/**
 * Converts a safetensors pipeline folder `src` into an ONNX layout folder `out` (created).
 * Every component is checked and built in memory first (configs, classes, weight headers and
 * shapes), so a folder that does not fit fails before anything is written.
 */
export function convertPipeline(src: string, out: string, options: ConvertOptions = {}): ConvertResult {
  if (!existsSync(join(src, 'model_index.json'))) throw new ModelLoadError(`${src} has no model_index.json: not a diffusers pipeline folder`, src);
  const plans = componentsOf(src);
  const settings = readKilnJson(src);
  const configs: Partial<Record<FolderComponent, Record<string, unknown>>> = {};
  for (const plan of plans) {
    const component = plan.source as FolderComponent;
    if (configs[component]) continue;
    const path = join(src, plan.source, 'config.json');
    configs[component] = readConfig(path, plan.source);
    checkClass(configs[component], plan.classes, plan.source, path);
  }
  // A separate VAE folder brings its own config (an fp16-fixed VAE says force_upcast false).
  const vaeConfig = settings?.vae ? vaeFolderConfig(settingsPath(src, settings.vae)) : undefined;
  if (vaeConfig) {
    checkClass(vaeConfig, ['AutoencoderKL'], 'vae', settingsPath(src, settings!.vae!));
    configs.vae = vaeConfig;
  }
  const { sources, warnings } = folderSources(src, Object.keys(configs) as FolderComponent[], configs);
  for (const w of warnings) options.onWarning?.(w);
  const planned = plans.map((component) => {
    const plan = CLIP_TEXT_SOURCES.includes(component.source) ? { ...component, build: buildTextEncoder(options.textAttentionMask ?? false) } : component;
    const config = configs[plan.source as FolderComponent]!;
    return { plan, config, built: buildGraph(plan, plan.target, config, sources[plan.source as FolderComponent]!, options) };
  });

  mkdirSync(out, { recursive: true });
  copyFileSync(join(src, 'model_index.json'), join(out, 'model_index.json'));
  for (const folder of COPIED_FOLDERS) {
    const from = join(src, folder);
    if (!existsSync(from)) continue;
    mkdirSync(join(out, folder), { recursive: true });
    for (const f of readdirSync(from)) if (statSync(join(from, f)).isFile()) copyFileSync(join(from, f), join(out, folder, f));
  }
  if (settings?.prediction_type) {
    const path = join(out, 'scheduler', 'scheduler_config.json');
    const scheduler = readConfig(path, 'scheduler');
    writeFileSync(path, `${JSON.stringify({ ...scheduler, prediction_type: settings.prediction_type }, null, 2)}\n`);
  }
  syncSettingsFile(src, out);
  const result: ConvertResult = { components: [], warnings };
  for (const { plan, config, built } of planned) {
    const dir = join(out, plan.target);
    const written = writeBuiltGraph(built, dir, options);
    writeFileSync(join(dir, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
    result.components.push({ name: plan.target, ...written });
  }
  return result;
}

/** kiln.json keys that say how to build (read by the build, kept out of the built folder's copy). */
export const BUILD_SETTINGS = ['checkpoint', 'vae', 'prediction_type'] as const;
/** kiln.json keys the engine applies to the built graphs itself, or that only describe the source. */
const SOURCE_ONLY_SETTINGS = new Set<string>([...BUILD_SETTINGS, 'loras', 'family', 'description', 'source', 'source_stamp']);

/**
 * Copies the generation defaults of `src`'s kiln.json (steps, guidance_scale, scheduler, ...)
 * into the built folder `out`, or removes a stale copy; nothing is written when it is current.
 */
export function syncSettingsFile(src: string, out: string): void {
  const target = join(out, KILN_JSON);
  const settings = readKilnJson(src);
  const kept = settings ? Object.fromEntries(Object.entries(settings).filter(([k]) => !SOURCE_ONLY_SETTINGS.has(k))) : {};
  if (Object.keys(kept).length === 0) {
    if (existsSync(target)) rmSync(target, { force: true });
    return;
  }
  const text = `${JSON.stringify(kept, null, 2)}\n`;
  if (existsSync(target) && readFileSync(target, 'utf8') === text) return;
  const tmp = `${target}.${randomBytes(4).toString('hex')}.tmp`; // worker threads share a pid
  writeFileSync(tmp, text);
  renameSync(tmp, target);
}

/**
 * Converts one transformers text-encoder folder (`config.json` and safetensors weights) into
 * `out/model.onnx` beside a copy of its config. `withProjection` overrides what config.json's
 * `architectures` says (configs written without it, as tiny test models are).
 */
export function convertTextEncoder(src: string, out: string, options: ConvertOptions & { withProjection?: boolean; component?: string } = {}): ConvertResult {
  const component = options.component ?? 'text_encoder';
  const config = readConfig(join(src, 'config.json'), component);
  checkClass(config, CLIP_TEXT, component, join(src, 'config.json'));
  const built = buildGraph({ build: buildTextEncoder(options.textAttentionMask ?? false, options.withProjection) }, component, config, componentWeights(src, component), options);
  const written = writeBuiltGraph(built, out, options);
  writeFileSync(join(out, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
  return { components: [{ name: component, ...written }], warnings: [] };
}
