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
  CONTROLNET_FIXTURE_KINDS,
  FIXTURE_VARIANTS,
  POSE_DETECTOR_FILE,
  POSE_NET_FILE,
  buildControlNetFixture,
  buildFixture,
  buildPoseFixture,
  builderVersionHash,
  ensureControlNetFixture,
  ensureFixture,
  ensurePoseFixture,
  poseTemplate,
  type ControlNetFixtureKind,
  type FixtureVariant,
} from '../tools/fixtures/variants.js';
import { decodeModel } from '../src/graphs/onnx-builder.js';
import { float32ToFloat16Bits as toFloat16Array, float16BitsToFloat32 as fromFloat16Array, toFloat16Bits as float32ToFloat16Bits, fromFloat16Bits as float16BitsToFloat32 } from '../src/engine/float16.js';

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
  /** `sample` channels when not 4 (9: inpainting). */
  sampleChannels?: number;
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

// ControlNet residuals (contracts §4.1), channels 320/640/1280 scaled to 8/16/32 (channels = 8),
// with their resolution level: 0 = h, 1 = h/2, 2 = h/4, 3 = h/8.
const SD15_RESIDUALS: Array<[channels: number, level: number]> = [
  [8, 0], [8, 0], [8, 0], [8, 1], [16, 1], [16, 1], [16, 2], [32, 2], [32, 2], [32, 3], [32, 3], [32, 3],
];
const SD15_MID: [number, number] = [32, 3];
const SDXL_RESIDUALS = SD15_RESIDUALS.slice(0, 9);
const SDXL_MID: [number, number] = [32, 2];
const residualNames = (n: number): string[] => [...Array.from({ length: n }, (_, i) => `down_block_${i}_additional_residual`), 'mid_block_additional_residual'];
/** Residual tensors as graph I/O: fixed channels, symbolic batch and spatial axes. */
const residualIos = (arch: 'sd15' | 'sdxl', f = 'float32'): Io[] => {
  const table = arch === 'sd15' ? [...SD15_RESIDUALS, SD15_MID] : [...SDXL_RESIDUALS, SDXL_MID];
  const names = residualNames(table.length - 1);
  return table.map(([c], i): Io => [names[i]!, f, `B,${c},H,W`]);
};
/** Level of a residual by name, for an arch with n down residuals (12 or 9). */
function residualLevel(name: string, downCount: number): number {
  if (name.startsWith('mid')) return downCount === 12 ? SD15_MID[1] : SDXL_MID[1];
  return SD15_RESIDUALS[Number(/^down_block_(\d+)_/.exec(name)![1])]![1];
}
/** Spatial size of a level for latent size n: each stride-2 conv gives ceil(n/2). */
const atLevel = (n: number, level: number): number => (level === 0 ? n : atLevel(Math.ceil(n / 2), level - 1));

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
  'sd15-controlnet': {
    text_encoder: ext(te('int32', 16), 'model.onnx.data'),
    unet: ext(unet(['timestep', 'float32', 'B'], 16), 'model.onnx.data'),
    controlnet: unet(['timestep', 'float32', 'B'], 16, 'float32', residualIos('sd15')),
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
  'sdxl-controlnet': {
    text_encoder: te('int32', 8, 'float32', 3),
    text_encoder_2: ext(te2(12, '16', 3), 'model.onnx.data'),
    unet: ext(unet(['timestep', 'float32', 'B'], 20, 'float32', SDXL_EXTRA), 'model.onnx.data'),
    controlnet: ext(unet(['timestep', 'float32', 'B'], 20, 'float32', [...SDXL_EXTRA, ...residualIos('sdxl')]), 'model.onnx.data'),
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
  'sd15-inpaint': {
    text_encoder: te('int32', 16),
    unet: ext(unet(['timestep', 'int64', 'steps'], 16), 'model.onnx_data'),
    inpaint_unet: {
      inputs: [['sample', 'float32', 'B,9,H,W'], ['timestep', 'int64', 'steps'], ['encoder_hidden_states', 'float32', 'B,S,16']],
      outputs: [['out_sample', 'float32', 'B,4,H,W']],
      external: 'model.onnx_data',
      sampleChannels: 9,
    },
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
  'sd15-inpaint9': {
    text_encoder: te('int32', 16),
    // The diffusers script's dynamic axes: the channel axis is symbolic (`channels`) on both ends;
    // ORT's metadata shows the inferred 4 for out_sample (the graph's declaration is checked below).
    unet: {
      inputs: [['sample', 'float32', 'B,channels,H,W'], ['timestep', 'int64', 'batch'], ['encoder_hidden_states', 'float32', 'B,S,16']],
      outputs: [['out_sample', 'float32', 'B,4,H,W']],
      external: 'weights.pb',
      sampleChannels: 9,
    },
    vae_encoder: vaeEnc('latent_sample'),
    vae_decoder: vaeDec(),
  },
};

/** Folders Kiln reads beside the diffusers ones; not components of model_index.json. */
const KILN_EXTRA_FOLDERS = ['controlnet', 'inpaint_unet'];
/** Which feed recipe a folder's model takes. */
const kindOf = (folder: string): string => (KILN_EXTRA_FOLDERS.includes(folder) ? 'unet' : folder.replace(/_2$/, ''));

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
    case 'float64':
      return new ort.Tensor('float64', Float64Array.from(values), dims);
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
  sampleChannels = 4,
): Record<string, ort.Tensor> {
  const feeds: Record<string, ort.Tensor> = {};
  const downResiduals = session.inputNames.filter((n) => n.startsWith('down_block_')).length;
  for (const m of session.inputMetadata) {
    assert.ok(m.isTensor);
    const dims = m.shape.map((d, axis) => {
      if (typeof d === 'number') return d;
      if (kind === 'vae_encoder') return [1, 3, 8 * sizes.h, 8 * sizes.w][axis]!;
      if (kind === 'vae_decoder') return [1, 4, sizes.h, sizes.w][axis]!;
      if (m.name === 'input_ids') return [sizes.batch, sizes.seq][axis]!;
      if (m.name === 'timestep') return sizes.batch;
      if (m.name === 'sample') return [sizes.batch, sampleChannels, sizes.h, sizes.w][axis]!;
      if (m.name === 'controlnet_cond') return [sizes.batch, 3, 8 * sizes.h, 8 * sizes.w][axis]!;
      if (m.name.endsWith('_additional_residual')) {
        const level = residualLevel(m.name, downResiduals);
        return [sizes.batch, 0, atLevel(sizes.h, level), atLevel(sizes.w, level)][axis]!;
      }
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
            : m.name === 'conditioning_scale'
              ? () => 1
              : m.name === 'controlnet_cond'
                ? (i: number) => 0.5 + 0.5 * Math.sin(i * 0.113)
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
        'sd15-controlnet': 'OnnxStableDiffusionPipeline',
        'sdxl-controlnet': 'StableDiffusionXLPipeline',
        'sd15-inpaint': 'StableDiffusionPipeline',
        'sd15-inpaint9': 'OnnxStableDiffusionInpaintPipeline',
      };
      assert.equal(index._class_name, cls[variant]);
      for (const [k, v] of Object.entries(index)) if (!k.startsWith('_') && Array.isArray(v)) assert.equal(v.length, 2, k);
      for (const folder of Object.keys(contract)) {
        // Every ONNX folder is either named in the index or is the VAE pair behind a `vae` entry
        // (Kiln's own extra folders, controlnet/ and inpaint_unet/, are not pipeline components).
        if (KILN_EXTRA_FOLDERS.includes(folder)) continue;
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
        'sd15-controlnet': ['PNDMScheduler', undefined],
        'sdxl-controlnet': ['EulerDiscreteScheduler', 'leading'],
        'sd15-inpaint': ['PNDMScheduler', undefined],
        'sd15-inpaint9': ['PNDMScheduler', undefined],
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
      assert.equal(u.in_channels, variant === 'sd15-inpaint9' ? 9 : 4);
      if (contract.inpaint_unet) assert.equal(read('inpaint_unet/config.json').in_channels, 9);
      if (contract.controlnet) assert.equal(read('controlnet/config.json').in_channels, 4);
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

    if (variant === 'sd15-inpaint9') {
      test('the 9-channel unet declares a symbolic channel axis (so the engine must read unet/config.json in_channels)', () => {
        const model = decodeModel(readFileSync(join(dir, 'unet', 'model.onnx')));
        const dimsOf = (v: { type?: { tensorType?: { shape?: { dim?: Array<{ dimParam?: string | null; dimValue?: unknown }> | null } | null } | null } | null }) =>
          v.type!.tensorType!.shape!.dim!.map((d) => d.dimParam || Number(d.dimValue));
        assert.deepEqual(dimsOf(model.graph!.input!.find((i) => i.name === 'sample')!), ['batch', 'channels', 'height', 'width']);
        assert.deepEqual(dimsOf(model.graph!.output!.find((o) => o.name === 'out_sample')!), ['batch', 'channels', 'height', 'width']);
      });
    }

    test('each sub-model runs with typed feeds and gives the expected shapes', async () => {
      for (const [folder, m] of Object.entries(contract)) {
        const s = await open(join(dir, folder, 'model.onnx'));
        const out = await s.run(feedsFor(s, kindOf(folder), {}, SIZES, m.sampleChannels));
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
        for (const [folder, m] of externals) {
          const s = await open(join(moved, folder, 'model.onnx'));
          await s.run(feedsFor(s, kindOf(folder), {}, SIZES, m.sampleChannels));
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

// ---------------------------------------------------------------------------------------------
// ControlNet-UNet and inpainting UNet behaviour

/** Feeds for a UNet-like session with every residual zero except (optionally) one. */
function unetFeeds(s: ort.InferenceSession, overrides: Record<string, (i: number) => number> = {}, sampleChannels = 4): Record<string, ort.Tensor> {
  const zeros: Record<string, (i: number) => number> = {};
  for (const n of s.inputNames) if (n.endsWith('_additional_residual')) zeros[n] = () => 0;
  return feedsFor(s, 'unet', { ...zeros, ...overrides }, SIZES, sampleChannels);
}

describe('ControlNet-UNet (controlnet/) and inpainting UNets', () => {
  before(async () => {
    for (const v of ['sd15-controlnet', 'sdxl-controlnet', 'sd15-inpaint', 'sd15-inpaint9'] as const) {
      if (!existsSync(join(tmpRoot, v))) await buildFixture(v, join(tmpRoot, v));
    }
  });

  test('with all-zero residuals the ControlNet-UNet gives exactly the base UNet’s output', async () => {
    for (const v of ['sd15-controlnet', 'sdxl-controlnet'] as const) {
      const base = await session(v, 'unet');
      const cn = await session(v, 'controlnet');
      const a = floats((await base.run(feedsFor(base, 'unet'))).out_sample!);
      const b = floats((await cn.run(unetFeeds(cn))).out_sample!);
      a.forEach((x, i) => assert.ok(Math.abs(x - b[i]!) <= 1e-6, `${v} index ${i}: ${x} vs ${b[i]}`));
    }
  });

  test('out_sample depends on every residual input, at every level', async () => {
    for (const v of ['sd15-controlnet', 'sdxl-controlnet'] as const) {
      const cn = await session(v, 'controlnet');
      const base = (await cn.run(unetFeeds(cn))).out_sample!;
      const names = cn.inputNames.filter((n) => n.endsWith('_additional_residual'));
      assert.equal(names.length, v === 'sd15-controlnet' ? 13 : 10);
      for (const name of names) {
        const changed = (await cn.run(unetFeeds(cn, { [name]: (i) => Math.cos(i * 0.7) }))).out_sample!;
        assert.ok(differ(base, changed), `${v}: out_sample ignores ${name}`);
      }
    }
  });

  test('9-channel UNets: output has 4 channels and depends on the mask and the masked-image latents', async () => {
    const s = await session('sd15-inpaint', 'inpaint_unet');
    const { batch: b, h, w } = SIZES;
    const plane = h * w;
    const sample = (mask: number, masked: number) => (i: number) => {
      const c = Math.floor(i / plane) % 9;
      return c < 4 ? Math.sin(i * 0.37) : c === 4 ? mask : masked * Math.cos(i * 0.5);
    };
    const run = async (mask: number, masked: number) => (await s.run(feedsFor(s, 'unet', { sample: sample(mask, masked) }, SIZES, 9))).out_sample!;
    const base = await run(0, 1);
    assert.deepEqual(base.dims, [b, 4, h, w]);
    assert.ok(differ(base, await run(1, 1)), 'ignores the mask channel');
    assert.ok(differ(base, await run(0, 2)), 'ignores the masked-image latents');
    // The same inpainting weights behind both layouts: inpaint_unet/ of sd15-inpaint ≡ unet/ of sd15-inpaint9.
    const s9 = await session('sd15-inpaint9', 'unet');
    const other = (await s9.run(feedsFor(s9, 'unet', { sample: sample(0, 1) }, SIZES, 9))).out_sample!;
    const x = floats(base);
    floats(other).forEach((v, i) => assert.ok(Math.abs(v - x[i]!) <= 1e-6, `index ${i}`));
  });
});

// ---------------------------------------------------------------------------------------------
// Standalone ControlNet folders (split layout, §4.1)

const controlnetContract = (kind: ControlNetFixtureKind): ModelContract => {
  const f = kind === 'sd15-openpose-fp16' ? 'float16' : 'float32';
  const xl = kind === 'sdxl-openpose';
  return {
    inputs: [
      ['sample', f, 'B,4,H,W'],
      ['timestep', f, 'B'],
      ['encoder_hidden_states', f, `B,S,${xl ? 20 : 16}`],
      ...(xl ? SDXL_EXTRA : []),
      ['controlnet_cond', f, 'B,3,H,W'],
      ...(kind === 'sd15-openpose-noscale' ? [] : [['conditioning_scale', 'float64', kind === 'sd15-openpose-fp16' ? '' : '1'] as Io]),
    ],
    outputs: residualIos(xl ? 'sdxl' : 'sd15', f),
    external: xl ? 'model.onnx.data' : undefined,
  };
};

describe('ControlNet folders', () => {
  const dirOf = (kind: ControlNetFixtureKind) => join(tmpRoot, `controlnet-${kind}`);
  before(async () => {
    for (const kind of CONTROLNET_FIXTURE_KINDS) await buildControlNetFixture(kind, dirOf(kind));
    for (const v of ['sd15-controlnet', 'sdxl-controlnet'] as const) if (!existsSync(join(tmpRoot, v))) await buildFixture(v, join(tmpRoot, v));
  });

  test('files: model.onnx (+ model.onnx.data for SDXL), config.json, annotators/dwpose/', () => {
    for (const kind of CONTROLNET_FIXTURE_KINDS) {
      const c = controlnetContract(kind);
      const files = listFiles(dirOf(kind));
      assert.deepEqual(
        files,
        ['annotators/dwpose/dw-ll_ucoco_384.onnx', 'annotators/dwpose/yolox_l.onnx', 'config.json', 'model.onnx', ...(c.external ? [c.external] : [])].sort(),
        kind,
      );
      const cfg = JSON.parse(readFileSync(join(dirOf(kind), 'config.json'), 'utf8'));
      assert.equal(cfg._class_name, 'ControlNetModel');
      assert.equal(cfg.cross_attention_dim, kind === 'sdxl-openpose' ? 20 : 16);
      assert.equal(cfg.addition_embed_type, kind === 'sdxl-openpose' ? 'text_time' : null);
      assert.equal(cfg.controlnet_conditioning_channel_order, 'rgb');
    }
  });

  test('sessions expose the contract: names, order, dtypes, ranks', async () => {
    for (const kind of CONTROLNET_FIXTURE_KINDS) {
      const m = controlnetContract(kind);
      const s = await open(join(dirOf(kind), 'model.onnx'));
      assert.deepEqual(s.inputNames, m.inputs.map((io) => io[0]), `${kind} input order`);
      assert.deepEqual(s.outputNames, m.outputs.map((io) => io[0]), `${kind} output order`);
      m.inputs.forEach((io, i) => assertShape(s.inputMetadata[i]!, io, `${kind} input`));
      m.outputs.forEach((io, i) => assertShape(s.outputMetadata[i]!, io, `${kind} output`));
    }
  });

  test('residual shapes: channels per the table, h, h/2, h/4, h/8 (ceil) for odd latent sizes', async () => {
    for (const kind of CONTROLNET_FIXTURE_KINDS) {
      const s = await open(join(dirOf(kind), 'model.onnx'));
      const out = await s.run(feedsFor(s, 'controlnet'));
      const table = kind === 'sdxl-openpose' ? [...SDXL_RESIDUALS, SDXL_MID] : [...SD15_RESIDUALS, SD15_MID];
      s.outputNames.forEach((name, i) => {
        const [c, level] = table[i]!;
        assert.deepEqual(out[name]!.dims, [SIZES.batch, c, atLevel(SIZES.h, level), atLevel(SIZES.w, level)], `${kind}/${name}`);
        assert.equal(out[name]!.type, kind === 'sd15-openpose-fp16' ? 'float16' : 'float32');
        assertFinite(out[name]!, `${kind}/${name}`);
      });
    }
  });

  test('residuals depend on the control image and every other input; the scale multiplies them', async () => {
    for (const kind of ['sd15-openpose', 'sdxl-openpose'] as const) {
      const s = await open(join(dirOf(kind), 'model.onnx'));
      const base = await s.run(feedsFor(s, 'controlnet'));
      for (const name of s.inputNames.filter((n) => n !== 'conditioning_scale')) {
        const changed = await s.run(feedsFor(s, 'controlnet', { [name]: name === 'timestep' ? () => 21 : (i: number) => 0.5 + 0.5 * Math.cos(i * 0.91) }));
        for (const out of s.outputNames) assert.ok(differ(base[out]!, changed[out]!), `${kind}: ${out} ignores ${name}`);
      }
      const zero = await s.run(feedsFor(s, 'controlnet', { conditioning_scale: () => 0 }));
      const half = await s.run(feedsFor(s, 'controlnet', { conditioning_scale: () => 0.5 }));
      for (const out of s.outputNames) {
        assert.ok(floats(zero[out]!).every((v) => v === 0), `${kind}: scale 0 zeroes ${out}`);
        const full = floats(base[out]!);
        floats(half[out]!).forEach((v, i) => assert.ok(Math.abs(v - full[i]! / 2) <= 1e-6, `${kind}: ${out} at scale 0.5`));
      }
    }
  });

  test('the sd15 kinds compute one function: no-scale = scale 1; fp16 I/O agrees to fp16 rounding', async () => {
    const outputs: Array<Record<string, ort.Tensor>> = [];
    for (const kind of ['sd15-openpose', 'sd15-openpose-noscale', 'sd15-openpose-fp16'] as const) {
      const s = await open(join(dirOf(kind), 'model.onnx'));
      outputs.push(await s.run(feedsFor(s, 'controlnet', { timestep: () => 500 })));
    }
    const [ref, noscale, fp16] = outputs;
    for (const name of Object.keys(ref!)) {
      const r = floats(ref![name]!);
      floats(noscale![name]!).forEach((v, i) => assert.equal(v, r[i], `${name} no-scale`));
      floats(fp16![name]!).forEach((v, i) => assert.ok(Math.abs(v - r[i]!) <= 0.05 * (1 + Math.abs(r[i]!)), `${name} fp16 ${v} vs ${r[i]}`));
    }
  });

  test('ControlNet residuals feed the matching ControlNet-UNet by name and change its output', async () => {
    for (const [kind, variant] of [['sd15-openpose', 'sd15-controlnet'], ['sdxl-openpose', 'sdxl-controlnet']] as const) {
      const cnet = await open(join(dirOf(kind), 'model.onnx'));
      const unetS = await session(variant, 'controlnet');
      const residuals = await cnet.run(feedsFor(cnet, 'controlnet'));
      const feeds = unetFeeds(unetS);
      const without = (await unetS.run(feeds)).out_sample!;
      for (const name of cnet.outputNames) {
        assert.deepEqual(residuals[name]!.dims, feeds[name]!.dims, `${kind} → ${variant}: ${name} shape`);
        feeds[name] = residuals[name]!;
      }
      const withControl = (await unetS.run(feeds)).out_sample!;
      assert.ok(differ(without, withControl), `${variant}: residuals change out_sample`);
      assertFinite(withControl, `${variant} out_sample`);
    }
  });

  test('two builds are byte-identical; ensureControlNetFixture caches under controlnet-<kind>-<hash>', async () => {
    const again = join(tmpRoot, 'controlnet-again');
    await buildControlNetFixture('sdxl-openpose', again);
    const a = listFiles(dirOf('sdxl-openpose'));
    assert.deepEqual(listFiles(again), a);
    for (const f of a) assert.ok(readFileSync(join(dirOf('sdxl-openpose'), f)).equals(readFileSync(join(again, f))), `${f} differs`);
    const prev = process.env.KILN_FIXTURE_CACHE;
    process.env.KILN_FIXTURE_CACHE = join(tmpRoot, 'cn-cache');
    try {
      const [x, y] = await Promise.all([ensureControlNetFixture('sd15-openpose'), ensureControlNetFixture('sd15-openpose')]);
      assert.equal(x, y);
      assert.match(x, new RegExp(`controlnet-sd15-openpose-${builderVersionHash()}$`));
      const pose = await ensurePoseFixture();
      assert.match(pose, new RegExp(`dwpose-${builderVersionHash()}$`));
      assert.deepEqual(readdirSync(pose).sort(), [POSE_NET_FILE, POSE_DETECTOR_FILE].sort());
    } finally {
      if (prev === undefined) delete process.env.KILN_FIXTURE_CACHE;
      else process.env.KILN_FIXTURE_CACHE = prev;
    }
  });
});

// ---------------------------------------------------------------------------------------------
// DWPose stand-ins (§5.1)

describe('pose fixtures', () => {
  const dir = join(tmpRoot, 'dwpose');
  before(() => buildPoseFixture(dir));

  test('contracts: yolox_l images [1,3,64,64] → output [1,84,85]; dw-ll input [1,3,64,48] → simcc_x [1,133,96], simcc_y [1,133,128]', async () => {
    const det = await open(join(dir, POSE_DETECTOR_FILE));
    assert.deepEqual(det.inputNames, ['images']);
    assert.deepEqual(det.outputNames, ['output']);
    assertShape(det.inputMetadata[0]!, ['images', 'float32', '1,3,64,64'], 'detector');
    // N = 8² + 4² + 2² for strides 8, 16, 32 of a 64² input.
    assertShape(det.outputMetadata[0]!, ['output', 'float32', '1,84,85'], 'detector');
    const pose = await open(join(dir, POSE_NET_FILE));
    assert.deepEqual(pose.inputNames, ['input']);
    assert.deepEqual(pose.outputNames, ['simcc_x', 'simcc_y']);
    assertShape(pose.inputMetadata[0]!, ['input', 'float32', '1,3,64,48'], 'pose');
    assertShape(pose.outputMetadata[0]!, ['simcc_x', 'float32', '1,133,96'], 'pose');
    assertShape(pose.outputMetadata[1]!, ['simcc_y', 'float32', '1,133,128'], 'pose');
  });

  test('detector: a bright block is a person in the cell under it, with its own box; black and grey are nobody', async () => {
    const det = await open(join(dir, POSE_DETECTOR_FILE));
    const S = 64;
    const inBlock = (x: number, y: number) => x >= 16 && x < 32 && y >= 8 && y < 48;
    const images = (fill: (x: number, y: number) => number) => new ort.Tensor('float32', Float32Array.from({ length: 3 * S * S }, (_, i) => fill(i % S, Math.floor(i / S) % S)), [1, 3, S, S]);
    const rows = async (t: ort.Tensor) => {
      const out = floats((await det.run({ images: t })).output!);
      return Array.from({ length: 84 }, (_, r) => out.subarray(r * 85, r * 85 + 85));
    };
    const bright = await rows(images((x, y) => (inBlock(x, y) ? 255 : 0)));
    // Stride-8 cell (2, 2) lies inside the block: person score obj·cls0 high, box = the block.
    const cell = bright[2 * 8 + 2]!;
    const score = cell[4]! * cell[5]!;
    assert.ok(score > 0.85, `score ${score}`);
    const cx = (cell[0]! + 2) * 8;
    const cy = (cell[1]! + 2) * 8;
    const w = Math.exp(cell[2]!) * 8;
    const h = Math.exp(cell[3]!) * 8;
    for (const [got, want] of [[cx, 24], [cy, 28], [w, 16], [h, 40]] as const) assert.ok(Math.abs(got - want) < 1e-3, `${got} vs ${want}`);
    // A cell outside the block scores nothing; the other 79 classes stay low everywhere.
    assert.ok(bright[7 * 8 + 7]![4]! < 0.01);
    assert.ok(bright.every((r) => Math.max(...r.subarray(6)) <= 0.02 + 1e-6));
    for (const fill of [() => 0, () => 114]) {
      const none = await rows(images(fill));
      assert.ok(none.every((r) => r[4]! * r[5]! < 0.1), 'no candidate above the NMS score threshold');
      assertFinite(new ort.Tensor('float32', Float32Array.from(none.flatMap((r) => [...r])), [84, 85]), 'empty picture');
    }
  });

  test('pose net: peaks at the template bins, visible on a bright crop and below 0.3 on a dark one', async () => {
    const pose = await open(join(dir, POSE_NET_FILE));
    const template = poseTemplate();
    assert.equal(template.length, 133);
    const run = async (value: number) => pose.run({ input: new ort.Tensor('float32', new Float32Array(3 * 64 * 48).fill(value), [1, 3, 64, 48]) });
    const argmax = (d: Float32Array, k: number, n: number) => {
      let best = 0;
      for (let i = 1; i < n; i++) if (d[k * n + i]! > d[k * n + best]!) best = i;
      return [best, d[k * n + best]!] as const;
    };
    const bright = await run((255 - 103.53) / 57.375);
    const sx = floats(bright.simcc_x!);
    const sy = floats(bright.simcc_y!);
    template.forEach((t, k) => {
      const [xb, xv] = argmax(sx, k, 96);
      const [yb, yv] = argmax(sy, k, 128);
      assert.deepEqual([xb, yb], [t.xBin, t.yBin], `keypoint ${k}`);
      assert.ok(Math.min(xv, yv) > 0.3, `keypoint ${k} score ${Math.min(xv, yv)}`);
    });
    const dark = await run(-2);
    assert.ok(Math.max(...floats(dark.simcc_x!)) < 0.3 && Math.max(...floats(dark.simcc_y!)) < 0.3);
  });

  test('two builds are byte-identical', async () => {
    const again = join(tmpRoot, 'dwpose-again');
    await buildPoseFixture(again);
    for (const f of [POSE_DETECTOR_FILE, POSE_NET_FILE]) assert.ok(readFileSync(join(dir, f)).equals(readFileSync(join(again, f))), f);
  });
});
