/**
 * `kiln convert SRC --out DIR [--dtype fp32|fp16] [--attention-mask]`: a diffusers folder with safetensors weights
 * -> the diffusers ONNX layout (the graphs Kiln builds itself), with a progress bar per component.
 */
import { existsSync, readdirSync } from 'node:fs';
import { resolve } from 'node:path';
import { Option, type Command } from 'commander';
import { SingleBar, Presets } from 'cli-progress';
import { InvalidOptionError } from '../engine/errors.js';
import { convertPipeline, type GraphDtype } from '../graphs/convert.js';
import { isSafetensorsLayout } from '../engine/model.js';
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
  attentionMask?: boolean;
}

export function convertCommand(src: string, flags: ConvertFlags): void {
  const from = resolve(src);
  const out = resolve(flags.out);
  if (!isSafetensorsLayout(from)) {
    throw new InvalidOptionError(`${from} is not a diffusers folder with safetensors weights (model_index.json, unet/*.safetensors, ...)`, 'SRC');
  }
  if (existsSync(out) && readdirSync(out).length > 0) throw new InvalidOptionError(`${out} exists and is not empty`, '--out');
  const progress = new BuildProgress();
  const started = performance.now();
  try {
    const result = convertPipeline(from, out, { dtype: flags.dtype, textAttentionMask: flags.attentionMask ?? false, onProgress: progress.handle });
    progress.stop();
    for (const c of result.components) {
      const copied = c.stats.copiedFiles.length ? `, ${c.stats.copiedFiles.length} file(s) copied (no hard link across filesystems)` : '';
      process.stdout.write(
        `${c.name}: ${(c.parameters / 1e6).toFixed(1)} M parameters, ${formatBytes(c.stats.linkedBytes)} used in place, ${formatBytes(c.stats.writtenBytes)} written${copied}\n`,
      );
    }
    process.stdout.write(`${out}: ONNX layout (${flags.dtype}) in ${((performance.now() - started) / 1000).toFixed(1)} s\n`);
  } finally {
    progress.stop();
  }
}

export function registerConvertCommand(program: Command): void {
  program
    .command('convert')
    .description('build the ONNX graphs of a diffusers folder with safetensors weights (the layout Kiln and ONNX Runtime load)')
    .argument('<src>', 'diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...)')
    .requiredOption('-o, --out <dir>', 'output folder (created; must be empty)')
    .addOption(new Option('--dtype <dtype>', 'graph precision (fp16 keeps norms and softmax in fp32, and the SDXL VAE)').choices(['fp32', 'fp16']).default('fp32'))
    .option('--attention-mask', 'text encoders also take attention_mask (exact compel down-weighting in Kiln; consumers that feed input_ids alone cannot run them)')
    .action(convertCommand);
}
