/**
 * The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
 * (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then
 * the raw little-endian tensor bytes, offsets relative to the end of the header.
 *
 * Only the header is read when a file is opened; tensor bytes are read one tensor at a time at
 * their offsets, so a multi-GB file is never held in one buffer. Every way a header can lie
 * (a length past the end of the file, offsets outside the data or overlapping, an unknown dtype,
 * a shape that disagrees with the byte length) is one SafetensorsError naming the file, the
 * tensor and what is wrong, raised before any tensor memory is allocated.
 */
import { closeSync, fstatSync, openSync, readSync, writeFileSync } from 'node:fs';
import { ModelLoadError } from '../engine/errors.js';
import { float16BitsToFloat32 } from '../engine/float16.js';

/** Bytes per element of each dtype the format defines. */
export const DTYPE_BYTES = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  U8: 1,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
} as const;
export type SafetensorsDType = keyof typeof DTYPE_BYTES;

/** The float dtypes Kiln reads as weights. */
export const FLOAT_DTYPES: readonly SafetensorsDType[] = ['F32', 'F16', 'BF16'];

/** The format's own bound on the header (the reference implementation refuses more than 100 MB). */
export const MAX_HEADER_BYTES = 100_000_000;

export class SafetensorsError extends ModelLoadError {
  override name = 'SafetensorsError';
}

export interface SafetensorsTensor {
  name: string;
  dtype: SafetensorsDType;
  shape: number[];
  /** Absolute byte offset of the first byte in the file. */
  begin: number;
  byteLength: number;
}

export interface SafetensorsFile {
  path: string;
  /** File size in bytes. */
  size: number;
  /** Absolute offset where tensor data starts (8 + header length). */
  dataStart: number;
  metadata: Record<string, string>;
  tensors: Map<string, SafetensorsTensor>;
}

/** Reads and checks a file's header. Throws SafetensorsError for anything malformed. */
export function openSafetensors(path: string): SafetensorsFile {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    const fail = (what: string): never => {
      throw new SafetensorsError(`${path} is not a valid safetensors file: ${what}`, path);
    };
    if (size < 8) fail(`${size} bytes is too short for the 8-byte header length`);
    const lengthBytes = Buffer.alloc(8);
    readFully(fd, lengthBytes, 0, path);
    const headerLength = lengthBytes.readBigUInt64LE(0);
    if (headerLength === 0n) fail('the header length is 0');
    // The bound first: a lying length is named as such whatever the file's size.
    if (headerLength > BigInt(MAX_HEADER_BYTES)) fail(`the header length ${headerLength} is over the ${MAX_HEADER_BYTES}-byte limit`);
    if (headerLength > BigInt(size - 8)) fail(`the header length ${headerLength} runs past the end of the file (${size} bytes)`);
    const n = Number(headerLength);
    const headerBytes = Buffer.alloc(n);
    readFully(fd, headerBytes, 8, path);
    let header: unknown;
    try {
      header = JSON.parse(headerBytes.toString('utf8'));
    } catch (err) {
      fail(`the header is not JSON (${err instanceof Error ? err.message : String(err)})`);
    }
    if (!header || typeof header !== 'object' || Array.isArray(header)) fail('the header is not a JSON object');
    const dataStart = 8 + n;
    const dataLength = size - dataStart;
    const metadata: Record<string, string> = {};
    const tensors = new Map<string, SafetensorsTensor>();
    for (const [name, raw] of Object.entries(header as Record<string, unknown>)) {
      if (name === '__metadata__') {
        if (!raw || typeof raw !== 'object' || Array.isArray(raw)) fail('__metadata__ is not an object');
        for (const [k, v] of Object.entries(raw as Record<string, unknown>)) {
          if (typeof v !== 'string') fail(`__metadata__.${k} is not a string`);
          metadata[k] = v as string;
        }
        continue;
      }
      const entry = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown } | null;
      const where = `tensor "${name}"`;
      if (!entry || typeof entry !== 'object' || Array.isArray(entry)) fail(`${where} is not an object`);
      const dtype = entry!.dtype;
      // hasOwn, not `in`: "toString" or "constructor" are not dtypes.
      if (typeof dtype !== 'string' || !Object.hasOwn(DTYPE_BYTES, dtype)) fail(`${where} has unknown dtype ${JSON.stringify(dtype)}`);
      const shape = entry!.shape;
      if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
        fail(`${where} has a malformed shape ${JSON.stringify(shape)}`);
      }
      const offsets = entry!.data_offsets;
      if (
        !Array.isArray(offsets) ||
        offsets.length !== 2 ||
        !offsets.every((o) => Number.isSafeInteger(o) && o >= 0) ||
        (offsets[0] as number) > (offsets[1] as number)
      ) {
        fail(`${where} has malformed data_offsets ${JSON.stringify(offsets)}`);
      }
      const [begin, end] = offsets as [number, number];
      if (end > dataLength) fail(`${where} has data_offsets [${begin}, ${end}] outside the ${dataLength} data bytes`);
      const elements = (shape as number[]).reduce((a, b) => a * b, 1);
      const expected = elements * DTYPE_BYTES[dtype as SafetensorsDType];
      if (expected !== end - begin) {
        fail(`${where} has shape [${shape}] of ${dtype} (${expected} bytes) but ${end - begin} bytes of data`);
      }
      tensors.set(name, { name, dtype: dtype as SafetensorsDType, shape: [...(shape as number[])], begin: dataStart + begin, byteLength: end - begin });
    }
    // Empty tensors occupy no bytes, so they overlap nothing; the others are compared with the
    // furthest-reaching tensor before them.
    const sorted = [...tensors.values()].filter((t) => t.byteLength > 0).sort((a, b) => a.begin - b.begin);
    let reach: SafetensorsTensor | undefined;
    for (const cur of sorted) {
      if (reach && cur.begin < reach.begin + reach.byteLength) fail(`tensors "${reach.name}" and "${cur.name}" overlap`);
      if (!reach || cur.begin + cur.byteLength > reach.begin + reach.byteLength) reach = cur;
    }
    return { path, size, dataStart, metadata, tensors };
  } finally {
    closeSync(fd);
  }
}

