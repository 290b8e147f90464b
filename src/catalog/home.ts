/**
 * What Kiln takes from the environment, read here and nowhere below: the home folder and the
 * tuning variables. Commands and servers resolve these and pass folders and values to the engine
 * (src/engine/ reads no environment; test/engine/layering.test.ts checks it).
 */
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { builtinModelsDir } from '../engine/locate.js';
import { DEFAULT_PREVIEW_BUDGET } from '../engine/tiny-decoder.js';

/** Kiln's data folder: `$KILN_HOME`, else `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`. */
export function kilnHome(env: NodeJS.ProcessEnv = process.env): string {
  if (env.KILN_HOME) return resolve(env.KILN_HOME);
  const xdg = env.XDG_DATA_HOME || join(homedir(), '.local', 'share');
  return join(xdg, 'kiln');
}

/** The folders model names are looked up in: the home's models/, then the models shipped with Kiln. */
export function modelSearchDirs(home: string): string[] {
  return [join(home, 'models'), builtinModelsDir()];
}

/** `$KILN_LORA_CACHE`: LoRA variants kept loaded beside the base models; undefined (the engine's 2) when unset or not a count. */
export function loraCacheSize(env: NodeJS.ProcessEnv = process.env): number | undefined {
  const raw = env.KILN_LORA_CACHE;
  if (raw === undefined || raw.trim() === '') return undefined;
  const n = Number(raw);
  return Number.isInteger(n) && n >= 0 ? n : undefined;
}

/** `$KILN_MAX_MODELS`: models each inference thread keeps loaded; undefined (no bound) when unset or not a positive count. */
export function maxModels(env: NodeJS.ProcessEnv = process.env): number | undefined {
  const raw = env.KILN_MAX_MODELS;
  if (raw === undefined || raw.trim() === '') return undefined;
  const n = Number(raw);
  return Number.isInteger(n) && n >= 1 ? n : undefined;
}

/** The share of a run's time tiny-decoder previews may take: `$KILN_PREVIEW_BUDGET` (a fraction, `Infinity`), else 0.05. */
export function previewBudget(env: NodeJS.ProcessEnv = process.env): number {
  const raw = env.KILN_PREVIEW_BUDGET?.trim();
  const v = raw ? Number(raw) : NaN;
  return v >= 0 ? v : DEFAULT_PREVIEW_BUDGET;
}
