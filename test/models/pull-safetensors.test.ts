/**
 * kiln pull of diffusers repositories with safetensors weights, against the local fake Hub
 * (fake-hub.ts). The repositories are built from a real diffusers `save_pretrained` folder (the
 * golden SDXL and SD 1.5 pipelines, a few MB of random weights) plus fp16 variant files, sharded
 * weights and the files a pull must leave out (`.bin`, flax, OpenVINO, `vae_1_0/`, an ONNX layout).
 * Only the installed files and kiln-source.json are checked here, not generation.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { float32ToFloat16Bits } from '../../src/engine/float16.js';
import { openSafetensors, readTensorBytes, readTensorFloat32, writeSafetensors, type TensorToWrite } from '../../src/graphs/safetensors.js';
import { componentWeights } from '../../src/graphs/weights.js';
import { BUILTIN_ALIASES, readUserAliases, resolvePullSpec } from '../../src/models/aliases.js';
import { PullError } from '../../src/models/errors.js';
import type { RepoFile } from '../../src/models/hub.js';
import { listModels, safetensorsFamily } from '../../src/models/installed.js';
import { pullModel, type DiffusionManifest, type PullOptions } from '../../src/models/pull.js';
import { chooseLayout } from '../../src/models/select.js';
import { FakeHub } from './fake-hub.js';
import { filler, readTree, tempHome } from './helpers.js';

const GOLDEN = '/work/shared/data/diffusers-golden/pipelines';
const scratch = mkdtempSync(join(tmpdir(), 'kiln-st-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

let hub: FakeHub;
const hfHome = tempHome('kiln-hf-');
let sdxl: Record<string, Buffer>;
let fp16: Record<string, Buffer>;

/** A safetensors file's bytes, written by writeSafetensors. */
function safetensorsBytes(tensors: Record<string, TensorToWrite>): Buffer {
  const path = join(scratch, `t-${Math.random().toString(36).slice(2)}.safetensors`);
  writeSafetensors(path, tensors);
  return readFileSync(path);
}

function openBytes(bytes: Buffer) {
  const path = join(scratch, `r-${Math.random().toString(36).slice(2)}.safetensors`);
  writeFileSync(path, bytes);
  return openSafetensors(path);
}

/** The same tensors in F16: what diffusers' `variant="fp16"` files hold. */
function toFp16(bytes: Buffer): Buffer {
  const file = openBytes(bytes);
  const out: Record<string, TensorToWrite> = {};
  for (const t of file.tensors.values()) out[t.name] = { dtype: 'F16', shape: t.shape, data: float32ToFloat16Bits(readTensorFloat32(file, t)) };
  return safetensorsBytes(out);
}

/** Splits a safetensors file into `<base>-0000i-of-00002.safetensors` shards plus its index (weight_map). */
function shard(bytes: Buffer, base: string, indexName: string): Record<string, Buffer> {
  const file = openBytes(bytes);
  const names = [...file.tensors.keys()].sort();
  const halves = [names.slice(0, names.length >> 1), names.slice(names.length >> 1)];
  const out: Record<string, Buffer> = {};
  const weightMap: Record<string, string> = {};
  halves.forEach((part, i) => {
    const shardName = `${base}-0000${i + 1}-of-00002.safetensors`;
    const tensors: Record<string, TensorToWrite> = {};
    for (const n of part) {
      const t = file.tensors.get(n)!;
      tensors[n] = { dtype: t.dtype, shape: t.shape, data: readTensorBytes(file, t) };
      weightMap[n] = shardName;
    }
    out[shardName] = safetensorsBytes(tensors);
  });
  out[indexName] = Buffer.from(JSON.stringify({ metadata: { total_size: bytes.length }, weight_map: weightMap }, null, 2));
  return out;
}

const prefixed = (folder: string, files: Record<string, Buffer>) => Object.fromEntries(Object.entries(files).map(([k, v]) => [`${folder}/${k}`, v]));

