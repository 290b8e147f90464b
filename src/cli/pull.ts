/**
 * `kiln pull <alias | owner/name[@revision]>`: download a model from the Hugging Face Hub (or
 * HF_ENDPOINT) into $KILN_HOME/models/<name>, with a progress bar (bytes, rate, ETA).
 */
import type { Command } from 'commander';
import { SingleBar, Presets } from 'cli-progress';
import { PullError } from '../models/errors.js';
import { formatBytes, pullModel, type PullEvent, type PullResult } from '../models/pull.js';
import { FORMAT_CHOICES, type FormatChoice } from '../models/select.js';
import { parseFileSpec, pullFile, type PullFileResult } from '../models/pull-file.js';

export interface PullFlags {
  config?: string;
  name?: string;
  force?: boolean;
  dryRun?: boolean;
  format?: string;
}

/** ` (safetensors, fp16)` for a plan or result that says which layout it holds. */
function layoutNote(r: { layout?: string; variant?: string }): string {
  if (!r.layout) return '';
  return ` (${r.layout}${r.variant && r.variant !== 'default' ? `, ${r.variant}` : ''})`;
}

function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '--';
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

/** Renders pull events: a byte progress bar on a terminal, one line per file otherwise. */
export class PullProgress {
  private bar: SingleBar | undefined;
  private total = 0;
  private done = 0;
  private file = '';
  private samples: { t: number; bytes: number }[] = [];
  private fetched = 0;
  private lastRender = 0;

  constructor(private readonly out: NodeJS.WriteStream = process.stderr) {}

  private payload() {
    const now = performance.now();
    this.samples.push({ t: now, bytes: this.fetched });
    while (this.samples.length > 2 && now - this.samples[0]!.t > 5000) this.samples.shift();
    const first = this.samples[0]!;
    const dt = (now - first.t) / 1000;
    const rate = dt > 0.2 ? (this.fetched - first.bytes) / dt : 0;
    return {
      done: formatBytes(this.done),
      size: formatBytes(this.total),
      rate: rate > 0 ? `${formatBytes(rate)}/s` : '-- B/s',
      remaining: rate > 0 ? formatDuration((this.total - this.done) / rate) : '--',
      file: this.file.length > 40 ? `…${this.file.slice(-39)}` : this.file,
    };
  }

  readonly handle = (e: PullEvent): void => {
    switch (e.type) {
      case 'resolved':
        this.out.write(`pulling ${e.repo}@${e.revision} (commit ${e.commit.slice(0, 7)}) into ${e.dir}\n`);
        break;
      case 'plan': {
        this.total = e.totalBytes;
        this.done = e.onDiskBytes;
        const resumed = e.onDiskBytes > 0 ? `, ${formatBytes(e.onDiskBytes)} already downloaded` : '';
        this.out.write(`${e.files.length} files, ${formatBytes(e.totalBytes)}${layoutNote(e)}${resumed}\n`);
        break;
      }
      case 'replan':
        this.total = e.totalBytes;
        this.bar?.setTotal(e.totalBytes);
        break;
      case 'file-start':
        this.file = e.path;
        if (!this.bar && this.out.isTTY) {
          this.bar = new SingleBar(
            {
              format: ' {bar} {percentage}% | {done} / {size} | {rate} | ETA {remaining} | {file}',
              hideCursor: true,
              barsize: 28,
              stream: this.out,
              clearOnComplete: false,
            },
            Presets.shades_classic,
          );
          this.bar.start(Math.max(this.total, 1), this.done, this.payload());
        }
        break;
      case 'bytes': {
        this.done += e.bytes;
        this.fetched += e.bytes;
        const now = performance.now();
        if (this.bar && now - this.lastRender > 100) {
          this.lastRender = now;
          this.bar.update(this.done, this.payload());
        }
        break;
      }
      case 'file-done':
        if (this.bar) this.bar.update(this.done, this.payload());
        else this.out.write(`  ${e.path} ${formatBytes(e.size)}${e.fetchedBytes === 0 ? ' (already downloaded)' : ''} ✓\n`);
        break;
      case 'retry':
        if (!this.bar) this.out.write(`  ${e.path}: ${e.message}; retrying (${e.attempt})\n`);
        break;
      case 'installed':
        break;
    }
  };

  stop(): void {
    this.bar?.stop();
    this.bar = undefined;
  }
}

