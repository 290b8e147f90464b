/**
 * The diffusers folder Kiln writes around a single-file checkpoint (`kiln import`): the real
 * configs of each family (reference-configs.ts), the scheduler it was trained with, and the CLIP
 * tokenizer files shipped in `models/.clip-tokenizer/` with the family's special tokens. The
 * weights stay in the one file; src/graphs/checkpoint.ts serves them under these configs.
 *
 * SD 2.x checkpoints do not say whether they predict the noise (epsilon: 2.x 512 "base") or
 * the velocity (v-prediction: 2.0-v / 2.1 768, and most 2.x fine-tunes). Kiln assumes
 * v-prediction for text-to-image files and epsilon for inpainting ones (the official SD 2
 * inpainting model), as diffusers' single-file loader does; `"prediction_type"` in the model's
 * kiln.json (or `kiln import --prediction-type`) overrides it.
 */
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ModelLoadError } from '../engine/errors.js';
import type { DetectedFamily } from './keys-ldm.js';
import {
  CLIP_VIT_L_TEXT,
  OPENCLIP_BIGG_TEXT,
  OPENCLIP_VIT_H_TEXT,
  SD15_SCHEDULER,
  SD15_UNET,
  SD21_SCHEDULER,
  SD21_UNET,
  SD_VAE,
  SDXL_BASE_UNET,
  SDXL_SCHEDULER,
  SDXL_VAE,
  type JsonConfig,
} from './reference-configs.js';

export type PredictionType = 'epsilon' | 'v_prediction';
export const PREDICTION_TYPES: readonly PredictionType[] = ['epsilon', 'v_prediction'];

/** The pipeline's component folders. */
export type FolderComponent = 'unet' | 'vae' | 'text_encoder' | 'text_encoder_2';

/** Everything but the weights of a diffusers pipeline folder. */
export interface FamilyFolder {
  modelIndex: Record<string, unknown>;
  scheduler: Record<string, unknown>;
  configs: Partial<Record<FolderComponent, Record<string, unknown>>>;
  /** Tokenizer folders and their pad token (the vocabulary is CLIP's in every family). */
  tokenizers: Partial<Record<'tokenizer' | 'tokenizer_2', { pad: string }>>;
}

const BOS = '<|startoftext|>';
const EOS = '<|endoftext|>';

/** The prediction type a family defaults to (see the file comment). */
export function defaultPredictionType(detected: DetectedFamily): PredictionType {
  return detected.family === 'sd2' && !detected.inpainting ? 'v_prediction' : 'epsilon';
}

const copy = (c: JsonConfig): Record<string, unknown> => JSON.parse(JSON.stringify(c)) as Record<string, unknown>;

/** Kiln's shipped folder for a detected family. The SDXL refiner is refused (Kiln's pipelines need the base's two encoders). */
export function familyFolder(detected: DetectedFamily, predictionType?: PredictionType): FamilyFolder {
  const prediction = predictionType ?? defaultPredictionType(detected);
  const inpaint = detected.inpainting;
  const withChannels = (unet: JsonConfig): Record<string, unknown> => ({ ...copy(unet), in_channels: detected.inChannels });
  const components = (pipeline: string, extra: Record<string, unknown>): Record<string, unknown> => ({
    _class_name: pipeline,
    _diffusers_version: '0.31.0',
    ...extra,
  });
  switch (detected.family) {
    case 'sd1':
    case 'sd2': {
      const sd2 = detected.family === 'sd2';
      const scheduler = sd2 ? copy(SD21_SCHEDULER) : copy(SD15_SCHEDULER);
      scheduler.prediction_type = prediction;
      return {
        modelIndex: components(inpaint ? 'StableDiffusionInpaintPipeline' : 'StableDiffusionPipeline', {
          feature_extractor: [null, null],
          requires_safety_checker: false,
          safety_checker: [null, null],
          scheduler: ['diffusers', scheduler._class_name],
          text_encoder: ['transformers', 'CLIPTextModel'],
          tokenizer: ['transformers', 'CLIPTokenizer'],
          unet: ['diffusers', 'UNet2DConditionModel'],
          vae: ['diffusers', 'AutoencoderKL'],
        }),
        scheduler,
        configs: {
          unet: withChannels(sd2 ? SD21_UNET : SD15_UNET),
          vae: copy(SD_VAE),
          text_encoder: copy(sd2 ? OPENCLIP_VIT_H_TEXT : CLIP_VIT_L_TEXT),
        },
        // SD 2.x's tokenizer (OpenCLIP's) pads with "!", SD 1.x's with the end token.
        tokenizers: { tokenizer: { pad: sd2 ? '!' : EOS } },
      };
    }
    case 'sdxl': {
      const scheduler = copy(SDXL_SCHEDULER);
      scheduler.prediction_type = prediction;
      return {
        modelIndex: components(inpaint ? 'StableDiffusionXLInpaintPipeline' : 'StableDiffusionXLPipeline', {
          feature_extractor: [null, null],
          force_zeros_for_empty_prompt: true,
          image_encoder: [null, null],
          scheduler: ['diffusers', 'EulerDiscreteScheduler'],
          text_encoder: ['transformers', 'CLIPTextModel'],
          text_encoder_2: ['transformers', 'CLIPTextModelWithProjection'],
          tokenizer: ['transformers', 'CLIPTokenizer'],
          tokenizer_2: ['transformers', 'CLIPTokenizer'],
          unet: ['diffusers', 'UNet2DConditionModel'],
          vae: ['diffusers', 'AutoencoderKL'],
        }),
        scheduler,
        configs: {
          unet: withChannels(SDXL_BASE_UNET),
          vae: copy(SDXL_VAE),
          text_encoder: copy(CLIP_VIT_L_TEXT),
          text_encoder_2: copy(OPENCLIP_BIGG_TEXT),
        },
        tokenizers: { tokenizer: { pad: EOS }, tokenizer_2: { pad: '!' } },
      };
    }
    case 'sdxl-refiner':
      throw new ModelLoadError(
        'this is an SDXL refiner checkpoint: Kiln recognises it but does not run the refiner (it refines latents from an SDXL base model and has only the second text encoder); import an SDXL base checkpoint instead',
      );
  }
}

