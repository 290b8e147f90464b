/**
 * The safetensors reader and the weight sources: hostile headers built byte by byte, round trips
 * of every float dtype, a sparse multi-GB file opened without reading it, and the folder layouts
 * componentWeights understands (single file, fp16 variant, sharded index).
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ModelLoadError } from '../../src/engine/errors.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import {
  MAX_HEADER_BYTES,
  openSafetensors,
  readByteRange,
  readTensorBytes,
  readTensorFloat32,
  SafetensorsError,
  writeSafetensors,
} from '../../src/graphs/safetensors.js';
import { componentWeights, Params, RandomWeights, SafetensorsWeights, type WeightSource } from '../../src/graphs/weights.js';

const root = mkdtempSync(join(tmpdir(), 'kiln-safetensors-'));
after(() => rmSync(root, { recursive: true, force: true }));

let counter = 0;
function tmpPath(name = 'file'): string {
  return join(root, `${counter++}-${name}.safetensors`);
}

/** 8-byte little-endian length, then the header text, then the data (length may lie). */
function rawFile(header: string | object, data: Uint8Array = new Uint8Array(0), length?: bigint): Buffer {
  const text = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(length ?? BigInt(text.length));
  return Buffer.concat([len, text, data]);
}

function writeRaw(bytes: Uint8Array, name?: string): string {
  const path = tmpPath(name);
  writeFileSync(path, bytes);
  return path;
}

/** openSafetensors refuses the file with a SafetensorsError naming the file and matching `what`. */
function assertRefused(bytes: Uint8Array, what: RegExp): void {
  const path = writeRaw(bytes, 'bad');
  assert.throws(
    () => openSafetensors(path),
    (err: unknown) => {
      assert.ok(err instanceof SafetensorsError, `not a SafetensorsError: ${String(err)}`);
      assert.ok(err instanceof ModelLoadError);
      assert.ok(err.message.includes(path), `message does not name the file: ${err.message}`);
      assert.match(err.message, what);
      return true;
    },
  );
}

const f32Entry = (offsets: unknown, shape: unknown = [2], dtype: unknown = 'F32'): object => ({ dtype, shape, data_offsets: offsets });
const eightBytes = new Uint8Array(8);

test('a file shorter than 8 bytes is refused', () => {
  assertRefused(new Uint8Array(0), /0 bytes is too short/);
  assertRefused(new Uint8Array(7), /7 bytes is too short/);
});

test('header length 0 is refused', () => {
  assertRefused(rawFile('', eightBytes, 0n), /header length is 0/);
});

test('a header length past the end of the file is refused', () => {
  assertRefused(rawFile('{}', eightBytes, 1000n), /header length 1000 runs past the end of the file \(18 bytes\)/);
  assertRefused(rawFile('{}', new Uint8Array(0), 3n), /header length 3 runs past the end/);
});

test('a header length over the 100 MB bound is refused without reading it', () => {
  // The length field lies: the file itself is tiny.
  assertRefused(rawFile('{}', eightBytes, BigInt(MAX_HEADER_BYTES) + 1n), /over the 100000000-byte limit/);
  assertRefused(rawFile('{}', eightBytes, 2n ** 64n - 1n), /over the 100000000-byte limit/);
  // A sparse file big enough to hold the claimed header: still refused by the bound, not read.
  const path = tmpPath('huge-header');
  writeFileSync(path, rawFile('{}', eightBytes, BigInt(MAX_HEADER_BYTES) + 8n));
  truncateSync(path, MAX_HEADER_BYTES + 64);
  assert.throws(() => openSafetensors(path), (err: unknown) => err instanceof SafetensorsError && /over the 100000000-byte limit/.test(err.message));
});

test('a header that is not JSON is refused', () => {
  assertRefused(rawFile('{"a": '), /header is not JSON/);
  assertRefused(rawFile('not json at all'), /header is not JSON/);
});

test('a header whose JSON is not an object is refused', () => {
  for (const text of ['[]', '[{"dtype":"F32"}]', '42', 'null', '"text"', 'true']) {
    assertRefused(rawFile(text), /header is not a JSON object/);
  }
});

