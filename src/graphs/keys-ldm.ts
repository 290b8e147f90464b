/**
 * Single-file checkpoints (the `.safetensors` files A1111, ComfyUI and stable-diffusion.cpp load)
 * seen through the names Kiln's model pages ask for. As in stable-diffusion.cpp, every naming is
 * normalised to one, here diffusers' / transformers':
 *
 * - UNet `model.diffusion_model.*` (LDM / SGM openaimodel: input_blocks, middle_block,
 *   output_blocks, time_embed, label_emb, out) -> UNet2DConditionModel names. Which
 *   `input_blocks.N` is which diffusers block depends on the config (layers per block, which blocks
 *   have attentions, where the samplers are), so the table is built from unet/config.json.
 * - VAE `first_stage_model.*` -> AutoencoderKL names; the decoder's `up.i` is `up_blocks.(n-1-i)`
 *   and the mid-block attention's q/k/v/proj_out are stored as 1x1 convs [C, C, 1, 1], served as
 *   the linear [C, C] they are (same bytes, another shape).
 * - CLIP ViT-L `cond_stage_model.transformer.*` / `conditioner.embedders.0.transformer.*`: the
 *   transformers names behind a prefix.
 * - OpenCLIP `cond_stage_model.model.*` (SD 2.x), `conditioner.embedders.1.model.*` (SDXL base),
 *   `conditioner.embedders.0.model.*` (SDXL refiner) -> transformers CLIP names: the fused
 *   `in_proj_weight` / `in_proj_bias` (rows q, k, v) are served as three row ranges of the stored
 *   tensor, and `text_projection` [hidden, proj] (used as x @ P) as its transpose [proj, hidden],
 *   the only tensor that is computed.
 *
 * Nothing is copied while a graph is built: every page key is a view of bytes in the one opened
 * file (writeGraph converts dtypes when it writes).
 */
import { ModelLoadError } from '../engine/errors.js';
import { parseUnetConfig } from './unet.js';
import type { WeightEntry, WeightSource } from './weights.js';
import { FLOAT_DTYPES, openSafetensors, readTensorFloat32, type SafetensorsFile, type SafetensorsTensor } from './safetensors.js';

// ---------------------------------------------------------------------------------------------
// Views of stored tensors

/** How a page key is read from a stored tensor. */
export interface TensorView {
  tensor: SafetensorsTensor;
  /** Served under this shape (same element count; a reshape needs no copy). */
  reshape?: number[];
  /** Rows [begin, end) of the first dimension: a contiguous byte range of the stored tensor. */
  rows?: [number, number];
  /** A 2-D tensor served transposed (computed on demand). */
  transpose?: boolean;
}

const FILE_DTYPE = { F32: 'float32', F16: 'float16', BF16: 'bfloat16' } as const;

/** A WeightSource whose keys are views of one safetensors file's tensors. */
export class MappedWeights implements WeightSource {
  constructor(
    readonly component: string,
    readonly location: string,
    readonly file: SafetensorsFile,
    /** Page key -> how it is read. */
    readonly views: ReadonlyMap<string, TensorView>,
  ) {}

  lookup(key: string): WeightEntry | undefined {
    const view = this.views.get(key);
    if (!view) return undefined;
    const t = view.tensor;
    if (!(t.dtype in FILE_DTYPE)) {
      throw new ModelLoadError(
        `${this.component}: weight "${key}" (stored as "${t.name}" in ${this.file.path}) has dtype ${t.dtype}; weights must be one of ${FLOAT_DTYPES.join(', ')}`,
        this.file.path,
      );
    }
    const dtype = FILE_DTYPE[t.dtype as keyof typeof FILE_DTYPE];
    if (view.transpose) {
      const [rows, cols] = t.shape as [number, number];
      const file = this.file;
      const values = (): Float32Array => {
        const v = readTensorFloat32(file, t);
        const out = new Float32Array(v.length);
        for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) out[j * rows + i] = v[i * cols + j]!;
        return out;
      };
      return { shape: [cols, rows], dtype: 'F32', source: { kind: 'values', values } };
    }
    if (view.rows) {
      const [r0, r1] = view.rows;
      const rowBytes = t.byteLength / t.shape[0]!;
      return {
        shape: [r1 - r0, ...t.shape.slice(1)],
        dtype: t.dtype,
        source: { kind: 'file', path: this.file.path, dtype, begin: t.begin + r0 * rowBytes, byteLength: (r1 - r0) * rowBytes },
      };
    }
    return {
      shape: view.reshape ? [...view.reshape] : [...t.shape],
      dtype: t.dtype,
      source: { kind: 'file', path: this.file.path, dtype, begin: t.begin, byteLength: t.byteLength },
    };
  }

  has(key: string): boolean {
    return this.views.has(key);
  }

  keys(): string[] {
    return [...this.views.keys()];
  }
}

