/**
 * Uploads in this process's memory (one machine): a job carries the key, the runner in the
 * same process gets the bytes. Entries go when the request is done with them (deleteInput) or
 * at their expiry, whichever comes first.
 */
import { randomBytes } from 'node:crypto';
import type { InputStore } from './types.js';

export class MemoryInputStore implements InputStore {
  private readonly entries = new Map<string, { bytes: Buffer; expiresAt: number; timer: NodeJS.Timeout }>();

  async putInput(bytes: Uint8Array, options: { contentType: string; ttlMs: number }): Promise<string> {
    const key = `mem_${randomBytes(18).toString('base64url')}`;
    const timer = setTimeout(() => this.entries.delete(key), Math.max(1, options.ttlMs));
    timer.unref();
    this.entries.set(key, { bytes: Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength), expiresAt: Date.now() + options.ttlMs, timer });
    return key;
  }

  async getInput(key: string): Promise<Buffer | undefined> {
    const entry = this.entries.get(key);
    if (!entry || entry.expiresAt <= Date.now()) return undefined;
    return entry.bytes;
  }

  async deleteInput(key: string): Promise<void> {
    const entry = this.entries.get(key);
    if (!entry) return;
    clearTimeout(entry.timer);
    this.entries.delete(key);
  }

  /** Bytes held now (for tests and metrics). */
  get size(): number {
    return this.entries.size;
  }
}
