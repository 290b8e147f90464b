/**
 * Images and uploads in an S3-compatible bucket (AWS S3, MinIO, R2, ...), so that any API host
 * can serve a result and any worker can read an upload.
 *
 * Object keys: `<prefix>images/<expiry>_<48 hex>.<ext>` for results (the part after `images/` is
 * the key in Kiln's URLs) and `<prefix>inputs/<expiry>_<48 hex>` for uploads. `<expiry>` is the
 * expiry in unix seconds, base 36, padded to 7 digits: keys in a folder then list (S3 lists in
 * key order) from the first to expire to the last, so the sweeper of any host finds what has
 * expired with ListObjectsV2 alone and stops at the first object still alive. The expiry is also
 * in the object's metadata (`x-amz-meta-kiln-expires`) for people and lifecycle tooling.
 * `<prefix>url-secret` holds the secret Kiln's image URLs are signed with, so that every API
 * host using the bucket signs and checks them alike (it never expires).
 *
 * Configured the SDK's standard way: region from AWS_REGION (or the shared config), credentials
 * from the default provider chain, an endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (read
 * by the SDK itself); with such an endpoint, path-style addressing (MinIO, R2, s3rver).
 */
import { randomBytes } from 'node:crypto';
import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  DeleteObjectCommand,
  DeleteObjectsCommand,
  GetObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  type S3ClientConfig,
} from '@aws-sdk/client-s3';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import { StoreUnavailableError } from './errors.js';
import type { ImageStore, InputStore, StoredImage } from './types.js';
import { startSweeper } from './sweeper.js';

const EXPIRY_DIGITS = 7; // base 36: enough until the year 4450
const IMAGE_KEY = /^([0-9a-z]{7})_([0-9a-f]{48})\.(png|jpeg|webp)$/;
const INPUT_KEY = /^([0-9a-z]{7})_([0-9a-f]{48})$/;
const CONTENT_TYPES: Record<string, string> = { png: 'image/png', jpeg: 'image/jpeg', webp: 'image/webp' };
const EXTENSIONS: Record<string, string> = { 'image/png': 'png', 'image/jpeg': 'jpeg', 'image/webp': 'webp' };
/** SigV4 presigned URLs live at most a week. */
export const MAX_PRESIGN_SECONDS = 7 * 24 * 3600;
/** Network-level failures: the store is unreachable, not misconfigured. */
const NETWORK_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENOTFOUND',
  'EAI_AGAIN',
  'UND_ERR_SOCKET',
]);
const UNAVAILABLE_NAMES = new Set(['TimeoutError', 'RequestTimeout', 'RequestTimeoutException', 'ServiceUnavailable', 'SlowDown', 'InternalError', 'ThrottlingException']);

/** `s3://BUCKET[/PREFIX]` -> bucket and prefix (empty, or ending with `/`); undefined when not such a URL. */
export function parseS3Url(url: string): { bucket: string; prefix: string } | undefined {
  const m = /^s3:\/\/([^/?#]+)(?:\/([^?#]*))?$/.exec(url.trim());
  if (!m) return undefined;
  const bucket = m[1]!;
  // Bucket names: 3 to 63 lower-case letters, digits, dots and hyphens (R2 and MinIO follow S3's rule).
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) return undefined;
  const parts = (m[2] ?? '').split('/').filter(Boolean);
  if (parts.some((p) => p === '.' || p === '..')) return undefined;
  return { bucket, prefix: parts.length ? `${parts.join('/')}/` : '' };
}

/** Parses an image key (the name in Kiln's URLs); undefined when this store could not have made it. */
export function parseS3ImageKey(key: string): { expiresAt: number; contentType: string } | undefined {
  const m = IMAGE_KEY.exec(key);
  if (!m) return undefined;
  return { expiresAt: parseInt(m[1]!, 36) * 1000, contentType: CONTENT_TYPES[m[3]!]! };
}

function parseInputKey(key: string): { expiresAt: number } | undefined {
  const m = INPUT_KEY.exec(key);
  return m ? { expiresAt: parseInt(m[1]!, 36) * 1000 } : undefined;
}

/** A new key's expiry part and the expiry it stands for (whole seconds, rounded up: never before the URL says). */
function expiryStamp(ttlMs: number): { stamp: string; expiresAt: number } {
  const sec = Math.ceil((Date.now() + ttlMs) / 1000);
  return { stamp: sec.toString(36).padStart(EXPIRY_DIGITS, '0'), expiresAt: sec * 1000 };
}

/** True when an SDK error means the store could not be reached or is overloaded (503), not that it refused us. */
export function isUnavailable(err: unknown): boolean {
  if (!err || typeof err !== 'object') return false;
  const e = err as { name?: string; code?: string; $metadata?: { httpStatusCode?: number }; cause?: unknown };
  const status = e.$metadata?.httpStatusCode;
  if (typeof status === 'number' && (status >= 500 || status === 429)) return true;
  if (e.name && UNAVAILABLE_NAMES.has(e.name)) return true;
  if (e.code && NETWORK_CODES.has(e.code)) return true;
  return e.cause !== undefined && e.cause !== err && isUnavailable(e.cause);
}

/** No such object (a missing bucket is a 404 too, but a configuration error, not a missing image). */
function isNotFound(err: unknown): boolean {
  const e = err as { name?: string; $metadata?: { httpStatusCode?: number } };
  return e?.name === 'NoSuchKey' || (e?.$metadata?.httpStatusCode === 404 && e?.name !== 'NoSuchBucket');
}

async function readAll(body: AsyncIterable<unknown>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of body) chunks.push(Buffer.from(chunk as Uint8Array));
  return Buffer.concat(chunks);
}

