/**
 * Graphs benchmark (issue 10): Kiln's own ONNX graphs at full size, from the real configs with
 * random weights (no download).
 *
 *   npm run bench:graphs -- [--runs 3] [--warmup 1] [--threads 2] [--interleave] [--conversion]
 *                           [--skip-counts] [--skip-kiln] [--skip-torch] [--keep]
 *
 * 1. Parameter counts: every reference config (src/graphs/reference-configs.ts) built by its
 *    model page with RandomWeights (nothing written or run), beside what diffusers /
 *    transformers count for the same config.
 * 2. One guided SD 1.5 UNet step (fp32, batch 2, 64x64 latent = 512x512): Kiln's graph written
 *    with writeGraph to a temp folder (conversion time, peak RSS), loaded in onnxruntime-node
 *    (CPU, graphOptimizationLevel 'all', intraOpNumThreads = --threads), warm-up + median of
 *    --runs; then diffusers' own UNet on PyTorch CPU with the same threads, through
 *    bench/graphs_torch.py, when torch and diffusers import (the oracle environment of
 *    ../shared/oracle/README.md; set KILN_ORACLE_SRC to its SRC_DIR, or source its env.sh).
 *    Goal: Kiln <= 0.6x PyTorch. With --interleave both processes stay alive and their steps
 *    alternate, so that load from other processes on a shared machine falls on both alike.
 * 3. --conversion: a random fp16 safetensors file with the SDXL base UNet's shapes (2.57 G
 *    params, 5.1 GB) converted to fp32 ONNX through writeGraph; seconds and peak RSS. The temp
 *    folder is deleted afterwards.
 *
 * The heavy phases run in child processes so that each peak RSS is its own.
 *
 * Environment: KILN_ORACLE_SRC (SRC_DIR of the oracle setup; default $ORACLE_SRC), KILN_ORACLE_DIR
 * (folder with the oracle's stubs/, default ../shared/oracle), KILN_PYTHON (default
 * /usr/bin/python3), TMPDIR (where the multi-GB temp folders go).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import os from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { Presets, SingleBar } from 'cli-progress';
import ort from 'onnxruntime-node';
import { buildClipText } from '../src/graphs/clip-text.js';
import { GraphBuilder, uniformValues } from '../src/graphs/onnx-builder.js';
import { REFERENCE_MODELS, SD15_UNET, SD_VAE, SDXL_BASE_UNET, type ReferenceModel } from '../src/graphs/reference-configs.js';
import { buildUnet } from '../src/graphs/unet.js';
import { buildVaeDecoder, buildVaeEncoder } from '../src/graphs/vae.js';
import { componentWeights, Params, RandomWeights, RecordingWeights } from '../src/graphs/weights.js';
import { writeGraph } from '../src/graphs/write.js';
import { median } from './stats.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, '..');
const SELF = fileURLToPath(import.meta.url);

const { values: args } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    warmup: { type: 'string', default: '1' },
    threads: { type: 'string', default: '2' },
    conversion: { type: 'boolean', default: false },
    interleave: { type: 'boolean', default: false },
    'skip-counts': { type: 'boolean', default: false },
    'skip-kiln': { type: 'boolean', default: false },
    'skip-torch': { type: 'boolean', default: false },
    keep: { type: 'boolean', default: false },
    phase: { type: 'string' }, // internal: child process phases 'kiln-step' | 'kiln-serve' | 'vae-decode' | 'conversion'
  },
});
const runs = Number(args.runs);
const warmup = Number(args.warmup);
const threads = Number(args.threads);
const BATCH = 2;
const LATENT = 64;
const SEQ = 77;

type Page = (g: GraphBuilder, config: Record<string, unknown>, p: Params) => void;

function firstLine(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).split('\n')[0]!.trim();
}

const peakRssMb = (): number => process.resourceUsage().maxRSS / 1024;
const mb = (bytes: number): string => `${(bytes / 1e6).toFixed(0)} MB`;
const gb = (bytes: number): string => `${(bytes / 1e9).toFixed(2)} GB`;
const millions = (n: number): string => `${(n / 1e6).toFixed(1)} M`;

function bytesBar(label: string): SingleBar {
  return new SingleBar(
    { format: ` ${label.padEnd(16)} |{bar}| {percentage}% | {doneMb} / {totalMb} MB | {duration_formatted}`, hideCursor: true, stream: process.stderr },
    Presets.shades_classic,
  );
}

/** Writes a built graph with a progress bar; returns seconds and write stats. */
function writeWithBar(g: GraphBuilder, dir: string, label: string): { seconds: number; stats: ReturnType<typeof writeGraph> } {
  const bar = bytesBar(label);
  let started = false;
  const t0 = performance.now();
  const stats = writeGraph(g, dir, {
    meta: { producerName: 'kiln-bench-graphs' },
    onProgress: (done, total) => {
      if (!started) {
        bar.start(total, 0, { doneMb: '0', totalMb: (total / 1e6).toFixed(0) });
        started = true;
      }
      bar.update(done, { doneMb: (done / 1e6).toFixed(0) });
    },
  });
  if (started) bar.stop();
  return { seconds: (performance.now() - t0) / 1000, stats };
}

