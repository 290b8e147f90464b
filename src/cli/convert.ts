/**
 * `kiln convert SRC --out DIR [--dtype fp32|fp16] [--lora FILE[:SCALE]]... [--attention-mask]`: a
 * diffusers folder with safetensors weights, or a single-file checkpoint, -> the diffusers ONNX
 * layout (the graphs Kiln builds itself), with a progress bar per component. With --lora the UNet
 * and text encoder graphs apply the LoRAs (folded in when ONNX Runtime loads them; lora-graph.ts).
 */
import { existsSync, mkdtempSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { SingleBar, Presets } from 'cli-progress';
import { InvalidOptionError } from '../engine/errors.js';
import { BUILD_FORMAT, BUILD_INFO } from '../graphs/cache.js';
import { importCheckpoint, isWeightsFilePath } from '../graphs/checkpoint.js';
import { convertPipeline, type GraphDtype } from '../graphs/convert.js';
import { PREDICTION_TYPES, type PredictionType } from '../graphs/families.js';
import { loraGraph, type LoraSpec } from '../graphs/lora-graph.js';
import { detectLayout, isSafetensorsLayout } from '../engine/model.js';
import { MAX_LORA_SCALE } from '../engine/loras.js';
import { formatBytes } from '../models/pull.js';

/** Renders graph-build progress: a bar per component on a terminal, a line per component otherwise. */
export class BuildProgress {
  private bar: SingleBar | undefined;
  private component = '';

  constructor(private readonly out: NodeJS.WriteStream = process.stderr) {}

  readonly handle = (e: { component: string; done: number; total: number }): void => {
    if (e.component !== this.component) {
      this.stop();
      this.component = e.component;
      if (this.out.isTTY) {
        this.bar = new SingleBar(
          { format: ' {component} |{bar}| {percentage}% | {doneBytes} / {totalBytes} | {duration_formatted}', hideCursor: true, stream: this.out },
          Presets.shades_classic,
        );
        this.bar.start(e.total, 0, { component: e.component.padEnd(14), doneBytes: '0 B', totalBytes: formatBytes(e.total) });
      } else {
        this.out.write(`building ${e.component} (${formatBytes(e.total)} of weights)\n`);
      }
    }
    this.bar?.update(e.done, { doneBytes: formatBytes(e.done) });
  };

  stop(): void {
    this.bar?.stop();
    this.bar = undefined;
  }
}

export interface ConvertFlags {
  out: string;
  dtype: GraphDtype;
  /** `--lora FILE[:SCALE]`, repeatable. */
  lora?: LoraSpec[];
  /** Single-file checkpoints: as `kiln import`. */
  vae?: string;
  config?: string;
  predictionType?: PredictionType;
  attentionMask?: boolean;
}

/** `--lora FILE[:SCALE]` (repeatable): a LoRA file and its scale (default 1). */
export function collectLoraFile(value: string, previous: LoraSpec[] = []): LoraSpec[] {
  const m = /^(.*):([^:/\\]*)$/.exec(value);
  const scaleText = m && m[1] !== '' && !/^[A-Za-z]$/.test(m[1]!) ? m[2]! : undefined;
  const path = scaleText !== undefined ? m![1]! : value;
  const scale = scaleText !== undefined ? Number(scaleText) : 1;
  if (scaleText !== undefined && (scaleText.trim() === '' || !Number.isFinite(scale) || Math.abs(scale) > MAX_LORA_SCALE)) {
    throw new InvalidArgumentError(`the scale of ${path} must be a number from -${MAX_LORA_SCALE} to ${MAX_LORA_SCALE}`);
  }
  return [...previous, { path: resolve(path), scale }];
}

export function convertCommand(src: string, flags: ConvertFlags): void {
  let from = resolve(src);
  const out = resolve(flags.out);
  const isFile = isWeightsFilePath(from) && existsSync(from) && statSync(from).isFile();
  if (!isFile && (flags.vae || flags.config || flags.predictionType)) {
    throw new InvalidOptionError('--vae, --config and --prediction-type apply to a single-file checkpoint (a folder says these in its kiln.json)', 'SRC');
  }
  if (!isFile && !isSafetensorsLayout(from)) {
    throw new InvalidOptionError(`${from} is not a diffusers folder with safetensors weights (model_index.json, unet/*.safetensors, ...) nor a single-file checkpoint`, 'SRC');
  }
  if (existsSync(out) && readdirSync(out).length > 0) throw new InvalidOptionError(`${out} exists and is not empty`, '--out');
  for (const l of flags.lora ?? []) if (!existsSync(l.path)) throw new InvalidOptionError(`the LoRA file ${l.path} does not exist`, '--lora');
  const progress = new BuildProgress();
  const started = performance.now();
  // A checkpoint is read through the folder `kiln import` would make (by reference, no copy), removed afterwards.
  let scratch: string | undefined;
  try {
    if (isFile) {
      scratch = mkdtempSync(join(dirname(out), '.kiln-convert-'));
      const r = importCheckpoint(from, { dir: join(scratch, 'model'), reference: true, vae: flags.vae, config: flags.config, predictionType: flags.predictionType });
      process.stdout.write(`${from}: ${r.detected.description} checkpoint\n`);
      from = r.dir;
    }
    const result = convertPipeline(from, out, { dtype: flags.dtype, textAttentionMask: flags.attentionMask ?? false, onProgress: progress.handle, onWarning: (m) => process.stderr.write(`kiln: warning: ${m}\n`) });
    progress.stop();
    if (flags.lora?.length) applyLoras(out, flags.lora);
    // Marks the folder as Kiln's own graphs (LoRAs can be applied to it as to a cache entry).
    const info = { format: BUILD_FORMAT, source: resolve(src), dtype: flags.dtype, components: result.components.map((c) => ({ name: c.name, parameters: c.parameters, ...c.stats })) };
    writeFileSync(join(out, BUILD_INFO), `${JSON.stringify({ ...info, ...(flags.lora?.length ? { loras: flags.lora } : {}) }, null, 2)}\n`);
    for (const c of result.components) {
      const copied = c.stats.copiedFiles.length ? `, ${c.stats.copiedFiles.length} file(s) copied (no hard link across filesystems)` : '';
      process.stdout.write(
        `${c.name}: ${(c.parameters / 1e6).toFixed(1)} M parameters, ${formatBytes(c.stats.linkedBytes)} used in place, ${formatBytes(c.stats.writtenBytes)} written${copied}\n`,
      );
    }
    process.stdout.write(`${out}: ONNX layout (${flags.dtype}) in ${((performance.now() - started) / 1000).toFixed(1)} s\n`);
  } finally {
    progress.stop();
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  }
}

/** Rewrites the UNet and text encoder graphs of `out` with the LoRAs in them. */
function applyLoras(out: string, loras: LoraSpec[]): void {
  const family = detectLayout(out).family;
  let matched = 0;
  for (const component of ['unet', 'text_encoder', 'text_encoder_2'] as const) {
    const graph = join(out, component, 'model.onnx');
    if (!existsSync(graph)) continue;
    const r = loraGraph(graph, loras, component, { family });
    for (const line of r.unmatched) process.stderr.write(`kiln: warning: ${line}\n`);
    matched += r.reports.reduce((a, x) => a + x.matched.length, 0);
    if (r.path !== graph) renameSync(r.path, graph);
    process.stdout.write(`${component}: ${r.changedWeights} weights with LoRA deltas\n`);
  }
  if (matched === 0) throw new InvalidOptionError(`no module of the LoRA(s) matches this model (${loras.map((l) => l.path).join(', ')})`, '--lora');
}

export function registerConvertCommand(program: Command): void {
  program
    .command('convert')
    .description('build the ONNX graphs of a diffusers folder with safetensors weights or of a single-file checkpoint (the layout Kiln and ONNX Runtime load)')
    .argument('<src>', 'diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...) or single-file checkpoint (.safetensors)')
    .requiredOption('-o, --out <dir>', 'output folder (created; must be empty)')
    .addOption(new Option('--dtype <dtype>', 'graph precision (fp16 keeps norms and softmax in fp32, and the SDXL VAE)').choices(['fp32', 'fp16']).default('fp32'))
    .option('--lora <file[:scale]>', 'apply a LoRA file (kohya or diffusers/PEFT) at a scale (default 1); repeatable', collectLoraFile)
    .option('--vae <file>', 'single-file checkpoints: a separate VAE that replaces the embedded one')
    .option('--config <dir>', 'single-file checkpoints: a diffusers folder to take the configs from')
    .addOption(new Option('--prediction-type <type>', 'single-file SD 2.x checkpoints: epsilon or v_prediction').choices([...PREDICTION_TYPES]))
    .option('--attention-mask', 'text encoders also take attention_mask (exact compel down-weighting in Kiln; consumers that feed input_ids alone cannot run them)')
    .action(convertCommand);
}