export interface S3StoreOptions {
  bucket: string;
  /** Key prefix, empty or ending with `/`. */
  prefix?: string;
  /** `url` responses are presigned S3 GET URLs (instead of Kiln's own signed URLs). */
  presignedUrls?: boolean;
  /** How often the sweeper runs (default 15 s). */
  sweepIntervalMs?: number;
  /** Called with failures nobody waits for (sweeps, best-effort deletes); the store keeps going. */
  onError?: (err: unknown) => void;
  /** Extra client settings over the SDK's defaults (tests; a custom endpoint). */
  client?: S3ClientConfig;
}

/** The SDK's standard configuration, plus path-style addressing when an endpoint is given (virtual-host buckets need DNS that MinIO and the like lack). */
export function s3ClientConfig(overrides: S3ClientConfig = {}, env: NodeJS.ProcessEnv = process.env): S3ClientConfig {
  const endpointSet = Boolean(overrides.endpoint ?? env.AWS_ENDPOINT_URL_S3 ?? env.AWS_ENDPOINT_URL);
  return {
    forcePathStyle: endpointSet,
    // Without these a blackholed endpoint would hold a request (and its HTTP client) forever.
    requestHandler: { connectionTimeout: 5_000, requestTimeout: 30_000 },
    ...overrides,
  };
}

export class S3Store implements ImageStore, InputStore {
  readonly bucket: string;
  readonly prefix: string;
  readonly client: S3Client;
  private timer: NodeJS.Timeout | undefined;
  private sweeping: Promise<number> | undefined;

  constructor(private readonly options: S3StoreOptions) {
    this.bucket = options.bucket;
    this.prefix = options.prefix ?? '';
    this.client = new S3Client(s3ClientConfig(options.client));
  }

  /** Starts the periodic sweeper (and sweeps once now). */
  start(): this {
    this.timer ??= startSweeper(() => this.sweep(), this.options.sweepIntervalMs ?? 15_000, this.options.onError);
    return this;
  }

  /** Runs an SDK call, turning "cannot reach the store" into StoreUnavailableError. */
  private async send<T>(what: string, call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (err) {
      if (isUnavailable(err)) throw new StoreUnavailableError(`The image store (S3) is unavailable: ${what} failed; try again shortly.`, { cause: err });
      throw err;
    }
  }

