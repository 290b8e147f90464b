/**
 * IP-Adapter (image prompts) in the h94/IP-Adapter file layout: the image projection and the
 * decoupled cross-attention layers, as diffusers' `load_ip_adapter` reads them.
 *
 * A file holds `image_proj.*` (the projection from image-encoder features to image tokens) and
 * `ip_adapter.<n>.to_k_ip.weight` / `.to_v_ip.weight` ([block width, cross_attention_dim], no
 * bias), where n is the position of the layer's attention processor in diffusers'
 * `unet.attn_processors`: down blocks, then up blocks, then the mid block, each transformer
 * block's attn1 then attn2, so the cross-attention layers get 1, 3, 5, ... (crossAttentionPaths).
 *
 * Projections (which one is read from the keys, as diffusers does):
 * - base (`image_proj.proj.weight`, diffusers' ImageProjection): the encoder's `image_embeds`
 *   [B, D] -> Linear to 4·C -> [B, 4, C] -> LayerNorm. 4 tokens (fixed in diffusers' loader).
 * - Plus / face (`image_proj.latents`, the Resampler, diffusers' IPAdapterPlusImageProjection):
 *   the encoder's penultimate hidden states [B, T, E] -> proj_in; learnt queries (`latents`)
 *   attend over concat(ln0(x), ln1(queries)) per layer (heads of 64, no biases), plus a GELU
 *   feed-forward, each with a residual; proj_out; norm_out. The h94 names are read as stored:
 *   `layers.i.0.{norm1,norm2,to_q,to_kv,to_out}` (to_kv rows: k then v), `layers.i.1.{0,1,3}`.
 *
 * Graphs built here (and cached, ensureImagePromptBuilt):
 * - `image_proj`: `image_embeds` float32 [batch, D] (base) or [batch, image_tokens, E] (Plus)
 *   -> `ip_tokens` [batch, N, cross_attention_dim].
 * - the model's UNet with the adapters' layers (unet.ts, UnetBuildOptions.ipAdapters): inputs
 *   `ip_tokens` [batch, ip_sequence, C] and `ip_scale` [1] after the UNet's own. The projection is
 *   its own graph so that it runs once per image, not once per step, and the UNet does not
 *   depend on the projection's kind.
 * - the image encoder (clip-vision.ts).
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { ModelLoadError } from '../engine/errors.js';
import { buildKey } from './cache.js';
import { buildClipVision, clipVisionConfig, penultimateOutput, type ClipVisionConfig } from './clip-vision.js';
import { buildGraph, checkClass, writeBuiltGraph, type GraphDtype } from './convert.js';
import { attention, gelu, layerNorm, linear } from './layers.js';
import type { GraphBuilder } from './onnx-builder.js';
import { openSafetensors, SafetensorsError, type SafetensorsTensor } from './safetensors.js';
import { ensureEntryControlUnet } from './control-unet.js';
import { buildUnet, parseUnetConfig, type DecoupledCrossAttention, type UnetBuildOptions, type UnetConfig } from './unet.js';
import { componentWeights, Params, SafetensorsWeights } from './weights.js';
import { GRAPH_FILE } from './write.js';

export type IpAdapterKind = 'base' | 'plus';

/** diffusers' loader: 4 image tokens for base adapters; Resampler heads are 64 wide. */
const BASE_TOKENS = 4;
const PLUS_HEAD_DIM = 64;
const PLUS_FFN_RATIO = 4;
const LN_EPS = 1e-5;

export interface IpAdapterFile {
  path: string;
  /** The file name, for messages. */
  name: string;
  kind: IpAdapterKind;
  /** Width of the image features the projection takes (base: image_embeds, Plus: encoder hidden). */
  embedDim: number;
  /** Image tokens per image (base 4, Plus: the number of learnt queries). */
  tokens: number;
  /** Width of the tokens, which must be the UNet's cross_attention_dim. */
  crossAttentionDim: number;
  /** `ip_adapter.<n>` -> the layer's width (to_k_ip rows). */
  layers: Map<number, number>;
  /** Plus: Resampler sizes. */
  resampler?: { hidden: number; heads: number; depth: number };
  weights: SafetensorsWeights;
}

const LAYER_KEY = /^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$/;

