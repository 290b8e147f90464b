/**
 * The store a server uses, from `--store`: absent for the local disk one (the server makes it),
 * `s3://BUCKET[/PREFIX]` for an S3-compatible bucket.
 */
import { MAX_PRESIGN_SECONDS, parseS3Url, S3Store } from './s3.js';
import type { InputStore } from './types.js';

export { StoreUnavailableError } from './errors.js';
export { S3Store } from './s3.js';

export interface StoreFactoryOptions {
  /** Lifetime of image URLs (the presigned ones must not outlive what SigV4 allows). */
  ttlMs: number;
  /** `url` responses are presigned S3 GET URLs. */
  presignedUrls?: boolean;
  sweepIntervalMs?: number;
  /** Run the periodic sweeper (default true; a worker host may leave it to the API hosts). */
  sweep?: boolean;
  onError?: (err: unknown) => void;
}

/** Checks a `--store` value; the message says what is expected. */
export function checkStoreUrl(url: string): string {
  if (!parseS3Url(url)) throw new Error('expected s3://BUCKET or s3://BUCKET/PREFIX (a bucket name of 3 to 63 lower-case letters, digits, dots or hyphens)');
  return url;
}

/** The S3 store for `url`, its sweeper started (unless `sweep: false`). */
export function createStore(url: string, options: StoreFactoryOptions): S3Store {
  const target = parseS3Url(url);
  if (!target) throw new Error(`--store ${url}: expected s3://BUCKET[/PREFIX]`);
  if (options.presignedUrls && options.ttlMs > MAX_PRESIGN_SECONDS * 1000) {
    throw new Error('--s3-presigned-urls: presigned S3 URLs live at most 7 days; set --url-ttl to 168h or less');
  }
  const store = new S3Store({
    ...target,
    presignedUrls: options.presignedUrls,
    // Every API host lists the bucket this often: not as eagerly as the local store's sweeper.
    sweepIntervalMs: options.sweepIntervalMs ?? Math.min(15_000, Math.max(2_000, options.ttlMs / 4)),
    onError: options.onError,
  });
  return options.sweep === false ? store : store.start();
}

/** Whether a store also keeps uploads (the S3 one does). */
export function isInputStore(store: unknown): store is InputStore {
  return typeof (store as InputStore | undefined)?.putInput === 'function';
}

/** What went wrong reaching a store, for a person at start-up: the underlying error's message. */
export function describeStoreError(err: unknown): string {
  const cause = (err as { cause?: unknown })?.cause;
  const inner = cause instanceof Error ? cause : err;
  const name = (inner as Error)?.name;
  const message = (inner as Error)?.message || String(inner);
  return name && name !== 'Error' && !message.includes(name) ? `${name}: ${message}` : message;
}