  private async putObject(key: string, bytes: Uint8Array, contentType: string, expiresAt: number): Promise<void> {
    await this.send('storing an object', () =>
      this.client.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: key,
          Body: bytes,
          ContentType: contentType,
          Metadata: { 'kiln-expires': String(expiresAt / 1000) },
        }),
      ),
    );
  }

  private async getObject(key: string): Promise<{ body: Readable; size: number; contentType?: string } | undefined> {
    try {
      const res = await this.send('reading an object', () => this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: key })));
      if (!res.Body) return undefined;
      return { body: res.Body as Readable, size: res.ContentLength ?? 0, contentType: res.ContentType };
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  /** Best effort: what a failed delete leaves, the sweeper (or the lifecycle rule) removes later. */
  private async deleteObject(key: string): Promise<void> {
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key }));
    } catch (err) {
      this.options.onError?.(err);
    }
  }

  async put(bytes: Buffer, options: { contentType: string; ttlMs: number }): Promise<StoredImage> {
    const ext = EXTENSIONS[options.contentType];
    if (!ext) throw new Error(`unsupported content type ${options.contentType}`);
    const { stamp, expiresAt } = expiryStamp(options.ttlMs);
    const key = `${stamp}_${randomBytes(24).toString('hex')}.${ext}`;
    await this.putObject(`${this.prefix}images/${key}`, bytes, options.contentType, expiresAt);
    return { key, contentType: options.contentType, size: bytes.length, expiresAt };
  }

  async get(key: string): Promise<{ image: StoredImage; body: Readable } | undefined> {
    const parsed = parseS3ImageKey(key);
    if (!parsed) return undefined;
    const found = await this.getObject(`${this.prefix}images/${key}`);
    if (!found) return undefined;
    return { image: { key, contentType: parsed.contentType, size: found.size, expiresAt: parsed.expiresAt }, body: found.body };
  }

  async delete(key: string): Promise<void> {
    if (!parseS3ImageKey(key)) return;
    await this.deleteObject(`${this.prefix}images/${key}`);
  }

  /**
   * The secret Kiln's URLs are signed with, shared by every API host through the bucket: read,
   * or made on first use (a conditional write, so two hosts starting at once end up with one, on
   * a store that honours If-None-Match as S3 does).
   */
  async urlSecret(): Promise<Buffer> {
    const key = `${this.prefix}url-secret`;
    const read = async () => {
      const found = await this.getObject(key);
      if (!found) return undefined;
      const text = (await readAll(found.body)).toString('utf8').trim();
      if (!/^[0-9a-f]{64,}$/.test(text)) throw new Error(`s3://${this.bucket}/${key} does not hold a hex secret of at least 32 bytes; delete it to have a new one made`);
      return Buffer.from(text, 'hex');
    };
    const existing = await read();
    if (existing) return existing;
    try {
      await this.send('storing the URL secret', () =>
        this.client.send(
          new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: `${randomBytes(32).toString('hex')}\n`, ContentType: 'text/plain', IfNoneMatch: '*' }),
        ),
      );
    } catch (err) {
      // 412: another host made it first; 409: it is making it right now. Theirs is read below.
      const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
      if (status !== 412 && status !== 409) throw err;
    }
    // Read back rather than trust what was sent: a store that ignores If-None-Match (s3rver) lets
    // the last writer win, and this agrees with it unless that write lands after this read (then
    // the hosts keep different secrets until they restart).
    // After a 409 the other host's write may not have landed yet: a few reads, 0.1 s to 1.6 s apart.
    let secret = await read();
    for (let wait = 100; !secret && wait <= 1600; wait *= 2) {
      await sleep(wait);
      secret = await read();
    }
    if (!secret) throw new Error(`s3://${this.bucket}/${key} could not be read back after writing it`);
    return secret;
  }

  /** A presigned GET URL for the image's remaining lifetime, when presigned URLs are on. */
  async externalUrl(image: StoredImage): Promise<string | undefined> {
    if (!this.options.presignedUrls || !parseS3ImageKey(image.key)) return undefined;
    const seconds = Math.min(MAX_PRESIGN_SECONDS, Math.max(1, Math.ceil((image.expiresAt - Date.now()) / 1000)));
    // Signing is local (no request); only a failing credentials provider can make it fail.
    return this.send('signing a URL', () =>
      getSignedUrl(this.client, new GetObjectCommand({ Bucket: this.bucket, Key: `${this.prefix}images/${image.key}` }), { expiresIn: seconds }),
    );
  }

  async putInput(bytes: Uint8Array, options: { contentType: string; ttlMs: number }): Promise<string> {
    const { stamp, expiresAt } = expiryStamp(options.ttlMs);
    const key = `${stamp}_${randomBytes(24).toString('hex')}`;
    await this.putObject(`${this.prefix}inputs/${key}`, bytes, options.contentType, expiresAt);
    return key;
  }

  async getInput(key: string): Promise<Buffer | undefined> {
    const parsed = parseInputKey(key);
    if (!parsed || parsed.expiresAt <= Date.now()) return undefined;
    const found = await this.getObject(`${this.prefix}inputs/${key}`);
    if (!found) return undefined;
    // Uploads are at most a few MB (the upload limits), so they are read whole.
    try {
      return await readAll(found.body);
    } catch (err) {
      throw new StoreUnavailableError('The image store (S3) is unavailable: reading an upload failed; try again shortly.', { cause: err });
    }
  }

  async deleteInput(key: string): Promise<void> {
    if (!parseInputKey(key)) return;
    await this.deleteObject(`${this.prefix}inputs/${key}`);
  }

  sweep(now = Date.now()): Promise<number> {
    // One sweep at a time per process (other hosts may sweep too: deleting twice is harmless).
    this.sweeping ??= (async () => {
      const images = await this.sweepFolder('images/', (name) => parseS3ImageKey(name)?.expiresAt, now);
      const inputs = await this.sweepFolder('inputs/', (name) => parseInputKey(name)?.expiresAt, now);
      return images + inputs;
    })().finally(() => {
      this.sweeping = undefined;
    });
    return this.sweeping;
  }

  private async sweepFolder(folder: string, expiryOf: (name: string) => number | undefined, now: number): Promise<number> {
    const prefix = `${this.prefix}${folder}`;
    let removed = 0;
    let token: string | undefined;
    let alive = false;
    do {
      const page = await this.send('listing objects', () =>
        this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: prefix, ContinuationToken: token })),
      );
      const expired: { Key: string }[] = [];
      for (const object of page.Contents ?? []) {
        if (!object.Key) continue;
        const expiresAt = expiryOf(object.Key.slice(prefix.length));
        if (expiresAt === undefined) continue; // not ours
        if (expiresAt > now) {
          alive = true; // keys list in expiry order: the rest are alive too
          break;
        }
        expired.push({ Key: object.Key });
      }
      if (expired.length) {
        const res = await this.send('deleting objects', () =>
          this.client.send(new DeleteObjectsCommand({ Bucket: this.bucket, Delete: { Objects: expired, Quiet: true } })),
        );
        removed += expired.length - (res.Errors?.length ?? 0);
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token && !alive);
    return removed;
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    await this.sweeping?.catch(() => {});
    this.client.destroy();
  }
}