/**
 * Reads an adapter file's header: its kind, sizes and layers. Anything Kiln does not implement
 * (FaceID's LoRA layers and insightface embeddings, the full-face MLP projection, a .bin
 * pickle) is one ModelLoadError naming the file and what it has.
 */
export function readIpAdapter(path: string): IpAdapterFile {
  const name = basename(path);
  if (!existsSync(path)) throw new ModelLoadError(`IP-Adapter file ${path} does not exist`, path);
  if (!path.endsWith('.safetensors')) {
    throw new ModelLoadError(`IP-Adapter ${name}: Kiln reads the .safetensors adapter files (h94/IP-Adapter has one beside each .bin)`, path);
  }
  const file = openSafetensors(path);
  const fail = (what: string): never => {
    throw new ModelLoadError(`IP-Adapter ${name} (${path}): ${what}`, path);
  };
  const proj = new Map<string, SafetensorsTensor>();
  const layerParts = new Map<number, { k?: SafetensorsTensor; v?: SafetensorsTensor }>();
  const other: string[] = [];
  for (const t of file.tensors.values()) {
    if (t.name.startsWith('image_proj.')) {
      proj.set(t.name.slice('image_proj.'.length), t);
      continue;
    }
    const m = LAYER_KEY.exec(t.name);
    if (!m) {
      other.push(t.name);
      continue;
    }
    const n = Number(m[1]);
    const parts = layerParts.get(n) ?? {};
    parts[m[2] === 'to_k_ip' ? 'k' : 'v'] = t;
    layerParts.set(n, parts);
  }
  if (other.length) {
    const lora = other.some((k) => /lora/.test(k));
    fail(
      `${other.length} key(s) outside image_proj.* and ip_adapter.<n>.to_{k,v}_ip.weight (${other.slice(0, 3).join(', ')}${other.length > 3 ? ', ...' : ''})` +
        (lora ? '; FaceID adapters (LoRA layers, insightface embeddings) are not supported' : ''),
    );
  }
  if (!proj.size) fail('no image_proj.* tensors (not an IP-Adapter file?)');
  if (!layerParts.size) fail('no ip_adapter.<n>.to_k_ip / to_v_ip tensors');

  const shape = (key: string, rank: number): number[] => {
    const t = proj.get(key);
    if (!t) return fail(`no image_proj.${key}`);
    if (t.shape.length !== rank) fail(`image_proj.${key} has shape [${t.shape.join(', ')}], expected rank ${rank}`);
    return t.shape;
  };
  let kind: IpAdapterKind;
  let embedDim: number;
  let tokens: number;
  let crossAttentionDim: number;
  let resampler: IpAdapterFile['resampler'];
  if (proj.has('proj.weight')) {
    kind = 'base';
    const [out, inp] = shape('proj.weight', 2) as [number, number];
    if (out % BASE_TOKENS !== 0) fail(`image_proj.proj.weight has ${out} rows, not ${BASE_TOKENS} tokens of one width`);
    embedDim = inp;
    tokens = BASE_TOKENS;
    crossAttentionDim = out / BASE_TOKENS;
  } else if (proj.has('latents')) {
    kind = 'plus';
    const [, queries, hidden] = shape('latents', 3) as [number, number, number];
    embedDim = shape('proj_in.weight', 2)[1]!;
    crossAttentionDim = shape('proj_out.weight', 2)[0]!;
    const qRows = shape('layers.0.0.to_q.weight', 2)[0]!;
    if (qRows % PLUS_HEAD_DIM !== 0) fail(`image_proj.layers.0.0.to_q.weight has ${qRows} rows, not heads of ${PLUS_HEAD_DIM}`);
    let depth = 0;
    while (proj.has(`layers.${depth}.0.to_q.weight`)) depth++;
    tokens = queries;
    resampler = { hidden, heads: qRows / PLUS_HEAD_DIM, depth };
  } else if (proj.has('proj.0.weight')) {
    return fail('its projection is the full-face MLP (image_proj.proj.0/proj.2), which Kiln does not implement; use an ip-adapter-plus-face file');
  } else {
    return fail(`image_proj has ${[...proj.keys()].slice(0, 4).join(', ')}: not a projection Kiln implements (the base ImageProjection or the Plus Resampler)`);
  }

  const layers = new Map<number, number>();
  for (const [n, { k, v }] of [...layerParts].sort((a, b) => a[0] - b[0])) {
    if (!k || !v) fail(`ip_adapter.${n} has ${k ? 'to_k_ip' : 'to_v_ip'} but not ${k ? 'to_v_ip' : 'to_k_ip'}`);
    for (const t of [k!, v!]) {
      if (t.shape.length !== 2 || t.shape[1] !== crossAttentionDim) {
        fail(`${t.name} has shape [${t.shape.join(', ')}]; its projection makes tokens of width ${crossAttentionDim}`);
      }
    }
    if (k!.shape[0] !== v!.shape[0]) fail(`ip_adapter.${n}: to_k_ip and to_v_ip have different widths`);
    layers.set(n, k!.shape[0]!);
  }
  return { path, name, kind, embedDim, tokens, crossAttentionDim, layers, resampler, weights: new SafetensorsWeights(`IP-Adapter ${name}`, path, [file]) };
}