/** What a pull must leave out, shaped like the official SDXL repository. */
function decoys(): Record<string, Buffer> {
  return {
    '.gitattributes': Buffer.from('*.safetensors filter=lfs diff=lfs merge=lfs -text\n'),
    '01.png': filler(3_000, 31),
    'LICENSE.md': Buffer.from('CreativeML Open RAIL++-M License\n'),
    'README.md': Buffer.from('---\nlicense: openrail++\n---\n# golden sdxl as a Hub repository\n'),
    'sd_xl_base_1.0.safetensors': filler(200_000, 32),
    'unet/diffusion_pytorch_model.bin': filler(60_000, 33),
    'unet/diffusion_flax_model.msgpack': filler(60_000, 34),
    'unet/diffusion_pytorch_model.non_ema.safetensors': filler(50_000, 35),
    'unet/openvino_model.xml': Buffer.from('<?xml version="1.0"?><net name="unet"/>\n'),
    'unet/openvino_model.bin': filler(50_000, 36),
    'text_encoder/pytorch_model.bin': filler(20_000, 37),
    'text_encoder/flax_model.msgpack': filler(20_000, 38),
    'vae/diffusion_flax_model.msgpack': filler(20_000, 39),
    'vae/diffusion_pytorch_model.ckpt': filler(20_000, 40),
    'vae_1_0/config.json': Buffer.from('{"_class_name": "AutoencoderKL"}\n'),
    'vae_1_0/diffusion_pytorch_model.safetensors': filler(25_000, 41),
    'vae_1_0/diffusion_pytorch_model.fp16.safetensors': filler(12_000, 42),
    'safety_checker/config.json': Buffer.from('{}\n'),
    'safety_checker/model.safetensors': filler(30_000, 43),
    'feature_extractor/preprocessor_config.json': Buffer.from('{}\n'),
  };
}

/** The golden SDXL pipeline with fp16 files for text_encoder_2, unet and vae (not text_encoder), plus decoys. */
function mixedRepo(): Record<string, Buffer> {
  return {
    ...sdxl,
    'text_encoder_2/model.fp16.safetensors': fp16['text_encoder_2']!,
    'unet/diffusion_pytorch_model.fp16.safetensors': fp16['unet']!,
    'vae/diffusion_pytorch_model.fp16.safetensors': fp16['vae']!,
    ...decoys(),
  };
}

const SHARED = [
  'LICENSE.md',
  'README.md',
  'model_index.json',
  'scheduler/scheduler_config.json',
  'text_encoder/config.json',
  'text_encoder_2/config.json',
  'tokenizer/merges.txt',
  'tokenizer/special_tokens_map.json',
  'tokenizer/tokenizer_config.json',
  'tokenizer/vocab.json',
  'tokenizer_2/merges.txt',
  'tokenizer_2/special_tokens_map.json',
  'tokenizer_2/tokenizer_config.json',
  'tokenizer_2/vocab.json',
  'unet/config.json',
  'vae/config.json',
];
const MIXED_FILES = [
  ...SHARED,
  'kiln-source.json',
  'text_encoder/model.safetensors',
  'text_encoder_2/model.fp16.safetensors',
  'unet/diffusion_pytorch_model.fp16.safetensors',
  'vae/diffusion_pytorch_model.fp16.safetensors',
].sort();