test('a tensor entry that is not an object is refused', () => {
  for (const entry of [5, null, 'F32', [1, 2]]) {
    assertRefused(rawFile({ w: entry }, eightBytes), /tensor "w" is not an object/);
  }
});

test('an unknown or missing dtype is refused', () => {
  assertRefused(rawFile({ w: f32Entry([0, 8], [2], 'F128') }, eightBytes), /tensor "w" has unknown dtype "F128"/);
  assertRefused(rawFile({ w: { shape: [2], data_offsets: [0, 8] } }, eightBytes), /tensor "w" has unknown dtype undefined/);
  assertRefused(rawFile({ w: f32Entry([0, 8], [2], 'f32') }, eightBytes), /unknown dtype "f32"/);
  assertRefused(rawFile({ w: f32Entry([0, 8], [2], 4) }, eightBytes), /unknown dtype 4/);
  // Names inherited from Object.prototype are not dtypes.
  assertRefused(rawFile({ w: f32Entry([0, 8], [2], 'toString') }, eightBytes), /unknown dtype "toString"/);
  assertRefused(rawFile({ w: f32Entry([0, 8], [2], 'constructor') }, eightBytes), /unknown dtype "constructor"/);
});

test('a malformed shape is refused', () => {
  for (const shape of [[-2], [1.5], [2, -1], '2', 2, null, [null], ['2'], { 0: 2 }]) {
    assertRefused(rawFile({ w: f32Entry([0, 8], shape) }, eightBytes), /tensor "w" has a malformed shape/);
  }
  // Missing entirely.
  assertRefused(rawFile({ w: { dtype: 'F32', data_offsets: [0, 8] } }, eightBytes), /tensor "w" has a malformed shape undefined/);
});

test('malformed data_offsets are refused', () => {
  for (const offsets of [[0], [0, 4, 8], [], ['0', '8'], [0, 8.5], [8, 4], [-4, 4], [0, -8], '0,8', null, undefined]) {
    assertRefused(rawFile({ w: f32Entry(offsets) }, eightBytes), /tensor "w" has malformed data_offsets/);
  }
});

test('data_offsets past the data are refused', () => {
  assertRefused(rawFile({ w: f32Entry([0, 16], [4]) }, eightBytes), /tensor "w" has data_offsets \[0, 16\] outside the 8 data bytes/);
  assertRefused(rawFile({ w: f32Entry([8, 16]) }, eightBytes), /outside the 8 data bytes/);
});

test('a shape whose size disagrees with the byte length is refused', () => {
  assertRefused(rawFile({ w: f32Entry([0, 8], [3]) }, new Uint8Array(12)), /tensor "w" has shape \[3\] of F32 \(12 bytes\) but 8 bytes of data/);
  assertRefused(rawFile({ w: f32Entry([0, 8], [2, 3], 'F16') }, eightBytes), /shape \[2,3\] of F16 \(12 bytes\) but 8 bytes of data/);
  assertRefused(rawFile({ w: f32Entry([0, 8], [2], 'F64') }, new Uint8Array(16)), /shape \[2\] of F64 \(16 bytes\) but 8 bytes/);
  assertRefused(rawFile({ w: f32Entry([0, 8], [], 'F32') }, eightBytes), /shape \[\] of F32 \(4 bytes\) but 8 bytes of data/);
  assertRefused(rawFile({ w: f32Entry([0, 8], [0], 'F32') }, eightBytes), /\(0 bytes\) but 8 bytes of data/);
});

test('overlapping tensors are refused', () => {
  const data = new Uint8Array(16);
  assertRefused(rawFile({ a: f32Entry([0, 8]), b: f32Entry([4, 12]) }, data), /tensors "a" and "b" overlap/);
  // Same range twice.
  assertRefused(rawFile({ a: f32Entry([0, 8]), b: f32Entry([0, 8]) }, data), /overlap/);
  // One tensor inside a larger one, listed in either order.
  assertRefused(rawFile({ c: f32Entry([4, 8], [1]), big: f32Entry([0, 16], [4]) }, data), /tensors "big" and "c" overlap/);
  // A tensor overlapping the first of two tensors that a short one in between does not reach.
  assertRefused(rawFile({ big: f32Entry([0, 16], [4]), x: f32Entry([0, 4], [1]), y: f32Entry([12, 16], [1]) }, data), /overlap/);
});