// ---------------------------------------------------------------------------------------------
// Module-prefix tables

/**
 * Pairs of module paths (LDM name, diffusers name). A key maps through the longest pair whose
 * name is the key or a dotted prefix of it; the rest of the key is kept.
 */
export class PrefixTable {
  private readonly forward = new Map<string, string>();
  private readonly backward = new Map<string, string>();

  add(from: string, to: string): void {
    this.forward.set(from, to);
    this.backward.set(to, from);
  }

  get size(): number {
    return this.forward.size;
  }

  /** LDM key -> diffusers key (undefined if no pair covers it). */
  toDiffusers(key: string): string | undefined {
    return PrefixTable.apply(this.forward, key);
  }

  /** diffusers key -> LDM key. */
  toLdm(key: string): string | undefined {
    return PrefixTable.apply(this.backward, key);
  }

  private static apply(map: Map<string, string>, key: string): string | undefined {
    for (let end = key.length; end > 0; end = key.lastIndexOf('.', end - 1)) {
      const hit = map.get(key.slice(0, end));
      if (hit !== undefined) return hit + key.slice(end);
    }
    return undefined;
  }
}

/** The block structure of a UNet2DConditionModel, which fixes the LDM block numbering. */
export interface UnetLayout {
  down: { resnets: number; attentions: boolean; downsampler: boolean }[];
  mid: boolean;
  up: { resnets: number; attentions: boolean; upsampler: boolean }[];
}

/** The layout unet/config.json implies (diffusers' defaults for absent keys). */
export function unetLayoutFromConfig(config: Record<string, unknown>, component = 'unet'): UnetLayout {
  const c = parseUnetConfig(config, component);
  const last = c.blockOutChannels.length - 1;
  const upLayers = [...c.layersPerBlock].reverse();
  return {
    down: c.downBlockTypes.map((t, i) => ({ resnets: c.layersPerBlock[i]!, attentions: t === 'CrossAttnDownBlock2D', downsampler: i < last })),
    mid: c.hasMidBlock,
    up: c.upBlockTypes.map((t, i) => ({ resnets: upLayers[i]! + 1, attentions: t === 'CrossAttnUpBlock2D', upsampler: i < last })),
  };
}

/** The layout a set of diffusers UNet keys shows (for LoRA files named after the LDM blocks). */
export function unetLayoutFromKeys(keys: Iterable<string>): UnetLayout {
  interface Seen { resnets: number; attentions: boolean; sampler: boolean }
  const seen = { down: [] as Seen[], up: [] as Seen[] };
  let mid = false;
  for (const key of keys) {
    if (key.startsWith('mid_block.')) mid = true;
    const m = /^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\./.exec(key);
    if (!m) continue;
    const list = seen[m[1] as 'down' | 'up'];
    const i = Number(m[2]);
    while (list.length <= i) list.push({ resnets: 0, attentions: false, sampler: false });
    const block = list[i]!;
    if (m[3] === 'resnets') block.resnets = Math.max(block.resnets, Number(m[4]) + 1);
    else if (m[3] === 'attentions') block.attentions = true;
    else block.sampler = true;
  }
  return {
    down: seen.down.map((b) => ({ resnets: b.resnets, attentions: b.attentions, downsampler: b.sampler })),
    mid,
    up: seen.up.map((b) => ({ resnets: b.resnets, attentions: b.attentions, upsampler: b.sampler })),
  };
}

