/**
 * Writes a built graph as `<dir>/model.onnx` with its weights as ONNX external data.
 *
 * A weight whose stored dtype is the graph's is not copied: its safetensors file is hard-linked
 * into `<dir>` and the initializer points at the tensor's byte range inside it (ONNX Runtime
 * refuses external-data paths outside the model's folder, symbolic links included, so the link
 * must be a hard one; across filesystems the file is copied instead, once). Everything that must
 * be computed (dtype casts, fused deltas, random benchmark weights) is computed once here, one
 * tensor at a time, and appended to `<dir>/model.onnx_data`.
 */
import { closeSync, copyFileSync, existsSync, linkSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';
import onnxProto from 'onnx-proto';
import { float32ToFloat16Bits } from '../engine/float16.js';
import type { DeferredInitializer, GraphBuilder } from './onnx-builder.js';
import { bytesToFloat32, readByteRange, type SafetensorsDType } from './safetensors.js';

const { onnx } = onnxProto;

export const GRAPH_FILE = 'model.onnx';
export const DATA_FILE = 'model.onnx_data';
/** Large tensors start on a page boundary so that the runtime may map them. */
const ALIGN = 4096;

export interface WriteStats {
  /** Bytes referenced in place inside linked (or copied) source files. */
  linkedBytes: number;
  /** Bytes computed and written to model.onnx_data. */
  writtenBytes: number;
  /** Source files that could not be hard-linked and were copied. */
  copiedFiles: string[];
}

export interface WriteOptions {
  meta?: Parameters<GraphBuilder['toModel']>[0];
  /** Called after each weight with the bytes of weights done so far and in all. */
  onProgress?: (done: number, total: number) => void;
}

const FILE_DTYPE: Record<'float32' | 'float16' | 'bfloat16', SafetensorsDType> = { float32: 'F32', float16: 'F16', bfloat16: 'BF16' };
const DATA_TYPE = { float32: onnx.TensorProto.DataType.FLOAT, float16: onnx.TensorProto.DataType.FLOAT16 } as const;

function targetBytes(t: DeferredInitializer): number {
  return t.dims.reduce((a, b) => a * b, 1) * (t.dtype === 'float32' ? 4 : 2);
}

export function writeGraph(g: GraphBuilder, dir: string, options: WriteOptions = {}): WriteStats {
  const model = g.toModel(options.meta);
  const stats: WriteStats = { linkedBytes: 0, writtenBytes: 0, copiedFiles: [] };
  const linked = new Map<string, string>(); // source path -> name in dir
  const total = g.deferred.reduce((a, t) => a + targetBytes(t), 0);
  let done = 0;
  const dataPath = join(dir, DATA_FILE);
  let dataFd: number | undefined;
  let dataOffset = 0;

  const linkSource = (path: string): string => {
    const known = linked.get(path);
    if (known) return known;
    let name = basename(path);
    for (let i = 1; [...linked.values()].includes(name) || name === GRAPH_FILE || name === DATA_FILE; i++) name = `${i}-${basename(path)}`;
    const target = join(dir, name);
    if (!existsSync(target)) {
      try {
        linkSync(path, target);
      } catch {
        copyFileSync(path, target);
        stats.copiedFiles.push(path);
      }
    }
    linked.set(path, name);
    return name;
  };

  try {
    for (const t of g.deferred) {
      const tensor: onnxProto.onnx.ITensorProto = {
        name: t.name,
        dataType: DATA_TYPE[t.dtype],
        dims: t.dims,
        dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      };
      const src = t.source;
      if (src.kind === 'file' && src.dtype === t.dtype) {
        tensor.externalData = external(linkSource(src.path), src.begin, src.byteLength);
        stats.linkedBytes += src.byteLength;
      } else {
        const values =
          src.kind === 'file'
            ? bytesToFloat32(readByteRange(src.path, src.begin, src.byteLength), FILE_DTYPE[src.dtype], t.name)
            : src.values();
        const bytes = t.dtype === 'float32' ? values : float32ToFloat16Bits(values);
        const raw = new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        dataFd ??= openSync(dataPath, 'w');
        const pad = raw.length >= ALIGN && dataOffset % ALIGN ? ALIGN - (dataOffset % ALIGN) : 0;
        if (pad) writeSync(dataFd, new Uint8Array(pad), 0, pad, dataOffset);
        dataOffset += pad;
        writeSync(dataFd, raw, 0, raw.length, dataOffset);
        tensor.externalData = external(DATA_FILE, dataOffset, raw.length);
        dataOffset += raw.length;
        stats.writtenBytes += raw.length;
      }
      model.graph!.initializer!.push(tensor);
      done += targetBytes(t);
      options.onProgress?.(done, total);
    }
  } finally {
    if (dataFd !== undefined) closeSync(dataFd);
  }
  writeFileSync(join(dir, GRAPH_FILE), onnx.ModelProto.encode(model).finish());
  return stats;
}

function external(location: string, offset: number, length: number): onnxProto.onnx.IStringStringEntryProto[] {
  return [
    { key: 'location', value: location },
    { key: 'offset', value: String(offset) },
    { key: 'length', value: String(length) },
  ];
}