test('__metadata__ must be an object of strings', () => {
  for (const meta of ['text', [], null, 3]) {
    assertRefused(rawFile({ __metadata__: meta }), /__metadata__ is not an object/);
  }
  assertRefused(rawFile({ __metadata__: { format: 'pt', step: 3 } }), /__metadata__\.step is not a string/);
  assertRefused(rawFile({ __metadata__: { nested: {} } }), /__metadata__\.nested is not a string/);
});

test('a hostile header claiming 100,000,000 elements over a short byte range is refused before allocating', () => {
  const before = process.memoryUsage().rss;
  assertRefused(rawFile({ w: f32Entry([0, 8], [100_000_000]) }, eightBytes), /shape \[100000000\] of F32 \(400000000 bytes\) but 8 bytes of data/);
  assertRefused(rawFile({ w: f32Entry([0, 400_000_000], [100_000_000]) }, eightBytes), /outside the 8 data bytes/);
  // Dimensions whose product is far past 2^53 never equal a real byte length.
  assertRefused(rawFile({ w: f32Entry([0, 8], [2 ** 40, 2 ** 40, 2 ** 40]) }, eightBytes), /but 8 bytes of data/);
  assert.ok(process.memoryUsage().rss - before < 200 * 2 ** 20, 'refusing the header allocated tensor memory');
});

test('F32, F16, BF16 and F64 round-trip through writeSafetensors, openSafetensors and readTensorFloat32', () => {
  const f32 = new Float32Array([0, 1, -2.5, 3.25e-8, 1e30, -Infinity, Math.fround(Math.PI)]);
  // Float16 bit patterns written by hand: 0, 1, -2, 0.5, 65504 (max), 2^-24 (smallest subnormal), -0.25.
  const f16Bits = new Uint16Array([0x0000, 0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0xb400]);
  const f16Values = [0, 1, -2, 0.5, 65504, 2 ** -24, -0.25];
  // bfloat16 is the top 16 bits of a float32: take floats whose low 16 bits are zero.
  const bf16Values = new Float32Array([1, -3.5, 0.15625, 2 ** 100, -(2 ** -100), 3.140625]);
  const words = new Uint32Array(bf16Values.buffer);
  const bf16 = Buffer.alloc(bf16Values.length * 2);
  words.forEach((w, i) => {
    assert.equal(w & 0xffff, 0, `${bf16Values[i]} is not exact in bfloat16`);
    bf16.writeUInt16LE(w >>> 16, 2 * i);
  });
  const f64 = new Float64Array([1.5, -2.25, 1e10, 0.1]);

  const path = tmpPath('roundtrip');
  writeSafetensors(
    path,
    {
      'w.f32': { dtype: 'F32', shape: [7], data: f32 },
      'w.f16': { dtype: 'F16', shape: [7, 1], data: f16Bits },
      'w.bf16': { dtype: 'BF16', shape: [2, 3], data: bf16 },
      'w.f64': { dtype: 'F64', shape: [2, 2], data: f64 },
    },
    { format: 'pt', note: 'kiln test' },
  );
  const file = openSafetensors(path);
  assert.deepEqual(file.metadata, { format: 'pt', note: 'kiln test' });
  assert.deepEqual([...file.tensors.keys()].sort(), ['w.bf16', 'w.f16', 'w.f32', 'w.f64']);
  const t = (name: string) => file.tensors.get(name)!;
  assert.deepEqual(t('w.f16').shape, [7, 1]);
  assert.equal(t('w.f16').dtype, 'F16');
  assert.equal(t('w.bf16').byteLength, 12);
  assert.deepEqual(readTensorFloat32(file, t('w.f32')), f32);
  assert.deepEqual([...readTensorFloat32(file, t('w.f16'))], f16Values);
  assert.deepEqual(readTensorFloat32(file, t('w.bf16')), bf16Values);
  assert.deepEqual([...readTensorFloat32(file, t('w.f64'))], [...f64].map(Math.fround));
  // Raw bytes come back untouched.
  assert.deepEqual(readTensorBytes(file, t('w.bf16')), bf16);
  // Offsets are absolute and lie inside the data section.
  for (const tensor of file.tensors.values()) {
    assert.ok(tensor.begin >= file.dataStart && tensor.begin + tensor.byteLength <= file.size);
  }
});

