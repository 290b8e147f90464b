/**
 * Prometheus metrics (GET /metrics), on a registry of the server's own (several servers may
 * share a process, as in tests).
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { JobQueue } from '../queue/types.js';

export interface Metrics {
  registry: Registry;
  httpRequests: Counter<'method' | 'route' | 'status'>;
  httpDuration: Histogram<'method' | 'route'>;
  jobs: Counter<'kind' | 'outcome'>;
  jobWait: Histogram<'kind'>;
  jobRun: Histogram<'kind'>;
  modelUnloads: Counter<'model'>;
}

/** `loadedModels`: one machine's loaded models (the in-process runner's), for kiln_models_loaded. */
export function createMetrics(queue: JobQueue, loadedModels?: () => Record<string, number>): Metrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'kiln_' });
  const registers = [registry];
  const httpRequests = new Counter({
    name: 'kiln_http_requests_total',
    help: 'HTTP requests answered, by route and status (499: the client went away first).',
    labelNames: ['method', 'route', 'status'] as const,
    registers,
  });
  const httpDuration = new Histogram({
    name: 'kiln_http_request_duration_seconds',
    help: 'Time to answer HTTP requests.',
    labelNames: ['method', 'route'] as const,
    buckets: [0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
    registers,
  });
  const jobs = new Counter({
    name: 'kiln_jobs_total',
    help: 'Image jobs finished, by kind and outcome (done, failed, cancelled, timeout).',
    labelNames: ['kind', 'outcome'] as const,
    registers,
  });
  const jobWait = new Histogram({
    name: 'kiln_job_queue_seconds',
    help: 'Time jobs waited in the queue.',
    labelNames: ['kind'] as const,
    buckets: [0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
    registers,
  });
  const jobRun = new Histogram({
    name: 'kiln_job_run_seconds',
    help: 'Time jobs ran (generation and encoding).',
    labelNames: ['kind'] as const,
    buckets: [0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300],
    registers,
  });
  const modelUnloads = new Counter({
    name: 'kiln_model_unloads_total',
    help: 'Models unloaded by inference threads (beyond --max-models, unused for --unload-after, or replaced), by model.',
    labelNames: ['model'] as const,
    registers,
  });
  if (loadedModels) {
    new Gauge({
      name: 'kiln_models_loaded',
      help: 'Inference threads holding each model now.',
      labelNames: ['model'] as const,
      registers,
      collect() {
        this.reset();
        for (const [model, threads] of Object.entries(loadedModels())) this.set({ model }, threads);
      },
    });
  }
  new Gauge({
    name: 'kiln_queue_active',
    help: 'Jobs being run now.',
    registers,
    collect() {
      this.set(queue.stats().active);
    },
  });
  new Gauge({
    name: 'kiln_queue_waiting',
    help: 'Jobs waiting for a worker.',
    registers,
    collect() {
      this.set(queue.stats().queued);
    },
  });
  if (queue.fleet) {
    const fleet = () => queue.fleet!();
    new Gauge({
      name: 'kiln_queue_reachable',
      help: 'Scale-out: 1 while the queue (Redis) answers.',
      registers,
      collect() {
        this.set(fleet().reachable ? 1 : 0);
      },
    });
    new Gauge({
      name: 'kiln_workers_live',
      help: 'Scale-out: worker processes with a live heartbeat.',
      registers,
      collect() {
        this.set(fleet().workers.length);
      },
    });
    new Gauge({
      name: 'kiln_worker_model',
      help: 'Scale-out: 1 per live worker and model it serves.',
      labelNames: ['worker', 'model'] as const,
      registers,
      collect() {
        this.reset();
        for (const w of fleet().workers) for (const m of w.models) this.set({ worker: w.id, model: m }, 1);
      },
    });
  }
  queue.events.on('finished', ({ kind, outcome, queuedMs, runMs }) => {
    jobs.inc({ kind, outcome });
    jobWait.observe({ kind }, queuedMs / 1000);
    if (runMs > 0) jobRun.observe({ kind }, runMs / 1000);
  });
  return { registry, httpRequests, httpDuration, jobs, jobWait, jobRun, modelUnloads };
}
