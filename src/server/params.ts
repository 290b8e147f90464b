/**
 * The request fields of the images endpoints: one table drives both validation (JSON bodies and
 * multipart forms) and the OpenAPI schema, so the two cannot drift apart.
 */
import { MAX_SEED } from '../engine/rng.js';
import { MAX_GUIDANCE, MAX_STEPS } from '../engine/pipeline.js';
import { DEFAULT_QUALITY, DEFAULT_SIZES, QUALITY_NAMES, SIZE_RANGES, SIZE_STEP, qualityTier } from '../engine/presets.js';
import { SCHEDULER_NAMES, schedulerClassFor } from '../engine/schedulers/index.js';
import { OUTPUT_FORMATS, type OutputFormat } from '../engine/image-codec.js';
import { MAX_IMAGE_PROMPT_SCALE } from '../engine/image-prompt.js';
import { ApiError } from './errors.js';
import { isGptImageModel } from '../catalog/catalog.js';

/**
 * Longest prompt (and negative prompt) accepted, in characters (Unicode code points): OpenAI's
 * largest limit (gpt-image-1: 32,000; dall-e-3: 4,000), so apps built for it may send what they
 * send it. What is encoded is bounded apart (engine/weighting.ts MAX_PROMPT_CHUNKS).
 */
export const MAX_PROMPT_CHARS = 32_000;
export const DEFAULT_SIZE = '1024x1024';
export const RESPONSE_FORMATS = ['url', 'b64_json'] as const;
export type ResponseFormat = (typeof RESPONSE_FORMATS)[number];
export const DEFAULT_STRENGTH = 0.75;
/** Inpainting repaints the masked part from scratch unless told otherwise. */
export const DEFAULT_INPAINT_STRENGTH = 1;
/** Largest ControlNet conditioning scale (`pose:<w>`). */
export const MAX_POSE_WEIGHT = 2;
/** Largest image-prompt weight (`style:<w>`, `face:<w>`, the `style` field): the engine's limit. */
export const MAX_IMAGE_PROMPT_WEIGHT = MAX_IMAGE_PROMPT_SCALE;
/** The style weight of an image prompt that does not give one (the reference's `style` default). */
export const DEFAULT_STYLE_WEIGHT = 0.6;
/** DALL-E 3's values of `style`, accepted and ignored. */
const DALLE_STYLES = ['vivid', 'natural'];

type Endpoint = 'generations' | 'edits';

/** What `n` means on this server: the seed (the reference, default) or the number of images (OpenAI). */
export type NMeaning = 'seed' | 'count';
export const N_MEANINGS: readonly NMeaning[] = ['seed', 'count'];
/** Most images one request may ask for with `--n-as count` (OpenAI's limit). */
export const MAX_IMAGES = 10;
/** Most partial images per streamed image (OpenAI's limit). */
export const MAX_PARTIAL_IMAGES = 3;

/** What `size` may look like; the model decides whether it takes it. */
const SIZE_PATTERN = /^(auto|[1-9][0-9]{0,5}x[1-9][0-9]{0,5})$/;

interface FieldSpec {
  type: 'string' | 'integer' | 'number' | 'boolean';
  description: string;
  required?: boolean;
  enum?: readonly string[];
  minimum?: number;
  maximum?: number;
  exclusiveMinimum?: number;
  minLength?: number;
  maxLength?: number;
  /** For the OpenAPI document only (readParams checks the form itself). */
  pattern?: string;
  /** A string field that also takes a number (JSON); readParams checks the value. */
  orNumber?: boolean;
  examples?: readonly string[];
  /** Only on these endpoints (default: both). */
  only?: Endpoint;
}