test('integer dtypes are listed, but readTensorFloat32 refuses them', () => {
  const path = tmpPath('ints');
  writeSafetensors(path, {
    ids: { dtype: 'I64', shape: [3], data: new BigInt64Array([1n, 2n, 77n]) },
    i32: { dtype: 'I32', shape: [2], data: new Int32Array([-1, 5]) },
    mask: { dtype: 'BOOL', shape: [4], data: new Uint8Array([1, 0, 0, 1]) },
    u8: { dtype: 'U8', shape: [2], data: new Uint8Array([3, 4]) },
  });
  const file = openSafetensors(path);
  assert.deepEqual(
    [...file.tensors.values()].map((x) => [x.name, x.dtype, x.shape]).sort(),
    [['i32', 'I32', [2]], ['ids', 'I64', [3]], ['mask', 'BOOL', [4]], ['u8', 'U8', [2]]],
  );
  const ids = file.tensors.get('ids')!;
  assert.deepEqual(new BigInt64Array(new Uint8Array(readTensorBytes(file, ids)).buffer), new BigInt64Array([1n, 2n, 77n]));
  for (const [name, dtype] of [['ids', 'I64'], ['i32', 'I32'], ['mask', 'BOOL'], ['u8', 'U8']] as const) {
    assert.throws(
      () => readTensorFloat32(file, file.tensors.get(name)!),
      (err: unknown) =>
        err instanceof SafetensorsError && err.message.includes(path) && err.message.includes(`tensor "${name}"`) && err.message.includes(`dtype ${dtype}, not a float type`),
    );
  }
});

test('an empty tensor (shape [0]) works, and occupies no bytes', () => {
  const path = tmpPath('empty');
  writeSafetensors(path, {
    a: { dtype: 'F32', shape: [2], data: new Float32Array([1, 2]) },
    empty: { dtype: 'F32', shape: [0], data: new Float32Array(0) },
    empty2: { dtype: 'F16', shape: [3, 0], data: new Uint16Array(0) },
  });
  const file = openSafetensors(path);
  assert.equal(file.tensors.get('empty')!.byteLength, 0);
  assert.deepEqual(readTensorFloat32(file, file.tensors.get('empty')!), new Float32Array(0));
  assert.deepEqual(readTensorFloat32(file, file.tensors.get('empty2')!), new Float32Array(0));
  assert.deepEqual(readTensorFloat32(file, file.tensors.get('a')!), new Float32Array([1, 2]));
  // An empty tensor placed inside another's range overlaps nothing.
  const inside = openSafetensors(writeRaw(rawFile({ a: f32Entry([0, 8]), e: f32Entry([4, 4], [0]) }, eightBytes)));
  assert.equal(inside.tensors.get('e')!.byteLength, 0);
  // A file with no tensors at all is valid too.
  const none = openSafetensors(writeRaw(rawFile({})));
  assert.equal(none.tensors.size, 0);
});

test('the header is padded to 8 bytes with spaces', () => {
  for (let n = 1; n <= 8; n++) {
    const path = tmpPath(`pad${n}`);
    writeSafetensors(path, { ['k'.repeat(n)]: { dtype: 'F32', shape: [1], data: new Float32Array([n]) } });
    const bytes = readFileSync(path);
    const length = Number(bytes.readBigUInt64LE(0));
    assert.equal(length % 8, 0, `header of ${length} bytes`);
    const text = bytes.subarray(8, 8 + length).toString('utf8');
    assert.match(text, /^\{.*\} *$/);
    const file = openSafetensors(path);
    assert.equal(file.dataStart, 8 + length);
    assert.equal(file.dataStart % 8, 0);
    assert.deepEqual(readTensorFloat32(file, file.tensors.get('k'.repeat(n))!), new Float32Array([n]));
  }
});