before(async () => {
  sdxl = readTree(join(GOLDEN, 'sdxl'));
  fp16 = {
    text_encoder: toFp16(sdxl['text_encoder/model.safetensors']!),
    text_encoder_2: toFp16(sdxl['text_encoder_2/model.safetensors']!),
    unet: toFp16(sdxl['unet/diffusion_pytorch_model.safetensors']!),
    vae: toFp16(sdxl['vae/diffusion_pytorch_model.safetensors']!),
  };
  hub = await FakeHub.start();
  hub.addRepo('kiln-test/sdxl-mixed', { main: mixedRepo() });
  hub.addRepo('kiln-test/sdxl-plain', { main: { ...sdxl, ...decoys() } });
  hub.addRepo('kiln-test/sd15-st', { main: { ...readTree(join(GOLDEN, 'sd15')), ...decoys() } });

  // Sharded: the unet's plain weights in two shards (and no single file); text_encoder_2's fp16
  // variant sharded with the diffusers/transformers index name, beside its plain single file.
  const sharded: Record<string, Buffer> = { ...sdxl, ...decoys() };
  delete sharded['unet/diffusion_pytorch_model.safetensors'];
  Object.assign(sharded, prefixed('unet', shard(sdxl['unet/diffusion_pytorch_model.safetensors']!, 'diffusion_pytorch_model', 'diffusion_pytorch_model.safetensors.index.json')));
  Object.assign(sharded, prefixed('text_encoder_2', shard(fp16['text_encoder_2']!, 'model.fp16', 'model.safetensors.index.fp16.json')));
  hub.addRepo('kiln-test/sdxl-sharded', { main: sharded });

  // Both forms: Kiln's SDXL ONNX fixture beside the fp16 safetensors (shared files: the golden ones).
  const onnx = readTree(await ensureFixture('sdxl'));
  const both: Record<string, Buffer> = { ...onnx, ...mixedRepo(), 'text_encoder/model.fp16.safetensors': fp16['text_encoder']! };
  hub.addRepo('kiln-test/sdxl-both', { main: both });
  hub.addRepo('stabilityai/stable-diffusion-xl-base-1.0', { main: both });

  // Incomplete: text_encoder_2 has only .bin weights, vae has no config.json, no ONNX.
  const incomplete: Record<string, Buffer> = { ...sdxl, ...decoys(), 'text_encoder_2/pytorch_model.bin': filler(30_000, 44) };
  delete incomplete['text_encoder_2/model.safetensors'];
  delete incomplete['vae/config.json'];
  hub.addRepo('kiln-test/sdxl-incomplete', { main: incomplete });

  // A sharded unet missing its second shard in the listing; and one whose index names a shard the repository lacks.
  const lostShard = { ...sharded };
  delete lostShard['unet/diffusion_pytorch_model-00002-of-00002.safetensors'];
  hub.addRepo('kiln-test/sdxl-lost-shard', { main: lostShard });
  const badIndex = { ...sharded };
  const index = JSON.parse(badIndex['unet/diffusion_pytorch_model.safetensors.index.json']!.toString()) as { weight_map: Record<string, string> };
  index.weight_map['extra.weight'] = 'diffusion_pytorch_model-extra.safetensors';
  badIndex['unet/diffusion_pytorch_model.safetensors.index.json'] = Buffer.from(JSON.stringify(index));
  hub.addRepo('kiln-test/sdxl-bad-index', { main: badIndex });

  // A "safetensors" file that is not one (the Hub's sha256 is of these very bytes).
  hub.addRepo('kiln-test/sdxl-junk', { main: { ...mixedRepo(), 'vae/diffusion_pytorch_model.fp16.safetensors': filler(10_000, 45) } });
});

after(async () => {
  await hub?.close();
});

function opts(home: string, extra: Partial<PullOptions> = {}): PullOptions {
  return { home, env: { HF_ENDPOINT: hub.url, HF_HOME: hfHome }, retryDelayMs: 0, ...extra };
}

const manifestOf = (dir: string) => JSON.parse(readFileSync(join(dir, 'kiln-source.json'), 'utf8')) as DiffusionManifest;
const filesOf = (dir: string) => Object.keys(readTree(dir)).sort();
const isPullError = (code: PullError['code'], re?: RegExp) => (err: unknown) => {
  assert.ok(err instanceof PullError, `expected a PullError, got ${String(err)}`);
  assert.equal(err.code, code, err.message);
  if (re) assert.match(err.message, re);
  return true;
};