// ---------------------------------------------------------------------------------------------
// The UNet's cross-attention layers in diffusers' processor order

/**
 * Module paths of every cross-attention layer (`...transformer_blocks.k.attn2`) in the order of
 * diffusers' `unet.attn_processors`: down blocks, up blocks, mid block (the order
 * UNet2DConditionModel registers them). Layer m is `ip_adapter.<2m+1>`.
 */
export function crossAttentionPaths(c: UnetConfig): string[] {
  const paths: string[] = [];
  const add = (block: string, attentions: number, depth: number): void => {
    for (let j = 0; j < attentions; j++) for (let k = 0; k < depth; k++) paths.push(`${block}.attentions.${j}.transformer_blocks.${k}.attn2`);
  };
  c.downBlockTypes.forEach((type, i) => {
    if (type === 'CrossAttnDownBlock2D') add(`down_blocks.${i}`, c.layersPerBlock[i]!, c.transformerLayersPerBlock[i]!);
  });
  const upLayers = [...c.layersPerBlock].reverse();
  const upDepth = [...c.transformerLayersPerBlock].reverse();
  c.upBlockTypes.forEach((type, i) => {
    if (type === 'CrossAttnUpBlock2D') add(`up_blocks.${i}`, upLayers[i]! + 1, upDepth[i]!);
  });
  if (c.hasMidBlock) add('mid_block', 1, c.transformerLayersPerBlock.at(-1)!);
  return paths;
}

/** `ip_adapter.<n>` of each cross-attention layer path. */
export function ipAdapterLayerMap(c: UnetConfig): Map<string, number> {
  return new Map(crossAttentionPaths(c).map((path, m) => [path, 2 * m + 1]));
}

const WIDTH_FAMILIES: Record<number, string> = { 768: 'SD 1.x', 1024: 'SD 2.x', 2048: 'SDXL', 1280: 'the SDXL refiner' };

function describeUnet(layers: number, width: number): string {
  const family = WIDTH_FAMILIES[width];
  return `${family ? `${family}: ` : ''}${layers} cross-attention layers of width ${width}`;
}

/**
 * Refuses an adapter made for another UNet (another family, or a UNet of other depth), before
 * anything is built: one ModelLoadError naming both.
 */
export function checkAdapterFits(adapter: IpAdapterFile, c: UnetConfig, model = 'the model'): void {
  const expected = [...ipAdapterLayerMap(c).values()];
  const have = [...adapter.layers.keys()];
  const same = expected.length === have.length && expected.every((n, i) => n === have[i]);
  if (!same || adapter.crossAttentionDim !== c.crossAttentionDim) {
    throw new ModelLoadError(
      `IP-Adapter ${adapter.name} is made for another UNet (${describeUnet(have.length, adapter.crossAttentionDim)}); ` +
        `${model} has ${describeUnet(expected.length, c.crossAttentionDim)}. Use the adapter for the model's family.`,
      adapter.path,
    );
  }
}

/**
 * The decoupled cross-attention of adapter number `k` for the UNet graph being built in `g`. Its
 * weights are named `adapters.<k>.ip_adapter.<n>...` in the graph, so that several adapters
 * (whose files use the same names) can share one UNet.
 */
