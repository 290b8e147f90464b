/**
 * LoRA switch cost (issue 11), at full size with random weights (no download):
 *
 *   node --import tsx bench/lora.ts [--rank 16] [--threads 2] [--runs 2] [--keep] [--skip-js]
 *
 * A full SD 1.5 UNet (fp32, RandomWeights, written once with writeGraph into a temp folder) and
 * a random kohya LoRA of rank --rank on every module kohya's default trainer targets in the UNet
 * (attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, proj_in/proj_out: 192
 * modules). Measured:
 *
 * 1. The base UNet session (onnxruntime-node CPU, 'all' optimizations): creation seconds.
 * 2. The JS fuse (lora.ts `withLoras` serving W + delta as computed values): seconds for every
 *    changed weight's values, with the base values read as zeros so that only the fuse is
 *    timed; GMAC/s. A switch on this path would also write the changed weights (model.onnx_data)
 *    and create the session.
 * 3. In the graph (lora-graph.ts): the variant graph written beside the base, then its session
 *    created (ONNX Runtime folds W + up @ down while creating it). The difference to (1) is
 *    what the LoRA adds to a switch.
 *
 * Each session is created in a child process, so its peak RSS is its own. Needs ~8 GB of disk
 * under TMPDIR and ~8 GB of memory.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import ort from 'onnxruntime-node';
import { float32ToFloat16Bits } from '../src/engine/float16.js';
import { loraGraph } from '../src/graphs/lora-graph.js';
import { withLoras } from '../src/graphs/lora.js';
import { GraphBuilder } from '../src/graphs/onnx-builder.js';
import { SD15_UNET } from '../src/graphs/reference-configs.js';
import { writeSafetensors, type TensorToWrite } from '../src/graphs/safetensors.js';
import { buildUnet } from '../src/graphs/unet.js';
import { Params, RecordingWeights, type WeightEntry, type WeightSource } from '../src/graphs/weights.js';
import { writeGraph } from '../src/graphs/write.js';

const SELF = fileURLToPath(import.meta.url);
const { values: args } = parseArgs({
  options: {
    rank: { type: 'string', default: '16' },
    threads: { type: 'string', default: '2' },
    runs: { type: 'string', default: '2' },
    keep: { type: 'boolean', default: false },
    'skip-js': { type: 'boolean', default: false },
    phase: { type: 'string' }, // internal: 'session' (creates the session at --model, prints JSON)
    model: { type: 'string' },
  },
});
const threads = Number(args.threads);

if (args.phase === 'session') {
  const started = performance.now();
  const cpu = process.cpuUsage();
  const session = await ort.InferenceSession.create(args.model!, { graphOptimizationLevel: 'all', intraOpNumThreads: threads, logSeverityLevel: 3 });
  const seconds = (performance.now() - started) / 1000;
  const used = process.cpuUsage(cpu);
  await session.release();
  process.stdout.write(`${JSON.stringify({ seconds, cpuSeconds: (used.user + used.system) / 1e6, peakRssGB: process.resourceUsage().maxRSS / 1024 / 1024 })}\n`);
  process.exit(0);
}

interface SessionCost {
  seconds: number;
  /** CPU time (user + system) of the creating process: less sensitive to other load than wall time. */
  cpuSeconds: number;
  peakRssGB: number;
}

