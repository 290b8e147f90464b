/**
 * Images on local disk under `<home>/images/`. A file's name carries its expiry
 * (`<expiry in unix seconds, base 36>_<48 random hex digits>.<ext>`), so the sweeper can delete
 * expired files without any index, including those a previous run left behind.
 */
import { createReadStream } from 'node:fs';
import { mkdir, readdir, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { ImageStore, StoredImage } from './types.js';
import { startSweeper } from './sweeper.js';

const KEY = /^([0-9a-z]{1,11})_([0-9a-f]{48})\.(png|jpeg|webp)$/;
const TMP = /^\.tmp-/;
const CONTENT_TYPES: Record<string, string> = { png: 'image/png', jpeg: 'image/jpeg', webp: 'image/webp' };
const EXTENSIONS: Record<string, string> = { 'image/png': 'png', 'image/jpeg': 'jpeg', 'image/webp': 'webp' };
/** Temp files older than this are leftovers of a crash mid-write. */
const STALE_TMP_MS = 10 * 60_000;

export interface LocalDiskStoreOptions {
  /** Folder for the images (created when missing). */
  dir: string;
  /** How often the sweeper runs (default 15 s: a file goes at most that long after expiry). */
  sweepIntervalMs?: number;
  /** Called with sweep failures (the sweeper keeps running). */
  onError?: (err: unknown) => void;
}

/** Parses a key; undefined when it is not one this store could have made. */
export function parseKey(key: string): { expiresAt: number; contentType: string } | undefined {
  const m = KEY.exec(key);
  if (!m) return undefined;
  return { expiresAt: parseInt(m[1]!, 36) * 1000, contentType: CONTENT_TYPES[m[3]!]! };
}

export class LocalDiskStore implements ImageStore {
  readonly dir: string;
  private timer: NodeJS.Timeout | undefined;
  private sweeping: Promise<number> | undefined;
  private ready: Promise<unknown>;

  constructor(private readonly options: LocalDiskStoreOptions) {
    this.dir = options.dir;
    this.ready = mkdir(this.dir, { recursive: true, mode: 0o700 });
    this.ready.catch(() => {}); // reported by put(), which awaits it
  }

  /** Starts the periodic sweeper (and sweeps once now). */
  start(): this {
    this.timer ??= startSweeper(() => this.sweep(), this.options.sweepIntervalMs ?? 15_000, this.options.onError);
    return this;
  }

  async put(bytes: Buffer, options: { contentType: string; ttlMs: number }): Promise<StoredImage> {
    await this.ready;
    const ext = EXTENSIONS[options.contentType];
    if (!ext) throw new Error(`unsupported content type ${options.contentType}`);
    // Whole seconds, rounded up: the file never goes before the URL says it does.
    const expiresSec = Math.ceil((Date.now() + options.ttlMs) / 1000);
    const key = `${expiresSec.toString(36)}_${randomBytes(24).toString('hex')}.${ext}`;
    const tmp = join(this.dir, `.tmp-${randomBytes(8).toString('hex')}`);
    await writeFile(tmp, bytes, { mode: 0o600 });
    await rename(tmp, join(this.dir, key));
    return { key, contentType: options.contentType, size: bytes.length, expiresAt: expiresSec * 1000 };
  }

  async get(key: string) {
    const parsed = parseKey(key);
    if (!parsed) return undefined;
    const path = join(this.dir, key);
    let size: number;
    try {
      size = (await stat(path)).size;
    } catch {
      return undefined;
    }
    const image: StoredImage = { key, contentType: parsed.contentType, size, expiresAt: parsed.expiresAt };
    return { image, body: createReadStream(path) };
  }

  async delete(key: string): Promise<void> {
    if (!parseKey(key)) return;
    await unlink(join(this.dir, key)).catch(() => {});
  }

  sweep(now = Date.now()): Promise<number> {
    // One sweep at a time: overlapping ones would race on the same files.
    this.sweeping ??= this.sweepOnce(now).finally(() => {
      this.sweeping = undefined;
    });
    return this.sweeping;
  }

  private async sweepOnce(now: number): Promise<number> {
    await this.ready;
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch {
      return 0;
    }
    let removed = 0;
    for (const name of names) {
      const parsed = parseKey(name);
      let expired = parsed !== undefined && parsed.expiresAt <= now;
      if (!parsed && TMP.test(name)) {
        const info = await stat(join(this.dir, name)).catch(() => undefined);
        expired = info !== undefined && now - info.mtimeMs > STALE_TMP_MS;
      }
      if (!expired) continue;
      try {
        await unlink(join(this.dir, name));
        removed++;
      } catch {
        // gone already (a fetch after expiry deleted it)
      }
    }
    return removed;
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    await this.sweeping;
  }
}