export const FIELDS: Record<string, FieldSpec> = {
  prompt: {
    type: 'string',
    required: true,
    minLength: 1,
    maxLength: MAX_PROMPT_CHARS,
    description: `What to draw; inline weights like \`(ball)0.5\` or \`word++\` work. At most ${MAX_PROMPT_CHARS} characters.`,
  },
  model: {
    type: 'string',
    maxLength: 256,
    description:
      "An installed model name or alias (GET /v1/models); default: the server's default model, which also serves OpenAI's names (dall-e-*, gpt-image-*) unless the operator maps them.",
  },
  n: {
    type: 'integer',
    minimum: 0,
    maximum: MAX_SEED,
    description:
      `The seed of the generator (one image per request; random when absent, reported back). On a server started with \`--n-as count\`, ` +
      `OpenAI's meaning instead: the number of images, 1 to ${MAX_IMAGES} (default 1), each with its own seed.`,
  },
  seed: {
    type: 'integer',
    minimum: 0,
    maximum: MAX_SEED,
    description: 'Extension: the seed; wins over `n`. With `--n-as count`, the first image\'s seed (the next ones count up from it).',
  },
  quality: { type: 'string', enum: QUALITY_NAMES, description: `Step-count preset; default \`${DEFAULT_QUALITY}\`.` },
  response_format: { type: 'string', enum: RESPONSE_FORMATS, description: '`url` or `b64_json`; default `url`, but `b64_json` for a `gpt-image*` model name (those never return URLs).' },
  size: {
    type: 'string',
    maxLength: 32,
    pattern: SIZE_PATTERN.source,
    examples: [...DEFAULT_SIZES, 'auto'],
    description:
      `Image size; default ${DEFAULT_SIZE}. ${DEFAULT_SIZES.join(', ')}; \`auto\` (the model's native size; for edits, the upload's shape at that area); ` +
      `or WxH with both sides multiples of ${SIZE_STEP} within the model's range (${Object.entries(SIZE_RANGES)
        .filter(([f]) => f !== 'sd2')
        .map(([f, r]) => `${f === 'sdxl' ? 'SDXL' : 'SD 1.x/2.x'} ${r.min}-${r.max}`)
        .join(', ')}).`,
  },
  user: {
    type: 'string',
    maxLength: 256,
    description:
      'End-user id. On edits, `cn` asks for pose mode (ControlNet OpenPose at scale 1.0), `pose:<w>` for scale w (0 to 2); ' +
      `\`style:<w>\` and/or \`face:<w>\` (0 to ${MAX_IMAGE_PROMPT_SCALE}) make the upload an image prompt (IP-Adapter) with those weights ` +
      `(the style weight defaults to ${DEFAULT_STYLE_WEIGHT} once an image prompt is asked for); the list form is \`face:0.5,style:0.6,pose:1.0\` ` +
      '(pose and an image prompt together: the image follows the pose and the image prompt).',
  },
  negprompt: { type: 'string', maxLength: MAX_PROMPT_CHARS, description: 'Extension: negative prompt (Block Entropy\'s name).' },
  negative_prompt: { type: 'string', maxLength: MAX_PROMPT_CHARS, description: 'Extension: negative prompt; wins over `negprompt`.' },
  steps: { type: 'integer', minimum: 1, maximum: MAX_STEPS, description: 'Extension: denoising steps (overrides `quality`).' },
  guidance_scale: { type: 'number', minimum: 0, maximum: MAX_GUIDANCE, description: 'Extension: classifier-free guidance scale.' },
  scheduler: {
    type: 'string',
    maxLength: 64,
    description: `Extension: ${SCHEDULER_NAMES.join(', ')}, or a diffusers scheduler class name.`,
  },
  output_format: { type: 'string', enum: OUTPUT_FORMATS, description: 'Extension (as OpenAI\'s GPT image models): `png` (default), `jpeg`, `webp`.' },
  output_compression: { type: 'integer', minimum: 0, maximum: 100, description: 'JPEG/WebP quality 0-100 (default 90); ignored for PNG.' },
  strength: {
    type: 'number',
    exclusiveMinimum: 0,
    maximum: 1,
    only: 'edits',
    description:
      `Extension: how much of the input is redrawn, 0 < strength <= 1 (default ${DEFAULT_STRENGTH} for image-to-image, ${DEFAULT_INPAINT_STRENGTH} for inpainting; not used in pose mode). ` +
      'With an image prompt and no mask, giving it starts from the upload (image-to-image with the image prompt) instead of from noise.',
  },
  stream: {
    type: 'boolean',
    description:
      'Answer with server-sent events (OpenAI\'s shape): `partial_images` previews while the image is drawn, then the final image, ' +
      'always inline as `b64_json` (plus `url` when `response_format` is `url`).',
  },
  partial_images: {
    type: 'integer',
    minimum: 0,
    maximum: MAX_PARTIAL_IMAGES,
    description: `With \`stream\`: previews to send while drawing, 0 to ${MAX_PARTIAL_IMAGES} (default 0: only the final image), spread over the steps.`,
  },
  // OpenAI's fields that Kiln cannot honour: accepted where that changes nothing a client relies on.
  background: {
    type: 'string',
    enum: ['auto', 'opaque', 'transparent'],
    description: "GPT image models' background: `auto` and `opaque` are accepted (Kiln's images are opaque); `transparent` is refused (400).",
  },
  style: {
    type: 'string',
    orNumber: true,
    maxLength: 32,
    examples: ['0.6', 'vivid'],
    description:
      `Block Entropy's image-prompt style weight, 0 to ${MAX_IMAGE_PROMPT_SCALE}: on edits (not in pose mode) it makes the upload an image prompt with that weight ` +
      "(`style:<w>` in `user` wins over it; ignored on generations, which have no upload). DALL-E 3's `vivid` and `natural` are accepted and ignored.",
  },
  moderation: { type: 'string', enum: ['auto', 'low'], description: "GPT image models' moderation level: accepted and ignored (Kiln moderates nothing)." },
  input_fidelity: {
    type: 'string',
    enum: ['high', 'low'],
    only: 'edits',
    description: "GPT image models' input fidelity: accepted and ignored (`strength` is Kiln's control of how much of the upload is kept).",
  },
};

