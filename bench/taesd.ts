/**
 * What one preview from a tiny VAE decoder costs: the full-size TAESD decoder (the real config,
 * 1,222,531 parameters, seeded random weights: the cost does not depend on the values) built by
 * Kiln's page (src/graphs/taesd.ts), run by onnxruntime-node as the engine runs it (CPU or CUDA,
 * all optimizations, default threads), at the latent sizes of the usual image sizes.
 *
 *   node --import tsx bench/taesd.ts [--latents 32,64,128] [--runs 3] [--device cpu|cuda]
 *
 * Prints the median (and min) ms per decode for each latent size, after one warm-up run; set
 * them against a model's run to see what the preview budget (5% by default) allows.
 */
import { parseArgs } from 'node:util';
import os from 'node:os';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { OnnxModel, type Device } from '../src/engine/onnx.js';
import { buildGraph, writeBuiltGraph } from '../src/graphs/convert.js';
import { TAESD } from '../src/graphs/reference-configs.js';
import { buildTinyDecoder } from '../src/graphs/taesd.js';
import { RandomWeights } from '../src/graphs/weights.js';

const { values: args } = parseArgs({
  args: process.argv.slice(2).filter((a) => a !== '--'),
  options: {
    latents: { type: 'string', default: '32,64,128' },
    runs: { type: 'string', default: '3' },
    device: { type: 'string', default: 'cpu' },
  },
});

async function main(): Promise<void> {
  const runs = Number(args.runs);
  const device = args.device as Device;
  const dir = mkdtempSync(join(os.tmpdir(), 'kiln-bench-taesd-'));
  try {
    const built = buildGraph({ build: buildTinyDecoder }, 'taesd_decoder', { ...TAESD }, new RandomWeights('taesd'));
    writeBuiltGraph(built, dir);
    const session = await OnnxModel.load(join(dir, 'model.onnx'), dir, { device });
    const lines = [
      `full-size TAESD decoder (${built.parameters.toLocaleString('en-US')} parameters, random weights), ${device}, ` +
        `host ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${os.cpus().length} cores, load ${os.loadavg()[0]!.toFixed(1)}`,
    ];
    for (const side of args.latents!.split(',').map(Number)) {
      const data = new Float32Array(4 * side * side).map((_, i) => Math.sin(i));
      const feed = { latent_sample: { data, dims: [1, 4, side, side] } };
      await session.run(feed, ['sample']);
      const times: number[] = [];
      for (let i = 0; i < runs; i++) {
        const t0 = performance.now();
        await session.run(feed, ['sample']);
        times.push(performance.now() - t0);
      }
      times.sort((a, b) => a - b);
      lines.push(`  ${side}x${side} latents (${side * 8}x${side * 8} px): median ${times[Math.floor(times.length / 2)]!.toFixed(0)} ms, min ${times[0]!.toFixed(0)} ms (${runs} runs)`);
    }
    await session.release();
    lines.push(`reproduce: node --import tsx bench/taesd.ts --latents ${args.latents} --runs ${runs} --device ${device}`);
    process.stdout.write(`${lines.join('\n')}\n`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench/taesd: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
