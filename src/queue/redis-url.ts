/** `--queue` URLs (kept apart from the BullMQ code, so that parsing a flag loads no queue). */

export interface RedisTarget {
  host: string;
  port: number;
  db: number;
  username?: string;
  password?: string;
}

/** `redis://[[user]:password@]HOST[:PORT][/DB]` -> its parts; throws on anything else. */
export function parseRedisUrl(value: string): RedisTarget {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new Error(`not a Redis URL: ${value} (expected redis://HOST:PORT[/DB])`);
  }
  if (url.protocol !== 'redis:') throw new Error(`not a Redis URL: ${value} (expected redis://HOST:PORT[/DB]; rediss:// is not supported)`);
  const db = url.pathname.replace(/^\/+/, '');
  if (db !== '' && !/^\d+$/.test(db)) throw new Error(`the Redis database in ${value} must be a number`);
  const target: RedisTarget = { host: url.hostname.replace(/^\[|\]$/g, '') || '127.0.0.1', port: url.port ? Number(url.port) : 6379, db: db ? Number(db) : 0 };
  if (url.username) target.username = decodeURIComponent(url.username);
  if (url.password) target.password = decodeURIComponent(url.password);
  return target;
}

/** The URL without its password, for logs. */
export function describeRedis(t: RedisTarget): string {
  return `redis://${t.host.includes(':') ? `[${t.host}]` : t.host}:${t.port}/${t.db}`;
}