export function adapterCrossAttention(g: GraphBuilder, adapter: IpAdapterFile, c: UnetConfig, k = 0): DecoupledCrossAttention & { params: Params } {
  const prefix = `adapters.${k}`;
  const source = new SafetensorsWeights(adapter.weights.component, adapter.weights.location, adapter.weights.files, (stored) => `${prefix}.${stored}`);
  const params = Params.of(g, source);
  const index = ipAdapterLayerMap(c);
  return {
    params,
    layer(path: string): Params {
      const n = index.get(path);
      if (n === undefined || !adapter.layers.has(n)) {
        throw new ModelLoadError(`IP-Adapter ${adapter.name} has no layer for ${path} (ip_adapter.${n ?? '?'})`, adapter.path);
      }
      return params.at(`${prefix}.ip_adapter.${n}`);
    },
  };
}

/** The model's UNet with the adapters' cross-attention layers (inputs as unet.ts' ipInputNames). */
export function buildIpAdapterUnet(
  g: GraphBuilder,
  config: Record<string, unknown>,
  p: Params,
  adapters: readonly IpAdapterFile[],
  model?: string,
  options: Pick<UnetBuildOptions, 'controlResiduals'> = {},
): void {
  const c = parseUnetConfig(config, p.source.component);
  for (const a of adapters) checkAdapterFits(a, c, model);
  const views = adapters.map((a, k) => adapterCrossAttention(g, a, c, k));
  buildUnet(g, config, p, { ...options, ipAdapters: views });
  views.forEach((v, k) => {
    const unused = v.params.unusedKeys().filter((key) => key.startsWith(`adapters.${k}.ip_adapter.`));
    if (unused.length) throw new ModelLoadError(`IP-Adapter ${adapters[k]!.name}: ${unused.length} layer weight(s) found no layer (${unused[0]})`, adapters[k]!.path);
  });
}

// ---------------------------------------------------------------------------------------------
// The projection graph

/** `image_embeds` -> `ip_tokens` [batch, tokens, cross_attention_dim]. */
export function buildImageProjection(g: GraphBuilder, adapter: IpAdapterFile): void {
  const p = Params.of(g, adapter.weights).at('image_proj');
  const C = adapter.crossAttentionDim;
  const N = adapter.tokens;
  const D = adapter.embedDim;
  g.output('ip_tokens', 'float32', ['batch', N, C]);
  if (adapter.kind === 'base') {
    const x = g.input('image_embeds', 'float32', ['batch', D]);
    const y = g.op('Reshape', [linear(g, p.at('proj'), x, D, N * C), g.constI64([0, N, C])]);
    g.op('Identity', [layerNorm(g, p.at('norm'), y, C, LN_EPS)], {}, 'ip_tokens');
    return;
  }
  const { hidden: H, heads, depth } = adapter.resampler!;
  const inner = heads * PLUS_HEAD_DIM;
  const ffn = H * PLUS_FFN_RATIO;
  const features = g.input('image_embeds', 'float32', ['batch', 'image_tokens', D]);
  const batch = g.op('Slice', [g.op('Shape', [features]), g.constI64([0]), g.constI64([1])]);
  let latents = g.op('Expand', [p.get('latents', [1, N, H]), g.op('Concat', [batch, g.constI64([N, H])], { axis: 0 })]);
  const x = linear(g, p.at('proj_in'), features, D, H);
  for (let i = 0; i < depth; i++) {
    latents = g.scope(`layers.${i}`, () => {
      const attn = p.at(`layers.${i}.0`);
      const ff = p.at(`layers.${i}.1`);
      const xn = layerNorm(g, attn.at('norm1'), x, H, LN_EPS);
      const ln = layerNorm(g, attn.at('norm2'), latents, H, LN_EPS);
      const kvInput = g.op('Concat', [xn, ln], { axis: 1 });
      const q = linear(g, attn.at('to_q'), ln, H, inner, false);
      const kv = linear(g, attn.at('to_kv'), kvInput, H, 2 * inner, false);
      const [k, v] = g.node('Split', [kv, g.constI64([inner, inner])], { axis: -1 }, { outputCount: 2 }) as [string, string];
      const attended = linear(g, attn.at('to_out'), attention(g, q, k, v, heads, PLUS_HEAD_DIM), inner, H, false);
      const r = g.op('Add', [attended, latents]);
      const f = linear(g, ff.at('3'), gelu(g, linear(g, ff.at('1'), layerNorm(g, ff.at('0'), r, H, LN_EPS), H, ffn, false)), ffn, H, false);
      return g.op('Add', [f, r]);
    });
  }
  g.op('Identity', [layerNorm(g, p.at('norm_out'), linear(g, p.at('proj_out'), latents, H, C), C, LN_EPS)], {}, 'ip_tokens');
}

