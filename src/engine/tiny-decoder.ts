/**
 * Tiny VAE decoders for previews: when a model's family has its TAESD installed, partial images
 * (streaming, `kiln generate --preview-dir`) are the predicted clean sample decoded by it, a
 * picture that looks like the final image, instead of preview.ts's linear latent -> RGB map.
 *
 *   family      decoder    installed by            folder
 *   SD 1.x/2.x  TAESD      `kiln pull taesd`       <home>/previews/taesd/
 *   SDXL        TAESDXL    `kiln pull taesdxl`     <home>/previews/taesdxl/
 *
 * A folder holds diffusers' AutoencoderTiny files (config.json + diffusion_pytorch_model.safetensors);
 * Kiln builds the decoder graph from them once (graphs/taesd.ts, cached under <home>/cache
 * like any built graph; the caller names the home). The folder is looked up for every run, so a pull is used without a
 * restart and a removal falls back to the linear map. A decoder that fails to build, load or run
 * is reported once and the linear map is used: a preview is never worth failing an image for.
 *
 * Previews must not slow the final image by more than a few percent, and a tiny decoder is not
 * cheap beside a small or fast UNet (full-size TAESD: 0.17-0.5 s per 256x256 preview on 2 CPU
 * cores, about half of kiln-tiny's whole run). So each run decides at its first preview (preview.ts
 * withinBudget): the decoder's measured cost at this size times the previews asked for, against
 * the run's expected time (from its pace so far) times the budget, 5% by default (the caller's
 * `budget`: commands pass $KILN_PREVIEW_BUDGET, a fraction, `Infinity`: always); over it, that
 * run uses the linear map.
 * The first run of a process waits at its first preview for the decoder to load (a graph build
 * the first time ever, then a session and the measuring decodes: well under a second for TAESD).
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ensureBuilt } from '../graphs/cache.js';
import { convertTinyDecoder, tinyDecoderConfig, type TinyDecoderConfig } from '../graphs/taesd.js';
import type { DiffusionModel, ModelFamily } from './model.js';
import { OnnxModel, type Device } from './onnx.js';
import type { RgbImage } from './vae.js';

export const PREVIEWS_DIR = 'previews';

/** The `kiln pull` alias (and folder under previews/) of each family's tiny decoder. */
export const TINY_DECODER_ALIASES: Readonly<Record<ModelFamily, 'taesd' | 'taesdxl'>> = { sd1: 'taesd', sd2: 'taesd', sdxl: 'taesdxl' };

export interface TinyDecoderLocation {
  /** Kiln's home: the decoders are under <home>/previews/. */
  home: string;
  /** Where the built graph is kept (default <home>/cache). */
  cacheDir?: string;
}

export interface TinyDecoder {
  /** taesd or taesdxl. */
  readonly alias: string;
  readonly dir: string;
  readonly config: TinyDecoderConfig;
  /** Diffusion latents [1, C, h, w] -> the picture (in the decoder's own size, 8x the latent's for TAESD). */
  decode(latents: Float32Array, dims: number[]): Promise<RgbImage>;
  /** What a decode of latents of `dims` takes on this host, in ms, from the last one (one is made at load). */
  estimateMs(dims: number[]): number;
}

const WEIGHTS = 'diffusion_pytorch_model.safetensors';

/** The installed folder of `family`'s tiny decoder, if there is one. */
export function tinyDecoderDir(family: ModelFamily, home: string): string | undefined {
  const dir = join(home, PREVIEWS_DIR, TINY_DECODER_ALIASES[family]);
  return existsSync(join(dir, 'config.json')) && existsSync(join(dir, WEIGHTS)) ? dir : undefined;
}

/** Identity of the folder's current files (a re-pull swaps them): inodes and modification times. */
function folderVersion(dir: string): string {
  return ['config.json', WEIGHTS]
    .map((f) => {
      const st = statSync(join(dir, f), { throwIfNoEntry: false });
      return st ? `${st.ino}:${st.mtimeMs}:${st.size}` : 'missing';
    })
    .join('/');
}

class LoadedTinyDecoder implements TinyDecoder {
  private running: Promise<unknown> = Promise.resolve();
  /** Milliseconds per latent cell of the last decode (its cost grows with the area). */
  private msPerCell = 0;