test('a 2 GB+ sparse file is opened by reading only its header', () => {
  const path = tmpPath('sparse');
  const size = 2 ** 31 + 2 ** 29; // 2.5 GiB, past every 32-bit offset
  const headerLength = 256;
  const dataLength = size - 8 - headerLength;
  const header = JSON.stringify({ tail: { dtype: 'F32', shape: [4], data_offsets: [dataLength - 16, dataLength] } }).padEnd(headerLength, ' ');
  writeFileSync(path, rawFile(header));
  truncateSync(path, size);
  // Real values in the last 16 bytes, written at a position past 2^31.
  const fd = openSync(path, 'r+');
  writeSync(fd, Buffer.from(new Float32Array([1, -2, 3, -4]).buffer), 0, 16, size - 16);
  closeSync(fd);

  const before = process.memoryUsage().rss;
  const start = performance.now();
  const file = openSafetensors(path);
  const elapsed = performance.now() - start;
  const grown = process.memoryUsage().rss - before;
  assert.equal(file.size, size);
  assert.equal(file.dataStart, 8 + headerLength);
  const tail = file.tensors.get('tail')!;
  assert.equal(tail.begin, size - 16);
  assert.ok(elapsed < 1000, `opening took ${elapsed.toFixed(0)} ms`);
  assert.ok(grown < 256 * 2 ** 20, `rss grew by ${(grown / 2 ** 20).toFixed(0)} MiB`);
  assert.deepEqual(readTensorFloat32(file, tail), new Float32Array([1, -2, 3, -4]));
  assert.deepEqual(readByteRange(path, 2 ** 31, 4), Buffer.alloc(4));
  rmSync(path);
});

// --- weights.ts ---------------------------------------------------------------------------------

function folder(name: string): string {
  const dir = join(root, `${counter++}-${name}`);
  mkdirSync(dir);
  return dir;
}

function tensors(entries: Record<string, number[]>, fill = 0): Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> {
  return Object.fromEntries(
    Object.entries(entries).map(([k, shape]) => [k, { dtype: 'F32' as const, shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(fill) }]),
  );
}

function sourcePath(w: SafetensorsWeights, key: string): string {
  const entry = w.lookup(key);
  assert.ok(entry && entry.source.kind === 'file');
  return entry.source.kind === 'file' ? entry.source.path : '';
}

function assertLoadError(fn: () => unknown, ...parts: (string | RegExp)[]): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof ModelLoadError, `not a ModelLoadError: ${String(err)}`);
    for (const part of parts) {
      if (typeof part === 'string') assert.ok(err.message.includes(part), `"${err.message}" lacks "${part}"`);
      else assert.match(err.message, part);
    }
    return true;
  });
}

test('componentWeights reads diffusion_pytorch_model.safetensors, preferring it to the fp16 variant', () => {
  const dir = folder('unet');
  writeSafetensors(join(dir, 'diffusion_pytorch_model.safetensors'), tensors({ 'conv_in.weight': [2, 1, 1, 1], 'conv_in.bias': [2] }));
  writeSafetensors(join(dir, 'diffusion_pytorch_model.fp16.safetensors'), tensors({ 'conv_in.weight': [2, 1, 1, 1] }));
  const w = componentWeights(dir, 'unet');
  assert.equal(w.component, 'unet');
  assert.deepEqual(w.keys().sort(), ['conv_in.bias', 'conv_in.weight']);
  assert.equal(sourcePath(w, 'conv_in.weight'), join(dir, 'diffusion_pytorch_model.safetensors'));
  // Asking for the variant picks it.
  assert.deepEqual(componentWeights(dir, 'unet', 'fp16').keys(), ['conv_in.weight']);
  assert.equal(sourcePath(componentWeights(dir, 'unet', 'fp16'), 'conv_in.weight'), join(dir, 'diffusion_pytorch_model.fp16.safetensors'));
});