/** `models/.clip-tokenizer/` in the package (src/graphs and dist/graphs are both two levels below the root). */
export function shippedTokenizerDir(): string {
  return resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'models', '.clip-tokenizer');
}

/** Writes a tokenizer folder: CLIP's vocabulary and merges, and transformers' special-token files for `pad`. */
export function writeTokenizer(dir: string, pad: string): void {
  mkdirSync(dir, { recursive: true });
  const source = shippedTokenizerDir();
  for (const f of ['vocab.json', 'merges.txt']) {
    if (!existsSync(join(source, f))) throw new ModelLoadError(`Kiln's CLIP tokenizer file ${join(source, f)} is missing (a broken install?)`, source);
    copyFileSync(join(source, f), join(dir, f));
  }
  const special = { bos_token: BOS, eos_token: EOS, pad_token: pad, unk_token: EOS };
  writeJson(join(dir, 'special_tokens_map.json'), special);
  writeJson(join(dir, 'tokenizer_config.json'), {
    ...special,
    add_prefix_space: false,
    clean_up_tokenization_spaces: true,
    do_lower_case: true,
    errors: 'replace',
    model_max_length: 77,
    tokenizer_class: 'CLIPTokenizer',
  });
}

export function writeJson(path: string, value: unknown): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, `${JSON.stringify(value, null, 2)}\n`);
}

/** Writes a family folder (configs, scheduler, tokenizers; no weights) into `dir`. */
export function writeFamilyFolder(dir: string, folder: FamilyFolder): void {
  writeJson(join(dir, 'model_index.json'), folder.modelIndex);
  writeJson(join(dir, 'scheduler', 'scheduler_config.json'), folder.scheduler);
  for (const [component, config] of Object.entries(folder.configs)) writeJson(join(dir, component, 'config.json'), config);
  for (const [name, tok] of Object.entries(folder.tokenizers)) writeTokenizer(join(dir, name), tok.pad);
}

/**
 * Copies the configs of a diffusers folder (`kiln import --config DIR`): model_index.json, the
 * scheduler and tokenizer folders, and each component's config.json, never its weights.
 */
export function copyConfigFolder(from: string, dir: string, components: readonly FolderComponent[]): void {
  const need = (rel: string): string => {
    const path = join(from, rel);
    if (!existsSync(path)) throw new ModelLoadError(`--config ${from} has no ${rel} (a diffusers pipeline folder is needed)`, path);
    return path;
  };
  // Copies are the model's own files, editable whatever the source's permissions.
  const copy = (src: string, dst: string): void => {
    copyFileSync(src, dst);
    chmodSync(dst, 0o644);
  };
  copy(need('model_index.json'), join(dir, 'model_index.json'));
  for (const folder of ['scheduler', 'tokenizer', 'tokenizer_2']) {
    const src = join(from, folder);
    if (!existsSync(src)) continue;
    mkdirSync(join(dir, folder), { recursive: true });
    for (const f of readdirSync(src)) {
      if (statSync(join(src, f)).isFile() && !/\.(safetensors|bin|onnx|onnx_data|pb)$/.test(f)) copy(join(src, f), join(dir, folder, f));
    }
  }
  need('scheduler/scheduler_config.json');
  for (const c of components) {
    mkdirSync(join(dir, c), { recursive: true });
    copy(need(`${c}/config.json`), join(dir, c, 'config.json'));
  }
}

/** A JSON object file, or a ModelLoadError naming it. */
export function readJsonObject(path: string, what: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new ModelLoadError(`${what} (${path}) is missing or not JSON${err instanceof SyntaxError ? `: ${err.message}` : ''}`, path);
  }
  if (!value || typeof value !== 'object' || Array.isArray(value)) throw new ModelLoadError(`${what} (${path}) is not a JSON object`, path);
  return value as Record<string, unknown>;
}
