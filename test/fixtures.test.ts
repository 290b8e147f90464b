/**
 * The fixture builder: every variant opens in onnxruntime-node with exactly the contract of the
 * layout it mimics (names, dtypes, ranks, output order), runs with correctly typed feeds, keeps
 * its external data beside it, and builds byte-identically.
 *
 * Expectations are written out by hand from shared/reference/onnx-model-contracts.md, not derived
 * from the builder's own tables, so a builder change that breaks a contract fails here.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import * as ort from 'onnxruntime-node';
import {
  ALL_FIXTURE_VARIANTS,
  FIXTURE_VARIANTS,
  buildFixture,
  builderVersionHash,
  ensureFixture,
  type FixtureVariant,
} from '../tools/fixtures/variants.js';
import { decodeModel, fromFloat16Array, toFloat16Array, float32ToFloat16Bits, float16BitsToFloat32 } from '../tools/fixtures/onnx-builder.js';

// ---------------------------------------------------------------------------------------------
// The contracts, by hand.
//
// Shape strings: a number is a fixed size; B, S, H, W (capitals) are any symbolic dim; `?` is
// anything; a lowercase word is that exact symbolic name. '' is rank 0.

type Io = [name: string, type: string, shape: string];
interface ModelContract {
  inputs: Io[];
  outputs: Io[];
  /** Name of the external-data file beside model.onnx, if any. */
  external?: string;
}
type Contract = Record<string, ModelContract>;

const te = (ids: string, d: number, f = 'float32', hidden = 0): ModelContract => ({
  inputs: [['input_ids', ids, 'B,S']],
  outputs: [
    ['last_hidden_state', f, `B,S,${d}`],
    ['pooler_output', f, `B,${d}`],
    ...Array.from({ length: hidden }, (_, k): Io => [`hidden_states.${k}`, f, `B,S,${d}`]),
  ],
});
const te2 = (d: number, p: string, hidden: number): ModelContract => ({
  inputs: [['input_ids', 'int64', 'B,S']],
  outputs: [
    ['text_embeds', 'float32', `B,${p}`],
    ['last_hidden_state', 'float32', `B,S,${d}`],
    ...Array.from({ length: hidden }, (_, k): Io => [`hidden_states.${k}`, 'float32', `B,S,${d}`]),
  ],
});
const unet = (timestep: Io, d: number, f = 'float32', extra: Io[] = []): ModelContract => ({
  inputs: [['sample', f, 'B,?,H,W'], timestep, ['encoder_hidden_states', f, `B,S,${d}`], ...extra],
  outputs: [['out_sample', f, 'B,?,H,W']],
});
const vaeEnc = (out: 'latent_sample' | 'latent_parameters', f = 'float32'): ModelContract => ({
  inputs: [['sample', f, 'B,?,H,W']],
  outputs: [[out, f, 'B,?,H,W']],
});
const vaeDec = (f = 'float32'): ModelContract => ({ inputs: [['latent_sample', f, 'B,?,H,W']], outputs: [['sample', f, 'B,?,H,W']] });
const ext = (m: ModelContract, file: string): ModelContract => ({ ...m, external: file });

const SDXL_EXTRA: Io[] = [
  ['text_embeds', 'float32', 'B,16'],
  ['time_ids', 'float32', 'B,6'],
];

