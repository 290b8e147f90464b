/**
 * `kiln import FILE.safetensors [--name NAME] [--vae FILE] [--config DIR] [--prediction-type T]`:
 * a single-file checkpoint installed as a model under $KILN_HOME/models/NAME (the file
 * hard-linked, never copied; src/graphs/checkpoint.ts). `kiln import --lora FILE [--name NAME]`:
 * a LoRA file installed as $KILN_HOME/loras/NAME.safetensors.
 */
import { join, resolve } from 'node:path';
import { Option, type Command } from 'commander';
import { InvalidOptionError } from '../engine/errors.js';
import { kilnHome } from '../catalog/home.js';
import { importCheckpoint, importLora } from '../graphs/checkpoint.js';
import { PREDICTION_TYPES, type PredictionType } from '../graphs/families.js';
import { isValidModelName } from '../models/aliases.js';
import { defaultFileName } from '../models/pull-file.js';

export interface ImportFlags {
  name?: string;
  lora?: boolean;
  vae?: string;
  config?: string;
  predictionType?: PredictionType;
  force?: boolean;
}

export function importCommand(file: string, flags: ImportFlags): void {
  const home = kilnHome();
  if (flags.lora) {
    if (flags.vae || flags.config || flags.predictionType) throw new InvalidOptionError('--vae, --config and --prediction-type are for checkpoints, not LoRAs', '--lora');
    const r = importLora(file, { lorasDir: join(home, 'loras'), name: flags.name, force: flags.force });
    process.stdout.write(`installed LoRA ${r.name} (${r.modules} modules) as ${r.path}; use it with <lora:${r.name}:0.8> in a prompt or --lora ${r.name}:0.8\n`);
    return;
  }
  const name = flags.name ?? defaultFileName(file);
  if (!isValidModelName(name)) throw new InvalidOptionError(`"${name}" is not a valid model name (letters, digits, ".", "_", "-"); pass --name`, '--name');
  const r = importCheckpoint(file, {
    dir: join(home, 'models', name),
    vae: flags.vae,
    config: flags.config,
    predictionType: flags.predictionType,
    force: flags.force,
  });
  const held =
    r.held === 'link'
      ? 'hard-linked, no copy'
      : `referred to at ${resolve(file)} (another file system: no hard link, and no copy; keep the file there)`;
  const prediction = r.detected.family === 'sd2' ? `; ${flags.predictionType ?? (r.detected.inpainting ? 'epsilon' : 'v_prediction')} prediction (set "prediction_type" in kiln.json to change it)` : '';
  process.stdout.write(
    `installed ${name}: ${r.detected.description} checkpoint (${held})${prediction} in ${r.dir}; its graphs are built on first use. ` +
      `kiln generate --model ${name} --prompt "..."\n`,
  );
}

export function registerImportCommand(program: Command): void {
  program
    .command('import')
    .description('install a single-file checkpoint (.safetensors, SD 1.x / 2.x / SDXL, as on model sites) as a model, or a LoRA file with --lora')
    .argument('<file>', 'the .safetensors file (pickle files such as .ckpt are refused: they can run code when loaded)')
    .option('-n, --name <name>', 'model (or LoRA) name (default: the file name without .safetensors)')
    .option('--lora', 'install a LoRA into $KILN_HOME/loras instead of a model')
    .option('--vae <file>', 'a separate VAE (.safetensors file or diffusers vae folder) that replaces the embedded one')
    .option('--config <dir>', "a diffusers pipeline folder to take the configs from (default: Kiln's shipped configs of the detected family)")
    .addOption(new Option('--prediction-type <type>', 'SD 2.x: what the UNet predicts (default v_prediction; epsilon for 512 "base" models)').choices([...PREDICTION_TYPES]))
    .option('-f, --force', 'replace an existing model or LoRA of that name')
    .action(importCommand);
}
