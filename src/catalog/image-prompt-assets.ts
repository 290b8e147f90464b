/**
 * Image prompts (`user=style:<w>` / `face:<w>`, the `style` field): finding the IP-Adapter files
 * and image encoders a model's family needs before any work is queued, so a request that cannot
 * be honoured gets a 400 naming the `kiln pull` lines (never an image that ignored the image prompt).
 *
 * Which adapter (h94/IP-Adapter's files, each with the image encoder it was trained with):
 *
 *   role    SD 1.x                                    SDXL
 *   style   ip-adapter_sd15 (ViT-H)                   ip-adapter_sdxl_vit-h (ViT-H), else ip-adapter_sdxl (bigG)
 *   face    ip-adapter-plus-face_sd15 (ViT-H)         ip-adapter-plus-face_sdxl_vit-h (ViT-H)
 *
 * Where, under `$KILN_HOME/ip-adapters/` (the h94/IP-Adapter repository's layout, `models/` for
 * SD 1.5 and the ViT-H encoder, `sdxl_models/` for SDXL and the bigG encoder):
 *
 * - an adapter file F of subfolder S: `ip-adapters/<alias>/F`, where `kiln pull <alias>` installs
 *   it (each pull owns its folder), else `ip-adapters/S/F` (a download of the repository itself);
 * - the image encoders (config.json + model.safetensors): `ip-adapters/models/image_encoder/`
 *   (ViT-H) and `ip-adapters/sdxl_models/image_encoder/` (bigG), where both put them.
 *
 * Files are looked up on every request, so a new install is used without a restart.
 */
import { join } from 'node:path';
import { statSync } from 'node:fs';
import type { ModelFamily } from '../engine/model.js';
import { AssetUnavailableError } from './errors.js';
import type { ImagePromptWeights } from '../jobs/types.js';

export const IP_ADAPTERS_DIR = 'ip-adapters';
export type ImagePromptRole = 'style' | 'face';

type EncoderKind = 'vit-h' | 'bigg';

/** The image encoders: where they live (relative to ip-adapters/, as in h94's repository) and their pull alias. */
export const IMAGE_ENCODERS: Readonly<Record<EncoderKind, { dir: string; alias: string; label: string }>> = {
  'vit-h': { dir: 'models/image_encoder', alias: 'ip-adapter-image-encoder', label: 'ViT-H/14' },
  bigg: { dir: 'sdxl_models/image_encoder', alias: 'ip-adapter-image-encoder-sdxl', label: 'ViT-bigG/14' },
};

export interface AdapterChoice {
  /** The file's name in h94/IP-Adapter. */
  file: string;
  /** Its folder there. */
  subfolder: 'models' | 'sdxl_models';
  encoder: EncoderKind;
  /** The `kiln pull` alias that installs it into `ip-adapters/<alias>/`. */
  alias: string;
}

/** Per family and role, the adapters Kiln uses, preferred first. SD 2.x has none (h94 made none). */
export const IMAGE_PROMPT_ADAPTERS: Readonly<Partial<Record<ModelFamily, Record<ImagePromptRole, readonly AdapterChoice[]>>>> = {
  sd1: {
    style: [{ file: 'ip-adapter_sd15.safetensors', subfolder: 'models', encoder: 'vit-h', alias: 'ip-adapter-sd15' }],
    face: [{ file: 'ip-adapter-plus-face_sd15.safetensors', subfolder: 'models', encoder: 'vit-h', alias: 'ip-adapter-plus-face-sd15' }],
  },
  sdxl: {
    // The ViT-H one first: it shares its encoder with the face adapter (one 2.5 GB encoder, not two).
    style: [
      { file: 'ip-adapter_sdxl_vit-h.safetensors', subfolder: 'sdxl_models', encoder: 'vit-h', alias: 'ip-adapter-sdxl-vit-h' },
      { file: 'ip-adapter_sdxl.safetensors', subfolder: 'sdxl_models', encoder: 'bigg', alias: 'ip-adapter-sdxl' },
    ],
    face: [{ file: 'ip-adapter-plus-face_sdxl_vit-h.safetensors', subfolder: 'sdxl_models', encoder: 'vit-h', alias: 'ip-adapter-plus-face-sdxl-vit-h' }],
  },
};

/** One adapter of a request, resolved: its files and weight. */
export interface ImagePromptAdapter {
  role: ImagePromptRole;
  /** The adapter's file name (for logs and messages). */
  name: string;
  adapter: string;
  imageEncoder: string;
  weight: number;
}

