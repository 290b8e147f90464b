/**
 * `encodePromptEmbeddings`: Kiln's text conditioning of one prompt, outside any pipeline, so that
 * anyone can compare it with compel or diffusers on the same text encoders.
 *
 * `folder` holds `tokenizer/` and `text_encoder/` (and `tokenizer_2/`, `text_encoder_2/` for
 * SDXL) as transformers writes them. Each encoder is either an ONNX export (`model.onnx`) or a
 * `config.json` with safetensors weights, which Kiln builds into ONNX with its own CLIP page once
 * (cached under `cacheDir`, by content, as pipeline folders are).
 */
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ensureBuilt } from '../graphs/cache.js';
import { convertTextEncoder } from '../graphs/convert.js';
import { encodeConditioning, type TextEncoders } from './conditioning.js';
import { ModelLoadError } from './errors.js';
import { OnnxModel, type Device } from './onnx.js';
import { loadClipTokenizer } from './tokenizer.js';

export interface PromptEmbeddingsOptions {
  /** `sd`: SD 1.x/2.x, the last hidden state. `sdxl`: both encoders' penultimate layers and encoder 2's pooled vector. */
  family: 'sd' | 'sdxl';
  /**
   * Cut the prompt to one 77-token row, as compel does by default. Default false: long prompts
   * are chunked at sentence ends, as Kiln's pipelines do (compel's `truncate_long_prompts=False`).
   */
  truncate?: boolean;
  /** Where encoders built from safetensors are kept; required when an encoder is safetensors. */
  cacheDir?: string;
  device?: Device;
}

export interface PromptEmbeddings {
  /** [1, T, D] row-major: T = 77 per chunk; D = the encoder's width (SDXL: both encoders' widths). */
  embeddings: Float32Array;
  dims: [1, number, number];
  /** SDXL: encoder 2's projected pooled vector of the raw prompt, [1, P]. */
  pooled?: Float32Array;
}

async function loadEncoder(folder: string, name: string, options: PromptEmbeddingsOptions & { withProjection?: boolean }): Promise<OnnxModel> {
  const dir = join(folder, name);
  const onnx = join(dir, 'model.onnx');
  if (existsSync(onnx)) return OnnxModel.load(onnx, folder, { device: options.device });
  if (!existsSync(join(dir, 'config.json'))) {
    throw new ModelLoadError(`${folder} has no ${name}/model.onnx and no ${name}/config.json with safetensors weights`, dir);
  }
  if (options.cacheDir === undefined) {
    throw new ModelLoadError(`${dir} holds safetensors weights, built into an ONNX graph under a cache folder: pass the cacheDir option`, dir);
  }
  const built = await ensureBuilt(dir, {
    cacheDir: options.cacheDir,
    build: {
      kind: `clip-text${options.withProjection ? '+projection' : ''}`,
      convert: (src, out, o) => convertTextEncoder(src, out, { ...o, withProjection: options.withProjection, component: name }),
    },
  });
  return OnnxModel.load(join(built, 'model.onnx'), built, { device: options.device });
}

/** A folder's tokenizers and text encoders, loaded (built first where they are safetensors). */
export async function loadTextEncoders(folder: string, options: PromptEmbeddingsOptions): Promise<TextEncoders & { release(): Promise<void> }> {
  const root = resolve(folder);
  const isXL = options.family === 'sdxl';
  if (options.family !== 'sd' && !isXL) throw new TypeError(`family must be 'sd' or 'sdxl', got ${JSON.stringify(options.family)}`);
  const [tokenizer, tokenizer2] = await Promise.all([
    loadClipTokenizer(join(root, 'tokenizer')),
    isXL ? loadClipTokenizer(join(root, 'tokenizer_2')) : undefined,
  ]);
  const textEncoder = await loadEncoder(root, 'text_encoder', options);
  let textEncoder2: OnnxModel | undefined;
  try {
    if (isXL) textEncoder2 = await loadEncoder(root, 'text_encoder_2', { ...options, withProjection: true });
  } catch (err) {
    await textEncoder.release();
    throw err;
  }
  return {
    isXL,
    tokenizer,
    tokenizer2,
    textEncoder,
    textEncoder2,
    release: async () => void (await Promise.all([textEncoder.release(), textEncoder2?.release()])),
  };
}

/**
 * The conditioning Kiln gives `prompt` (inline weights by compel's rule, see weighting.ts):
 * `{ embeddings, dims: [1, T, D], pooled? }`.
 */
export async function encodePromptEmbeddings(folder: string, prompt: string, options: PromptEmbeddingsOptions): Promise<PromptEmbeddings> {
  const encoders = await loadTextEncoders(folder, options);
  try {
    const [c] = await encodeConditioning(encoders, [prompt], { truncate: options.truncate });
    const dims = c!.hidden.dims as [1, number, number];
    return { embeddings: c!.hidden.data, dims, ...(c!.pooled ? { pooled: c!.pooled.data } : {}) };
  } finally {
    await encoders.release();
  }
}
