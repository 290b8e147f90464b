/**
 * The `kiln` command.
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { registerConvertCommand } from './convert.js';
import { registerImportCommand } from './import.js';
import { isValidLoraName, MAX_LORA_SCALE, type AppliedLora } from '../engine/loras.js';
import { generateCommand } from './generate.js';
import { formatCliError } from './errors.js';
import { registerModelCommands } from './models.js';
import { registerPullCommand } from './pull.js';
import { registerServeCommand } from './serve.js';
import { registerWorkerCommand } from './worker.js';

// src/cli/main.ts and dist/cli/main.js are both two levels below the package root.
const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };

const program = new Command();
program
  .name('kiln')
  .description('Self-hosted, OpenAI-compatible image generation (Block Entropy images API) on ONNX Runtime')
  .version(pkg.version, '-V, --version', 'print the version')
  .showHelpAfterError();

export const HOME_HELP = "Kiln's home folder: models/, aliases.json, images/, cache/ (default $KILN_HOME or ~/.local/share/kiln)";

// Every command takes --home; setting KILN_HOME before the action makes every reader of the home
// (model lookup, aliases, pulls, the server's workers) agree on it.
program.hook('preAction', (_root, command) => {
  const home = (command.opts() as { home?: string }).home;
  if (home) process.env.KILN_HOME = resolve(home);
});

export function parseInteger(value: string): number {
  if (!/^\d+$/.test(value.trim())) throw new InvalidArgumentError('expected a non-negative integer');
  return Number(value);
}

/** `--lora NAME[:SCALE]` (repeatable): a LoRA of $KILN_HOME/loras and its scale (default 1). */
export function collectLora(value: string, previous: AppliedLora[] = []): AppliedLora[] {
  const at = value.lastIndexOf(':');
  const name = at > 0 ? value.slice(0, at) : value;
  const scale = at > 0 ? Number(value.slice(at + 1)) : 1;
  if (!isValidLoraName(name)) throw new InvalidArgumentError(`"${name}" is not a LoRA name (a file of $KILN_HOME/loras without .safetensors: letters, digits, . _ + -)`);
  if (at > 0 && (value.slice(at + 1).trim() === '' || !Number.isFinite(scale) || Math.abs(scale) > MAX_LORA_SCALE)) {
    throw new InvalidArgumentError(`the scale of ${name} must be a number from -${MAX_LORA_SCALE} to ${MAX_LORA_SCALE}`);
  }
  return [...previous.filter((l) => l.name !== name), { name, scale }];
}

export function parseNumber(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError('expected a number');
  return n;
}

program
  .command('generate')
  .description('generate one image from a prompt and write it as PNG')
  .option('-m, --model <name|dir|file>', 'installed model name, model folder, or single-file checkpoint (.safetensors) (default: the default model)')
  .requiredOption('-p, --prompt <text>', 'what to draw; inline weights like (ball)0.5 or word++ work')
  .option('--negative <text>', 'negative prompt')
  .option('-s, --seed <n>', 'seed (the API\'s n); random when absent', parseInteger)
  .option('--size <WxH>', 'image size: 256x256, 512x512, 1024x1024, 1792x1024, 1024x1792, 1536x1024, 1024x1536, auto (the native size), or WxH in multiples of 64 within the model\'s range', '512x512')
  .option('-q, --quality <name>', 'draft|low, smooth|standard|medium|auto, hd|high', 'smooth')
  .option('--scheduler <name>', 'euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras, dpm_single, unipc, lcm')
  .option('--steps <n>', 'denoising steps (overrides quality)', parseInteger)
  .option('--guidance <x>', 'classifier-free guidance scale', parseNumber)
  .addOption(new Option('--device <device>', 'execution provider').choices(['cpu', 'cuda']).default('cpu'))
  .option('-o, --out <file>', 'output PNG path (default: kiln-<seed>.png)')
  .option('--lora <name[:scale]>', 'apply a LoRA from $KILN_HOME/loras (repeatable; also <lora:NAME:SCALE> in the prompt)', collectLora)
  .option('--preview-dir <dir>', 'write previews of the image in progress there as PNGs (partial-<i>-step-<n>.png), as they come')
  .option('--previews <n>', 'how many previews with --preview-dir, spread over the steps', parseInteger, 3)
  .action(generateCommand);

registerServeCommand(program);
registerWorkerCommand(program);

registerPullCommand(program);
registerModelCommands(program);
registerConvertCommand(program);
registerImportCommand(program);

for (const command of program.commands) {
  if (!command.options.some((o) => o.long === '--home')) command.option('--home <dir>', HOME_HELP);
}

try {
  await program.parseAsync(process.argv);
} catch (err) {
  process.stderr.write(`kiln: ${formatCliError(err)}\n`);
  process.exitCode = 1;
}