// ---------------------------------------------------------------------------------------------
// Phase: one SD 1.5 UNet step on ONNX Runtime (child process)

interface KilnStep {
  buildS: number;
  writeS: number;
  writtenBytes: number;
  parameters: number;
  conversionPeakRssMb: number;
  loadS: number;
  runs: number[];
  medianMs: number;
  peakRssMb: number;
  outDims: number[];
  finite: boolean;
  ort: string;
}

/** Seeded values in [-1, 1): stand-ins for latents and text embeddings. */
function noise(count: number, seed: number): Float32Array {
  return uniformValues(count, 1, seed);
}

function timestepTensor(meta: ort.InferenceSession.ValueMetadata | undefined, batch: number, t: number): ort.Tensor {
  const shape = meta && meta.isTensor ? meta.shape : [batch];
  const dims = shape.length === 0 ? [] : shape[0] === 1 ? [1] : [batch];
  const count = dims.length ? dims[0]! : 1;
  const type = meta && meta.isTensor ? meta.type : 'float32';
  if (type === 'int64') return new ort.Tensor('int64', new BigInt64Array(count).fill(BigInt(t)), dims);
  if (type === 'int32') return new ort.Tensor('int32', new Int32Array(count).fill(t), dims);
  return new ort.Tensor('float32', new Float32Array(count).fill(t), dims);
}

/** The SD 1.5 UNet written, loaded and ready to step (one session, fixed feeds). */
interface KilnStepper {
  prepared: Omit<KilnStep, 'runs' | 'medianMs' | 'peakRssMb' | 'outDims' | 'finite'>;
  step(): Promise<number>;
  finish(): Promise<Pick<KilnStep, 'peakRssMb' | 'outDims' | 'finite'>>;
}

async function prepareKiln(): Promise<KilnStepper> {
  const dir = mkdtempSync(join(os.tmpdir(), 'kiln-bench-sd15-unet-'));
  const cleanup = () => {
    if (!args.keep) rmSync(dir, { recursive: true, force: true });
    else process.stderr.write(`kept ${dir}\n`);
  };
  try {
    const t0 = performance.now();
    const g = new GraphBuilder('unet');
    const p = Params.of(g, new RandomWeights('unet'));
    buildUnet(g, { ...SD15_UNET }, p);
    const buildS = (performance.now() - t0) / 1000;
    const { seconds: writeS, stats } = writeWithBar(g, dir, 'write sd15 unet');
    const conversionPeakRssMb = peakRssMb();

    const t1 = performance.now();
    const session = await ort.InferenceSession.create(join(dir, 'model.onnx'), {
      executionProviders: ['cpu'],
      graphOptimizationLevel: 'all',
      intraOpNumThreads: threads,
      interOpNumThreads: 1,
    });
    const loadS = (performance.now() - t1) / 1000;
    const meta = new Map(session.inputMetadata.map((m) => [m.name, m]));
    const cross = SD15_UNET.cross_attention_dim as number;
    const feeds: Record<string, ort.Tensor> = {
      sample: new ort.Tensor('float32', noise(BATCH * 4 * LATENT * LATENT, 1), [BATCH, 4, LATENT, LATENT]),
      timestep: timestepTensor(meta.get('timestep'), BATCH, 999),
      encoder_hidden_states: new ort.Tensor('float32', noise(BATCH * SEQ * cross, 2), [BATCH, SEQ, cross]),
    };
    for (const name of meta.keys()) if (!(name in feeds)) throw new Error(`the SD 1.5 UNet graph has an unexpected input "${name}"`);
    let out: ort.Tensor | undefined;
    return {
      prepared: {
        buildS,
        writeS,
        writtenBytes: stats.writtenBytes + stats.linkedBytes,
        parameters: p.parameterCount,
        conversionPeakRssMb,
        loadS,
        ort: ort.env.versions.common,
      },
      async step() {
        out?.dispose?.();
        const t = performance.now();
        out = (await session.run(feeds, ['out_sample'])).out_sample!;
        return Math.round((performance.now() - t) * 10) / 10;
      },
      async finish() {
        const finite = out ? (out.data as Float32Array).every(Number.isFinite) : false;
        const outDims = out ? [...out.dims] : [];
        await session.release();
        cleanup();
        return { peakRssMb: peakRssMb(), outDims, finite };
      },
    };
  } catch (err) {
    cleanup();
    throw err;
  }
}