test('componentWeights falls back to the .fp16.safetensors variant, and reads model.safetensors', () => {
  const dir = folder('vae');
  const path = join(dir, 'diffusion_pytorch_model.fp16.safetensors');
  writeSafetensors(path, { 'decoder.conv_in.bias': { dtype: 'F16', shape: [2], data: new Uint16Array([0x3c00, 0xc000]) } });
  const w = componentWeights(dir, 'vae');
  assert.equal(sourcePath(w, 'decoder.conv_in.bias'), path);
  const entry = w.lookup('decoder.conv_in.bias')!;
  assert.equal(entry.dtype, 'F16');
  assert.ok(entry.source.kind === 'file' && entry.source.dtype === 'float16');

  const te = folder('text_encoder');
  writeSafetensors(join(te, 'model.fp16.safetensors'), tensors({ 'text_model.final_layer_norm.weight': [4] }));
  assert.deepEqual(componentWeights(te, 'text_encoder').keys(), ['text_model.final_layer_norm.weight']);
  writeSafetensors(join(te, 'model.safetensors'), tensors({ 'text_model.final_layer_norm.bias': [4] }));
  assert.deepEqual(componentWeights(te, 'text_encoder').keys(), ['text_model.final_layer_norm.bias']);
});

test('componentWeights reads the shards of a *.safetensors.index.json', () => {
  const dir = folder('unet-sharded');
  const s1 = 'diffusion_pytorch_model-00001-of-00002.safetensors';
  const s2 = 'diffusion_pytorch_model-00002-of-00002.safetensors';
  writeSafetensors(join(dir, s1), tensors({ 'a.weight': [2, 2], 'a.bias': [2] }, 1));
  writeSafetensors(join(dir, s2), tensors({ 'b.weight': [3] }, 2));
  writeFileSync(
    join(dir, 'diffusion_pytorch_model.safetensors.index.json'),
    JSON.stringify({ metadata: { total_size: 36 }, weight_map: { 'a.weight': s1, 'a.bias': s1, 'b.weight': s2 } }),
  );
  const w = componentWeights(dir, 'unet');
  assert.deepEqual(w.keys().sort(), ['a.bias', 'a.weight', 'b.weight']);
  assert.equal(sourcePath(w, 'a.weight'), join(dir, s1));
  assert.equal(sourcePath(w, 'b.weight'), join(dir, s2));
  assert.equal(w.files.length, 2);
  // The fp16 variant's index is found too.
  const fp16 = folder('unet-sharded-fp16');
  writeSafetensors(join(fp16, 'shard.safetensors'), tensors({ 'x.weight': [1] }));
  writeFileSync(join(fp16, 'diffusion_pytorch_model.fp16.safetensors.index.json'), JSON.stringify({ weight_map: { 'x.weight': 'shard.safetensors' } }));
  assert.deepEqual(componentWeights(fp16, 'unet').keys(), ['x.weight']);
});

test('an index naming a missing shard, or a shard outside the folder, is refused', () => {
  const dir = folder('bad-index');
  const index = join(dir, 'diffusion_pytorch_model.safetensors.index.json');
  writeSafetensors(join(dir, 'present.safetensors'), tensors({ 'a.weight': [1] }));
  writeFileSync(index, JSON.stringify({ weight_map: { 'a.weight': 'present.safetensors', 'b.weight': 'absent.safetensors' } }));
  assertLoadError(() => componentWeights(dir, 'unet'), 'unet', 'absent.safetensors', 'missing', index);

  // A real file one level up is still refused: the index may only name files in its folder.
  writeSafetensors(join(root, 'outside.safetensors'), tensors({ 'a.weight': [1] }));
  for (const shard of ['../outside.safetensors', `${dir}/present.safetensors`, 'sub/x.safetensors', '..\\outside.safetensors', '..', '.hidden.safetensors']) {
    writeFileSync(index, JSON.stringify({ weight_map: { 'a.weight': shard } }));
    assertLoadError(() => componentWeights(dir, 'unet'), 'unet', index, 'outside its folder', shard);
  }
  writeFileSync(index, JSON.stringify({ weight_map: { 'a.weight': 7 } }));
  assertLoadError(() => componentWeights(dir, 'unet'), 'unet', index, 'not a file name');
  for (const body of ['{}', '{"weight_map": null}', '{"weight_map": ["present.safetensors"]}', 'null', '[]']) {
    writeFileSync(index, body);
    assertLoadError(() => componentWeights(dir, 'unet'), 'unet', index, 'no weight_map');
  }
  writeFileSync(index, '{"weight_map": {}}');
  assertLoadError(() => componentWeights(dir, 'unet'), index, 'lists no shards');
  writeFileSync(index, '{"weight_map": ');
  assertLoadError(() => componentWeights(dir, 'unet'), index, 'is not JSON');
});

