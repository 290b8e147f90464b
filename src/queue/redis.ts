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
import { RedisConnection } from 'bullmq';
import { RespClient, type RespClientOptions } from './redis-client.js';
import type { InputStore } from '../store/types.js';

// BullMQ creates its connections through this (it would otherwise require ioredis, not installed).
(RedisConnection as unknown as { clientFactory: (opts: RespClientOptions) => RespClient }).clientFactory = (opts) => new RespClient(opts);

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
  startedAt: number;
}

/** Every live worker (heartbeat key present); a bounded SCAN. */
export async function readFleet(redis: RespClient, queueName: string): Promise<WorkerInfo[]> {
  const k = keys(queueName);
  const names: string[] = [];
  let cursor = '0';
  for (let i = 0; i < 100; i++) {
    const [next, batch] = await redis.scan(cursor, { MATCH: k.workerPattern, COUNT: 200 });
    names.push(...batch);
    cursor = next;
    if (cursor === '0') break;
  }
  if (names.length === 0) return [];
  const values = (await redis.call(['MGET', ...names])) as (string | null)[];
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
    private readonly redis: RespClient,
    queueName: string,
  ) {
    this.k = keys(queueName);
  }

  async putInput(bytes: Uint8Array, options: { contentType: string; ttlMs: number }): Promise<string> {
    const key = `in_${randomBytes(18).toString('base64url')}`;
    await this.redis.set(this.k.input(key), Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength), { PX: Math.max(1000, Math.round(options.ttlMs)) });
    return key;
  }

  async getInput(key: string): Promise<Buffer | undefined> {
    if (!/^in_[A-Za-z0-9_-]{24}$/.test(key)) return undefined;
    const value = await this.redis.call(['GET', this.k.input(key)], { buffers: true });
    return Buffer.isBuffer(value) ? value : undefined;
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
      worker: string;
    }
  | { ok: false; error: import('../runner/protocol.js').SerializedError; cancelled: boolean; worker: string };

export function connectionOptions(t: RedisTarget, extra: Partial<RespClientOptions> = {}): RespClientOptions {
  return { host: t.host, port: t.port, db: t.db, username: t.username, password: t.password, ...extra };
}
