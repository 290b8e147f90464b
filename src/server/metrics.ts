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
}

export function createMetrics(queue: JobQueue): Metrics {
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
  queue.events.on('finished', ({ kind, outcome, queuedMs, runMs }) => {
    jobs.inc({ kind, outcome });
    jobWait.observe({ kind }, queuedMs / 1000);
    if (runMs > 0) jobRun.observe({ kind }, runMs / 1000);
  });
  return { registry, httpRequests, httpDuration, jobs, jobWait, jobRun };
}