test('a key stored twice across shards is refused', () => {
  const dir = folder('twice');
  writeSafetensors(join(dir, 's1.safetensors'), tensors({ 'a.weight': [1], 'b.weight': [1] }));
  writeSafetensors(join(dir, 's2.safetensors'), tensors({ 'a.weight': [1] }));
  writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { 'a.weight': 's1.safetensors', 'b.weight': 's2.safetensors' } }));
  assertLoadError(() => componentWeights(dir, 'text_encoder'), 'text_encoder', '"a.weight" is stored twice', join(dir, 's1.safetensors'), join(dir, 's2.safetensors'));
});

test('a folder without weights is a clear error listing what it has', () => {
  const dir = folder('no-weights');
  writeFileSync(join(dir, 'config.json'), '{}');
  writeFileSync(join(dir, 'model.onnx'), '');
  writeFileSync(join(dir, 'diffusion_pytorch_model.bin'), '');
  assertLoadError(() => componentWeights(dir, 'unet'), 'unet', dir, 'no safetensors weights', 'config.json', 'model.onnx', 'diffusion_pytorch_model.bin');
  assertLoadError(() => componentWeights(folder('empty'), 'vae'), 'vae', 'found: nothing');
  assertLoadError(() => componentWeights(join(root, 'does-not-exist'), 'vae'), 'vae', 'does-not-exist', 'the folder does not exist');
  // Asking for a variant that is not there does not fall back to another.
  const plain = folder('plain-only');
  writeSafetensors(join(plain, 'diffusion_pytorch_model.safetensors'), tensors({ w: [1] }));
  assertLoadError(() => componentWeights(plain, 'unet', 'fp16'), 'unet', 'diffusion_pytorch_model.safetensors');
  // A corrupt file in the folder is the reader's error, naming that file.
  const corrupt = folder('corrupt');
  writeFileSync(join(corrupt, 'diffusion_pytorch_model.safetensors'), Buffer.alloc(4));
  assertLoadError(() => componentWeights(corrupt, 'unet'), join(corrupt, 'diffusion_pytorch_model.safetensors'), 'too short');
});

