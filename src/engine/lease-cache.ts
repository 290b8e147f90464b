/**
 * Loaded things (a model's sessions, a LoRA variant's) by key, handed out as leases. An entry
 * leased by anyone stays; once more than `capacity` entries exist, idle ones go, least recently
 * used first, before anything new is built (its memory is freed first), and an entry taken out
 * while leased is freed when its last lease ends. So the cache may briefly hold more than
 * `capacity` (everything in use), never frees what a request is running on, and keeps nothing
 * that failed to build. With `idleMs`, an entry nobody has leased for that long is freed too.
 */

/** Why the cache let a value go: beyond the capacity, idle past `idleMs`, taken out by `evict`, or the cache cleared. */
export type FreeReason = 'capacity' | 'idle' | 'evicted' | 'cleared';

/** A value held until `release()` (idempotent); the cache frees it only after. */
export interface Lease<T> {
  value: T;
  release(): void;
}

interface Entry<T> {
  promise: Promise<T>;
  refs: number;
  /** Out of the cache (and why): freed when its last lease ends. */
  evicted?: FreeReason;
  /** Frees the entry once idle for `idleMs` (set while nobody leases it). */
  idleTimer?: NodeJS.Timeout;
}

export class LeaseCache<T> {
  private readonly entries = new Map<string, Entry<T>>();

  /** `free` releases a value the cache let go of (its errors are the caller's to log inside it). */
  constructor(
    readonly capacity: number,
    private readonly free: (value: T, why: FreeReason) => Promise<void>,
    private readonly idleMs = Infinity,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  keys(): string[] {
    return [...this.entries.keys()];
  }

  /** The value of `key`, built by `build` on a miss once idle entries past the capacity are freed. */
  async acquire(key: string, build: () => Promise<T>): Promise<Lease<T>> {
    let entry = this.entries.get(key);
    if (entry) {
      clearTimeout(entry.idleTimer);
      this.entries.delete(key); // most recently used last
      this.entries.set(key, entry);
      entry.refs++;
    } else {
      // Leased from the start, so the trim that makes room for it passes it by.
      const created: Entry<T> = { promise: undefined as unknown as Promise<T>, refs: 1 };
      this.entries.set(key, created);
      created.promise = this.trim().then(build);
      created.promise.catch(() => {
        if (this.entries.get(key) === created) this.entries.delete(key);
      });
      entry = created;
    }
    let value: T;
    try {
      value = await entry.promise;
    } catch (err) {
      entry.refs--;
      throw err;
    }
    const held = entry;
    let released = false;
    return {
      value,
      release: () => {
        if (released) return;
        released = true;
        held.refs--;
        if (held.evicted && held.refs === 0) void this.free(value, held.evicted);
        else {
          if (held.refs === 0) this.startIdleTimer(key, held);
          void this.trim();
        }
      },
    };
  }

  /**
   * The value of `name` (a folder, a file) as it is now, `version` (its stamp): keyed
   * `${name}\n${version}`, passed to `build`. Entries of its other versions (a re-pulled folder)
   * are taken out, freed once no lease holds them.
   */
  acquireCurrent(name: string, version: string, build: (key: string) => Promise<T>): Promise<Lease<T>> {
    const key = `${name}\n${version}`;
    void this.evict((k) => k !== key && k.slice(0, k.indexOf('\n')) === name);
    return this.acquire(key, () => build(key));
  }

  /** Takes the entries whose keys match out of the cache: idle ones are freed now, leased ones when their last lease ends. */
  evict(match: (key: string) => boolean): Promise<void> {
    const freeing: Promise<void>[] = [];
    for (const [key, entry] of this.entries) {
      if (match(key)) freeing.push(this.drop(key, entry, 'evicted'));
    }
    return Promise.all(freeing).then(() => undefined);
  }

  /** Frees every entry (the owner is closing: nothing runs). */
  async clear(): Promise<void> {
    const all = [...this.entries.values()];
    for (const e of all) clearTimeout(e.idleTimer);
    this.entries.clear();
    await Promise.all(all.map((e) => e.promise.then((v) => this.free(v, 'cleared')).catch(() => {})));
  }

  /** Drops idle entries, oldest first, beyond the capacity; resolves once they are freed. */
  private trim(): Promise<void> {
    const freeing: Promise<void>[] = [];
    for (const [key, entry] of this.entries) {
      if (this.entries.size <= this.capacity) break;
      if (entry.refs === 0) freeing.push(this.drop(key, entry, 'capacity'));
    }
    return Promise.all(freeing).then(() => undefined);
  }

  private startIdleTimer(key: string, entry: Entry<T>): void {
    if (!Number.isFinite(this.idleMs)) return;
    clearTimeout(entry.idleTimer);
    entry.idleTimer = setTimeout(() => {
      if (entry.refs === 0 && this.entries.get(key) === entry) void this.drop(key, entry, 'idle');
    }, this.idleMs);
    entry.idleTimer.unref(); // an idle cache keeps no process alive
  }

  private drop(key: string, entry: Entry<T>, why: FreeReason): Promise<void> {
    clearTimeout(entry.idleTimer);
    this.entries.delete(key);
    entry.evicted = why;
    if (entry.refs > 0) return Promise.resolve();
    return entry.promise.then((v) => this.free(v, why)).catch(() => {});
  }
}