/** LDM ResBlock children -> diffusers ResnetBlock2D children. */
const RESNET_PARTS: readonly [string, string][] = [
  ['in_layers.0', 'norm1'],
  ['in_layers.2', 'conv1'],
  ['emb_layers.1', 'time_emb_proj'],
  ['out_layers.0', 'norm2'],
  ['out_layers.3', 'conv2'],
  ['skip_connection', 'conv_shortcut'],
];

/**
 * The LDM <-> diffusers module table of a UNet (names relative to `model.diffusion_model.` and
 * to the diffusers UNet). LDM numbers its blocks in one sequence: input_blocks.0 is conv_in, then
 * each down block's layers (resnet `.0`, transformer `.1`) and its downsampler (`.0.op`) take one
 * number each; output_blocks number each up block's layers, the upsampler riding in the block's
 * last layer after the resnet and transformer (`.1.conv` or `.2.conv`). SpatialTransformer
 * children already have diffusers' names (norm, proj_in, transformer_blocks.N.attn1.to_q, ...).
 */
export function ldmUnetTable(layout: UnetLayout): PrefixTable {
  const t = new PrefixTable();
  const resnet = (ldm: string, diff: string): void => {
    for (const [a, b] of RESNET_PARTS) t.add(`${ldm}.${a}`, `${diff}.${b}`);
  };
  t.add('time_embed.0', 'time_embedding.linear_1');
  t.add('time_embed.2', 'time_embedding.linear_2');
  t.add('label_emb.0.0', 'add_embedding.linear_1');
  t.add('label_emb.0.2', 'add_embedding.linear_2');
  t.add('input_blocks.0.0', 'conv_in');
  t.add('out.0', 'conv_norm_out');
  t.add('out.2', 'conv_out');
  let k = 1;
  layout.down.forEach((b, i) => {
    for (let j = 0; j < b.resnets; j++, k++) {
      resnet(`input_blocks.${k}.0`, `down_blocks.${i}.resnets.${j}`);
      if (b.attentions) t.add(`input_blocks.${k}.1`, `down_blocks.${i}.attentions.${j}`);
    }
    if (b.downsampler) t.add(`input_blocks.${k++}.0.op`, `down_blocks.${i}.downsamplers.0.conv`);
  });
  if (layout.mid) {
    resnet('middle_block.0', 'mid_block.resnets.0');
    t.add('middle_block.1', 'mid_block.attentions.0');
    resnet('middle_block.2', 'mid_block.resnets.1');
  }
  k = 0;
  layout.up.forEach((b, i) => {
    for (let j = 0; j < b.resnets; j++, k++) {
      resnet(`output_blocks.${k}.0`, `up_blocks.${i}.resnets.${j}`);
      if (b.attentions) t.add(`output_blocks.${k}.1`, `up_blocks.${i}.attentions.${j}`);
      if (b.upsampler && j === b.resnets - 1) t.add(`output_blocks.${k}.${b.attentions ? 2 : 1}.conv`, `up_blocks.${i}.upsamplers.0.conv`);
    }
  });
  return t;
}

// ---------------------------------------------------------------------------------------------
// Per-component renames (stored name relative to the component prefix -> page key)

/** A page key and how to read it from the stored tensor, or several (a fused q/k/v). */
type Rename = { key: string; view?: Omit<TensorView, 'tensor'> }[];