async function kilnStepPhase(): Promise<KilnStep> {
  const k = await prepareKiln();
  const bar = new SingleBar({ format: ' ORT UNet step    |{bar}| {value}/{total} | last {last} ms', hideCursor: true, stream: process.stderr }, Presets.shades_classic);
  bar.start(warmup + runs, 0, { last: '-' });
  const times: number[] = [];
  for (let i = 0; i < warmup + runs; i++) {
    const ms = await k.step();
    if (i >= warmup) times.push(ms);
    bar.update(i + 1, { last: ms.toFixed(0) });
  }
  bar.stop();
  return { ...k.prepared, runs: times, medianMs: median(times), ...(await k.finish()) };
}

// ---------------------------------------------------------------------------------------------
// Phase: one full-size SD VAE decode (child process)

interface VaeDecode {
  parameters: number;
  writeS: number;
  loadS: number;
  decodeMs: number;
  outDims: number[];
  finite: boolean;
  peakRssMb: number;
}

/** The real SD VAE decoder (random weights): one 64x64 latent to a 512x512 picture, with its shapes checked. */
async function vaeDecodePhase(): Promise<VaeDecode> {
  const dir = mkdtempSync(join(os.tmpdir(), 'kiln-bench-sd-vae-'));
  try {
    const g = new GraphBuilder('vae_decoder');
    const p = Params.of(g, new RandomWeights('vae'));
    buildVaeDecoder(g, { ...SD_VAE }, p);
    const { seconds: writeS } = writeWithBar(g, dir, 'write sd vae decoder');
    const t1 = performance.now();
    const session = await ort.InferenceSession.create(join(dir, 'model.onnx'), { graphOptimizationLevel: 'all', intraOpNumThreads: threads, interOpNumThreads: 1 });
    const loadS = (performance.now() - t1) / 1000;
    const latent = new ort.Tensor('float32', noise(4 * LATENT * LATENT, 3), [1, 4, LATENT, LATENT]);
    const t2 = performance.now();
    const out = (await session.run({ latent_sample: latent }, ['sample'])).sample!;
    const decodeMs = performance.now() - t2;
    const result = { parameters: p.parameterCount, writeS, loadS, decodeMs, outDims: [...out.dims], finite: (out.data as Float32Array).every(Number.isFinite), peakRssMb: peakRssMb() };
    await session.release();
    return result;
  } finally {
    if (!args.keep) rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * --interleave: the child prepares and warms up, prints {"ready": ...}, then runs one step per
 * "run" line on stdin ({"ms": x} each) and on "stop" prints {"done": ...}. The parent alternates
 * Kiln and PyTorch steps so that both see the same load from other processes.
 */
async function kilnServePhase(): Promise<void> {
  const k = await prepareKiln();
  for (let i = 0; i < warmup; i++) process.stderr.write(` Kiln warm-up ${await k.step()} ms\n`);
  process.stdout.write(`${JSON.stringify({ ready: k.prepared })}\n`);
  const rl = createInterface({ input: process.stdin });
  for await (const line of rl) {
    if (line.trim() === 'run') process.stdout.write(`${JSON.stringify({ ms: await k.step() })}\n`);
    else break;
  }
  rl.close();
  process.stdout.write(`${JSON.stringify({ done: await k.finish() })}\n`);
}

// ---------------------------------------------------------------------------------------------
// Phase: SDXL-sized conversion (child process)

/**
 * Streams a safetensors file of random fp16 values (|x| in [2^-6, 2^-2)) one chunk at a time,
 * never holding more than a few MB: the file is as large as a real SDXL fp16 UNet.
 */
function writeRandomFp16Safetensors(path: string, shapes: Map<string, number[]>): number {
  const names = [...shapes.keys()].sort();
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let offset = 0;
  for (const name of names) {
    const bytes = shapes.get(name)!.reduce((a, b) => a * b, 1) * 2;
    header[name] = { dtype: 'F16', shape: shapes.get(name), data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const pad = (8 - (json.length % 8)) % 8;
  if (pad) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  const fd = openSync(path, 'w');
  const bar = bytesBar('random fp16 file');
  bar.start(offset, 0, { doneMb: '0', totalMb: (offset / 1e6).toFixed(0) });
  try {
    writeSync(fd, len);
    writeSync(fd, json);
    const CHUNK = 1 << 22;
    const buf = new Uint16Array(CHUNK);
    let state = 0x9e3779b9;
    let done = 0;
    for (const name of names) {
      let left = shapes.get(name)!.reduce((a, b) => a * b, 1);
      while (left > 0) {
        const n = Math.min(left, CHUNK);
        for (let i = 0; i < n; i++) {
          state ^= state << 13;
          state ^= state >>> 17;
          state ^= state << 5;
          // sign and 10 mantissa bits random, exponent 9..12
          buf[i] = (state & 0x83ff) | ((((state >>> 10) & 3) + 9) << 10);
        }
        writeSync(fd, buf, 0, n * 2);
        left -= n;
        done += n * 2;
        bar.update(done, { doneMb: (done / 1e6).toFixed(0) });
      }
    }
  } finally {
    bar.stop();
    closeSync(fd);
  }
  return offset;
}

interface ConversionResult {
  parameters: number;
  sourceBytes: number;
  makeSourceS: number;
  buildS: number;
  writeS: number;
  totalS: number;
  writtenBytes: number;
  linkedBytes: number;
  peakRssMb: number;
  baselineRssMb: number;
}

async function conversionPhase(): Promise<ConversionResult> {
  // The shapes of a real checkpoint of this config (the recorded graph is never written: no values are made).
  const recorder = new RecordingWeights('unet');
  buildUnet(new GraphBuilder('unet'), { ...SDXL_BASE_UNET }, Params.of(new GraphBuilder('unet'), recorder));
  const root = mkdtempSync(join(os.tmpdir(), 'kiln-bench-sdxl-conversion-'));
  try {
    const src = join(root, 'unet');
    const out = join(root, 'onnx');
    mkdirSync(src, { recursive: true });
    mkdirSync(out, { recursive: true });
    writeFileSync(join(src, 'config.json'), JSON.stringify(SDXL_BASE_UNET, null, 2));
    const t0 = performance.now();
    const sourceBytes = writeRandomFp16Safetensors(join(src, 'diffusion_pytorch_model.fp16.safetensors'), recorder.shapes);
    const makeSourceS = (performance.now() - t0) / 1000;
    const baselineRssMb = peakRssMb();

    // What `kiln convert --dtype fp32` does for this component: open, build, cast while writing.
    const t1 = performance.now();
    const g = new GraphBuilder('unet');
    const p = Params.of(g, componentWeights(src, 'unet'));
    buildUnet(g, { ...SDXL_BASE_UNET }, p);
    const buildS = (performance.now() - t1) / 1000;
    const { seconds: writeS, stats } = writeWithBar(g, out, 'convert to fp32');
    return {
      parameters: p.parameterCount,
      sourceBytes,
      makeSourceS,
      buildS,
      writeS,
      totalS: buildS + writeS,
      writtenBytes: stats.writtenBytes,
      linkedBytes: stats.linkedBytes,
      peakRssMb: peakRssMb(),
      baselineRssMb,
    };
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// Parent: counts, children, PyTorch, report

const ISSUE_FIGURES: Record<string, string> = {
  'sd15-unet': '859.5 M',
  'sdxl-base-unet': '2567.5 M',
  'clip-vit-l-text': '123.1 M',
  'openclip-bigg-text': '694.7 M',
  'sd-vae': '83.7 M',
};

function countParameters(model: ReferenceModel): { count?: number; parts?: Record<string, number>; error?: string } {
  const config = { ...model.config } as Record<string, unknown>;
  const one = (page: Page, component: string): number => {
    const g = new GraphBuilder(component);
    const p = Params.of(g, new RandomWeights(component));
    page(g, config, p);
    return p.parameterCount;
  };
  try {
    if (model.kind === 'unet') return { count: one(buildUnet, 'unet') };
    if (model.kind === 'clip-text') return { count: one(buildClipText, 'text_encoder') };
    const encoder = one(buildVaeEncoder, 'vae');
    const decoder = one(buildVaeDecoder, 'vae');
    return { count: encoder + decoder, parts: { encoder, decoder } };
  } catch (err) {
    return { error: firstLine(err) };
  }
}

function runChild<T>(phase: string): { result?: T; error?: string } {
  const child = spawnSync(process.execPath, ['--import', 'tsx', SELF, '--phase', phase, '--runs', String(runs), '--warmup', String(warmup), '--threads', String(threads), ...(args.keep ? ['--keep'] : [])], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'inherit'],
    encoding: 'utf8',
    maxBuffer: 16 << 20,
  });
  const line = child.stdout.trim().split('\n').pop() ?? '';
  try {
    const parsed = JSON.parse(line) as { ok?: T; error?: string };
    if (parsed.error) return { error: parsed.error };
    return { result: parsed.ok };
  } catch {
    return { error: `child process exited with ${child.status ?? child.signal}${child.signal === 'SIGKILL' ? ' (killed: out of memory?)' : ''}` };
  }
}

interface TorchEnv {
  python: string;
  env: NodeJS.ProcessEnv;
  pythonPath: string;
  available: boolean;
  why?: string;
}

/** The oracle environment's PYTHONPATH, as ../shared/oracle/env.sh sets it. */
function torchEnv(): TorchEnv {
  const python = process.env.KILN_PYTHON ?? (existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3');
  const src = process.env.KILN_ORACLE_SRC ?? process.env.ORACLE_SRC;
  const oracleDir = process.env.KILN_ORACLE_DIR ?? resolve(ROOT, '..', 'shared', 'oracle');
  let pythonPath = process.env.PYTHONPATH ?? '';
  if (src) {
    pythonPath = [
      join(oracleDir, 'stubs'),
      join(src, 'hub-0.36.2', 'src'),
      join(src, 'diffusers-0.31.0', 'src'),
      join(src, 'transformers', 'src'),
      join(src, 'peft-0.13.2', 'src'),
      join(src, 'accelerate-0.34.2', 'src'),
    ].join(':');
  }
  const env = { ...process.env, PYTHONPATH: pythonPath, HF_HUB_OFFLINE: '1', TRANSFORMERS_OFFLINE: '1' };
  const probe = spawnSync(python, ['-c', 'import torch, diffusers, accelerate'], { env, encoding: 'utf8' });
  if (probe.status === 0) return { python, env, pythonPath, available: true };
  const why = probe.error ? firstLine(probe.error) : (probe.stderr.trim().split('\n').pop() ?? `exit ${probe.status}`);
  return { python, env, pythonPath, available: false, why: `${python} cannot import torch + diffusers (${why})` };
}

interface TorchStep {
  median_ms: number;
  runs: number[];
  peak_rss_mb: number;
  torch: string;
  diffusers: string;
  parameters: number;
  build_s: number;
  finite: boolean;
}

function torchStep(te: TorchEnv): { result?: TorchStep; error?: string } {
  const dir = mkdtempSync(join(os.tmpdir(), 'kiln-bench-torch-'));
  try {
    const cfg = join(dir, 'config.json');
    writeFileSync(cfg, JSON.stringify(SD15_UNET));
    process.stderr.write(` PyTorch UNet step: diffusers UNet2DConditionModel, ${warmup} warm-up + ${runs} runs (about 20-60 s each at 2 threads)\n`);
    const child = spawnSync(
      te.python,
      [join(HERE, 'graphs_torch.py'), '--config', cfg, '--threads', String(threads), '--warmup', String(warmup), '--runs', String(runs), '--batch', String(BATCH), '--height', String(LATENT), '--width', String(LATENT)],
      { env: te.env, stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8', maxBuffer: 16 << 20 },
    );
    const line = child.stdout.trim().split('\n').pop() ?? '';
    try {
      return { result: JSON.parse(line) as TorchStep };
    } catch {
      return { error: `graphs_torch.py exited with ${child.status ?? child.signal}` };
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Line-oriented JSON client for a --serve child (stdout lines that are not JSON are skipped). */
class ServeChild {
  private readonly lines: string[] = [];
  private readonly waiters: ((line: string | undefined) => void)[] = [];
  private closed = false;
  constructor(
    readonly label: string,
    readonly proc: ChildProcess,
  ) {
    const rl = createInterface({ input: proc.stdout! });
    rl.on('line', (line) => {
      const w = this.waiters.shift();
      if (w) w(line);
      else this.lines.push(line);
    });
    rl.on('close', () => {
      this.closed = true;
      for (const w of this.waiters.splice(0)) w(undefined);
    });
  }

  private next(): Promise<string | undefined> {
    if (this.lines.length) return Promise.resolve(this.lines.shift());
    if (this.closed) return Promise.resolve(undefined);
    return new Promise((r) => this.waiters.push(r));
  }

  /** The next JSON object the child prints; its `error` is thrown. */
  async message(): Promise<Record<string, unknown>> {
    for (;;) {
      const line = await this.next();
      if (line === undefined) throw new Error(`${this.label} exited (${this.proc.exitCode ?? this.proc.signalCode ?? 'no status'})`);
      if (!line.trim().startsWith('{')) continue;
      const msg = JSON.parse(line) as Record<string, unknown>;
      if (typeof msg.error === 'string') throw new Error(`${this.label}: ${msg.error}`);
      return msg;
    }
  }

  send(command: string): void {
    this.proc.stdin!.write(`${command}\n`);
  }
}

/**
 * --interleave: Kiln and PyTorch steps alternate (K P P K K P ...), both processes alive, so
 * that load from other processes falls on both sides alike. Needs both models in memory at once
 * (about 14 GB).
 */
async function interleaved(te: TorchEnv): Promise<{ kiln?: KilnStep; torch?: TorchStep; error?: string }> {
  const dir = mkdtempSync(join(os.tmpdir(), 'kiln-bench-torch-'));
  const cfg = join(dir, 'config.json');
  writeFileSync(cfg, JSON.stringify(SD15_UNET));
  const kilnProc = spawn(process.execPath, ['--import', 'tsx', SELF, '--phase', 'kiln-serve', '--warmup', String(warmup), '--threads', String(threads), ...(args.keep ? ['--keep'] : [])], {
    cwd: ROOT,
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const k = new ServeChild('Kiln child', kilnProc);
  let t: ServeChild | undefined;
  try {
    const kReady = (await k.message()).ready as KilnStepper['prepared'];
    process.stderr.write(` PyTorch: building diffusers UNet2DConditionModel, ${warmup} warm-up\n`);
    const torchProc = spawn(
      te.python,
      [join(HERE, 'graphs_torch.py'), '--serve', '--config', cfg, '--threads', String(threads), '--warmup', String(warmup), '--batch', String(BATCH), '--height', String(LATENT), '--width', String(LATENT)],
      { env: te.env, stdio: ['pipe', 'pipe', 'inherit'] },
    );
    t = new ServeChild('graphs_torch.py', torchProc);
    const tReady = (await t.message()).ready as Omit<TorchStep, 'median_ms' | 'runs' | 'peak_rss_mb' | 'finite'>;
    const kRuns: number[] = [];
    const tRuns: number[] = [];
    const bar = new SingleBar({ format: ' interleaved      |{bar}| {value}/{total} | Kiln {k} ms, PyTorch {t} ms', hideCursor: true, stream: process.stderr }, Presets.shades_classic);
    bar.start(2 * runs, 0, { k: '-', t: '-' });
    const stepOf = async (c: ServeChild, into: number[]) => {
      c.send('run');
      into.push((await c.message()).ms as number);
    };
    for (let i = 0; i < runs; i++) {
      const order: [ServeChild, number[]][] = i % 2 === 0 ? [[k, kRuns], [t, tRuns]] : [[t, tRuns], [k, kRuns]];
      for (const [c, into] of order) {
        await stepOf(c, into);
        bar.increment(1, { k: kRuns.at(-1)?.toFixed(0) ?? '-', t: tRuns.at(-1)?.toFixed(0) ?? '-' });
      }
    }
    bar.stop();
    k.send('stop');
    t.send('stop');
    const kDone = (await k.message()).done as Pick<KilnStep, 'peakRssMb' | 'outDims' | 'finite'>;
    const tDone = (await t.message()).done as Pick<TorchStep, 'peak_rss_mb' | 'finite'>;
    return {
      kiln: { ...kReady, runs: kRuns, medianMs: median(kRuns), ...kDone },
      torch: { ...tReady, runs: tRuns, median_ms: median(tRuns), ...tDone },
    };
  } catch (err) {
    return { error: firstLine(err) };
  } finally {
    for (const c of [k, t]) if (c && c.proc.exitCode === null) c.proc.stdin?.end();
    rmSync(dir, { recursive: true, force: true });
  }
}

function reproduceCommand(te: TorchEnv | undefined): string {
  const flags = process.argv.slice(2).join(' ');
  const oracle = te?.available && (process.env.KILN_ORACLE_SRC ?? process.env.ORACLE_SRC) ? `KILN_ORACLE_SRC=${process.env.KILN_ORACLE_SRC ?? process.env.ORACLE_SRC} ` : '';
  return `${oracle}npm run bench:graphs${flags ? ` -- ${flags}` : ''}`;
}

async function parent(): Promise<void> {
  const cpu = os.cpus();
  console.log('kiln graphs benchmark (issue 10): full-size architectures from their real configs, random weights');
  console.log(`  host: ${cpu[0]?.model ?? 'cpu'} x${cpu.length}, ${gb(os.totalmem())} RAM, node ${process.version}, onnxruntime-node ${ort.env.versions.common}, load average ${os.loadavg()[0]!.toFixed(1)}`);

  if (!args['skip-counts']) {
    console.log('\nparameter counts (Kiln graph built with RandomWeights vs diffusers/transformers on the same config):');
    for (const model of REFERENCE_MODELS) {
      const r = countParameters(model);
      const issue = ISSUE_FIGURES[model.name] ? ` (issue: ${ISSUE_FIGURES[model.name]})` : '';
      const expected = `${model.parameters.toLocaleString('en-US')}${issue}`;
      if (r.error) {
        console.log(`  ${model.name.padEnd(20)} ${'-'.padStart(15)}  expected ${expected}  [${r.error}]`);
        continue;
      }
      const ok = r.count === model.parameters ? 'ok' : `MISMATCH (${(r.count! - model.parameters).toLocaleString('en-US')})`;
      const parts = r.parts && model.parts
        ? `  [${Object.entries(r.parts).map(([k, v]) => `${k} ${v.toLocaleString('en-US')}${v === model.parts![k] ? '' : ` vs ${model.parts![k]!.toLocaleString('en-US')}`}`).join(', ')}]`
        : '';
      console.log(`  ${model.name.padEnd(20)} ${r.count!.toLocaleString('en-US').padStart(15)}  expected ${expected}  ${ok}${parts}`);
    }
  }

  let kiln: KilnStep | undefined;
  let torch: TorchStep | undefined;
  const te = args['skip-torch'] ? undefined : torchEnv();
  if (te && !te.available) {
    console.log(`\nPyTorch side not available: ${te.why}.`);
    console.log('  Set it up as ../shared/oracle/README.md says and pass KILN_ORACLE_SRC=<SRC_DIR> (bench/README.md, bench:graphs).');
  }
  const describeKiln = () => {
    if (!kiln) return;
    console.log(`  conversion: graph ${kiln.buildS.toFixed(2)} s + write ${kiln.writeS.toFixed(1)} s (${gb(kiln.writtenBytes)} of weights), peak RSS ${kiln.conversionPeakRssMb.toFixed(0)} MB`);
    console.log(`  session load ${kiln.loadS.toFixed(1)} s; out_sample [${kiln.outDims.join(', ')}]${kiln.finite ? '' : ' (NOT FINITE)'}; peak RSS ${kiln.peakRssMb.toFixed(0)} MB`);
  };
  const describeTorch = () => {
    if (!torch) return;
    console.log(`  torch ${torch.torch}, diffusers ${torch.diffusers}; ${torch.parameters.toLocaleString('en-US')} parameters; build ${torch.build_s.toFixed(1)} s; peak RSS ${torch.peak_rss_mb.toFixed(0)} MB${torch.finite ? '' : ' (NOT FINITE)'}`);
  };
  const kilnTitle = `\nKiln: SD 1.5 UNet, fp32, batch ${BATCH}, latent ${LATENT}x${LATENT} (512x512 image), ONNX Runtime CPU, ${threads} intra-op threads`;
  const torchTitle = `\nPyTorch: diffusers UNet2DConditionModel, same config, fp32, CPU, torch.set_num_threads(${threads})`;

  if (args.interleave && !args['skip-kiln'] && te?.available) {
    console.log(`\nKiln and PyTorch steps interleaved (Kiln, PyTorch, PyTorch, Kiln, ...), both processes alive`);
    const r = await interleaved(te);
    kiln = r.kiln;
    torch = r.torch;
    if (r.error) console.log(`  not run: ${r.error}`);
    console.log(kilnTitle);
    describeKiln();
    console.log(torchTitle);
    describeTorch();
  } else {
    if (!args['skip-kiln']) {
      console.log(kilnTitle);
      const r = runChild<KilnStep>('kiln-step');
      kiln = r.result;
      if (kiln) describeKiln();
      else console.log(`  not run: ${r.error}`);
    }
    if (te?.available) {
      console.log(torchTitle);
      const r = torchStep(te);
      torch = r.result;
      if (torch) describeTorch();
      else console.log(`  not run: ${r.error}`);
    }
  }

  if (kiln || torch) {
    console.log(`\nSD 1.5 UNet step, batch ${BATCH}, 64x64 latent, fp32, ${threads} threads (median of ${runs} after ${warmup} warm-up${args.interleave && kiln && torch ? ', interleaved' : ''}):`);
    console.log(`  ${''.padEnd(22)}${'Kiln (ORT CPU)'.padStart(18)}${'PyTorch (diffusers)'.padStart(22)}`);
    const cell = (v: string | undefined) => (v ?? '-');
    console.log(`  ${'median'.padEnd(22)}${cell(kiln && `${kiln.medianMs.toFixed(0)} ms`).padStart(18)}${cell(torch && `${torch.median_ms.toFixed(0)} ms`).padStart(22)}`);
    console.log(`  ${'min'.padEnd(22)}${cell(kiln && `${Math.min(...kiln.runs).toFixed(0)} ms`).padStart(18)}${cell(torch && `${Math.min(...torch.runs).toFixed(0)} ms`).padStart(22)}`);
    console.log(`  ${'peak RSS'.padEnd(22)}${cell(kiln && `${kiln.peakRssMb.toFixed(0)} MB`).padStart(18)}${cell(torch && `${torch.peak_rss_mb.toFixed(0)} MB`).padStart(22)}`);
    if (kiln) console.log(`  Kiln runs (ms):    ${kiln.runs.map((x) => x.toFixed(0)).join(', ')}`);
    if (torch) console.log(`  PyTorch runs (ms): ${torch.runs.map((x) => x.toFixed(0)).join(', ')}`);
    if (kiln && torch) {
      const ratio = kiln.medianMs / torch.median_ms;
      const ratioMin = Math.min(...kiln.runs) / Math.min(...torch.runs);
      console.log(`  Kiln / PyTorch: ${ratio.toFixed(3)}x of medians, ${ratioMin.toFixed(3)}x of minimums (goal <= 0.6x: ${ratio <= 0.6 ? 'met' : 'NOT met'})`);
      // Other processes on the same cores inflate both sides unevenly: say how busy the host was.
      console.log(`  host load average during the run: ${os.loadavg().map((x) => x.toFixed(1)).join(' ')} (1/5/15 min) on ${os.cpus().length} cores`);
    } else if (kiln) {
      console.log('  PyTorch figure not available: Kiln alone.');
    }
  }

  if (!args['skip-kiln']) {
    console.log(`\nKiln: SD VAE decoder (full size, random weights), one ${LATENT}x${LATENT} latent, ONNX Runtime CPU, ${threads} threads`);
    const r = runChild<VaeDecode>('vae-decode');
    if (r.result) {
      const v = r.result;
      console.log(`  ${v.parameters.toLocaleString('en-US')} parameters; write ${v.writeS.toFixed(1)} s, load ${v.loadS.toFixed(1)} s; decode ${(v.decodeMs / 1000).toFixed(1)} s -> sample [${v.outDims.join(', ')}]${v.finite ? '' : ' (NOT FINITE)'}; peak RSS ${v.peakRssMb.toFixed(0)} MB`);
      if (!v.finite || v.outDims.join() !== [1, 3, LATENT * 8, LATENT * 8].join()) process.exitCode = 1;
    } else {
      console.log(`  not run: ${r.error}`);
    }
  }

  if (args.conversion) {
    console.log('\nconversion of SDXL-sized weights: random fp16 safetensors with the SDXL base UNet shapes -> fp32 ONNX (writeGraph)');
    const r = runChild<ConversionResult>('conversion');
    if (r.result) {
      const c = r.result;
      console.log(`  ${c.parameters.toLocaleString('en-US')} parameters (${millions(c.parameters)}), source ${gb(c.sourceBytes)} fp16 (written in ${c.makeSourceS.toFixed(1)} s, not counted)`);
      console.log(`  conversion ${c.totalS.toFixed(1)} s (graph ${c.buildS.toFixed(2)} s + cast and write ${c.writeS.toFixed(1)} s), ${gb(c.writtenBytes)} written, ${mb(c.linkedBytes)} linked`);
      console.log(`  peak RSS ${c.peakRssMb.toFixed(0)} MB (process peak before converting: ${c.baselineRssMb.toFixed(0)} MB)`);
    } else {
      console.log(`  not run: ${r.error}`);
    }
  }

  console.log(`\nreproduce: ${reproduceCommand(te)}`);
  if (kiln && kiln.medianMs && !kiln.finite) process.exitCode = 1;
}

async function child(phase: string): Promise<void> {
  try {
    if (phase === 'kiln-serve') return await kilnServePhase();
    const phases: Record<string, () => Promise<unknown>> = { 'kiln-step': kilnStepPhase, conversion: conversionPhase, 'vae-decode': vaeDecodePhase };
    const ok = await phases[phase]?.();
    if (!ok) throw new Error(`unknown phase ${phase}`);
    process.stdout.write(`${JSON.stringify({ ok })}\n`);
  } catch (err) {
    process.stdout.write(`${JSON.stringify({ error: firstLine(err) })}\n`);
  }
}

if (args.phase) await child(args.phase);
else await parent();