/** Creates a session for `model` in a child process: seconds and peak RSS. */
function sessionCost(model: string): SessionCost {
  const r = spawnSync(process.execPath, ['--import', 'tsx', SELF, '--phase', 'session', '--model', model, '--threads', String(threads)], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`session child failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as SessionCost;
}

/** The cheapest (in CPU time) of `runs` alternating creations of each model's session (page cache warm for all). */
function sessionCosts(models: string[], runs: number): SessionCost[] {
  const best: SessionCost[] = models.map(() => ({ seconds: Infinity, cpuSeconds: Infinity, peakRssGB: 0 }));
  for (let r = 0; r < runs; r++) {
    models.forEach((m, i) => {
      const c = sessionCost(m);
      if (c.cpuSeconds < best[i]!.cpuSeconds) best[i] = c;
    });
  }
  return best;
}

/** Zeros of the recorded shapes: the JS fuse timed without the cost of reading base weights. */
class Zeros implements WeightSource {
  readonly component = 'unet';
  readonly location = 'zeros';
  constructor(private readonly shapes: Map<string, number[]>) {}
  lookup(key: string): WeightEntry | undefined {
    const shape = this.shapes.get(key);
    if (!shape) return undefined;
    const n = shape.reduce((a, b) => a * b, 1);
    return { shape, dtype: 'F32', source: { kind: 'values', values: () => new Float32Array(n) } };
  }
  has(key: string): boolean {
    return this.shapes.has(key);
  }
  keys(): string[] {
    return [...this.shapes.keys()];
  }
}

const TARGET = /attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))\.weight$/;

const dir = mkdtempSync(join(process.env.TMPDIR ?? os.tmpdir(), 'kiln-bench-lora-'));
try {
  const rank = Number(args.rank);
  console.log(`host: ${os.cpus().length} cores, load ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}; ORT threads ${threads}; rank ${rank}`);
  let t = performance.now();
  // Every weight the UNet page asks for (random values), to write the graph and plan the LoRA.
  const rec = new RecordingWeights('unet');
  const g = new GraphBuilder('unet');
  buildUnet(g, SD15_UNET as Record<string, unknown>, Params.of(g, rec));
  const unetDir = join(dir, 'unet');
  mkdirSync(unetDir);
  writeGraph(g, unetDir);
  console.log(`SD 1.5 UNet written (fp32, random weights): ${((performance.now() - t) / 1000).toFixed(1)} s`);

  // A random kohya LoRA (fp16 tensors, alpha = rank) on the targeted modules.
  let seed = 1;
  const rand = (): number => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  const tensors: Record<string, TensorToWrite> = {};
  let macs = 0;
  let modules = 0;
  for (const [key, shape] of rec.shapes) {
    if (!TARGET.test(key)) continue;
    const module = key.slice(0, -'.weight'.length).replace(/\./g, '_');
    const inner = shape.slice(1).reduce((a, b) => a * b, 1);
    const f16 = (dims: number[], s: number): TensorToWrite => {
      const n = dims.reduce((a, b) => a * b, 1);
      const v = new Float32Array(n);
      for (let i = 0; i < n; i++) v[i] = rand() * s;
      return { dtype: 'F16', shape: dims, data: float32ToFloat16Bits(v) };
    };
    const conv = shape.length === 4;
    tensors[`lora_unet_${module}.lora_down.weight`] = f16(conv ? [rank, shape[1]!, 1, 1] : [rank, inner], 1 / Math.sqrt(inner));
    tensors[`lora_unet_${module}.lora_up.weight`] = f16(conv ? [shape[0]!, rank, 1, 1] : [shape[0]!, rank], 0.01);
    tensors[`lora_unet_${module}.alpha`] = { dtype: 'F32', shape: [], data: Float32Array.of(rank) };
    macs += shape[0]! * rank * inner;
    modules++;
  }
  const loraPath = join(dir, 'lora.safetensors');
  writeSafetensors(loraPath, tensors, { ss_base_model_version: 'sd_v1' });
  console.log(`LoRA: ${modules} modules, rank ${rank}, ${(macs / 1e9).toFixed(2)} GMAC to fuse`);


  if (!args['skip-js']) {
    const fused = withLoras(new Zeros(rec.shapes), [{ file: loraPath, scale: 0.8 }], 'unet', { family: 'sd1' });
    t = performance.now();
    for (const key of fused.plan.keys()) {
      const entry = fused.lookup(key, [])!;
      if (entry.source.kind === 'values') entry.source.values();
    }
    const js = (performance.now() - t) / 1000;
    console.log(`2. JS fuse: ${js.toFixed(1)} s for ${fused.changedWeights} weights (${(macs / 1e9 / js).toFixed(2)} GMAC/s), before writing them and creating a session`);
  }

  t = performance.now();
  const patched = loraGraph(join(unetDir, 'model.onnx'), [{ path: loraPath, scale: 0.8 }], 'unet', { family: 'sd1' });
  const patchSeconds = (performance.now() - t) / 1000;
  const [base, variant] = sessionCosts([join(unetDir, 'model.onnx'), patched.path], Number(args.runs));
  console.log(
    `1. base UNet session: ${base!.seconds.toFixed(1)} s, ${base!.cpuSeconds.toFixed(1)} CPU s (peak RSS ${base!.peakRssGB.toFixed(1)} GB), fastest of ${args.runs}`,
  );
  const fold = variant!.seconds - base!.seconds;
  const foldCpu = variant!.cpuSeconds - base!.cpuSeconds;
  console.log(
    `3. in the graph: variant graph written in ${patchSeconds.toFixed(2)} s (${patched.changedWeights} weights); session ${variant!.seconds.toFixed(1)} s, ` +
      `${variant!.cpuSeconds.toFixed(1)} CPU s (peak RSS ${variant!.peakRssGB.toFixed(1)} GB, fastest of ${args.runs}): +${fold.toFixed(1)} s, ` +
      `+${foldCpu.toFixed(1)} CPU s over the base session (${(macs / 1e9 / Math.max(foldCpu, 1e-3)).toFixed(1)} GMAC per CPU second)`,
  );
  console.log(`   a switch to this LoRA: ${(patchSeconds + variant!.seconds).toFixed(1)} s (once written, ${variant!.seconds.toFixed(1)} s)`);
} finally {
  if (args.keep) console.log(`kept ${dir}`);
  else rmSync(dir, { recursive: true, force: true });
}