/** VAE: LDM AutoencoderKL names -> diffusers'. `blocks` = number of resolution levels. */
export function ldmVaeRename(name: string, shape: readonly number[], blocks: number): Rename | undefined {
  let m = /^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$/.exec(name);
  if (m) {
    const part = { norm: 'group_norm', q: 'to_q', k: 'to_k', v: 'to_v', proj_out: 'to_out.0' }[m[2] as 'q'];
    const key = `${m[1]}.mid_block.attentions.0.${part}.${m[3]}`;
    // Linear weights stored as 1x1 convs (older diffusers' AttentionBlock wrote [C, C] directly).
    const conv = m[2] !== 'norm' && m[3] === 'weight' && shape.length === 4;
    return [{ key, view: conv ? { reshape: [shape[0]!, shape[1]!] } : undefined }];
  }
  const resnetPart = (p: string): string => p.replace(/^nin_shortcut\./, 'conv_shortcut.');
  m = /^(encoder|decoder)\.mid\.block_([12])\.(.+)$/.exec(name);
  if (m) return [{ key: `${m[1]}.mid_block.resnets.${Number(m[2]) - 1}.${resnetPart(m[3]!)}` }];
  m = /^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$/.exec(name);
  if (m) return [{ key: `encoder.down_blocks.${m[1]}.resnets.${m[2]}.${resnetPart(m[3]!)}` }];
  m = /^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$/.exec(name);
  if (m) return [{ key: `encoder.down_blocks.${m[1]}.downsamplers.0.conv.${m[2]}` }];
  // The decoder's `up` list runs from the lowest resolution level's index 0 = the last block.
  m = /^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$/.exec(name);
  if (m) return [{ key: `decoder.up_blocks.${blocks - 1 - Number(m[1])}.resnets.${m[2]}.${resnetPart(m[3]!)}` }];
  m = /^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$/.exec(name);
  if (m) return [{ key: `decoder.up_blocks.${blocks - 1 - Number(m[1])}.upsamplers.0.conv.${m[2]}` }];
  m = /^(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)$/.exec(name);
  if (m) return [{ key: `${m[1]}.${m[2] === 'norm_out' ? 'conv_norm_out' : m[2]}.${m[3]}` }];
  if (/^(post_)?quant_conv\.(weight|bias)$/.test(name)) return [{ key: name }];
  return undefined;
}

/** CLIP ViT-L under transformers names (old files lack the `text_model.` level). */
export function clipRename(name: string): Rename | undefined {
  const key = name.startsWith('text_model.') ? name : `text_model.${name}`;
  if (!/^text_model\.(embeddings|encoder|final_layer_norm)\./.test(key)) return undefined;
  return [{ key }];
}