// ---------------------------------------------------------------------------------------------
// Image encoders

export interface ImageEncoderInfo {
  dir: string;
  config: ClipVisionConfig;
  raw: Record<string, unknown>;
}

/** Reads an image encoder folder's config (and checks it has weights): a clear error for a missing one. */
export function readImageEncoder(dir: string, forAdapter?: string): ImageEncoderInfo {
  const who = forAdapter ? ` for IP-Adapter ${forAdapter}` : '';
  const configPath = join(dir, 'config.json');
  if (!existsSync(dir)) throw new ModelLoadError(`the image encoder${who} is missing: ${dir} does not exist`, dir);
  if (!existsSync(configPath)) throw new ModelLoadError(`the image encoder${who} is incomplete: ${dir} has no config.json`, configPath);
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(readFileSync(configPath, 'utf8')) as Record<string, unknown>;
  } catch {
    throw new ModelLoadError(`the image encoder${who}: ${configPath} is not JSON`, configPath);
  }
  checkClass(raw, ['CLIPVisionModelWithProjection', 'CLIPVisionModel'], 'image_encoder', configPath);
  const config = clipVisionConfig(raw, 'image_encoder', configPath);
  componentWeights(dir, 'image_encoder'); // throws, naming the folder, when there are no weights
  return { dir, config, raw };
}

/** What an adapter reads from its encoder: `image_embeds` (base) or hidden_states[-2] (Plus). */
export function encoderOutputFor(adapter: IpAdapterFile, encoder: ImageEncoderInfo): string {
  const c = encoder.config;
  if (adapter.kind === 'base') {
    if (!c.withProjection || c.projectionDim !== adapter.embedDim) {
      throw new ModelLoadError(
        `IP-Adapter ${adapter.name} takes image embeddings of width ${adapter.embedDim}; the image encoder ${encoder.dir} gives ` +
          `${c.withProjection ? `${c.projectionDim}` : 'none (a CLIPVisionModel without projection)'}: it needs another image encoder`,
        adapter.path,
      );
    }
    return 'image_embeds';
  }
  if (c.hidden !== adapter.embedDim) {
    throw new ModelLoadError(
      `IP-Adapter ${adapter.name} takes image-encoder hidden states of width ${adapter.embedDim}; the image encoder ${encoder.dir} has width ${c.hidden}: it needs another image encoder`,
      adapter.path,
    );
  }
  return penultimateOutput(c);
}

// ---------------------------------------------------------------------------------------------
// Building and caching

export interface ImagePromptAdapterSpec {
  /** The adapter's .safetensors file (h94 layout). */
  file: string;
  /** Its image encoder folder (CLIPVisionModelWithProjection: config.json + model.safetensors). */
  imageEncoder: string;
}

export interface ImagePromptBuildSpec {
  /** The model's UNet folder (diffusers: config.json + safetensors weights). */
  unet: string;
  adapters: readonly ImagePromptAdapterSpec[];
  cacheDir: string;
  dtype?: GraphDtype;
  /** Names the cache entry (and the model in messages). */
  model?: string;
}

/** A built (or cached) set of image-prompt graphs: `kiln-build.json` of the entry. */
export interface ImagePromptBuild {
  dir: string;
  dtype: GraphDtype;
  /** `<dir>/unet/model.onnx`. */
  unet: string;
  /** The model's UNet folder the entry was built from, and each adapter's file (for ensureImagePromptControlUnet). */
  sources: { unet: string; adapters: string[] };
  adapters: {
    name: string;
    kind: IpAdapterKind;
    tokens: number;
    /** `<dir>/image_proj.<k>/model.onnx`. */
    projection: string;
    /** Index into `encoders`. */
    encoder: number;
    /** The encoder output the projection takes. */
    encoderOutput: string;
  }[];
  encoders: { graph: string; source: string; imageSize: number }[];
}

