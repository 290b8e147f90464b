/**
 * `kiln worker --queue redis://...`: runs the jobs `kiln serve --queue` puts on the BullMQ queue,
 * on this host's models and device, until SIGTERM/SIGINT (running jobs get --shutdown-timeout to
 * finish, then go back to the queue).
 */
import { resolve } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { kilnHome, maxModels as maxModelsFromEnv, modelSearchDirs } from '../catalog/home.js';
import type { Device } from '../engine/onnx.js';
import { createModelCatalog } from '../catalog/catalog.js';
import { describeRedis, parseRedisUrl } from '../queue/redis-url.js';
import { collect, modelMemoryLine, parseDuration, parsePositiveCount } from './serve.js';
import { checkStoreUrl, createStore } from '../store/index.js';

export interface WorkerFlags {
  queue: string;
  home?: string;
  device: Device;
  workers: number;
  maxBatch: number;
  maxModels?: number;
  unloadAfter?: number;
  lockDuration: number;
  stalledInterval: number;
  heartbeat: number;
  shutdownTimeout: number;
  logLevel: string;
  store?: string;
  preload: string[];
}


function parseQueue(value: string): string {
  try {
    parseRedisUrl(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
  return value;
}

function parseStore(value: string): string {
  try {
    return checkStoreUrl(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

const LEVELS = ['error', 'warn', 'info'] as const;

export async function workerCommand(flags: WorkerFlags): Promise<void> {
  const home = resolve(flags.home ?? kilnHome());
  const catalog = createModelCatalog(modelSearchDirs(home), { home });
  const target = parseRedisUrl(flags.queue);
  const threshold = flags.logLevel === 'silent' ? -1 : LEVELS.indexOf(flags.logLevel as (typeof LEVELS)[number]);
  const log = (level: (typeof LEVELS)[number], message: string, extra?: Record<string, unknown>) => {
    if (LEVELS.indexOf(level) <= threshold) {
      process.stderr.write(`kiln worker: ${level}: ${message}${extra ? ` ${JSON.stringify(extra)}` : ''}\n`);
    }
  };
  // Loaded here: the other kiln commands never load BullMQ.
  const { startQueueWorker } = await import('../runner/worker.js');
  // The bucket the API hosts keep uploads in (--store s3:// on both); its sweeping is left to them.
  const bucket = flags.store ? createStore(flags.store, { ttlMs: 3_600_000, sweep: false }) : undefined;
  // Resolved once here, for the inference threads and the banner alike.
  const maxModels = flags.maxModels ?? maxModelsFromEnv();
  const worker = await startQueueWorker({
    inputs: bucket,
    redis: target,
    catalog,
    device: flags.device,
    workers: flags.workers,
    maxBatch: flags.maxBatch,
    maxModels,
    unloadAfterMs: flags.unloadAfter,
    lockDurationMs: flags.lockDuration,
    stalledIntervalMs: flags.stalledInterval,
    heartbeatMs: flags.heartbeat,
    preload: flags.preload,
    log,
  });
  process.stderr.write(
    `kiln worker: ${worker.id} takes jobs from ${describeRedis(target)} with ${flags.workers} inference thread(s) on ${flags.device}; ` +
      `serves ${catalog.installed().map((m) => m.id).join(', ') || 'no installed model'} (Ctrl-C to stop)\n` +
      modelMemoryLine(maxModels, flags.unloadAfter).replace(/^kiln:/, 'kiln worker:'),
  );
  // First signal: finish what runs (up to --shutdown-timeout), give the rest back to the queue, exit 0.
  // Second: give running jobs back now (at their next step). Third: exit at once; the jobs' locks
  // expire and the stalled check gives them to another worker.
  let signals = 0;
  const stop = (signal: NodeJS.Signals) => {
    signals++;
    if (signals >= 3) process.exit(1);
    if (signals === 2) {
      process.stderr.write(`kiln worker: ${signal} again: giving running jobs back to the queue now (once more to exit at once)\n`);
      void worker.close(0);
      return;
    }
    process.stderr.write(
      `kiln worker: ${signal}: taking no new jobs; running ones may finish for ${Math.round(flags.shutdownTimeout / 1000)} s, then go back to the queue\n`,
    );
    worker.close(flags.shutdownTimeout).then(async () => {
      await bucket?.close();
    }).then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

export function registerWorkerCommand(program: Command): void {
  program
    .command('worker')
    .description('scale out: run the jobs of `kiln serve --queue` from a BullMQ queue in Redis, on this host\'s models and device')
    .requiredOption('--queue <redis-url>', 'the queue: redis://HOST:PORT[/DB] (the same as kiln serve --queue)', parseQueue)
    .option('--home <dir>', "Kiln's home folder: the models this worker serves (default $KILN_HOME or ~/.local/share/kiln)")
    .addOption(new Option('--device <device>', 'execution provider').choices(['cpu', 'cuda']).default('cpu'))
    .option('--workers <n>', 'inference threads', parsePositiveCount, 1)
    .option('--max-batch <n>', 'jobs each thread runs at once, their denoising steps batched (as kiln serve --max-batch)', parsePositiveCount, 1)
    .option('--max-models <n>', 'models each thread keeps loaded, the least recently used idle one unloaded first (as kiln serve --max-models)', parsePositiveCount)
    .addOption(new Option('--unload-after <duration>', 'unload a model no job has used for this long (default: never)').argParser(parseDuration))
    .addOption(new Option('--lock-duration <duration>', "a job's lock, renewed every half of it while it runs; a dead worker's job is run again after it").argParser(parseDuration).default(60_000, '60s'))
    .addOption(new Option('--stalled-interval <duration>', 'how often jobs whose worker died are looked for').argParser(parseDuration).default(30_000, '30s'))
    .addOption(new Option('--heartbeat <duration>', 'how often this worker announces itself and its models (it counts as gone after three)').argParser(parseDuration).default(5_000, '5s'))
    .addOption(new Option('--shutdown-timeout <duration>', 'on SIGTERM/SIGINT, how long running jobs may take to finish here; then they stop at their next step and go back to the queue for another worker (a second signal: at once)').argParser(parseDuration).default(30_000, '30s'))
    .addOption(new Option('--log-level <level>', 'log level').choices(['error', 'warn', 'info', 'silent']).default('info'))
    .option('--preload <model>', 'load a model (an installed name, one of this home\'s aliases, or a folder) in every inference thread at start; repeatable', collect, [] as string[])
    .option('--store <s3://bucket[/prefix]>', 'the bucket of `kiln serve --store s3://...`, where the API hosts keep uploads (AWS_REGION, AWS_ENDPOINT_URL_S3, the AWS credentials chain)', parseStore)
    .action(workerCommand);
}