test('fp16 variant files are taken where a component has them, the plain file where not; nothing else is fetched', async () => {
  hub.reset();
  const home = tempHome();
  const repo = 'kiln-test/sdxl-mixed';
  const r = await pullModel(repo, opts(home));
  const dir = join(home, 'models', 'sdxl-mixed');
  assert.equal(r.layout, 'safetensors');
  assert.equal(r.variant, 'mixed');
  assert.deepEqual(filesOf(dir), MIXED_FILES);
  const installed = readTree(dir);
  const source = mixedRepo();
  for (const p of MIXED_FILES) if (p !== 'kiln-source.json') assert.ok(installed[p]!.equals(source[p]!), `${p} differs`);
  // Every byte served once, and only for the installed files.
  assert.equal(hub.totalServed(repo), r.totalBytes);
  assert.equal(r.fetchedBytes, r.totalBytes);
  for (const p of Object.keys(source)) if (!MIXED_FILES.includes(p)) assert.equal(hub.bytesServed(repo, p), 0, `${p} must not be downloaded`);
  assert.ok(!existsSync(join(home, 'downloads', 'sdxl-mixed')));

  const m = manifestOf(dir);
  assert.equal(m.kind, 'diffusion');
  assert.equal(m.layout, 'safetensors');
  assert.equal(m.variant, 'mixed');
  assert.deepEqual(m.components, { text_encoder: 'default', text_encoder_2: 'fp16', unet: 'fp16', vae: 'fp16' });
  assert.match(m.files.find((f) => f.path === 'unet/diffusion_pytorch_model.fp16.safetensors')!.sha256!, /^[0-9a-f]{64}$/);

  // kiln models: listed with its family (from unet/config.json) and its size.
  const listed = listModels({ home, builtinDir: null });
  assert.equal(listed.length, 1);
  assert.equal(listed[0]!.name, 'sdxl-mixed');
  assert.equal(listed[0]!.family, 'SDXL');
  assert.equal(listed[0]!.layout, 'safetensors');
  assert.equal(listed[0]!.problem, undefined);
  assert.equal(listed[0]!.bytes, r.totalBytes + statSync(join(dir, 'kiln-source.json')).size);

  // The same commit again: nothing fetched.
  hub.reset();
  const again = await pullModel(repo, opts(home));
  assert.equal(again.upToDate, true);
  assert.equal(again.layout, 'safetensors');
  assert.equal(hub.totalServed(repo), 0);
});

test('without fp16 files the plain weights are installed; an SD 1.5 folder is listed as SD 1.x', async () => {
  hub.reset();
  const home = tempHome();
  const r = await pullModel('kiln-test/sdxl-plain', opts(home));
  assert.equal(r.variant, 'default');
  const plain = [
    ...SHARED,
    'kiln-source.json',
    'text_encoder/model.safetensors',
    'text_encoder_2/model.safetensors',
    'unet/diffusion_pytorch_model.safetensors',
    'vae/diffusion_pytorch_model.safetensors',
  ].sort();
  assert.deepEqual(filesOf(r.dir), plain);
  assert.deepEqual(manifestOf(r.dir).components, { text_encoder: 'default', text_encoder_2: 'default', unet: 'default', vae: 'default' });

  const sd = await pullModel('kiln-test/sd15-st', opts(home));
  assert.deepEqual(filesOf(sd.dir), [
    'LICENSE.md',
    'README.md',
    'kiln-source.json',
    'model_index.json',
    'scheduler/scheduler_config.json',
    'text_encoder/config.json',
    'text_encoder/model.safetensors',
    'tokenizer/merges.txt',
    'tokenizer/special_tokens_map.json',
    'tokenizer/tokenizer_config.json',
    'tokenizer/vocab.json',
    'unet/config.json',
    'unet/diffusion_pytorch_model.safetensors',
    'vae/config.json',
    'vae/diffusion_pytorch_model.safetensors',
  ]);
  assert.deepEqual(
    listModels({ home, builtinDir: null }).map((m) => [m.name, m.family]),
    [
      ['sd15-st', 'SD 1.x'],
      ['sdxl-plain', 'SDXL'],
    ],
  );
  // SD 2.x is told by its 1024-wide cross-attention; a folder missing a component's weights is broken.
  const sd2 = join(scratch, 'sd2');
  cpSync(sd.dir, sd2, { recursive: true });
  const unetConfig = JSON.parse(readFileSync(join(sd2, 'unet/config.json'), 'utf8')) as Record<string, unknown>;
  writeFileSync(join(sd2, 'unet/config.json'), JSON.stringify({ ...unetConfig, cross_attention_dim: 1024 }));
  assert.deepEqual(safetensorsFamily(sd2), { family: 'SD 2.x' });
  rmSync(join(sd2, 'vae/diffusion_pytorch_model.safetensors'));
  const broken = safetensorsFamily(sd2)!;
  assert.equal(broken.family, 'broken');
  assert.match(broken.problem!, /not a complete diffusers safetensors layout: missing vae\/diffusion_pytorch_model\.safetensors$/);
});

