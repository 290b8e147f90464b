/**
 * Where generated images wait for their URL to be fetched. The routes see only `ImageStore`,
 * so an S3-compatible store can replace the local disk one later.
 */
import type { Readable } from 'node:stream';

export interface StoredImage {
  /** Opaque, unguessable, URL-safe name. */
  key: string;
  contentType: string;
  size: number;
  /** Epoch milliseconds after which the image is gone. */
  expiresAt: number;
}

export interface ImageStore {
  /** Stores bytes for `ttlMs`; the store deletes them by itself after that. */
  put(bytes: Buffer, options: { contentType: string; ttlMs: number }): Promise<StoredImage>;
  /** The image and a stream of its bytes, or undefined when the key is unknown or malformed. */
  get(key: string): Promise<{ image: StoredImage; body: Readable } | undefined>;
  delete(key: string): Promise<void>;
  /** Deletes what has expired (files left by a previous run too); returns how many. */
  sweep(now?: number): Promise<number>;
  /**
   * A URL the store serves by itself (e.g. a presigned S3 URL). When absent or undefined,
   * Kiln serves the image at its own signed URL.
   */
  externalUrl?(image: StoredImage): Promise<string | undefined>;
  close(): Promise<void>;
}

/**
 * Uploads (edit images, masks, image prompts) a job refers to by key, so the job itself stays
 * small and serializable: in memory on one machine, objects in the bucket when scaled out. The
 * API host puts them; whichever worker runs the job gets them; they expire like results.
 */
export interface InputStore {
  /** Stores bytes for `ttlMs`; returns the key a job carries. */
  putInput(bytes: Uint8Array, options: { contentType: string; ttlMs: number }): Promise<string>;
  /** The bytes, or undefined when the key is unknown, malformed or expired. */
  getInput(key: string): Promise<Buffer | undefined>;
  deleteInput(key: string): Promise<void>;
}