test('Params.get checks keys and shapes against the stored weights', () => {
  const dir = folder('params');
  const path = join(dir, 'diffusion_pytorch_model.safetensors');
  writeSafetensors(path, {
    'down_blocks.0.conv.weight': { dtype: 'F16', shape: [4, 2, 3, 3], data: new Uint16Array(72) },
    'down_blocks.0.conv.bias': { dtype: 'F32', shape: [4], data: new Float32Array([1, 2, 3, 4]) },
    'position_ids': { dtype: 'I64', shape: [1, 3], data: new BigInt64Array([0n, 1n, 2n]) },
  });
  const g = new GraphBuilder('params-test');
  const p = Params.of(g, componentWeights(dir, 'unet'));
  const block = p.at('down_blocks').at(0);
  assert.ok(block.has('conv.weight') && !block.has('conv.missing'));

  assertLoadError(() => block.get('norm.weight', [4]), 'unet', '"down_blocks.0.norm.weight"', dir, '[4]');
  assertLoadError(() => block.get('conv.weight', [4, 2, 1, 1]), 'unet', '"down_blocks.0.conv.weight"', '[4, 2, 3, 3]', '[4, 2, 1, 1]');
  assertLoadError(() => block.get('conv.bias', [4, 1]), 'unet', '"down_blocks.0.conv.bias"', 'shape [4] but config.json implies [4, 1]');
  assertLoadError(() => p.get('position_ids', [1, 3]), 'unet', '"position_ids"', 'dtype I64', 'F32, F16, BF16', path);
  assert.equal(p.parameterCount, 0, 'refused weights are not counted');

  const name = block.get('conv.weight', [4, 2, 3, 3]);
  assert.equal(name, 'down_blocks.0.conv.weight');
  assert.equal(block.get('conv.weight', [4, 2, 3, 3]), name, 'the same weight twice is one initializer');
  assertLoadError(() => block.get('conv.weight', [8, 9]), 'unet', '"down_blocks.0.conv.weight"', '[8, 9]', '[4, 2, 3, 3]');
  const bias = block.get('conv.bias', [4]);
  assert.equal(p.parameterCount, 72 + 4);
  assert.deepEqual(p.unusedKeys(), ['position_ids']);

  assert.equal(g.deferred.length, 2);
  const weight = g.deferred.find((d) => d.name === name)!;
  assert.deepEqual(weight.dims, [4, 2, 3, 3]);
  assert.ok(weight.source.kind === 'file' && weight.source.dtype === 'float16' && weight.source.byteLength === 144);
  const b = g.deferred.find((d) => d.name === bias)!;
  assert.ok(b.source.kind === 'file');
  if (b.source.kind === 'file') {
    assert.deepEqual(new Float32Array(new Uint8Array(readByteRange(path, b.source.begin, b.source.byteLength)).buffer), new Float32Array([1, 2, 3, 4]));
  }
});

test('RandomWeights gives deterministic values of the asked shape', () => {
  const a = new RandomWeights('unet', 7);
  const entry = a.lookup('conv_in.weight', [8, 4, 3, 3]);
  assert.deepEqual(entry.shape, [8, 4, 3, 3]);
  assert.equal(entry.dtype, 'F32');
  assert.ok(entry.source.kind === 'values');
  const values = (e: ReturnType<RandomWeights['lookup']>): Float32Array => (e.source.kind === 'values' ? e.source.values() : new Float32Array());
  const v = values(entry);
  assert.equal(v.length, 8 * 4 * 3 * 3);
  assert.deepEqual(values(a.lookup('conv_in.weight', [8, 4, 3, 3])), v, 'same key, same values');
  assert.deepEqual(values(new RandomWeights('unet', 7).lookup('conv_in.weight', [8, 4, 3, 3])), v, 'same seed, same values');
  assert.notDeepEqual(values(new RandomWeights('unet', 8).lookup('conv_in.weight', [8, 4, 3, 3])), v, 'seed changes values');
  assert.notDeepEqual(values(new RandomWeights('vae', 7).lookup('conv_in.weight', [8, 4, 3, 3])), v, 'component changes values');
  assert.notDeepEqual(values(a.lookup('conv_out.weight', [8, 4, 3, 3])), v, 'key changes values');
  const bound = 1 / Math.sqrt(4 * 3 * 3);
  assert.ok(v.every((x) => Number.isFinite(x) && Math.abs(x) <= bound), 'values within 1/sqrt(fan_in)');
  assert.ok(new Set(v).size > v.length / 2, 'values vary');
  const norm = values(a.lookup('norm1.weight', [16]));
  assert.ok(norm.every((x) => Math.abs(x - 1) <= 0.02), 'norm scales near 1');
  assert.equal(values(a.lookup('scalar', [])).length, 1);
  assert.ok((a as WeightSource).has('anything') && a.keys().length === 0);

  // Through Params: the asked shape is the shape, and parameters are counted.
  const g = new GraphBuilder('random');
  const p = Params.of(g, a);
  p.at('down_blocks.0').get('proj.weight', [5, 3]);
  assert.equal(p.parameterCount, 15);
  assert.deepEqual(g.deferred[0]!.dims, [5, 3]);
  assert.deepEqual(p.unusedKeys(), []);
});