export const IMAGE_PROMPT_FORMAT = 1;
const INFO_FILE = 'kiln-build.json';

interface Plan {
  unetConfig: Record<string, unknown>;
  adapters: IpAdapterFile[];
  encoders: ImageEncoderInfo[];
  encoderOf: number[];
  outputs: string[];
}

/** Checks everything (adapter files, encoders, fit to the UNet) from headers and configs. */
export function planImagePrompt(spec: Pick<ImagePromptBuildSpec, 'unet' | 'adapters' | 'model'>): Plan {
  if (!spec.adapters.length) throw new ModelLoadError('an image prompt needs at least one IP-Adapter');
  const unetConfigPath = join(spec.unet, 'config.json');
  if (!existsSync(unetConfigPath)) throw new ModelLoadError(`image prompts need the model's UNet config: ${unetConfigPath} is missing`, unetConfigPath);
  const unetConfig = JSON.parse(readFileSync(unetConfigPath, 'utf8')) as Record<string, unknown>;
  const c = parseUnetConfig(unetConfig);
  const adapters = spec.adapters.map((a) => {
    try {
      return readIpAdapter(resolve(a.file));
    } catch (err) {
      if (err instanceof SafetensorsError) throw new ModelLoadError(`IP-Adapter ${basename(a.file)}: ${err.message}`, a.file);
      throw err;
    }
  });
  for (const a of adapters) checkAdapterFits(a, c, spec.model ? `model ${spec.model}` : undefined);
  const encoders: ImageEncoderInfo[] = [];
  const encoderOf = spec.adapters.map((a, k) => {
    const dir = resolve(a.imageEncoder);
    let index = encoders.findIndex((e) => e.dir === dir);
    if (index < 0) index = encoders.push(readImageEncoder(dir, adapters[k]!.name)) - 1;
    return index;
  });
  const outputs = adapters.map((a, k) => encoderOutputFor(a, encoders[encoderOf[k]!]!));
  return { unetConfig, adapters, encoders, encoderOf, outputs };
}

function fileFingerprint(path: string): string {
  const st = statSync(path);
  const header = openSafetensors(path);
  const tensors = [...header.tensors.values()].map((t) => `${t.name}:${t.dtype}:${t.shape.join('x')}:${t.begin}`);
  return `${basename(path)}\n${st.size}\n${st.mtimeMs}\n${tensors.join('\n')}`;
}

/** The cache key: build format, dtype, the UNet folder, every adapter file and encoder folder. */
export function imagePromptKey(spec: ImagePromptBuildSpec): string {
  const dtype = spec.dtype ?? 'fp32';
  const h = createHash('sha256').update(`kiln-image-prompt ${IMAGE_PROMPT_FORMAT}\n${dtype}\nunet ${buildKey(spec.unet, dtype)}\n`);
  for (const a of spec.adapters) h.update(`adapter ${fileFingerprint(resolve(a.file))}\nencoder ${buildKey(resolve(a.imageEncoder), dtype)}\n`);
  return h.digest('hex').slice(0, 16);
}

/**
 * The image-prompt graphs for a UNet and adapters: the cached entry
 * `<cacheDir>/ip-<model>-<dtype>-<key>/` when it exists, else built now (in a private temporary
 * folder renamed into place, so concurrent builders never see half an entry: the first rename
 * wins). Everything is checked first (planImagePrompt), also when the entry exists.
 */
export async function ensureImagePromptBuilt(spec: ImagePromptBuildSpec): Promise<ImagePromptBuild> {
  const plan = planImagePrompt(spec);
  const dtype = spec.dtype ?? 'fp32';
  const name = `ip-${(spec.model ?? basename(resolve(spec.unet, '..'))).replace(/[^\w.-]/g, '_')}-${dtype}-${imagePromptKey(spec)}`;
  const target = join(spec.cacheDir, name);
  if (!existsSync(join(target, INFO_FILE))) buildEntry(spec, plan, target, dtype);
  return readBuild(target);
}