function readFully(fd: number, target: Buffer, position: number, path: string): void {
  let done = 0;
  while (done < target.length) {
    const n = readSync(fd, target, done, target.length - done, position + done);
    if (n === 0) throw new SafetensorsError(`${path}: unexpected end of file at byte ${position + done}`, path);
    done += n;
  }
}

/** `length` bytes of a file from `begin` (one positioned read). */
export function readByteRange(path: string, begin: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const out = Buffer.allocUnsafe(length);
    readFully(fd, out, begin, path);
    return out;
  } finally {
    closeSync(fd);
  }
}

/** The raw bytes of one tensor. */
export function readTensorBytes(file: SafetensorsFile, tensor: SafetensorsTensor): Buffer {
  return readByteRange(file.path, tensor.begin, tensor.byteLength);
}

/** A float tensor's values as float32 (F32, F16 and BF16 are read; anything else is an error). */
export function readTensorFloat32(file: SafetensorsFile, tensor: SafetensorsTensor): Float32Array {
  return bytesToFloat32(readTensorBytes(file, tensor), tensor.dtype, `${file.path}: tensor "${tensor.name}"`);
}

export function bytesToFloat32(bytes: Uint8Array, dtype: SafetensorsDType, what = 'tensor'): Float32Array {
  switch (dtype) {
    case 'F32': {
      const out = new Float32Array(bytes.length / 4);
      new Uint8Array(out.buffer).set(bytes);
      return out;
    }
    case 'F16': {
      const bits = new Uint16Array(bytes.length / 2);
      new Uint8Array(bits.buffer).set(bytes);
      return float16BitsToFloat32(bits);
    }
    case 'BF16': {
      // bfloat16 is the top half of a float32.
      const out = new Float32Array(bytes.length / 2);
      const words = new Uint32Array(out.buffer);
      for (let i = 0; i < words.length; i++) words[i] = (bytes[2 * i]! | (bytes[2 * i + 1]! << 8)) << 16;
      return out;
    }
    case 'F64': {
      const wide = new Float64Array(bytes.length / 8);
      new Uint8Array(wide.buffer).set(bytes);
      return Float32Array.from(wide);
    }
    default:
      throw new SafetensorsError(`${what} has dtype ${dtype}, not a float type`);
  }
}

export interface TensorToWrite {
  dtype: SafetensorsDType;
  shape: readonly number[];
  /** Raw little-endian bytes, or a typed array whose element type fits the dtype. */
  data: Uint8Array | Float32Array | Uint16Array | Int32Array | BigInt64Array | Float64Array;
}

/** Writes a safetensors file (tests, tools): header padded to 8 bytes, tensors in name order. */
export function writeSafetensors(path: string, tensors: Record<string, TensorToWrite>, metadata?: Record<string, string>): void {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  const chunks: Uint8Array[] = [];
  let offset = 0;
  for (const name of Object.keys(tensors).sort()) {
    const t = tensors[name]!;
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    header[name] = { dtype: t.dtype, shape: [...t.shape], data_offsets: [offset, offset + bytes.length] };
    chunks.push(bytes);
    offset += bytes.length;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const pad = (8 - (json.length % 8)) % 8;
  if (pad) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([length, json, ...chunks]));
}