test('sharded weights: the index and the shards it names; a variant index is installed under the name the weight reader reads', async () => {
  hub.reset();
  const home = tempHome();
  const r = await pullModel('kiln-test/sdxl-sharded', opts(home));
  assert.deepEqual(filesOf(r.dir), [
    ...SHARED,
    'kiln-source.json',
    'text_encoder/model.safetensors',
    'text_encoder_2/model.fp16-00001-of-00002.safetensors',
    'text_encoder_2/model.fp16-00002-of-00002.safetensors',
    'text_encoder_2/model.fp16.safetensors.index.json',
    'unet/diffusion_pytorch_model-00001-of-00002.safetensors',
    'unet/diffusion_pytorch_model-00002-of-00002.safetensors',
    'unet/diffusion_pytorch_model.safetensors.index.json',
    'vae/diffusion_pytorch_model.safetensors',
  ].sort());
  assert.equal(hub.bytesServed('kiln-test/sdxl-sharded', 'text_encoder_2/model.safetensors'), 0, 'the other precision is not fetched');
  const m = manifestOf(r.dir);
  assert.deepEqual(m.components, { text_encoder: 'default', text_encoder_2: 'fp16', unet: 'default', vae: 'default' });
  assert.equal(m.files.find((f) => f.path === 'text_encoder_2/model.fp16.safetensors.index.json')!.from, 'text_encoder_2/model.safetensors.index.fp16.json');
  assert.deepEqual(safetensorsFamily(r.dir), { family: 'SDXL' }, 'the installed shard names read as a complete layout');
  // The installed folders read as the same tensors through Kiln's weight reader.
  for (const [c, original] of [['unet', sdxl['unet/diffusion_pytorch_model.safetensors']!], ['text_encoder_2', fp16['text_encoder_2']!]] as const) {
    const w = componentWeights(join(r.dir, c), c);
    assert.deepEqual(w.keys().sort(), [...openBytes(original).tensors.keys()].sort(), c);
  }
});

test('both forms: auto takes the (smaller) fp16 safetensors layout, --format onnx the ONNX one; a forced format re-pulls', async () => {
  hub.reset();
  const home = tempHome();
  const repo = 'kiln-test/sdxl-both';
  const plan = await pullModel(repo, opts(home, { dryRun: true }));
  assert.equal(plan.layout, 'safetensors');
  assert.equal(plan.variant, 'fp16');
  assert.equal(hub.totalServed(repo), 0);

  const st = await pullModel(repo, opts(home));
  assert.equal(st.layout, 'safetensors');
  const stFiles = [
    ...SHARED,
    'kiln-source.json',
    'text_encoder/model.fp16.safetensors',
    'text_encoder_2/model.fp16.safetensors',
    'unet/diffusion_pytorch_model.fp16.safetensors',
    'vae/diffusion_pytorch_model.fp16.safetensors',
  ].sort();
  assert.deepEqual(filesOf(st.dir), stFiles);
  assert.equal(manifestOf(st.dir).variant, 'fp16');

  // The same name with --format onnx: the ONNX layout replaces it (it is not "up to date").
  const onnx = await pullModel(repo, opts(home, { format: 'onnx' }));
  assert.equal(onnx.upToDate, false);
  assert.equal(onnx.layout, 'onnx');
  assert.deepEqual(filesOf(onnx.dir), [
    ...SHARED,
    'kiln-source.json',
    'text_encoder/model.onnx',
    'text_encoder_2/model.onnx',
    'unet/model.onnx',
    'unet/model.onnx_data',
    'vae_1_0/config.json',
    'vae_decoder/config.json',
    'vae_decoder/model.onnx',
    'vae_encoder/config.json',
    'vae_encoder/model.onnx',
  ].sort());
  assert.equal(manifestOf(onnx.dir).layout, 'onnx');
  assert.equal(listModels({ home, builtinDir: null })[0]!.family, 'SDXL');
  // auto accepts either layout of the same commit; --format safetensors swaps back.
  assert.equal((await pullModel(repo, opts(home))).upToDate, true);
  const back = await pullModel(repo, opts(home, { format: 'safetensors' }));
  assert.equal(back.upToDate, false);
  assert.deepEqual(filesOf(back.dir), stFiles);
});