function buildEntry(spec: ImagePromptBuildSpec, plan: Plan, target: string, dtype: GraphDtype): void {
  mkdirSync(spec.cacheDir, { recursive: true });
  const partial = join(spec.cacheDir, `.partial-${basename(target)}-${process.pid}-${randomBytes(4).toString('hex')}`);
  try {
    const model = spec.model ? `model ${spec.model}` : undefined;
    const unet = buildGraph({ build: (g, config, p) => buildIpAdapterUnet(g, config, p, plan.adapters, model) }, 'unet', plan.unetConfig, componentWeights(spec.unet, 'unet'), { dtype });
    writeBuiltGraph(unet, join(partial, 'unet'));
    writeFileSync(join(partial, 'unet', 'config.json'), `${JSON.stringify(plan.unetConfig, null, 2)}\n`);
    plan.adapters.forEach((a, k) => {
      const built = buildGraph({ build: (g) => buildImageProjection(g, a) }, `image_proj.${k}`, {}, a.weights, { dtype });
      writeBuiltGraph(built, join(partial, `image_proj.${k}`));
    });
    plan.encoders.forEach((e, k) => {
      const built = buildGraph({ build: (g, config, p) => void buildClipVision(g, config, p) }, `image_encoder.${k}`, e.raw, componentWeights(e.dir, 'image_encoder'), { dtype });
      writeBuiltGraph(built, join(partial, `image_encoder.${k}`));
      writeFileSync(join(partial, `image_encoder.${k}`, 'config.json'), `${JSON.stringify(e.raw, null, 2)}\n`);
    });
    const info = {
      format: IMAGE_PROMPT_FORMAT,
      dtype,
      unet: resolve(spec.unet),
      adapters: plan.adapters.map((a, k) => ({
        name: a.name,
        source: a.path,
        kind: a.kind,
        tokens: a.tokens,
        encoder: plan.encoderOf[k]!,
        encoderOutput: plan.outputs[k]!,
      })),
      encoders: plan.encoders.map((e) => ({ source: e.dir, imageSize: e.config.imageSize })),
    };
    writeFileSync(join(partial, INFO_FILE), `${JSON.stringify(info, null, 2)}\n`);
    try {
      renameSync(partial, target);
    } catch (err) {
      // Another builder finished first: its entry is the same graphs.
      if (!existsSync(join(target, INFO_FILE))) throw err;
    }
  } finally {
    rmSync(partial, { recursive: true, force: true });
  }
}

function readBuild(dir: string): ImagePromptBuild {
  const info = JSON.parse(readFileSync(join(dir, INFO_FILE), 'utf8')) as {
    dtype: GraphDtype;
    unet: string;
    adapters: { name: string; source: string; kind: IpAdapterKind; tokens: number; encoder: number; encoderOutput: string }[];
    encoders: { source: string; imageSize: number }[];
  };
  return {
    dir,
    dtype: info.dtype,
    unet: join(dir, 'unet', GRAPH_FILE),
    sources: { unet: info.unet, adapters: info.adapters.map((a) => a.source) },
    adapters: info.adapters.map((a, k) => ({ ...a, projection: join(dir, `image_proj.${k}`, GRAPH_FILE) })),
    encoders: info.encoders.map((e, k) => ({ graph: join(dir, `image_encoder.${k}`, GRAPH_FILE), source: e.source, imageSize: e.imageSize })),
  };
}

/**
 * The entry's UNet with the adapters' layers and ControlNet residual inputs (image prompt and pose
 * together): `<dir>/controlnet/model.onnx`, built from the entry's own sources on first use
 * (control-unet.ts), so that entries without it stay valid and the image-prompt UNet itself
 * carries no residual inputs.
 */
export function ensureImagePromptControlUnet(build: ImagePromptBuild, model?: string): string {
  const config = JSON.parse(readFileSync(join(build.dir, 'unet', 'config.json'), 'utf8')) as Record<string, unknown>;
  return ensureEntryControlUnet(build.dir, config, () => {
    const adapters = build.sources.adapters.map((file) => readIpAdapter(file));
    const who = model ? `model ${model}` : undefined;
    return buildGraph(
      { build: (g, c, p) => buildIpAdapterUnet(g, c, p, adapters, who, { controlResiduals: true }) },
      'unet',
      config,
      componentWeights(build.sources.unet, 'unet'),
      { dtype: build.dtype },
    );
  });
}
