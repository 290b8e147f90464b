/**
 * Scale-out benchmark (`npm run bench:server -- --queue redis://HOST:PORT[/DB]`): images per
 * second through the API with 1, then 2 `kiln worker` processes (one inference thread each) on a
 * kiln-tiny model, the API in this process on the same Redis. Prints each rate and the ratio,
 * and the load average (the figure only means something on a quiet machine: workers on one
 * host share its cores).
 *
 *   npm run bench:server -- --queue redis://127.0.0.1:6379 [--workers-list 1,2] [--clients 4]
 *                           [--requests 24] [--size 256x256] [--steps 8] [--model kiln-tiny]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { createServer } from '../src/server/app.js';

export function queueBenchRequested(argv = process.argv.slice(2)): boolean {
  return argv.some((a) => a === '--queue' || a.startsWith('--queue='));
}

function startWorker(queue: string, home: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'worker', '--queue', queue, '--home', home, '--workers', '1', '--heartbeat', '1s'], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  return new Promise((resolve, reject) => {
    let seen = '';
    child.stderr!.on('data', (c: Buffer) => {
      seen += c.toString();
      if (/takes jobs from/.test(seen)) resolve(child);
    });
    child.once('exit', (code) => reject(new Error(`kiln worker exited (${code}): ${seen}`)));
  });
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
}

export async function queueBench(): Promise<void> {
  const { values: args } = parseArgs({
    options: {
      queue: { type: 'string' },
      'workers-list': { type: 'string', default: '1,2' },
      clients: { type: 'string', default: '4' },
      requests: { type: 'string', default: '24' },
      size: { type: 'string', default: '256x256' },
      steps: { type: 'string', default: '8' },
      model: { type: 'string', default: 'kiln-tiny' },
      prompt: { type: 'string', default: 'a lighthouse on a cliff at dusk, oil painting' },
    },
  });
  const queue = args.queue!;
  const counts = args['workers-list'].split(',').map(Number);
  const clients = Number(args.clients);
  const total = Number(args.requests);
  const home = mkdtempSync(join(os.tmpdir(), 'kiln-bench-queue-'));
  mkdirSync(join(home, 'models'));
  const server = await createServer({ home, port: 0, redisQueue: { url: queue }, maxQueue: clients * 2, logger: 'silent', preload: false });
  const base = await server.listen();
  const body = (seed: number) => JSON.stringify({ prompt: args.prompt, model: args.model, size: args.size, steps: Number(args.steps), seed, response_format: 'b64_json' });
  const post = async (seed: number) => {
    const res = await fetch(`${base}/v1/images/generations`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: body(seed) });
    await res.arrayBuffer();
    if (res.status !== 200) throw new Error(`HTTP ${res.status}`);
  };
  const rates: Record<number, number> = {};
  try {
    for (const n of counts) {
      const workers = await Promise.all(Array.from({ length: n }, () => startWorker(queue, home)));
      try {
        // Until the API sees them all, then one request per worker to load the model everywhere.
        for (let i = 0; i < 200 && ((await (await fetch(`${base}/ping`)).json()) as { workers: unknown[] }).workers.length < n; i++) await new Promise((r) => setTimeout(r, 100));
        await Promise.all(Array.from({ length: n * 2 }, (_, i) => post(1000 + i)));
        let next = 0;
        const started = performance.now();
        await Promise.all(
          Array.from({ length: clients }, async () => {
            while (next < total) await post(next++);
          }),
        );
        const seconds = (performance.now() - started) / 1000;
        rates[n] = total / seconds;
        console.log(`${n} worker process(es): ${total} images in ${seconds.toFixed(1)} s = ${rates[n]!.toFixed(2)} images/s (${clients} clients, ${args.model} ${args.size} x ${args.steps} steps)`);
      } finally {
        await Promise.all(workers.map(stop));
      }
    }
    if (rates[1] && rates[2]) console.log(`2 workers / 1 worker: ${(rates[2] / rates[1]).toFixed(2)}x`);
    console.log(`load average (1, 5, 15 min): ${os.loadavg().map((l) => l.toFixed(2)).join(', ')} on ${os.cpus().length} CPUs`);
  } finally {
    await server.close();
    rmSync(home, { recursive: true, force: true });
  }
}
