/**
 * LoRAs per request: the `<lora:NAME:SCALE>` prompt syntax people already use (A1111, ComfyUI
 * prompt nodes), the LoRAs a model runs with, and the bounded cache of built variants.
 *
 * A tag is removed from the prompt text before it is tokenized. The model the request names (or
 * the variant its kiln.json asks for) carries a provider, set by the Engine, that returns the
 * same model with the request's LoRAs added: each variant is a set of sessions (UNet, text
 * encoders) whose graphs fold the LoRA in (src/graphs/lora-graph.ts), sharing everything else
 * with the base model. Variants are kept in an LRU cache of bounded size; one in use by a
 * running request is released only when that request ends.
 */
import { InvalidOptionError } from './errors.js';
import type { DiffusionModel } from './model.js';
import type { OnnxModel } from './onnx.js';

/** A LoRA as settings report it: its name in the loras folder and its scale. */
export interface AppliedLora {
  name: string;
  scale: number;
}

/** Tags per prompt, and the largest scale magnitude accepted (beyond it images are noise). */
export const MAX_PROMPT_LORAS = 8;
export const MAX_LORA_SCALE = 10;

/** LoRA names: file names in the loras folder without `.safetensors` (no separators, no `..`). */
export const LORA_NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$/;

export function isValidLoraName(name: string): boolean {
  return LORA_NAME.test(name) && !name.includes('..');
}

const TAG = /<lora:([^<>]*)>/gi;

/**
 * Splits `<lora:NAME>` / `<lora:NAME:SCALE>` tags out of a prompt. Returns the prompt without
 * them (the space a tag leaves is collapsed) and the LoRAs in prompt order. Throws an
 * InvalidOptionError (param `param`) naming a malformed tag.
 */
export function parsePromptLoras(prompt: string, param = 'prompt'): { prompt: string; loras: AppliedLora[] } {
  if (!/<lora:/i.test(prompt)) return { prompt, loras: [] };
  const loras: AppliedLora[] = [];
  const text = prompt.replace(TAG, (tag: string, body: string) => {
    const parts = body.split(':').map((p) => p.trim());
    const [name = '', scaleText] = parts;
    if (parts.length > 2) throw new InvalidOptionError(`${tag}: a LoRA tag is <lora:NAME> or <lora:NAME:SCALE>`, param);
    if (!isValidLoraName(name)) {
      throw new InvalidOptionError(`${tag}: "${name}" is not a LoRA name (letters, digits, . _ + -: a file in the loras folder, without .safetensors)`, param);
    }
    const scale = scaleText === undefined || scaleText === '' ? 1 : Number(scaleText);
    if (!Number.isFinite(scale) || Math.abs(scale) > MAX_LORA_SCALE) {
      throw new InvalidOptionError(`${tag}: the scale must be a number from -${MAX_LORA_SCALE} to ${MAX_LORA_SCALE}`, param);
    }
    if (loras.some((l) => l.name === name)) throw new InvalidOptionError(`${tag}: LoRA "${name}" is named twice in the prompt`, param);
    loras.push({ name, scale });
    return '\u0000';
  });
  if (loras.length > MAX_PROMPT_LORAS) throw new InvalidOptionError(`at most ${MAX_PROMPT_LORAS} LoRA tags per prompt (got ${loras.length})`, param);
  const cleaned = text
    .replace(/[ \t]*\u0000[ \t]*/g, ' ')
    .replace(/ {2,}/g, ' ')
    .trim();
  return { prompt: cleaned, loras };
}

/** `base` with `extra` added: an extra LoRA of a name already there replaces its scale. */
export function mergeLoras(base: readonly AppliedLora[], extra: readonly AppliedLora[]): AppliedLora[] {
  const out = base.map((l) => ({ ...l }));
  for (const l of extra) {
    const known = out.find((o) => o.name === l.name);
    if (known) known.scale = l.scale;
    else out.push({ ...l });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// What a model carries

/** A model with some LoRAs, held until `release()` (the cache frees it only after). */
export interface LoraLease {
  model: DiffusionModel;
  release(): void;
}

/** Returns the model the provider belongs to with `loras` (from a prompt) added to its own. */
export type LoraProvider = (loras: readonly AppliedLora[]) => Promise<LoraLease>;

interface Attached {
  loras: readonly AppliedLora[];
  provider?: LoraProvider;
}

const attached = new WeakMap<DiffusionModel, Attached>();

/** Records which LoRAs `model`'s sessions have applied and how to get others (the Engine calls this). */
export function attachLoras(model: DiffusionModel, loras: readonly AppliedLora[], provider?: LoraProvider): void {
  attached.set(model, { loras: loras.map((l) => ({ ...l })), provider });
}

/** The LoRAs a model's sessions apply (empty for a base model). */
export function modelLoras(model: DiffusionModel): readonly AppliedLora[] {
  return attached.get(model)?.loras ?? [];
}

/** For EffectiveSettings: `{ loras }` when the model applies some, else nothing. */
export function loraSettings(model: DiffusionModel): { loras?: AppliedLora[] } {
  const loras = modelLoras(model);
  return loras.length ? { loras: loras.map((l) => ({ ...l })) } : {};
}

/**
 * The model, options and UNet a generation runs with once the prompt's LoRA tags are taken out:
 * the same ones when the prompt has none; else the model's variant with them (held until
 * `release`), the prompt without the tags, and `unet` swapped when it was the model's own.
 */
export async function withPromptLoras<O extends { prompt: string }, E extends { unet?: OnnxModel }>(
  model: DiffusionModel,
  options: O,
  extra: E,
): Promise<{ model: DiffusionModel; options: O; extra: E; release: () => void }> {
  const same = { model, options, extra, release: () => {} };
  if (typeof options.prompt !== 'string') return same; // resolveSettings says what is wrong
  const { prompt, loras } = parsePromptLoras(options.prompt);
  if (loras.length === 0) return same;
  const provider = attached.get(model)?.provider;
  if (!provider) {
    throw new InvalidOptionError(
      `the prompt names LoRAs (${loras.map((l) => l.name).join(', ')}) but model ${model.name} was not loaded through Kiln's Engine, which applies them`,
      'prompt',
    );
  }
  const lease = await provider(loras);
  const swapped = extra.unet !== undefined && extra.unet === model.unet ? { ...extra, unet: lease.model.unet } : extra;
  return { model: lease.model, options: { ...options, prompt }, extra: swapped, release: () => lease.release() };
}