/** Validated, defaulted parameters of one images request. */
export interface ImageParams {
  prompt: string;
  model?: string;
  seed?: number;
  /** Images to make (1 unless `n` counts them). */
  count: number;
  quality: string;
  responseFormat: ResponseFormat;
  size: string;
  user?: string;
  negativePrompt?: string;
  steps?: number;
  guidanceScale?: number;
  scheduler?: string;
  outputFormat: OutputFormat;
  outputCompression?: number;
  strength?: number;
  /** Server-sent events instead of one JSON answer (streaming.ts). */
  stream: boolean;
  /** Streaming: previews per image (0..3). */
  partialImages: number;
  /** The `style` field as an image-prompt weight (absent, or DALL-E 3's `vivid` / `natural`: undefined). */
  styleWeight?: number;
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'number') return Number.isInteger(value) ? 'an integer' : 'a decimal number';
  if (typeof value === 'object') return 'an object';
  if (typeof value === 'string') return 'a string';
  if (typeof value === 'boolean') return 'a boolean';
  return typeof value;
}

const ARTICLE: Record<FieldSpec['type'], string> = { string: 'a string', integer: 'an integer', number: 'a number', boolean: 'a boolean' };

function show(value: unknown): string {
  const s = typeof value === 'string' ? value : JSON.stringify(value);
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

/** Turns a form value (always text) into the field's type; undefined for "not given". */
function fromForm(name: string, spec: FieldSpec, raw: string): unknown {
  if (raw === 'null') return null;
  if (raw === '' && !spec.required) return undefined;
  switch (spec.type) {
    case 'string':
      return raw;
    case 'integer':
      return /^\s*[+-]?\d{1,20}\s*$/.test(raw) ? Number(raw) : raw;
    case 'number': {
      const n = Number(raw);
      return raw.trim() !== '' && Number.isFinite(n) ? n : raw;
    }
    case 'boolean':
      return raw === 'true' ? true : raw === 'false' ? false : raw;
  }
  throw new ApiError(400, `Invalid field '${name}'.`, name, 'invalid_value');
}

function checkField(name: string, spec: FieldSpec, value: unknown): void {
  const typeOk =
    spec.type === 'string'
      ? typeof value === 'string' || (spec.orNumber === true && typeof value === 'number' && Number.isFinite(value))
      : spec.type === 'integer'
        ? typeof value === 'number' && Number.isInteger(value)
        : spec.type === 'number'
          ? typeof value === 'number' && Number.isFinite(value)
          : typeof value === 'boolean';
  if (!typeOk) {
    throw new ApiError(400, `Invalid type for '${name}': expected ${ARTICLE[spec.type]}, but got ${describe(value)} instead.`, name, 'invalid_type');
  }
  if (typeof value === 'string') {
    const length = [...value].length;
    if (spec.minLength !== undefined && value.trim().length < spec.minLength) {
      throw new ApiError(400, `Invalid '${name}': empty string. Expected a non-empty string.`, name, 'empty_string');
    }
    if (spec.maxLength !== undefined && length > spec.maxLength) {
      throw new ApiError(
        400,
        `Invalid '${name}': string too long. Expected a string with maximum length ${spec.maxLength}, but got a string with length ${length} instead.`,
        name,
        'string_above_max_length',
      );
    }
    if (spec.enum && !spec.enum.includes(name === 'quality' ? value.toLowerCase() : value)) {
      throw new ApiError(
        400,
        `Invalid value for '${name}': '${show(value)}'. Supported values are: ${spec.enum.map((v) => `'${v}'`).join(', ')}.`,
        name,
        'invalid_value',
      );
    }
  }
  if (typeof value === 'number') {
    const kind = spec.type === 'integer' ? 'integer' : 'decimal';
    if (spec.minimum !== undefined && value < spec.minimum) {
      throw new ApiError(
        400,
        `Invalid '${name}': ${kind} below minimum value. Expected a value >= ${spec.minimum}, but got ${value} instead.`,
        name,
        `${kind}_below_min_value`,
      );
    }
    if (spec.exclusiveMinimum !== undefined && value <= spec.exclusiveMinimum) {
      throw new ApiError(
        400,
        `Invalid '${name}': ${kind} below minimum value. Expected a value > ${spec.exclusiveMinimum}, but got ${value} instead.`,
        name,
        `${kind}_below_min_value`,
      );
    }
    if (spec.maximum !== undefined && value > spec.maximum) {
      throw new ApiError(
        400,
        `Invalid '${name}': ${kind} above maximum value. Expected a value <= ${spec.maximum}, but got ${value} instead.`,
        name,
        `${kind}_above_max_value`,
      );
    }
  }
}

/**
 * Validates a request's fields (a parsed JSON body, or a form's text fields) and fills the
 * defaults. Unknown fields are ignored; OpenAI's that Kiln cannot honour are checked (background: transparent is a 400).
 * Throws ApiError(400) naming the field.
 */
export function readParams(input: unknown, endpoint: Endpoint, source: 'json' | 'form', nMeaning: NMeaning = 'seed'): ImageParams {
  if (input === null || typeof input !== 'object' || Array.isArray(input)) {
    throw new ApiError(400, `The request body must be a JSON object, but got ${describe(input)}.`, null, 'invalid_type');
  }
  const raw = input as Record<string, unknown>;
  const values: Record<string, unknown> = {};
  for (const [name, spec] of Object.entries(FIELDS)) {
    if (spec.only && spec.only !== endpoint) continue;
    let value = Object.hasOwn(raw, name) ? raw[name] : undefined;
    if (source === 'form' && value !== undefined) {
      if (typeof value !== 'string') throw new ApiError(400, `Field '${name}' must be given once, as text.`, name, 'invalid_type');
      value = fromForm(name, spec, value);
    }
    if (value === undefined || value === null) {
      if (spec.required) throw new ApiError(400, `Missing required parameter: '${name}'.`, name, 'missing_required_parameter');
      continue;
    }
    checkField(name, spec, value);
    values[name] = value;
  }
  const size = values.size as string | undefined;
  // The model decides the rest (its range, its native size): checked before queueing, in images-service.
  if (size !== undefined && !SIZE_PATTERN.test(size)) {
    throw new ApiError(
      400,
      `Invalid value for 'size': '${show(size)}'. Supported values are: ${DEFAULT_SIZES.map((v) => `'${v}'`).join(', ')}, 'auto', or 'WxH' with both sides multiples of ${SIZE_STEP} within the model's range.`,
      'size',
      'invalid_value',
    );
  }
  if (values.background === 'transparent') {
    throw new ApiError(
      400,
      "Kiln's models draw opaque images, so 'background: transparent' cannot be honoured; leave 'background' out or send 'opaque' or 'auto'.",
      'background',
      'unsupported_value',
    );
  }
  const n = values.n as number | undefined;
  if (nMeaning === 'count' && n !== undefined && (n < 1 || n > MAX_IMAGES)) {
    throw new ApiError(
      400,
      `Invalid 'n': ${n}. On this server n is the number of images (OpenAI's meaning), from 1 to ${MAX_IMAGES}; the seed goes in 'seed'.`,
      'n',
      n < 1 ? 'integer_below_min_value' : 'integer_above_max_value',
    );
  }
  const styleWeight = readStyleWeight(values.style as string | number | undefined);
  const quality = (values.quality as string | undefined) ?? DEFAULT_QUALITY;
  qualityTier(quality); // enum-checked already; keeps the engine's rule the one truth
  const scheduler = values.scheduler as string | undefined;
  if (scheduler !== undefined && !schedulerClassFor(scheduler)) {
    throw new ApiError(
      400,
      `Invalid value for 'scheduler': '${show(scheduler)}'. Supported values are: ${SCHEDULER_NAMES.join(', ')}, or a diffusers scheduler class name.`,
      'scheduler',
      'invalid_value',
    );
  }
  return {
    prompt: values.prompt as string,
    model: values.model as string | undefined,
    seed: (nMeaning === 'count' ? values.seed : (values.seed ?? n)) as number | undefined,
    count: nMeaning === 'count' ? (n ?? 1) : 1,
    quality,
    // OpenAI's GPT image models only answer in base64, so their clients read b64_json unasked.
    responseFormat: (values.response_format as ResponseFormat | undefined) ?? (isGptImageModel(values.model as string | undefined) ? 'b64_json' : 'url'),
    size: size ?? DEFAULT_SIZE,
    user: values.user as string | undefined,
    negativePrompt: (values.negative_prompt ?? values.negprompt) as string | undefined,
    steps: values.steps as number | undefined,
    guidanceScale: values.guidance_scale as number | undefined,
    scheduler,
    outputFormat: (values.output_format as OutputFormat | undefined) ?? 'png',
    outputCompression: values.output_compression as number | undefined,
    strength: values.strength as number | undefined,
    stream: values.stream === true,
    partialImages: (values.partial_images as number | undefined) ?? 0,
    styleWeight,
  };
}

/** A weight from form text or a JSON number; undefined when it is not a finite number (the range is the caller's). */
function weightOf(value: string | number): number | undefined {
  const weight = typeof value === 'number' ? value : value.trim() === '' ? Number.NaN : Number(value);
  return Number.isFinite(weight) ? weight : undefined;
}

/** The `style` field: a weight, or DALL-E 3's `vivid` / `natural` (ignored: undefined). 400 `style` for anything else. */
function readStyleWeight(style: string | number | undefined): number | undefined {
  if (style === undefined) return undefined;
  if (typeof style === 'string' && DALLE_STYLES.includes(style)) return undefined;
  const weight = weightOf(style);
  if (weight === undefined) {
    throw new ApiError(
      400,
      `Invalid value for 'style': '${show(style)}'. Supported values are an image-prompt weight from 0 to ${MAX_IMAGE_PROMPT_WEIGHT} (e.g. '${DEFAULT_STYLE_WEIGHT}'), or DALL-E 3's ${DALLE_STYLES.map((v) => `'${v}'`).join(', ')}.`,
      'style',
      'invalid_value',
    );
  }
  if (weight < 0 || weight > MAX_IMAGE_PROMPT_WEIGHT) {
    throw new ApiError(400, `Invalid value for 'style': the style weight must be from 0 to ${MAX_IMAGE_PROMPT_WEIGHT}, but got ${weight}.`, 'style', 'invalid_value');
  }
  return weight;
}

/** The roles of Block Entropy's list form of `user` (`face:0.5,style:0.6,pose:1.0`). */
const USER_WEIGHT_ROLES = ['face', 'style', 'pose'] as const;
type UserRole = (typeof USER_WEIGHT_ROLES)[number];

/**
 * The weights an edit's `user` gives, or an empty object when `user` gives none (then it is an
 * ordinary end-user id):  `cn` -> pose 1;  `pose:<w>` -> pose w;  `face:0.5,style:0.6,pose:1.0` ->
 * each role's weight. A weight list with a malformed number, a pose weight outside 0..2 or an
 * image-prompt weight outside 0..MAX_IMAGE_PROMPT_WEIGHT is a 400 (`user`).
 */
export function parseUserWeights(user: string | undefined): Partial<Record<UserRole, number>> {
  if (user === undefined) return {};
  const text = user.trim().toLowerCase();
  if (text === 'cn') return { pose: 1 };
  const parts = text.split(',').map((p) => p.trim());
  const pairs = parts.map((p) => /^([a-z_]+)\s*:\s*(.*)$/.exec(p));
  if (!pairs.every((m) => m && (USER_WEIGHT_ROLES as readonly string[]).includes(m[1]!))) return {};
  const weights: Partial<Record<UserRole, number>> = {};
  for (const m of pairs) {
    const role = m![1]! as UserRole;
    const value = m![2]!;
    const weight = weightOf(value);
    if (weight === undefined) {
      throw new ApiError(400, `Invalid value for 'user': the ${role} weight '${show(value)}' is not a number (e.g. ${role}:${role === 'pose' ? '1.0' : '0.6'}).`, 'user', 'invalid_value');
    }
    const max = role === 'pose' ? MAX_POSE_WEIGHT : MAX_IMAGE_PROMPT_WEIGHT;
    if (weight < 0 || weight > max) {
      throw new ApiError(400, `Invalid value for 'user': the ${role} weight must be from 0 to ${max}, but got ${weight}.`, 'user', 'invalid_value');
    }
    if (weights[role] !== undefined) throw new ApiError(400, `Invalid value for 'user': the ${role} weight is given twice.`, 'user', 'invalid_value');
    weights[role] = weight;
  }
  return weights;
}

/** Pose mode from an edit's `user`: the ControlNet conditioning scale, or undefined when `user` does not ask for pose. */
export function parsePoseUser(user: string | undefined): number | undefined {
  return parseUserWeights(user).pose;
}

/** An edit's image prompt: the weight of each adapter role, and the field that asked for it (for 400s). */
export type { ImagePromptWeights } from '../jobs/types.js';
import type { ImagePromptWeights } from '../jobs/types.js';

/**
 * What an edit asks for beyond image-to-image / inpainting: pose mode (its scale) and an image
 * prompt (its weights). An image prompt is asked for by `style:<w>` / `face:<w>` in `user`, or
 * by a `style` weight outside pose mode (`cn` / `pose:<w>` alone keep the reference's pose mode,
 * whose image ignored the style field). Its style weight is `user`'s, else the field's, else
 * DEFAULT_STYLE_WEIGHT; `face` is used only when given.
 */
export function editWeights(params: Pick<ImageParams, 'user' | 'styleWeight'>): { pose?: number; imagePrompt?: ImagePromptWeights } {
  const user = parseUserWeights(params.user);
  const listAsks = user.style !== undefined || user.face !== undefined;
  const fieldAsks = params.styleWeight !== undefined && user.pose === undefined;
  const out: { pose?: number; imagePrompt?: ImagePromptWeights } = {};
  if (user.pose !== undefined) out.pose = user.pose;
  if (listAsks || fieldAsks) {
    out.imagePrompt = {
      style: user.style ?? params.styleWeight ?? DEFAULT_STYLE_WEIGHT,
      ...(user.face !== undefined ? { face: user.face } : {}),
      from: listAsks ? 'user' : 'style',
      ...(user.style === undefined && params.styleWeight === undefined ? { styleDefault: true } : {}),
    };
  }
  return out;
}

/** The JSON Schema of an endpoint's fields (for the OpenAPI document). */
export function paramsSchema(endpoint: Endpoint, source: 'json' | 'form'): Record<string, unknown> {
  const properties: Record<string, unknown> = {};
  const required: string[] = [];
  for (const [name, spec] of Object.entries(FIELDS)) {
    if (spec.only && spec.only !== endpoint) continue;
    const { type, description, enum: values, minimum, maximum, exclusiveMinimum, minLength, maxLength, pattern, examples } = spec;
    const types = spec.orNumber && source === 'json' ? [type, 'number'] : [type];
    const prop: Record<string, unknown> = { type: spec.required || source === 'form' ? (types.length > 1 ? types : type) : [...types, 'null'], description };
    if (values) prop.enum = source === 'form' || spec.required ? [...values] : [...values, null];
    Object.assign(
      prop,
      Object.fromEntries(Object.entries({ minimum, maximum, exclusiveMinimum, minLength, maxLength, pattern, examples }).filter(([, v]) => v !== undefined)),
    );
    properties[name] = prop;
    if (spec.required) required.push(name);
  }
  return { type: 'object', required, properties, additionalProperties: true };
}