/** OpenCLIP text tower names -> transformers CLIPTextModel(WithProjection) names. */
export function openClipRename(name: string, shape: readonly number[]): Rename | undefined {
  if (name === 'token_embedding.weight') return [{ key: 'text_model.embeddings.token_embedding.weight' }];
  if (name === 'positional_embedding') return [{ key: 'text_model.embeddings.position_embedding.weight' }];
  let m = /^ln_final\.(weight|bias)$/.exec(name);
  if (m) return [{ key: `text_model.final_layer_norm.${m[1]}` }];
  if (name === 'text_projection' && shape.length === 2) return [{ key: 'text_projection.weight', view: { transpose: true } }];
  m = /^transformer\.resblocks\.(\d+)\.(.+)$/.exec(name);
  if (!m) return undefined;
  const layer = `text_model.encoder.layers.${m[1]}`;
  const rest = m[2]!;
  m = /^attn\.in_proj_(weight|bias)$/.exec(rest);
  if (m) {
    if (shape[0]! % 3 !== 0) return undefined;
    const d = shape[0]! / 3;
    return ['q', 'k', 'v'].map((p, i) => ({ key: `${layer}.self_attn.${p}_proj.${m![1]}`, view: { rows: [i * d, (i + 1) * d] as [number, number] } }));
  }
  const parts: Record<string, string> = { 'ln_1': 'layer_norm1', 'ln_2': 'layer_norm2', 'attn.out_proj': 'self_attn.out_proj', 'mlp.c_fc': 'mlp.fc1', 'mlp.c_proj': 'mlp.fc2' };
  m = /^(.+)\.(weight|bias)$/.exec(rest);
  if (m && parts[m[1]!]) return [{ key: `${layer}.${parts[m[1]!]}.${m[2]}` }];
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Family detection

export type ModelFamily = 'sd1' | 'sd2' | 'sdxl' | 'sdxl-refiner';

type Component = 'unet' | 'vae' | 'text_encoder' | 'text_encoder_2';

export interface DetectedFamily {
  family: ModelFamily;
  /** 9 input channels (latents + mask + masked-image latents). */
  inpainting: boolean;
  inChannels: number;
  /** Key prefix of each component present in the file. */
  prefixes: Partial<Record<Component, string>>;
  /** Which text encoder naming each prefix uses. */
  textEncoders: Partial<Record<'text_encoder' | 'text_encoder_2', 'clip' | 'openclip'>>;
  /** For messages: "SDXL base", "SD 1.x inpainting", ... */
  description: string;
}

const FAMILY_NAMES: Record<ModelFamily, string> = { sd1: 'SD 1.x', sd2: 'SD 2.x', sdxl: 'SDXL base', 'sdxl-refiner': 'SDXL refiner' };

const UNET_PREFIX = 'model.diffusion_model.';
const VAE_PREFIX = 'first_stage_model.';

/** Counts of the first two name levels, largest first: what a refusal says was found. */
function describeKeys(names: string[]): string {
  const counts = new Map<string, number>();
  for (const n of names) {
    const parts = n.split('.');
    const head = parts.length > 2 ? parts.slice(0, 2).join('.') + '.*' : n;
    counts.set(head, (counts.get(head) ?? 0) + 1);
  }
  const top = [...counts].sort((a, b) => b[1] - a[1]).slice(0, 8);
  return `${names.length} tensors: ${top.map(([k, c]) => `${k} (${c})`).join(', ')}${counts.size > top.length ? ', ...' : ''}`;
}

/** What a file that is not an SD checkpoint looks like, when its keys say. */
function recognise(names: string[]): string | undefined {
  const any = (re: RegExp): boolean => names.some((n) => re.test(n));
  if (any(/^lora_(unet|te\d?)_|\.lora_(down|up|A|B)\./)) return 'a LoRA file (use it as a LoRA, not as a model)';
  if (any(/(^|\.)double_blocks\.\d+\./)) return 'a Flux transformer (not supported)';
  if (any(/(^|\.)joint_blocks\.\d+\./)) return 'an SD3 MMDiT (not supported)';
  if (any(/^(unet\.)?down_blocks\.\d+\.(resnets|attentions)\./) || any(/^(unet\.)?conv_in\.weight$/)) return 'diffusers-named UNet weights (load the diffusers folder instead)';
  if (any(/^(first_stage_model\.)?(encoder|decoder)\.(down|up|mid)\./) && !any(/^model\.diffusion_model\./)) return 'a VAE alone (use it as a separate VAE)';
  if (any(/^(text_model\.|transformer\.resblocks\.)/)) return 'a text encoder alone';
  return undefined;
}

/**
 * The family of a single-file checkpoint from its keys and shapes: the text encoders say SD 1.x
 * (CLIP ViT-L), SD 2.x (OpenCLIP ViT-H), SDXL base (both, plus the UNet's label_emb) or refiner
 * (OpenCLIP bigG alone, label_emb); conv_in's input channels say text-to-image (4) or
 * inpainting (9). Anything else is refused with a ModelLoadError that names what was found.
 */
export function detectFamily(file: SafetensorsFile): DetectedFamily {
  const names = [...file.tensors.keys()];
  const refuse = (why: string): never => {
    const seen = recognise(names);
    throw new ModelLoadError(
      `${file.path} is not a Stable Diffusion checkpoint Kiln can load (SD 1.x, SD 2.x, SDXL base or refiner, text-to-image or 9-channel inpainting): ${why}${seen ? `; it looks like ${seen}` : ''}. Found ${describeKeys(names)}`,
      file.path,
    );
  };
  const convIn = file.tensors.get(`${UNET_PREFIX}input_blocks.0.0.weight`);
  if (!convIn) {
    const dit = names.find((n) => n.startsWith(UNET_PREFIX));
    return refuse(dit ? `its model.diffusion_model has no input_blocks.0.0 (a UNet's conv_in), e.g. "${dit}"` : 'no model.diffusion_model.* UNet tensors');
  }
  if (convIn.shape.length !== 4) return refuse(`model.diffusion_model.input_blocks.0.0.weight has shape [${convIn.shape}], not a conv`);
  const inChannels = convIn.shape[1]!;
  if (inChannels !== 4 && inChannels !== 9) {
    const known: Record<number, string> = { 5: 'an SD 2 depth model', 7: 'an SD x4 upscaler', 8: 'an instruct-pix2pix model' };
    return refuse(`the UNet takes ${inChannels} input channels (4: text-to-image, 9: inpainting)${known[inChannels] ? `, as ${known[inChannels]} does` : ''}`);
  }
  const hasPrefix = (p: string): boolean => names.some((n) => n.startsWith(p));
  const labelEmb = file.tensors.has(`${UNET_PREFIX}label_emb.0.0.weight`);
  const prefixes: DetectedFamily['prefixes'] = { unet: UNET_PREFIX };
  const textEncoders: DetectedFamily['textEncoders'] = {};
  if (hasPrefix(VAE_PREFIX)) prefixes.vae = VAE_PREFIX;
  let family: ModelFamily;
  if (labelEmb) {
    const clipL = 'conditioner.embedders.0.transformer.';
    const bigG = 'conditioner.embedders.1.model.';
    const refinerG = 'conditioner.embedders.0.model.';
    if (hasPrefix(clipL) && hasPrefix(bigG)) {
      family = 'sdxl';
      prefixes.text_encoder = clipL;
      prefixes.text_encoder_2 = bigG;
      textEncoders.text_encoder = 'clip';
      textEncoders.text_encoder_2 = 'openclip';
    } else if (hasPrefix(refinerG) && !hasPrefix('conditioner.embedders.1.')) {
      family = 'sdxl-refiner';
      prefixes.text_encoder_2 = refinerG;
      textEncoders.text_encoder_2 = 'openclip';
    } else {
      const found = [...new Set(names.filter((n) => n.startsWith('conditioner.')).map((n) => n.split('.').slice(0, 4).join('.')))];
      return refuse(`the UNet has SDXL's label_emb but the text encoders are not SDXL's (conditioner.embedders.0.transformer + 1.model, or 0.model alone); found ${found.join(', ') || 'no conditioner.* tensors'}`);
    }
  } else if (hasPrefix('cond_stage_model.transformer.')) {
    family = 'sd1';
    prefixes.text_encoder = 'cond_stage_model.transformer.';
    textEncoders.text_encoder = 'clip';
  } else if (hasPrefix('cond_stage_model.model.')) {
    family = 'sd2';
    prefixes.text_encoder = 'cond_stage_model.model.';
    textEncoders.text_encoder = 'openclip';
  } else {
    return refuse('a UNet without SDXL\'s label_emb and without an SD 1.x (cond_stage_model.transformer.*) or SD 2.x (cond_stage_model.model.*) text encoder');
  }
  const inpainting = inChannels === 9;
  return { family, inpainting, inChannels, prefixes, textEncoders, description: `${FAMILY_NAMES[family]}${inpainting ? ' inpainting' : ''}` };
}

// ---------------------------------------------------------------------------------------------
// The whole file

/** Stored tensors a checkpoint carries that are not weights of the components Kiln builds. */
const IGNORED: readonly [RegExp, string][] = [
  [/^model_ema\./, 'the EMA copy of the UNet (diffusers loads the non-EMA weights as well)'],
  [
    /^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)$/,
    'the training noise schedule (the scheduler config decides it)',
  ],
  [/^denoiser\./, 'the training noise schedule (the scheduler config decides it)'],
  [/^first_stage_model\.loss\./, 'the VAE training loss (LPIPS / discriminator)'],
  [/\.position_ids$/, 'a buffer of position indices 0..76, not a weight'],
  [/\.logit_scale$/, "OpenCLIP's contrastive temperature, not part of the text tower"],
  [/\.attn_mask$/, "OpenCLIP's causal mask buffer (the page builds its own)"],
];