test('the built-in be-stable-diffusion-xl-base-1.0 alias fetches the fp16 safetensors of the official repository', async () => {
  hub.reset();
  const home = tempHome();
  const alias = BUILTIN_ALIASES['be-stable-diffusion-xl-base-1.0']!;
  assert.equal(alias.format, 'safetensors');
  assert.equal(alias.size, '~6.9 GB');
  assert.equal(resolvePullSpec('be-stable-diffusion-xl-base-1.0', home).format, 'safetensors');
  const r = await pullModel('be-stable-diffusion-xl-base-1.0', opts(home));
  assert.equal(r.layout, 'safetensors');
  assert.equal(r.variant, 'fp16');
  assert.equal(manifestOf(r.dir).alias, 'be-stable-diffusion-xl-base-1.0');
  assert.equal(hub.bytesServed('stabilityai/stable-diffusion-xl-base-1.0', 'unet/model.onnx_data'), 0);

  // The official repository's shape (real sizes): the fp16 files make about 6.94 GB.
  const lfs = (path: string, size: number): RepoFile => ({ path, size, lfs: { oid: 'a'.repeat(64), size } });
  const git = (path: string, size = 500): RepoFile => ({ path, size, oid: 'b'.repeat(40) });
  const listing: RepoFile[] = [
    git('LICENSE.md'), git('README.md'), git('model_index.json'), lfs('sd_xl_base_1.0.safetensors', 6.94e9), git('scheduler/scheduler_config.json'),
    git('text_encoder/config.json'), lfs('text_encoder/model.safetensors', 4.92e8), lfs('text_encoder/model.fp16.safetensors', 2.46e8),
    lfs('text_encoder/model.onnx', 4.92e8), lfs('text_encoder/flax_model.msgpack', 4.92e8), lfs('text_encoder/openvino_model.bin', 4.92e8),
    git('text_encoder_2/config.json'), lfs('text_encoder_2/model.safetensors', 2.78e9), lfs('text_encoder_2/model.fp16.safetensors', 1.39e9),
    lfs('text_encoder_2/model.onnx', 1.2e6), lfs('text_encoder_2/model.onnx_data', 2.78e9),
    git('tokenizer/merges.txt', 5.2e5), git('tokenizer/vocab.json', 1.06e6), git('tokenizer_2/merges.txt', 5.2e5), git('tokenizer_2/vocab.json', 1.06e6),
    git('unet/config.json'), lfs('unet/diffusion_pytorch_model.safetensors', 1.03e10), lfs('unet/diffusion_pytorch_model.fp16.safetensors', 5.14e9),
    lfs('unet/diffusion_flax_model.msgpack', 1.03e10), lfs('unet/model.onnx', 7.29e6), lfs('unet/model.onnx_data', 1.03e10),
    git('vae/config.json'), lfs('vae/diffusion_pytorch_model.safetensors', 3.35e8), lfs('vae/diffusion_pytorch_model.fp16.safetensors', 1.67e8),
    git('vae_1_0/config.json'), lfs('vae_1_0/diffusion_pytorch_model.safetensors', 3.35e8), lfs('vae_1_0/diffusion_pytorch_model.fp16.safetensors', 1.67e8),
    git('vae_decoder/config.json'), lfs('vae_decoder/model.onnx', 1.98e8), git('vae_encoder/config.json'), lfs('vae_encoder/model.onnx', 1.37e8),
  ];
  const chosen = chooseLayout(listing, 'auto', 'stabilityai/stable-diffusion-xl-base-1.0@main');
  assert.equal(chosen.format, 'safetensors');
  const weights = chosen.files.filter((f) => f.role === 'weights').map((f) => f.path).sort();
  assert.deepEqual(weights, [
    'text_encoder/model.fp16.safetensors',
    'text_encoder_2/model.fp16.safetensors',
    'unet/diffusion_pytorch_model.fp16.safetensors',
    'vae/diffusion_pytorch_model.fp16.safetensors',
  ]);
  const total = chosen.files.reduce((s, f) => s + f.size, 0);
  assert.ok(total > 6.94e9 && total < 6.95e9, String(total));
  assert.equal(chooseLayout(listing, 'onnx', 'x').format, 'onnx');
});

