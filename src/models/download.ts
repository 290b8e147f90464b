/**
 * One file from the Hub to disk: resumable, verified, never visible under its final name until
 * it is complete and correct.
 *
 * Bytes go to `<dest>.incomplete` as they arrive. An attempt that breaks (connection cut, idle
 * timeout, HTTP 5xx/429) is retried with `Range: bytes=<on disk>-`, and so is the next `kiln
 * pull` after an interruption: bytes already on disk are never fetched again. The sha256 the
 * Hub reports for LFS files (or the git blob sha1 of small files) is computed while streaming,
 * then the file is renamed to `dest`. A mismatch deletes the partial file and fails.
 */
import { createHash, type Hash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, open, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { PullError } from './errors.js';
import { describeNetworkError, statusError, type HubConfig } from './hub.js';

export const INCOMPLETE_SUFFIX = '.incomplete';

export interface DownloadSpec {
  url: string;
  dest: string;
  /** Repository path, for messages. */
  label: string;
  size: number;
  sha256?: string;
  gitOid?: string;
}

export interface DownloadContext {
  config: HubConfig;
  /** A fetch that adds the Hub's token for the endpoint's origin (hubFetch). */
  fetch: typeof fetch;
  signal?: AbortSignal;
  /** Attempts after the first one within this call (default 5). */
  retries?: number;
  /** Base delay between attempts, doubled each time (default 1000 ms). */
  retryDelayMs?: number;
  /** Called with each chunk's byte count as it is written. */
  onBytes?: (n: number) => void;
  onRetry?: (attempt: number, error: Error) => void;
}

export interface DownloadOutcome {
  /** Bytes received over the network by this call. */
  fetched: number;
}

/** Bytes of `dest` already on disk: the whole size if the verified file exists, else the partial file's length. */
export async function bytesOnDisk(dest: string, size: number): Promise<number> {
  const done = await stat(dest).catch(() => undefined);
  if (done?.isFile() && done.size === size) return size;
  const part = await stat(dest + INCOMPLETE_SUFFIX).catch(() => undefined);
  return part?.isFile() ? Math.min(part.size, size) : 0;
}

class RetryableError extends Error {}

/** Hash state that follows the partial file, so a retry in the same process does not re-read it. */
class RunningHash {
  private hash: Hash | undefined;
  private covered = 0;

  constructor(private readonly spec: DownloadSpec) {}

  private fresh(): Hash {
    if (this.spec.sha256) return createHash('sha256');
    const h = createHash('sha1');
    if (this.spec.gitOid) h.update(`blob ${this.spec.size}\0`);
    return h;
  }

  /** Brings the hash up to `offset` bytes of `path` (re-reading from disk only when needed). */
  async catchUp(path: string, offset: number): Promise<void> {
    if (this.hash && this.covered === offset) return;
    this.hash = this.fresh();
    this.covered = 0;
    if (offset === 0) return;
    for await (const chunk of createReadStream(path, { start: 0, end: offset - 1 })) {
      this.hash.update(chunk as Buffer);
      this.covered += (chunk as Buffer).length;
    }
  }

  update(chunk: Uint8Array): void {
    this.hash!.update(chunk);
    this.covered += chunk.length;
  }

  reset(): void {
    this.hash = undefined;
    this.covered = 0;
  }

  digest(): string {
    return this.hash!.digest('hex');
  }
}

/** GET with manual redirects: the token (added by ctx.fetch) never follows to another origin. */
async function get(url: string, headers: Record<string, string>, ctx: DownloadContext, signal: AbortSignal): Promise<Response> {
  let current = url;
  for (let hop = 0; hop < 10; hop++) {
    const res = await ctx.fetch(current, { headers, redirect: 'manual', signal });
    if (res.status >= 300 && res.status < 400 && res.headers.has('location')) {
      await res.body?.cancel().catch(() => {});
      current = new URL(res.headers.get('location')!, current).href;
      continue;
    }
    return res;
  }
  throw new PullError(`too many redirects for ${url}`, 'network');
}

/**
 * Downloads `spec.url` to `spec.dest` (resuming `<dest>.incomplete`), checks its size and hash,
 * and renames it into place. Returns at once when `dest` already exists with the right size
 * (it was verified before it got that name).
 */
export async function downloadVerified(spec: DownloadSpec, ctx: DownloadContext): Promise<DownloadOutcome> {
  const done = await stat(spec.dest).catch(() => undefined);
  if (done?.isFile() && done.size === spec.size) return { fetched: 0 };
  if (done) await unlink(spec.dest);
  await mkdir(dirname(spec.dest), { recursive: true });
  const part = spec.dest + INCOMPLETE_SUFFIX;
  const retries = ctx.retries ?? 5;
  const hash = new RunningHash(spec);
  const counter = { fetched: 0 };

  for (let attempt = 0; ; attempt++) {
    try {
      await attemptOnce(spec, part, hash, ctx, counter);
      break;
    } catch (err) {
      if (ctx.signal?.aborted) throw new PullError('download cancelled', 'aborted', { cause: err });
      if (!(err instanceof RetryableError) || attempt >= retries) {
        if (err instanceof RetryableError) {
          throw new PullError(
            `${spec.label}: ${err.message}; gave up after ${attempt + 1} attempt(s). Run the same command again to resume.`,
            'network',
            { cause: err },
          );
        }
        throw err;
      }
      ctx.onRetry?.(attempt + 1, err);
      const delay = (ctx.retryDelayMs ?? 1000) * 2 ** attempt;
      if (delay > 0) await sleep(delay, undefined, { signal: ctx.signal }).catch(() => {});
    }
  }

  const digest = hash.digest();
  const expected = spec.sha256 ?? spec.gitOid;
  if (expected && digest !== expected) {
    await unlink(part).catch(() => {});
    throw new PullError(
      `${spec.label}: ${spec.sha256 ? 'sha256' : 'git sha1'} mismatch (expected ${expected}, got ${digest}); ` +
        'the download was discarded. The mirror or a proxy served corrupt data: try again, or another HF_ENDPOINT.',
      'integrity',
    );
  }
  await rename(part, spec.dest);
  return { fetched: counter.fetched };
}

/** One HTTP attempt from the partial file's current length; adds the bytes it receives to `counter`. */
async function attemptOnce(spec: DownloadSpec, part: string, hash: RunningHash, ctx: DownloadContext, counter: { fetched: number }): Promise<void> {
  let offset = (await stat(part).catch(() => undefined))?.size ?? 0;
  if (offset > spec.size) offset = 0;
  await hash.catchUp(part, offset);
  if (offset === spec.size) return;

  const idle = new AbortController();
  const signal = ctx.signal ? AbortSignal.any([ctx.signal, idle.signal]) : idle.signal;
  let timer: NodeJS.Timeout | undefined;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => idle.abort(new Error('timeout')), ctx.config.timeoutMs);
  };
  arm();
  let fh: FileHandle | undefined;
  try {
    let res: Response;
    try {
      res = await get(spec.url, offset > 0 ? { range: `bytes=${offset}-` } : {}, ctx, signal);
    } catch (err) {
      if (err instanceof PullError && err.code !== 'network') throw err;
      throw new RetryableError(idle.signal.aborted ? 'no answer from the server' : describeNetworkError(err));
    }
    if (res.status === 416 && offset > 0) {
      // The partial file is longer than what the server has: start over.
      await res.body?.cancel().catch(() => {});
      await unlink(part).catch(() => {});
      hash.reset();
      throw new RetryableError('range not satisfiable');
    }
    if (res.status === 429 || res.status >= 500) {
      await res.body?.cancel().catch(() => {});
      throw new RetryableError(`HTTP ${res.status}`);
    }
    if (!res.ok) {
      await res.body?.cancel().catch(() => {});
      throw statusError(res.status, spec.label, ctx.config);
    }
    if (res.status === 206) {
      const m = /^bytes (\d+)-\d+\/(\d+|\*)$/.exec(res.headers.get('content-range') ?? '');
      if (!m || Number(m[1]) !== offset) {
        await res.body?.cancel().catch(() => {});
        throw new RetryableError(`unexpected Content-Range "${res.headers.get('content-range')}"`);
      }
    } else if (offset > 0) {
      // 200 to a range request: the server sends the whole file.
      offset = 0;
      hash.reset();
      await hash.catchUp(part, 0);
    }
    if (!res.body) throw new RetryableError('empty response');

    fh = await open(part, offset > 0 ? 'r+' : 'w');
    let position = offset;
    try {
      for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
        arm();
        if (position + chunk.length > spec.size) {
          await fh.close();
          fh = undefined;
          await unlink(part).catch(() => {});
          hash.reset();
          throw new PullError(`${spec.label}: the server sent more than the ${spec.size} bytes the Hub lists; discarded`, 'integrity');
        }
        try {
          await fh.write(chunk, 0, chunk.length, position);
        } catch (err) {
          throw new PullError(`${spec.label}: cannot write ${part}: ${(err as Error).message}`, 'disk', { cause: err });
        }
        position += chunk.length;
        counter.fetched += chunk.length;
        hash.update(chunk);
        ctx.onBytes?.(chunk.length);
      }
    } catch (err) {
      if (err instanceof PullError) throw err;
      throw new RetryableError(
        idle.signal.aborted ? `no data for ${Math.round(ctx.config.timeoutMs / 1000)} s` : `connection lost (${describeNetworkError(err)})`,
      );
    }
    if (position !== spec.size) throw new RetryableError(`connection closed at ${position} of ${spec.size} bytes`);
  } finally {
    clearTimeout(timer);
    await fh?.close();
  }
}