function summary(r: PullResult): string {
  if (r.dryRun) {
    const lines = r.files.map((f) => `  ${f.path}${f.from ? ` (from ${f.from})` : ''}  ${formatBytes(f.size)}`);
    return `would install ${r.repo}@${r.revision} (commit ${r.commit.slice(0, 7)})${layoutNote(r)} into ${r.dir}:\n${lines.join('\n')}\n` +
      `total ${formatBytes(r.totalBytes)}; ${r.skipped?.length ?? 0} repository files skipped\n`;
  }
  const use = r.kind === 'diffusion' ? `; kiln generate --model ${r.name} --prompt "..."` : '';
  if (r.upToDate) return `${r.name} is up to date (${r.repo}@${r.revision}, commit ${r.commit.slice(0, 7)})${use}\n`;
  return `installed ${r.name}: ${r.files.length} files, ${formatBytes(r.totalBytes)} (${formatBytes(r.fetchedBytes)} downloaded) in ${r.dir}${use}\n`;
}

function fileSummary(r: PullFileResult): string {
  const where = `${r.repo}/${r.path}@${r.revision} (commit ${r.commit.slice(0, 7)})`;
  if (r.dryRun) return `would fetch ${where}: ${formatBytes(r.size)}\n`;
  const use = r.kind === 'lora' ? `; use it with <lora:${r.name}:0.8> in a prompt` : `; kiln generate --model ${r.name} --prompt "..."`;
  const what = r.kind === 'lora' ? `LoRA ${r.name}` : `${r.name}${r.detected ? ` (${r.detected.description} checkpoint)` : ''}`;
  if (r.upToDate) return `${what} is up to date (${where})${use}\n`;
  return `installed ${what}: ${formatBytes(r.size)} (${formatBytes(r.fetchedBytes)} downloaded) from ${where} in ${r.dir}${use}\n`;
}

export async function pullCommand(spec: string, flags: PullFlags): Promise<void> {
  let fileSpec: ReturnType<typeof parseFileSpec>;
  try {
    fileSpec = parseFileSpec(spec);
  } catch (err) {
    if (!(err instanceof PullError)) throw err;
    process.stderr.write(`kiln: ${err.message}\n`);
    process.exitCode = 1;
    return;
  }
  if ((fileSpec && flags.format !== undefined) || (!fileSpec && flags.config !== undefined)) {
    process.stderr.write(`kiln: ${fileSpec ? '--format applies to repositories' : '--config applies to one checkpoint file (owner/name/path/file.safetensors)'}\n`);
    process.exitCode = 1;
    return;
  }
  if (flags.format !== undefined && !FORMAT_CHOICES.includes(flags.format as FormatChoice)) {
    process.stderr.write(`kiln: --format is one of ${FORMAT_CHOICES.join(', ')} (got "${flags.format}")\n`);
    process.exitCode = 1;
    return;
  }
  const abort = new AbortController();
  const onSigint = () => abort.abort();
  process.once('SIGINT', onSigint);
  const view = new PullProgress();
  try {
    if (fileSpec) {
      const r = await pullFile(fileSpec, { name: flags.name, force: flags.force, dryRun: flags.dryRun, config: flags.config, signal: abort.signal, onEvent: view.handle });
      view.stop();
      process.stdout.write(fileSummary(r));
      return;
    }
    const result = await pullModel(spec, {
      name: flags.name,
      force: flags.force,
      dryRun: flags.dryRun,
      format: flags.format as FormatChoice | undefined,
      signal: abort.signal,
      onEvent: view.handle,
    });
    view.stop();
    process.stdout.write(summary(result));
  } catch (err) {
    view.stop();
    if (!(err instanceof PullError)) throw err;
    const message = err.code === 'aborted' ? 'pull interrupted; the downloaded part is kept: run the same command again to resume.' : err.message;
    process.stderr.write(`kiln: ${message}\n`);
    process.exitCode = err.code === 'aborted' ? 130 : 1;
  } finally {
    process.off('SIGINT', onSigint);
  }
}

export function registerPullCommand(program: Command): void {
  program
    .command('pull')
    .description(
      'download a model from the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE apply): an alias (see kiln models --aliases), owner/name[@revision], ' +
        'or one file owner/name/path/file.safetensors[@revision] (a single-file checkpoint becomes a model, a LoRA goes to $KILN_HOME/loras)',
    )
    .argument('<model>', 'alias, Hub repository id owner/name, or owner/name/path/file.safetensors, with an optional @branch, tag or commit')
    .option('-n, --name <name>', 'install name under $KILN_HOME/models (default: the alias or the repository name)')
    .option('-f, --force', 'replace a folder of that name that kiln pull did not install')
    .option('--dry-run', 'list the files and the size, download nothing')
    .option('--config <dir>', 'one checkpoint file: a diffusers folder to take the configs from (as kiln import --config)')
    .option(
      '--format <format>',
      'diffusion layout to install: auto (the safetensors weights, fp16 where present, when complete, else the ONNX export), onnx or safetensors (default: auto, or what the alias says)',
    )
    .action(pullCommand);
}