test('a repository with neither layout complete is refused before any download, naming what is missing', async () => {
  hub.reset();
  const home = tempHome();
  const repo = 'kiln-test/sdxl-incomplete';
  await assert.rejects(
    pullModel(repo, opts(home)),
    isPullError(
      'layout',
      /kiln-test\/sdxl-incomplete@main is not a usable diffusers ONNX layout: missing text_encoder\/model\.onnx, unet\/model\.onnx, vae_decoder\/model\.onnx, text_encoder_2\/model\.onnx\. Its PyTorch\/safetensors weights are not a complete diffusers safetensors layout either: missing text_encoder_2\/model\.safetensors, vae\/config\.json\. Kiln reads safetensors weights only, not the \.bin files in text_encoder_2\/\./,
    ),
  );
  await assert.rejects(
    pullModel(repo, opts(home, { format: 'safetensors' })),
    isPullError('layout', /^kiln-test\/sdxl-incomplete@main is not a complete diffusers safetensors layout: missing text_encoder_2\/model\.safetensors, vae\/config\.json\./),
  );
  // --format onnx on a complete safetensors repository says how to pull it.
  await assert.rejects(
    pullModel('kiln-test/sdxl-plain', opts(home, { format: 'onnx' })),
    isPullError('layout', /not a usable diffusers ONNX layout: missing .* Its diffusers safetensors layout is complete: pull it with --format safetensors/),
  );
  await assert.rejects(
    pullModel('kiln-test/sdxl-lost-shard', opts(home)),
    isPullError('layout', /missing unet\/diffusion_pytorch_model-00002-of-00002\.safetensors\./),
  );
  assert.equal(hub.totalServed(repo) + hub.totalServed('kiln-test/sdxl-plain') + hub.totalServed('kiln-test/sdxl-lost-shard'), 0, 'nothing downloaded');

  // An index naming a shard the repository lacks: found once the (small) index is read, before the weights.
  await assert.rejects(
    pullModel('kiln-test/sdxl-bad-index', opts(home)),
    isPullError('layout', /diffusion_pytorch_model\.safetensors\.index\.json lists the shard unet\/diffusion_pytorch_model-extra\.safetensors, which the repository does not have/),
  );
  assert.equal(hub.bytesServed('kiln-test/sdxl-bad-index', 'unet/diffusion_pytorch_model-00001-of-00002.safetensors'), 0);
  // A weights file that is not safetensors fails the pull, not the first conversion.
  await assert.rejects(
    pullModel('kiln-test/sdxl-junk', opts(home)),
    isPullError('layout', /vae\/diffusion_pytorch_model\.fp16\.safetensors is not a valid safetensors file/),
  );
  assert.deepEqual(readdirSync(join(home, 'models')), []);
  assert.deepEqual(readdirSync(join(home, 'downloads')).filter((n) => !n.startsWith('.')), [], 'a layout failure leaves no partial download');
});

test('sha256 is checked: a corrupted weights file is refused, nothing is installed, and a later pull completes', async () => {
  hub.reset();
  const home = tempHome();
  const repo = 'kiln-test/sdxl-mixed';
  hub.corrupt.add(`${repo}/unet/diffusion_pytorch_model.fp16.safetensors`);
  await assert.rejects(pullModel(repo, opts(home)), isPullError('integrity', /unet\/diffusion_pytorch_model\.fp16\.safetensors: sha256 mismatch/));
  assert.deepEqual(readdirSync(join(home, 'models')), []);
  const staging = join(home, 'downloads', 'sdxl-mixed');
  assert.ok(!existsSync(join(staging, 'unet/diffusion_pytorch_model.fp16.safetensors')));
  assert.ok(!existsSync(join(staging, 'unet/diffusion_pytorch_model.fp16.safetensors.incomplete')));
  hub.reset();
  const r = await pullModel(repo, opts(home));
  assert.deepEqual(filesOf(r.dir), MIXED_FILES);
});

