/** For operators and monitors, no API key: GET /ping (queue), /health (liveness), /metrics (Prometheus), /openapi.json. */
import type { FastifyInstance } from 'fastify';
import type { JobQueue, JobRunner } from '../../queue/types.js';
import type { Metrics } from '../metrics.js';

/** Scale-out: the queue (Redis) and its live workers with their models. */
function fleetFields(queue: JobQueue) {
  const fleet = queue.fleet?.();
  if (!fleet) return {};
  return {
    queue: { backend: 'redis', reachable: fleet.reachable },
    workers: fleet.workers.map((w) => ({ id: w.id, host: w.host, pid: w.pid, device: w.device, slots: w.slots, active: w.active, models: w.models, loaded_models: w.loaded })),
  };
}

export async function opsRoutes(app: FastifyInstance, { queue, metrics, runner }: { queue: JobQueue; metrics: Metrics; runner?: JobRunner }): Promise<void> {
  app.get('/ping', { schema: { summary: 'Jobs running and waiting' } }, async () => {
    const s = queue.stats();
    // One machine: the models its inference threads hold now (scaled out: per worker, below).
    const loaded = runner?.loadedModels ? { loaded_models: runner.loadedModels() } : {};
    return { active: s.active, queued: s.queued, max_queued: s.maxQueued, concurrency: s.concurrency, ...loaded, ...fleetFields(queue) };
  });

  const started = Date.now();
  app.get('/health', { schema: { summary: 'Liveness' } }, async (_request, reply) => {
    const fleet = queue.fleet?.();
    // Scaled out, the API cannot serve while Redis is unreachable: say so (503) rather than "ok".
    if (fleet && !fleet.reachable) reply.code(503);
    return { status: fleet && !fleet.reachable ? 'queue_unavailable' : 'ok', uptime_s: Math.round((Date.now() - started) / 1000), ...fleetFields(queue) };
  });

  app.get('/metrics', { schema: { summary: 'Prometheus metrics', hide: false } }, async (_request, reply) => {
    reply.type(metrics.registry.contentType);
    return metrics.registry.metrics();
  });

  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());
}