  constructor(
    readonly alias: string,
    readonly dir: string,
    readonly config: TinyDecoderConfig,
    private readonly session: OnnxModel,
  ) {}

  decode(latents: Float32Array, dims: number[]): Promise<RgbImage> {
    const { scalingFactor, shiftFactor } = this.config;
    const input = new Float32Array(latents.length);
    for (let i = 0; i < latents.length; i++) input[i] = latents[i]! / scalingFactor + shiftFactor;
    const started = performance.now();
    const run = this.session.run({ latent_sample: { data: input, dims } }, ['sample']).then(({ sample }) => {
      this.msPerCell = (performance.now() - started) / (dims[2]! * dims[3]!);
      return toRgb(sample!.data, sample!.dims);
    });
    this.running = run.catch(() => {});
    return run;
  }

  estimateMs(dims: number[]): number {
    return this.msPerCell * dims[2]! * dims[3]!;
  }

  /** A first measure of the cost: one small decode to warm the session, one timed. */
  async calibrate(): Promise<void> {
    const c = this.config.latentChannels;
    await this.decode(new Float32Array(c * 64), [1, c, 8, 8]);
    await this.decode(new Float32Array(c * 256), [1, c, 16, 16]);
  }

  /** Frees the session once the decode under way (if any) is over. */
  async release(): Promise<void> {
    await this.running;
    await this.session.release();
  }
}

/** [1, 3, H, W] in [-1, 1] -> 8-bit RGB, rounded as the final image is (engine/vae.ts). */
function toRgb(data: Float32Array, dims: number[]): RgbImage {
  const [, , height, width] = dims as [number, number, number, number];
  const plane = width * height;
  const pixels = new Uint8Array(plane * 3);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const v = data[c * plane + i]!;
      // NaN (a broken decoder) becomes 0, as a Uint8Array stores it: a black preview, not a failure.
      pixels[i * 3 + c] = Math.round(Math.min(1, Math.max(0, v / 2 + 0.5)) * 255);
    }
  }
  return { width, height, pixels };
}

const loaded = new Map<string, { version: string; loading: Promise<LoadedTinyDecoder | undefined> }>();

async function load(alias: string, dir: string, cacheDir: string, device: Device, onWarning: (message: string) => void): Promise<LoadedTinyDecoder | undefined> {
  try {
    const config = tinyDecoderConfig(JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>);
    const built = await ensureBuilt(dir, { cacheDir, build: { kind: 'taesd-decoder', convert: convertTinyDecoder } });
    const session = await OnnxModel.load(join(built, 'model.onnx'), built, { device });
    const decoder = new LoadedTinyDecoder(alias, dir, config, session);
    try {
      await decoder.calibrate();
    } catch (err) {
      await session.release();
      throw err;
    }
    return decoder;
  } catch (err) {
    onWarning(`previews: the tiny decoder in ${dir} does not load (${err instanceof Error ? err.message : String(err)}); previews use the linear latent map`);
    return undefined;
  }
}

const warnToStderr = (message: string): void => void process.stderr.write(`kiln: warning: ${message}\n`);

/**
 * The tiny decoder for `model`'s family, loaded once per folder version and device; undefined
 * when none is installed or it does not load (reported once through `onWarning`, default stderr).
 */
export function tinyDecoderFor(model: DiffusionModel, location: TinyDecoderLocation, onWarning: (message: string) => void = warnToStderr): Promise<TinyDecoder | undefined> {
  const { home } = location;
  const dir = tinyDecoderDir(model.layout.family, home);
  if (!dir) return Promise.resolve(undefined);
  const cacheDir = location.cacheDir ?? join(home, 'cache');
  const key = JSON.stringify([dir, model.device, cacheDir]);
  const version = folderVersion(dir);
  const hit = loaded.get(key);
  if (hit && hit.version === version) return hit.loading;
  if (hit) void hit.loading.then((old) => old?.release()).catch(() => {});
  const loading = load(TINY_DECODER_ALIASES[model.layout.family], dir, cacheDir, model.device, onWarning);
  loaded.set(key, { version, loading });
  return loading;
}

/** The share of a run's time tiny-decoder previews may take unless the caller says otherwise. */
export const DEFAULT_PREVIEW_BUDGET = 0.05;