test('an interrupted safetensors download resumes with a range request; no byte is fetched twice', async () => {
  hub.reset();
  const home = tempHome();
  const repo = 'kiln-test/sdxl-mixed';
  const path = 'unet/diffusion_pytorch_model.fp16.safetensors';
  const size = fp16['unet']!.length;
  const cut = 100_000;
  assert.ok(size > cut);
  hub.cutAfter.set(`${repo}/${path}`, cut);
  await assert.rejects(pullModel(repo, opts(home, { retries: 0 })), isPullError('network', /resume/));
  assert.ok(!existsSync(join(home, 'models', 'sdxl-mixed')));
  assert.equal(statSync(join(home, 'downloads', 'sdxl-mixed', `${path}.incomplete`)).size, cut);
  const servedFirst = hub.totalServed(repo);

  const r = await pullModel(repo, opts(home));
  assert.equal(hub.bytesServed(repo, path), size);
  assert.ok(hub.requests.some((q) => q.range === `bytes=${cut}-`));
  assert.equal(hub.totalServed(repo), r.totalBytes);
  assert.equal(r.fetchedBytes, r.totalBytes - servedFirst);
  assert.ok(readFileSync(join(r.dir, path)).equals(fp16['unet']!));
});

test('aliases.json "format": validated, and it forces the layout', async () => {
  const home = tempHome();
  writeFileSync(join(home, 'aliases.json'), JSON.stringify({ 'xl-onnx': { repo: 'kiln-test/sdxl-both', format: 'onnx' } }));
  assert.deepEqual(readUserAliases(home)['xl-onnx'], { repo: 'kiln-test/sdxl-both', revision: undefined, format: 'onnx' });
  hub.reset();
  const r = await pullModel('xl-onnx', opts(home, { dryRun: true }));
  assert.equal(r.layout, 'onnx');
  assert.ok(r.files.some((f) => f.path === 'unet/model.onnx'));
  const bad = (value: unknown, re: RegExp) => {
    writeFileSync(join(home, 'aliases.json'), JSON.stringify({ x: value }));
    assert.throws(() => readUserAliases(home), (e: unknown) => e instanceof PullError && e.code === 'alias-file' && re.test(e.message));
  };
  bad({ repo: 'a/b', format: 'gguf' }, /"format" is one of onnx, safetensors/);
  bad({ repo: 'a/b', files: ['x.onnx'], format: 'onnx' }, /"format" is for diffusion aliases/);
});

test('kiln pull --format on the command line', async () => {
  const home = tempHome();
  const run = promisify(execFile);
  const main = join(import.meta.dirname, '..', '..', 'src', 'cli', 'main.ts');
  const env = { PATH: process.env.PATH, HOME: home, KILN_HOME: home, HF_HOME: join(home, 'hf'), HF_ENDPOINT: hub.url };
  const kiln = async (args: string[]) => {
    try {
      const { stdout, stderr } = await run(process.execPath, ['--import', 'tsx', main, ...args], { env, timeout: 60_000 });
      return { code: 0, stdout, stderr };
    } catch (err) {
      const e = err as { code?: number; stdout?: string; stderr?: string };
      return { code: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
    }
  };
  const [dry, bad] = await Promise.all([
    kiln(['pull', 'kiln-test/sdxl-both', '--dry-run', '--format', 'onnx']),
    kiln(['pull', 'kiln-test/sdxl-both', '--format', 'gguf']),
  ]);
  assert.equal(dry.code, 0, dry.stderr);
  assert.match(dry.stdout, /would install kiln-test\/sdxl-both@main \(commit [0-9a-f]{7}\) \(onnx\) into /);
  assert.match(dry.stdout, /^ {2}unet\/model\.onnx_data /m);
  assert.doesNotMatch(dry.stdout, /\.safetensors/);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /--format is one of auto, onnx, safetensors/);
});
