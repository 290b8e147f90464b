/**
 * Which external-data files an ONNX model needs, read from the model itself.
 *
 * A tensor stored outside `model.onnx` carries `data_location = EXTERNAL` and an `external_data`
 * entry `location` naming the file, relative to the model's folder (`model.onnx_data` from
 * optimum, `model.onnx.data` from Olive/onnxruntime, `weights.pb` from the old diffusers script,
 * a UUID in TensorRT repositories). Reading the names from the file, rather than guessing them,
 * is what lets `kiln pull` fetch exactly the data files a graph needs, under their original names.
 *
 * The reader walks the protobuf wire format directly, descending only into the messages that can
 * hold tensors (graph initializers, node attributes, sub-graphs, functions, training info) and
 * seeking over everything else, so the weights of an inline model (hundreds of MB) are never read.
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { posix } from 'node:path';

// Field numbers from onnx.proto.
const MODEL = { graph: 7, trainingInfo: 20, functions: 25 } as const;
const GRAPH = { node: 1, initializer: 5, sparseInitializer: 15 } as const;
const NODE = { attribute: 5 } as const;
const ATTRIBUTE = { t: 5, g: 6, tensors: 10, graphs: 11, sparseTensor: 22, sparseTensors: 23 } as const;
const TENSOR = { externalData: 13 } as const;
const SPARSE = { values: 1, indices: 2 } as const;
const FUNCTION = { node: 7 } as const;
const TRAINING = { initialization: 1, algorithm: 2 } as const;
const ENTRY = { key: 1, value: 2 } as const;

const WINDOW = 1 << 20;

/** Random access to a file through a 1 MiB window (sequential reads hit the window). */
class WindowedFile {
  private readonly buf = Buffer.alloc(WINDOW);
  private start = 0;
  private length = 0;
  readonly size: number;

  constructor(private readonly fd: number) {
    this.size = fstatSync(fd).size;
  }

  byte(pos: number): number {
    if (pos < this.start || pos >= this.start + this.length) this.fill(pos);
    return this.buf[pos - this.start]!;
  }

  bytes(pos: number, len: number): Buffer {
    if (len > WINDOW) throw new Error('field too large');
    if (pos < this.start || pos + len > this.start + this.length) this.fill(pos);
    return this.buf.subarray(pos - this.start, pos - this.start + len);
  }

  private fill(pos: number): void {
    if (pos >= this.size) throw new Error('truncated protobuf');
    this.start = pos;
    this.length = readSync(this.fd, this.buf, 0, WINDOW, pos);
    if (this.length <= 0) throw new Error('truncated protobuf');
  }
}

interface Cursor {
  pos: number;
}

function varint(f: WindowedFile, c: Cursor, end: number): number {
  let result = 0;
  let scale = 1;
  for (let i = 0; i < 10; i++) {
    if (c.pos >= end) throw new Error('truncated varint');
    const b = f.byte(c.pos++);
    result += (b & 0x7f) * scale;
    if (b < 0x80) return result;
    scale *= 128;
  }
  throw new Error('malformed varint');
}

/** Calls `onField(field, start, end)` for each length-delimited field of the message in [start, end). */
function fields(f: WindowedFile, start: number, end: number, onField: (field: number, s: number, e: number) => void): void {
  const c: Cursor = { pos: start };
  while (c.pos < end) {
    const tag = varint(f, c, end);
    const field = Math.floor(tag / 8);
    const wire = tag % 8;
    switch (wire) {
      case 0:
        varint(f, c, end);
        break;
      case 1:
        c.pos += 8;
        break;
      case 5:
        c.pos += 4;
        break;
      case 2: {
        const len = varint(f, c, end);
        const s = c.pos;
        c.pos += len;
        if (c.pos > end) throw new Error('truncated field');
        onField(field, s, c.pos);
        break;
      }
      default:
        throw new Error(`unsupported protobuf wire type ${wire}`);
    }
  }
  if (c.pos !== end) throw new Error('truncated message');
}

function walkTensor(f: WindowedFile, s: number, e: number, out: Set<string>): void {
  fields(f, s, e, (field, fs, fe) => {
    if (field !== TENSOR.externalData) return;
    let key = '';
    let value = '';
    fields(f, fs, fe, (k, ks, ke) => {
      if (k === ENTRY.key) key = f.bytes(ks, ke - ks).toString('utf8');
      else if (k === ENTRY.value) value = f.bytes(ks, ke - ks).toString('utf8');
    });
    if (key === 'location' && value) out.add(value);
  });
}

function walkSparse(f: WindowedFile, s: number, e: number, out: Set<string>): void {
  fields(f, s, e, (field, fs, fe) => {
    if (field === SPARSE.values || field === SPARSE.indices) walkTensor(f, fs, fe, out);
  });
}

function walkNode(f: WindowedFile, s: number, e: number, out: Set<string>): void {
  fields(f, s, e, (field, fs, fe) => {
    if (field !== NODE.attribute) return;
    fields(f, fs, fe, (a, as, ae) => {
      if (a === ATTRIBUTE.t || a === ATTRIBUTE.tensors) walkTensor(f, as, ae, out);
      else if (a === ATTRIBUTE.g || a === ATTRIBUTE.graphs) walkGraph(f, as, ae, out);
      else if (a === ATTRIBUTE.sparseTensor || a === ATTRIBUTE.sparseTensors) walkSparse(f, as, ae, out);
    });
  });
}

function walkGraph(f: WindowedFile, s: number, e: number, out: Set<string>): void {
  fields(f, s, e, (field, fs, fe) => {
    if (field === GRAPH.initializer) walkTensor(f, fs, fe, out);
    else if (field === GRAPH.sparseInitializer) walkSparse(f, fs, fe, out);
    else if (field === GRAPH.node) walkNode(f, fs, fe, out);
  });
}

/**
 * The external-data locations `model.onnx` at `path` refers to, as written in the file
 * (relative to the model's folder), sorted. Empty for a self-contained model.
 * Throws when the file is not a readable ONNX protobuf.
 */
export function externalDataLocations(path: string): string[] {
  const fd = openSync(path, 'r');
  try {
    const f = new WindowedFile(fd);
    const out = new Set<string>();
    fields(f, 0, f.size, (field, s, e) => {
      if (field === MODEL.graph) walkGraph(f, s, e, out);
      else if (field === MODEL.functions) {
        fields(f, s, e, (ff, fs, fe) => {
          if (ff === FUNCTION.node) walkNode(f, fs, fe, out);
        });
      } else if (field === MODEL.trainingInfo) {
        fields(f, s, e, (tf, ts, te) => {
          if (tf === TRAINING.initialization || tf === TRAINING.algorithm) walkGraph(f, ts, te, out);
        });
      }
    });
    return [...out].sort();
  } finally {
    closeSync(fd);
  }
}

/**
 * Normalises an external-data location to a POSIX path relative to the model's folder, or
 * returns undefined when it is absolute or climbs out of the folder (never followed).
 */
export function safeRelativeLocation(location: string): string | undefined {
  const norm = posix.normalize(location.replace(/\\/g, '/'));
  if (norm.startsWith('/') || /^[A-Za-z]:/.test(norm) || norm === '..' || norm.startsWith('../') || norm === '.') return undefined;
  return norm;
}