export interface SingleFileConfigs {
  /** The UNet's config.json (its block layout decides the LDM numbering). */
  unet: Record<string, unknown>;
  /** The VAE's config.json (number of levels; inferred from the keys when absent). */
  vae?: Record<string, unknown>;
}

export interface SingleFileCheckpoint {
  file: SafetensorsFile;
  detected: DetectedFamily;
  unet: MappedWeights;
  /** Absent when the file carries no VAE (then a separate one is needed). */
  vae?: MappedWeights;
  /** CLIP ViT-L (SD 1.x, SDXL base) or OpenCLIP ViT-H (SD 2.x); absent for the SDXL refiner. */
  text_encoder?: MappedWeights;
  /** OpenCLIP bigG (SDXL base and refiner). */
  text_encoder_2?: MappedWeights;
  /** Stored tensors left out on purpose, with the reason. */
  ignored: { name: string; reason: string }[];
  /** Stored tensors no rule maps (a config that does not fit the file, or an unknown part). */
  unmapped: string[];
}

/** Opens a single-file checkpoint once and serves each component under diffusers' names. */
export function singleFileSources(path: string, configs: SingleFileConfigs): SingleFileCheckpoint {
  const file = openSafetensors(path);
  const detected = detectFamily(file);
  const table = ldmUnetTable(unetLayoutFromConfig(configs.unet));
  const vaeBlocks = vaeLevels(file, configs.vae);

  const views: Record<Component, Map<string, TensorView>> = { unet: new Map(), vae: new Map(), text_encoder: new Map(), text_encoder_2: new Map() };
  const ignored: SingleFileCheckpoint['ignored'] = [];
  const unmapped: string[] = [];
  const prefixOf = Object.entries(detected.prefixes) as [Component, string][];

  for (const tensor of file.tensors.values()) {
    const name = tensor.name;
    const skip = IGNORED.find(([re]) => re.test(name));
    if (skip) {
      ignored.push({ name, reason: skip[1] });
      continue;
    }
    const hit = prefixOf.find(([, p]) => name.startsWith(p));
    if (!hit) {
      unmapped.push(name);
      continue;
    }
    const [component, prefix] = hit;
    const rel = name.slice(prefix.length);
    let renamed: Rename | undefined;
    if (component === 'unet') {
      const key = table.toDiffusers(rel);
      renamed = key === undefined ? undefined : [{ key }];
    } else if (component === 'vae') {
      renamed = ldmVaeRename(rel, tensor.shape, vaeBlocks);
    } else {
      renamed = detected.textEncoders[component] === 'openclip' ? openClipRename(rel, tensor.shape) : clipRename(rel);
    }
    if (!renamed) {
      unmapped.push(name);
      continue;
    }
    for (const { key, view } of renamed) {
      const map = views[component];
      if (map.has(key)) throw new ModelLoadError(`${component}: weight "${key}" is stored twice in ${path} ("${map.get(key)!.tensor.name}" and "${name}")`, path);
      map.set(key, { tensor, ...view });
    }
  }

  const source = (component: Component): MappedWeights | undefined =>
    detected.prefixes[component] === undefined ? undefined : new MappedWeights(component, path, file, views[component]);
  return {
    file,
    detected,
    unet: source('unet')!,
    vae: source('vae'),
    text_encoder: source('text_encoder'),
    text_encoder_2: source('text_encoder_2'),
    ignored,
    unmapped,
  };
}

/** The VAE's number of resolution levels: from its config, else from the encoder's `down.N`. */
function vaeLevels(file: SafetensorsFile, config?: Record<string, unknown>): number {
  const blocks = config?.block_out_channels;
  if (Array.isArray(blocks) && blocks.length > 0) return blocks.length;
  let n = 0;
  for (const name of file.tensors.keys()) {
    const m = /^first_stage_model\.encoder\.down\.(\d+)\./.exec(name);
    if (m) n = Math.max(n, Number(m[1]) + 1);
  }
  return n || 1; // diffusers' AutoencoderKL default block_out_channels has one level
}