const CONTRACTS: Record<FixtureVariant, Contract> = {
  'sd15-legacy': {
    text_encoder: te('int32', 16),
    unet: ext(unet(['timestep', 'int64', 'batch'], 16), 'weights.pb'),
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
  'sd15-optimum': {
    text_encoder: te('int32', 16),
    unet: ext(unet(['timestep', 'int64', 'steps'], 16), 'model.onnx_data'),
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
  'sd15-optimum124': {
    text_encoder: te('int64', 16),
    unet: ext(unet(['timestep', 'float32', ''], 16), 'model.onnx_data'),
    vae_encoder: vaeEnc('latent_parameters'),
    vae_decoder: vaeDec(),
  },
  'sd15-fp16io': {
    text_encoder: te('int32', 16, 'float16'),
    unet: unet(['timestep', 'float16', '1'], 16, 'float16'),
    vae_encoder: vaeEnc('latent_sample', 'float16'),
    vae_decoder: vaeDec('float16'),
  },
  'sd15-external-data': {
    text_encoder: ext(te('int32', 16), 'model.onnx.data'),
    unet: ext(unet(['timestep', 'float32', 'B'], 16), 'model.onnx.data'),
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
  sdxl: {
    text_encoder: te('int32', 8, 'float32', 3),
    text_encoder_2: te2(12, '?', 3), // declared `sequence_length` (optimum's mislabel); ORT reports 16
    unet: ext(unet(['timestep', 'int64', 'steps'], 20, 'float32', SDXL_EXTRA), 'model.onnx_data'),
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
  'sdxl-turbo': {
    text_encoder: te('int32', 8, 'float32', 3),
    text_encoder_2: ext(te2(12, '16', 3), 'model.onnx.data'),
    unet: ext(unet(['timestep', 'float32', 'B'], 20, 'float32', SDXL_EXTRA), 'model.onnx.data'),
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
  'sdxl-refiner': {
    text_encoder_2: te2(12, '?', 3),
    unet: ext(
      unet(['timestep', 'int64', 'steps'], 12, 'float32', [
        ['text_embeds', 'float32', 'B,16'],
        ['time_ids', 'float32', 'B,5'],
      ]),
      'model.onnx_data',
    ),
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
  lcm: {
    text_encoder: te('int32', 16),
    unet: ext(unet(['timestep', 'int64', 'steps'], 16, 'float32', [['timestep_cond', 'float32', 'B,256']]), 'model.onnx_data'),
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
  'sd-turbo': {
    text_encoder: te('int32', 1024),
    unet: unet(['timestep', 'float32', '1'], 1024),
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
};

// ---------------------------------------------------------------------------------------------
// Helpers

type Meta = ort.InferenceSession.ValueMetadata;

function assertShape(meta: Meta, expected: Io, where: string): void {
  assert.ok(meta.isTensor, `${where}: ${meta.name} is a tensor`);
  const [name, type, shape] = expected;
  assert.equal(meta.name, name, where);
  assert.equal(meta.type, type, `${where}: ${name} dtype`);
  const want = shape === '' ? [] : shape.split(',');
  assert.equal(meta.shape.length, want.length, `${where}: ${name} rank (got [${meta.shape}])`);
  want.forEach((w, i) => {
    const got = meta.shape[i];
    if (w === '?') return;
    if (/^\d+$/.test(w)) assert.equal(got, Number(w), `${where}: ${name} dim ${i}`);
    else if (/^[A-Z]$/.test(w)) assert.equal(typeof got, 'string', `${where}: ${name} dim ${i} should be symbolic, got ${got}`);
    else assert.equal(got, w, `${where}: ${name} dim ${i}`);
  });
}

/** Sizes used for symbolic dims: odd latent sizes to prove h, w need not be even. */
const SIZES = { batch: 2, seq: 77, h: 5, w: 7 };

function tensor(type: string, dims: number[], fill: (i: number) => number): ort.Tensor {
  const n = dims.reduce((a, b) => a * b, 1);
  const values = Array.from({ length: n }, (_, i) => fill(i));
  switch (type) {
    case 'float32':
      return new ort.Tensor('float32', Float32Array.from(values), dims);
    case 'float16':
      return new ort.Tensor('float16', toFloat16Array(values), dims);
    case 'int32':
      return new ort.Tensor('int32', Int32Array.from(values), dims);
    case 'int64':
      return new ort.Tensor('int64', BigInt64Array.from(values.map((v) => BigInt(Math.round(v)))), dims);
    default:
      throw new Error(`no feed for ${type}`);
  }
}

function floats(t: ort.Tensor): Float32Array {
  if (t.type === 'float16') return fromFloat16Array(t.data as Uint16Array);
  assert.equal(t.type, 'float32');
  return t.data as Float32Array;
}

function assertFinite(t: ort.Tensor, what: string): void {
  for (const v of floats(t)) assert.ok(Number.isFinite(v), `${what}: non-finite value`);
}

/** CLIP-like ids: BOS, a few tokens, EOS, then padding. */
function promptIds(i: number, seq: number, variantSalt = 0): number {
  const pos = i % seq;
  const row = Math.floor(i / seq);
  if (pos === 0) return 49406;
  if (pos < 5) return 320 + 37 * pos + 101 * row + variantSalt;
  return 49407;
}

/** Feeds for every input of a session, from its metadata alone (as the engine must do). */
function feedsFor(
  session: ort.InferenceSession,
  kind: string,
  overrides: Record<string, (i: number) => number> = {},
  sizes: typeof SIZES = SIZES,
): Record<string, ort.Tensor> {
  const feeds: Record<string, ort.Tensor> = {};
  for (const m of session.inputMetadata) {
    assert.ok(m.isTensor);
    const dims = m.shape.map((d, axis) => {
      if (typeof d === 'number') return d;
      if (kind === 'vae_encoder') return [1, 3, 8 * sizes.h, 8 * sizes.w][axis]!;
      if (kind === 'vae_decoder') return [1, 4, sizes.h, sizes.w][axis]!;
      if (m.name === 'input_ids') return [sizes.batch, sizes.seq][axis]!;
      if (m.name === 'timestep') return sizes.batch;
      if (m.name === 'sample') return [sizes.batch, 4, sizes.h, sizes.w][axis]!;
      if (m.name === 'encoder_hidden_states') return [sizes.batch, sizes.seq][axis]!;
      return sizes.batch;
    });
    const fill =
      overrides[m.name] ??
      (m.name === 'input_ids'
        ? (i: number) => promptIds(i, dims[1]!)
        : m.name === 'timestep'
          ? () => 981
          : m.name === 'time_ids'
            ? (i: number) => [1024, 1024, 0, 0, 1024, 1024][i % 6]!
            : (i: number) => Math.sin(i * 0.37 + 0.1));
    feeds[m.name] = tensor(m.type, dims, fill);
  }
  return feeds;
}

const execFileAsync = promisify(execFile);

const tmpRoot = mkdtempSync(join(tmpdir(), 'kiln-fixtures-'));
after(() => rmSync(tmpRoot, { recursive: true, force: true }));

const sessions: ort.InferenceSession[] = [];
after(async () => {
  await Promise.all(sessions.map((s) => s.release()));
});
async function open(path: string): Promise<ort.InferenceSession> {
  const s = await ort.InferenceSession.create(path);
  sessions.push(s);
  return s;
}

function listFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const name of readdirSync(d).sort()) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else out.push(relative(dir, p));
    }
  };
  walk(dir);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Per variant

test('every variant has a contract here', () => {
  assert.deepEqual([...ALL_FIXTURE_VARIANTS].sort(), Object.keys(CONTRACTS).sort());
  for (const v of FIXTURE_VARIANTS) assert.ok(ALL_FIXTURE_VARIANTS.includes(v));
});

for (const variant of ALL_FIXTURE_VARIANTS) {
  describe(`fixture ${variant}`, () => {
    const dir = join(tmpRoot, variant);
    const contract = CONTRACTS[variant];
    let buildMs = 0;

    before(async () => {
      const t0 = performance.now();
      await buildFixture(variant, dir);
      buildMs = performance.now() - t0;
    });

    test('builds fast and small, with the diffusers folder layout', () => {
      assert.ok(buildMs < 1000, `build took ${buildMs.toFixed(0)} ms`);
      const files = listFiles(dir);
      let bytes = 0;
      const inodes = new Set<number>();
      for (const f of files) {
        const st = statSync(join(dir, f));
        if (!inodes.has(st.ino)) bytes += st.size;
        inodes.add(st.ino);
      }
      assert.ok(bytes < 3e6, `${(bytes / 1e6).toFixed(2)} MB`);
      for (const f of ['model_index.json', 'scheduler/scheduler_config.json']) assert.ok(files.includes(f), f);
      for (const folder of Object.keys(contract)) {
        const expected = ['config.json', 'model.onnx', ...(contract[folder]!.external ? [contract[folder]!.external!] : [])].sort();
        assert.deepEqual(readdirSync(join(dir, folder)).sort(), expected, `${folder}/ holds exactly its files`);
      }
      const tokenizers = variant === 'sdxl-refiner' ? ['tokenizer_2'] : contract.text_encoder_2 ? ['tokenizer', 'tokenizer_2'] : ['tokenizer'];
      for (const t of tokenizers) {
        assert.deepEqual(readdirSync(join(dir, t)).sort(), ['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json']);
        const cfg = JSON.parse(readFileSync(join(dir, t, 'tokenizer_config.json'), 'utf8'));
        assert.equal(cfg.model_max_length, 77);
        // SDXL's tokenizer_2 and SD2.x's tokenizer pad with "!" (id 0); CLIP ViT-L with <|endoftext|>.
        const pad = typeof cfg.pad_token === 'string' ? cfg.pad_token : cfg.pad_token.content; // AddedToken in older files
        assert.equal(pad, t === 'tokenizer_2' || variant === 'sd-turbo' ? '!' : '<|endoftext|>');
      }
    });

    test('model_index.json, scheduler and component configs', () => {
      const read = (p: string) => JSON.parse(readFileSync(join(dir, p), 'utf8'));
      const index = read('model_index.json');
      assert.match(index._diffusers_version, /^\d+\.\d+\.\d+/);
      const cls: Record<FixtureVariant, string> = {
        'sd15-legacy': 'OnnxStableDiffusionPipeline',
        'sd15-optimum': 'StableDiffusionPipeline',
        'sd15-optimum124': 'StableDiffusionPipeline',
        'sd15-fp16io': 'OnnxStableDiffusionPipeline',
        'sd15-external-data': 'OnnxStableDiffusionPipeline',
        sdxl: 'StableDiffusionXLPipeline',
        'sdxl-turbo': 'StableDiffusionXLPipeline',
        'sdxl-refiner': 'StableDiffusionXLImg2ImgPipeline',
        lcm: 'LatentConsistencyModelPipeline',
        'sd-turbo': 'OnnxStableDiffusionPipeline',
      };
      assert.equal(index._class_name, cls[variant]);
      for (const [k, v] of Object.entries(index)) if (!k.startsWith('_') && Array.isArray(v)) assert.equal(v.length, 2, k);
      for (const folder of Object.keys(contract)) {
        // Every ONNX folder is either named in the index or is the VAE pair behind a `vae` entry.
        assert.ok(folder in index || (folder.startsWith('vae_') && 'vae' in index), `${folder} in model_index.json`);
      }

      const sched = read('scheduler/scheduler_config.json');
      const expectScheduler: Record<FixtureVariant, [string, string | undefined]> = {
        'sd15-legacy': ['PNDMScheduler', undefined],
        'sd15-optimum': ['PNDMScheduler', undefined],
        'sd15-optimum124': ['PNDMScheduler', undefined],
        'sd15-fp16io': ['PNDMScheduler', undefined],
        'sd15-external-data': ['PNDMScheduler', undefined],
        sdxl: ['EulerDiscreteScheduler', 'leading'],
        'sdxl-turbo': ['EulerAncestralDiscreteScheduler', 'trailing'],
        'sdxl-refiner': ['EulerDiscreteScheduler', 'leading'],
        lcm: ['LCMScheduler', undefined],
        'sd-turbo': ['EulerDiscreteScheduler', 'trailing'],
      };
      const [schedClass, spacing] = expectScheduler[variant];
      assert.equal(sched._class_name, schedClass);
      if (spacing) assert.equal(sched.timestep_spacing, spacing);
      assert.equal(sched.beta_schedule, 'scaled_linear');
      assert.equal(sched.beta_start, 0.00085);
      assert.equal(sched.beta_end, 0.012);
      assert.equal(sched.steps_offset, 1);
      if (schedClass === 'PNDMScheduler') assert.equal(sched.skip_prk_steps, true);
      if (schedClass === 'LCMScheduler') assert.equal(sched.original_inference_steps, 50);

      const xl = variant.startsWith('sdxl');
      for (const v of ['vae_encoder', 'vae_decoder']) {
        const c = read(`${v}/config.json`);
        assert.equal(c.scaling_factor, xl ? 0.13025 : 0.18215);
        if (xl) assert.equal(c.force_upcast, true);
      }
      const u = read('unet/config.json');
      assert.equal(u.in_channels, 4);
      assert.equal(typeof u.sample_size, 'number');
      assert.equal(u.time_cond_proj_dim, variant === 'lcm' ? 256 : null);
      if (contract.text_encoder) assert.equal(read('text_encoder/config.json').hidden_size, variant === 'sd-turbo' ? 1024 : xl ? 8 : 16);
    });

    test('sessions expose the contract: names, order, dtypes, ranks', async () => {
      for (const [folder, m] of Object.entries(contract)) {
        const s = await open(join(dir, folder, 'model.onnx'));
        assert.deepEqual(s.inputNames, m.inputs.map((io) => io[0]), `${folder} input order`);
        assert.deepEqual(s.outputNames, m.outputs.map((io) => io[0]), `${folder} output order`);
        m.inputs.forEach((io, i) => assertShape(s.inputMetadata[i]!, io, `${variant}/${folder} input`));
        m.outputs.forEach((io, i) => assertShape(s.outputMetadata[i]!, io, `${variant}/${folder} output`));
      }
    });

    if (variant === 'sdxl' || variant === 'sdxl-refiner') {
      test("text_embeds keeps optimum's mislabelled axis in the graph (ORT's metadata shows the inferred size)", () => {
        const model = decodeModel(readFileSync(join(dir, 'text_encoder_2', 'model.onnx')));
        const out = (model.graph?.output ?? []).find((o) => o.name === 'text_embeds')!;
        assert.deepEqual(out.type!.tensorType!.shape!.dim!.map((d) => d.dimParam || Number(d.dimValue)), ['batch_size', 'sequence_length']);
      });
    }

    test('each sub-model runs with typed feeds and gives the expected shapes', async () => {
      for (const [folder, m] of Object.entries(contract)) {
        const s = await open(join(dir, folder, 'model.onnx'));
        const kind = folder.replace(/_2$/, '');
        const out = await s.run(feedsFor(s, kind));
        for (const [name, type] of m.outputs) {
          const t = out[name]!;
          assert.equal(t.type, type, `${folder}/${name}`);
          assertFinite(t, `${variant}/${folder}/${name}`);
          const { batch: b, seq, h, w } = SIZES;
          const d = Number(m.outputs.find((o) => o[0] === 'last_hidden_state')?.[2].split(',').at(-1));
          const want: Record<string, number[]> = {
            last_hidden_state: [b, seq, d],
            pooler_output: [b, d],
            text_embeds: [b, 16],
            out_sample: [b, 4, h, w],
            latent_sample: [1, 4, h, w],
            latent_parameters: [1, 8, h, w],
            sample: [1, 3, 8 * h, 8 * w],
          };
          const expected = name.startsWith('hidden_states.') ? want.last_hidden_state : want[name];
          assert.deepEqual(t.dims, expected, `${variant}/${folder}/${name} dims`);
        }
      }
    });

    const externals = Object.entries(contract).filter(([, m]) => m.external);
    if (externals.length) {
      test('external data: side file under its producer name, EXTERNAL tensors, works after a move', async () => {
        for (const [folder, m] of externals) {
          const model = decodeModel(readFileSync(join(dir, folder, 'model.onnx')));
          const ext = (model.graph?.initializer ?? []).filter((t) => t.dataLocation === 1);
          assert.ok(ext.length > 0, `${folder} has external tensors`);
          const dataSize = statSync(join(dir, folder, m.external!)).size;
          for (const t of ext) {
            const kv = Object.fromEntries((t.externalData ?? []).map((e) => [e.key, e.value]));
            assert.equal(kv.location, m.external, 'relative location, just the file name');
            assert.ok(Number(kv.offset) + Number(kv.length) <= dataSize);
            assert.ok(!t.rawData || t.rawData.length === 0, 'no inline bytes as well');
          }
        }
        // Move the whole folder: locations are relative to model.onnx, so it still loads.
        const moved = join(tmpRoot, `${variant}-moved`);
        const copy = join(tmpRoot, `${variant}-copy`);
        await buildFixture(variant, copy);
        renameSync(copy, moved);
        for (const [folder] of externals) {
          const s = await open(join(moved, folder, 'model.onnx'));
          await s.run(feedsFor(s, folder.replace(/_2$/, '')));
        }
        // And without its side file it must not load.
        rmSync(join(moved, externals[0]![0], externals[0]![1].external!));
        await assert.rejects(ort.InferenceSession.create(join(moved, externals[0]![0], 'model.onnx')));
      });
    }

    test('two builds are byte-identical', async () => {
      const again = join(tmpRoot, `${variant}-again`);
      await buildFixture(variant, again);
      const a = listFiles(dir);
      assert.deepEqual(listFiles(again), a);
      for (const f of a) assert.ok(readFileSync(join(dir, f)).equals(readFileSync(join(again, f))), `${f} differs`);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Behaviour the engine tests rely on

async function session(variant: FixtureVariant, folder: string): Promise<ort.InferenceSession> {
  return open(join(tmpRoot, variant, folder, 'model.onnx'));
}

function differ(a: ort.Tensor, b: ort.Tensor): boolean {
  const x = floats(a);
  const y = floats(b);
  return x.some((v, i) => Math.abs(v - y[i]!) > 1e-6);
}

describe('compute depends on every input', () => {
  before(async () => {
    for (const v of ['sdxl', 'lcm', 'sd15-optimum'] as const) if (!existsSync(join(tmpRoot, v))) await buildFixture(v, join(tmpRoot, v));
  });

  test('UNet output changes with each conditioning input (SDXL, LCM)', async () => {
    for (const [variant, inputs] of [
      ['sdxl', ['sample', 'timestep', 'encoder_hidden_states', 'text_embeds', 'time_ids']],
      ['lcm', ['sample', 'timestep', 'encoder_hidden_states', 'timestep_cond']],
    ] as const) {
      const s = await session(variant, 'unet');
      const base = (await s.run(feedsFor(s, 'unet'))).out_sample!;
      for (const name of inputs) {
        const changed = (await s.run(feedsFor(s, 'unet', { [name]: name === 'timestep' ? () => 21 : (i: number) => Math.cos(i * 0.91) * 2 }))).out_sample!;
        assert.ok(differ(base, changed), `${variant}: out_sample ignores ${name}`);
      }
    }
  });

  test('text encoders: prompt changes every output; padding does not move the pooled EOS position', async () => {
    for (const folder of ['text_encoder', 'text_encoder_2']) {
      const s = await session('sdxl', folder);
      const a = await s.run(feedsFor(s, 'text_encoder'));
      const b = await s.run(feedsFor(s, 'text_encoder', { input_ids: (i) => promptIds(i, SIZES.seq, 7) }));
      for (const name of s.outputNames) assert.ok(differ(a[name]!, b[name]!), `${folder}/${name}`);
    }
    // A shorter sequence is accepted (the sequence axis is dynamic).
    const s = await session('sd15-optimum', 'text_encoder');
    const ids = new ort.Tensor('int32', Int32Array.from({ length: 20 }, (_, i) => promptIds(i, 10)), [2, 10]);
    const out = await s.run({ input_ids: ids });
    assert.deepEqual(out.last_hidden_state!.dims, [2, 10, 16]);
  });

  test('the sd15-* layouts share weights: same inputs give the same UNet output', async () => {
    const outputs: Float32Array[] = [];
    for (const v of ['sd15-legacy', 'sd15-optimum', 'sd15-optimum124', 'sd15-external-data', 'sd15-fp16io'] as const) {
      if (!existsSync(join(tmpRoot, v))) await buildFixture(v, join(tmpRoot, v));
      const s = await session(v, 'unet');
      const feeds = feedsFor(s, 'unet');
      // batch 2, timestep shaped per the session: 981 in every layout
      outputs.push(floats((await s.run(feeds)).out_sample!));
    }
    const [ref, ...rest] = outputs;
    rest.forEach((o, k) => {
      const tol = k >= 2 ? 2e-2 : 1e-5; // the fp16-weight layouts round
      o.forEach((v, i) => assert.ok(Math.abs(v - ref![i]!) <= tol * (1 + Math.abs(ref![i]!)), `layout ${k + 1} index ${i}: ${v} vs ${ref![i]}`));
    });
  });

  test('50 Euler steps stay finite and bounded; the decoder gives pixels in [-1, 1]', async () => {
    for (const variant of ['sdxl', 'sd15-fp16io'] as const) {
      if (!existsSync(join(tmpRoot, variant))) await buildFixture(variant, join(tmpRoot, variant));
      const s = await session(variant, 'unet');
      const dec = await session(variant, 'vae_decoder');
      const n = 1 * 4 * 8 * 8;
      let x = Float32Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898) * 14.6);
      const sigmas = Array.from({ length: 51 }, (_, k) => 14.6 * (1 - k / 50));
      for (let k = 0; k < 50; k++) {
        const sigma = sigmas[k]!;
        const scaled = x.map((v) => v / Math.sqrt(sigma * sigma + 1));
        const feeds = feedsFor(s, 'unet', { sample: (i) => scaled[i]!, timestep: () => 999 - 20 * k }, { batch: 1, seq: 77, h: 8, w: 8 });
        const eps = floats((await s.run(feeds)).out_sample!);
        const dt = sigmas[k + 1]! - sigma;
        x = x.map((v, i) => v + eps[i]! * dt);
      }
      for (const v of x) assert.ok(Number.isFinite(v) && Math.abs(v) < 1e3, `${variant}: latent ${v}`);
      const m = dec.inputMetadata[0] as ort.InferenceSession.TensorValueMetadata;
      const img = (await dec.run({ latent_sample: tensor(m.type, [1, 4, 8, 8], (i) => x[i]! / 0.18215) })).sample!;
      for (const v of floats(img)) assert.ok(v >= -1 && v <= 1, `${variant}: pixel ${v}`);
    }
  });
});

describe('float16 helpers', () => {
  test('round to nearest even and back', () => {
    assert.equal(float32ToFloat16Bits(1), 0x3c00);
    assert.equal(float32ToFloat16Bits(-2), 0xc000);
    assert.equal(float32ToFloat16Bits(65504), 0x7bff);
    assert.equal(float32ToFloat16Bits(1e6), 0x7c00);
    assert.equal(float32ToFloat16Bits(2 ** -24), 0x0001);
    assert.equal(float32ToFloat16Bits(1 + 2 ** -11), 0x3c00); // tie → even
    assert.equal(float32ToFloat16Bits(1 + 3 * 2 ** -11), 0x3c02); // tie → even (up)
    for (const v of [0.5, 981, -0.1, 3.14159]) assert.ok(Math.abs(float16BitsToFloat32(float32ToFloat16Bits(v)) - v) <= Math.abs(v) * 2 ** -11);
  });
});

describe('ensureFixture', () => {
  test('two processes racing on an empty cache both get the same complete folder', async () => {
    const cache = join(tmpRoot, 'race-cache');
    const script = `import { ensureFixture } from './tools/fixtures/variants.ts'; process.stdout.write(await ensureFixture('sd15-legacy'));`;
    const run = () =>
      execFileAsync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { env: { ...process.env, KILN_FIXTURE_CACHE: cache } });
    const [a, b] = await Promise.all([run(), run()]);
    assert.equal(a.stdout, b.stdout);
    assert.deepEqual(readdirSync(cache), [`sd15-legacy-${builderVersionHash()}`]);
    const s = await open(join(a.stdout, 'unet', 'model.onnx'));
    await s.run(feedsFor(s, 'unet'));
  });

  test('caches under .cache/fixtures/<variant>-<hash>, and racing callers get one folder', async () => {
    const prev = process.env.KILN_FIXTURE_CACHE;
    process.env.KILN_FIXTURE_CACHE = join(tmpRoot, 'cache');
    try {
      const [a, b] = await Promise.all([ensureFixture('sd15-optimum'), ensureFixture('sd15-optimum')]);
      assert.equal(a, b);
      assert.match(a, new RegExp(`sd15-optimum-${builderVersionHash()}$`));
      const heavy = await ensureFixture('sd15-optimum', { channels: 12 });
      assert.match(heavy, new RegExp(`sd15-optimum-12-${builderVersionHash()}$`));
      // Only finished folders remain: no temp build folders left behind.
      assert.deepEqual(readdirSync(join(tmpRoot, 'cache')).sort(), [`sd15-optimum-${builderVersionHash()}`, `sd15-optimum-12-${builderVersionHash()}`].sort());
      const s = await open(join(heavy, 'unet', 'model.onnx'));
      await s.run(feedsFor(s, 'unet'));
    } finally {
      if (prev === undefined) delete process.env.KILN_FIXTURE_CACHE;
      else process.env.KILN_FIXTURE_CACHE = prev;
    }
  });
});
