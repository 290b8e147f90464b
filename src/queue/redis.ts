/**
 * What the API host and `kiln worker` share in Redis, beside BullMQ's own keys: where (the URL
 * and key names), the fleet (each worker's heartbeat key, with a TTL, naming its models), the
 * uploads of jobs (RedisInputStore), results and cancellations, all under `<prefix>:<queue>:`.
 *
 *   <p>:<q>:worker:<id>    JSON heartbeat {id, host, pid, device, slots, active, models}, PX ttl
 *   <p>:<q>:input:<key>    an upload, PX its TTL
 *   <p>:<q>:result:<job>   the finished image (JSON, base64), PX a few minutes, keyed by job id
 *   <p>:<q>:cancel:<job>   set when the job's client went away; the worker polls it
 */
import { randomBytes } from 'node:crypto';
import { Redis, type RedisOptions } from 'ioredis';
import type { InputStore } from '../store/types.js';

export { parseRedisUrl, describeRedis, type RedisTarget } from './redis-url.js';
import type { RedisTarget } from './redis-url.js';

export const DEFAULT_QUEUE_NAME = 'kiln-images';
export const KEY_PREFIX = 'kiln';

export function keys(queueName: string) {
  const base = `${KEY_PREFIX}:${queueName}`;
  return {
    worker: (id: string) => `${base}:worker:${id}`,
    workerPattern: `${base}:worker:*`,
    input: (key: string) => `${base}:input:${key}`,
    result: (jobId: string) => `${base}:result:${jobId}`,
    cancel: (jobId: string) => `${base}:cancel:${jobId}`,
  };
}

/** A worker process as its heartbeat describes it. */
export interface WorkerInfo {
  id: string;
  host: string;
  pid: number;
  device: string;
  /** Jobs it runs at once (inference threads). */
  slots: number;
  /** Jobs it runs now. */
  active: number;
  /** The model names its catalog serves (installed models and aliases). */
  models: string[];
  /** The models loaded now, each with the number of its inference threads holding it. */
  loaded?: Record<string, number>;
  startedAt: number;
}

/** Every live worker (heartbeat key present); a bounded SCAN. */
export async function readFleet(redis: Redis, queueName: string): Promise<WorkerInfo[]> {
  const k = keys(queueName);
  const names: string[] = [];
  let cursor = '0';
  for (let i = 0; i < 100; i++) {
    const [next, batch] = await redis.scan(cursor, 'MATCH', k.workerPattern, 'COUNT', 200);
    names.push(...batch);
    cursor = next;
    if (cursor === '0') break;
  }
  if (names.length === 0) return [];
  const values = await redis.mget(...names);
  const out: WorkerInfo[] = [];
  for (const v of values) {
    if (!v) continue;
    try {
      out.push(JSON.parse(v) as WorkerInfo);
    } catch {
      // a key someone else wrote: not a worker
    }
  }
  return out.sort((a, b) => a.id.localeCompare(b.id));
}

/** Uploads in Redis: any worker that reaches Redis gets them (the local-store choice when scaled out). */
export class RedisInputStore implements InputStore {
  private readonly k: ReturnType<typeof keys>;
  constructor(
    private readonly redis: Redis,
    queueName: string,
  ) {
    this.k = keys(queueName);
  }

  async putInput(bytes: Uint8Array, options: { contentType: string; ttlMs: number }): Promise<string> {
    const key = `in_${randomBytes(18).toString('base64url')}`;
    await this.redis.set(this.k.input(key), Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength), 'PX', Math.max(1000, Math.round(options.ttlMs)));
    return key;
  }

  async getInput(key: string): Promise<Buffer | undefined> {
    if (!/^in_[A-Za-z0-9_-]{24}$/.test(key)) return undefined;
    return (await this.redis.getBuffer(this.k.input(key))) ?? undefined;
  }

  async deleteInput(key: string): Promise<void> {
    if (/^in_[A-Za-z0-9_-]{24}$/.test(key)) await this.redis.del(this.k.input(key));
  }
}

/** What a worker leaves for the API host: the finished image (or the job's error), keyed by job id. */
export type StoredResult =
  | {
      ok: true;
      bytes: string;
      contentType: string;
      format: string;
      settings: unknown;
      timings: unknown;
      pose?: string;
      people?: number;
      /** The adapter files this worker's home resolved (JobOutput.imagePromptAdapters). */
      imagePromptAdapters?: string[];
      worker: string;
    }
  | { ok: false; error: import('../runner/protocol.js').SerializedError; cancelled: boolean; worker: string };

/**
 * A connection for BullMQ (Queue, Worker, QueueEvents: `maxRetriesPerRequest: null`, as BullMQ
 * requires) or for Kiln's own keys. `failFast`: commands fail at once while Redis is down (the
 * API's own, so that a request gets its 503 instead of waiting for a reconnect).
 */
export function connect(t: RedisTarget, options: { failFast?: boolean; name?: string } = {}): Redis {
  const redisOptions: RedisOptions = {
    host: t.host,
    port: t.port,
    db: t.db,
    username: t.username,
    password: t.password,
    connectionName: options.name,
    maxRetriesPerRequest: options.failFast ? 0 : null,
    enableOfflineQueue: !options.failFast,
    // Back within a couple of seconds of Redis returning, whatever the outage lasted.
    retryStrategy: (times) => Math.min(2000, 100 * 2 ** Math.min(5, times)),
  };
  const redis = new Redis(redisOptions);
  redis.on('error', () => {}); // connection errors: seen as 503s, in /health and in the workers' logs
  return redis;
}
