/** For operators and monitors, no API key: GET /ping (queue), /health (liveness), /metrics (Prometheus), /openapi.json. */
import type { FastifyInstance } from 'fastify';
import type { JobQueue } from '../../queue/types.js';
import type { Metrics } from '../metrics.js';

export async function opsRoutes(app: FastifyInstance, { queue, metrics }: { queue: JobQueue; metrics: Metrics }): Promise<void> {
  app.get('/ping', { schema: { summary: 'Jobs running and waiting' } }, async () => {
    const s = queue.stats();
    return { active: s.active, queued: s.queued, max_queued: s.maxQueued, concurrency: s.concurrency };
  });

  const started = Date.now();
  app.get('/health', { schema: { summary: 'Liveness' } }, async () => ({ status: 'ok', uptime_s: Math.round((Date.now() - started) / 1000) }));

  app.get('/metrics', { schema: { summary: 'Prometheus metrics', hide: false } }, async (_request, reply) => {
    reply.type(metrics.registry.contentType);
    return metrics.registry.metrics();
  });

  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());
}