/** 400 `image_prompt_model_missing`: an image prompt was asked for and cannot be applied. */
export class ImagePromptUnavailableError extends AssetUnavailableError {
  override name = 'ImagePromptUnavailableError';
  constructor(message: string, param: 'user' | 'style') {
    super(message, param, 'image_prompt_model_missing');
  }
}

const isFile = (path: string) => {
  try {
    return statSync(path).isFile();
  } catch {
    return false;
  }
};

const hasEncoder = (dir: string) => isFile(join(dir, 'config.json')) && isFile(join(dir, 'model.safetensors'));

/** Where an adapter file is, if installed. */
function adapterPath(root: string, choice: AdapterChoice): string | undefined {
  return [join(root, choice.alias, choice.file), join(root, choice.subfolder, choice.file)].find(isFile);
}

const FAMILY_LABEL: Record<ModelFamily, string> = { sd1: 'SD 1.x', sd2: 'SD 2.x', sdxl: 'SDXL' };

/**
 * The adapters of an image prompt for a model of `family` (shown to clients as `modelName`), one
 * per role with a weight above 0 (style first), or ImagePromptUnavailableError naming every
 * missing piece and the `kiln pull` lines that install them. Every weight 0: no adapter (the plain model).
 */
export function resolveImagePromptAssets(family: ModelFamily, modelName: string, home: string, weights: ImagePromptWeights): ImagePromptAdapter[] {
  const wanted = (['style', 'face'] as const).flatMap((role) => {
    const weight = role === 'style' ? weights.style : weights.face;
    return weight !== undefined && weight > 0 ? [{ role, weight }] : [];
  });
  if (wanted.length === 0) return [];
  const asked = `style:${weights.style}${weights.face !== undefined ? `, face:${weights.face}` : ''}`;
  const prefix = `The image prompt (${asked}) cannot be used with the model '${modelName}'`;
  const table = IMAGE_PROMPT_ADAPTERS[family];
  if (!table) {
    throw new ImagePromptUnavailableError(
      `${prefix}: h94/IP-Adapter has no adapters for ${FAMILY_LABEL[family]} models; image prompts work with SD 1.x and SDXL models.`,
      weights.from,
    );
  }
  const root = join(home, IP_ADAPTERS_DIR);
  const found: ImagePromptAdapter[] = [];
  const missing: string[] = [];
  const pulls: string[] = [];
  const pull = (alias: string) => {
    if (!pulls.includes(alias)) pulls.push(alias);
  };
  const encodersReported = new Set<EncoderKind>();
  for (const { role, weight } of wanted) {
    const choices = table[role];
    // The first choice complete on disk, else the first with its adapter file (its encoder is what is missing).
    const located = choices.map((c) => ({ c, adapter: adapterPath(root, c), encoder: join(root, IMAGE_ENCODERS[c.encoder].dir) }));
    const complete = located.find((l) => l.adapter && hasEncoder(l.encoder));
    if (complete) {
      found.push({ role, name: complete.c.file, adapter: complete.adapter!, imageEncoder: complete.encoder, weight });
      continue;
    }
    const partial = located.find((l) => l.adapter) ?? located[0]!;
    if (!partial.adapter) {
      missing.push(`the ${role} IP-Adapter for ${FAMILY_LABEL[family]} (${partial.c.file})`);
      pull(partial.c.alias);
    }
    if (!hasEncoder(partial.encoder) && !encodersReported.has(partial.c.encoder)) {
      encodersReported.add(partial.c.encoder);
      const encoder = IMAGE_ENCODERS[partial.c.encoder];
      missing.push(`the image encoder it needs (${encoder.label}, ${encoder.dir}/)`);
      pull(encoder.alias);
    }
  }
  if (missing.length) {
    const styleDefault =
      weights.styleDefault && wanted.some((w) => w.role === 'style')
        ? ` The style weight ${weights.style} is the default of an image prompt; send style:0 in user to use the face adapter alone.`
        : '';
    throw new ImagePromptUnavailableError(
      `${prefix}: ${missing.join(' and ')} ${missing.length > 1 ? 'are' : 'is'} not installed. ` +
        `Install with \`${pulls.map((a) => `kiln pull ${a}`).join(' && ')}\` ` +
        `(Kiln looks in $KILN_HOME/${IP_ADAPTERS_DIR}/<alias>/ and in the h94/IP-Adapter layout under $KILN_HOME/${IP_ADAPTERS_DIR}/).${styleDefault}`,
      weights.from,
    );
  }
  return found;
}
