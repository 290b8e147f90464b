/**
 * The txt2img pipeline on every fixture layout variant: real ONNX graphs with the real I/O
 * contracts, run by the real pipeline.
 */
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, rmSync, unlinkSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { ensureFixture, FIXTURE_VARIANTS, type FixtureVariant } from '../../tools/fixtures/variants.js';

// Every layout variant the engine serves (the SDXL refiner, text_encoder_2 only, is not one yet).
const SERVED_VARIANTS: FixtureVariant[] = [...FIXTURE_VARIANTS, 'sdxl-turbo'];
import { DiffusionModel, detectLayout } from '../../src/engine/model.js';
import { Engine } from '../../src/engine/engine.js';
import { generate, type GenerateOptions } from '../../src/engine/pipeline.js';
import { encodeGeneratedPng, readPngText } from '../../src/engine/image-codec.js';
import { DeviceUnavailableError, GenerationCancelledError, InvalidOptionError, ModelLoadError } from '../../src/engine/errors.js';
import { OnnxModel, cudaProviderInstalled, type Feed } from '../../src/engine/onnx.js';

const loaded: DiffusionModel[] = [];
after(async () => {
  await Promise.all(loaded.map((m) => m.release()));
});

async function load(variant: FixtureVariant): Promise<DiffusionModel> {
  const model = await DiffusionModel.load(await ensureFixture(variant));
  loaded.push(model);
  return model;
}

/** Records the feeds of every UNet call (batch size, timestep shape, sequence length). */
function spyOnUnet(model: DiffusionModel): { name: string; dims: number[] }[][] {
  const calls: { name: string; dims: number[] }[][] = [];
  const unet = model.unet as OnnxModel & { run: OnnxModel['run'] };
  const original = unet.run.bind(unet);
  unet.run = (feeds: Record<string, Feed>, outputs: string[]) => {
    calls.push(Object.entries(feeds).map(([name, f]) => ({ name, dims: f.dims })));
    return original(feeds, outputs);
  };
  return calls;
}

const base: GenerateOptions = { prompt: 'a red circle on a blue background', seed: 42, size: '256x256', steps: 3 };

async function png(model: DiffusionModel, options: Partial<GenerateOptions> = {}): Promise<Buffer> {
  const result = await generate(model, { ...base, ...options });
  return encodeGeneratedPng(result.image, result.settings);
}

const EXPECTED_FAMILY: Partial<Record<FixtureVariant, string>> = { sdxl: 'sdxl', 'sdxl-turbo': 'sdxl', lcm: 'sd1', 'sd-turbo': 'sd2' };
const EXPECTED_DISTILLATION: Partial<Record<FixtureVariant, string>> = { lcm: 'lcm', 'sd-turbo': 'turbo', 'sdxl-turbo': 'turbo' };

for (const variant of SERVED_VARIANTS) {
  describe(`fixture ${variant}`, () => {
    test('size, determinism (same seed same bytes, other seed other bytes), prompt sensitivity', async () => {
      const model = await load(variant);
      assert.equal(model.layout.family, EXPECTED_FAMILY[variant] ?? 'sd1');
      assert.equal(model.layout.distillation, EXPECTED_DISTILLATION[variant] ?? null);
      const a = await png(model);
      const b = await png(model);
      const c = await png(model, { seed: 43 });
      const d = await png(model, { prompt: 'a green square at the left' });
      const meta = await sharp(a).metadata();
      assert.equal(meta.format, 'png');
      assert.equal(meta.width, 256);
      assert.equal(meta.height, 256);
      assert.ok(a.equals(b), 'same request must give byte-identical PNGs');
      assert.ok(!a.equals(c), 'another seed must give another image');
      assert.ok(!a.equals(d), 'another prompt must give another image');
      assert.match(readPngText(a).parameters!, /Seed: 42/);
    });

    test('one UNet call per step with the batch CFG needs', async () => {
      const model = await load(variant);
      const calls = spyOnUnet(model);
      const result = await generate(model, { ...base, steps: 4 });
      assert.equal(result.unetCalls, 4);
      assert.equal(calls.length, 4);
      const expectCfg = model.layout.distillation === null; // LCM embeds guidance; Turbo runs at guidance 0
      const sample = calls[0]!.find((f) => f.name === 'sample')!;
      assert.equal(sample.dims[0], expectCfg ? 2 : 1);
      const hidden = calls[0]!.find((f) => f.name === 'encoder_hidden_states')!;
      assert.equal(hidden.dims[0], sample.dims[0]);
      assert.equal(hidden.dims[1], 77);
      for (const f of calls[0]!) {
        if (['text_embeds', 'time_ids', 'timestep_cond'].includes(f.name)) assert.equal(f.dims[0], sample.dims[0], f.name);
      }
    });
  });
}

describe('pipeline behaviour', () => {
  test('cancellation between steps stops the run', async () => {
    const model = await load('sd15-optimum');
    const calls = spyOnUnet(model);
    const controller = new AbortController();
    await assert.rejects(
      generate(model, {
        ...base,
        steps: 10,
        signal: controller.signal,
        onProgress: (p) => {
          if (p.stage === 'denoise' && p.step === 2) controller.abort();
        },
      }),
      GenerationCancelledError,
    );
    assert.equal(calls.length, 2, 'no UNet call after the abort');
    const already = new AbortController();
    already.abort();
    await assert.rejects(generate(model, { ...base, signal: already.signal }), GenerationCancelledError);
  });

  test('every scheduler runs and gives finite, distinct images', async () => {
    const model = await load('sd15-optimum');
    const seen = new Set<string>();
    for (const scheduler of ['euler', 'euler_a', 'ddim', 'dpmpp_2m', 'dpmpp_2m_karras', 'dpm_single', 'unipc', 'lcm']) {
      const result = await generate(model, { ...base, scheduler, steps: 4 });
      assert.equal(result.settings.steps, 4);
      seen.add(Buffer.from(result.image.pixels).toString('base64'));
    }
    assert.equal(seen.size, 8, 'each scheduler takes its own path');
  });

  test('quality presets pick the step count; distilled models use their own', async () => {
    const sd = await load('sd15-optimum');
    const lcm = await load('lcm');
    const steps = async (m: DiffusionModel, quality: string) => (await generate(m, { ...base, steps: undefined, quality, size: '256x256' })).settings.steps;
    assert.equal(await steps(sd, 'draft'), 12);
    assert.equal(await steps(lcm, 'smooth'), 4);
    assert.equal(await steps(lcm, 'hd'), 8);
  });

  test('unknown scheduler, quality and size are InvalidOptionErrors naming the option', async () => {
    const model = await load('sd15-optimum');
    const cases: [Partial<GenerateOptions>, string, RegExp][] = [
      [{ scheduler: 'warp' }, 'scheduler', /euler/],
      [{ quality: 'ultra' }, 'quality', /smooth/],
      [{ size: '640x480' }, 'size', /512x512/],
      [{ steps: 0 }, 'steps', /1 to/],
      [{ guidanceScale: -1 }, 'guidance_scale', /0 to/],
      [{ seed: 2 ** 32 }, 'seed', /4294967295/],
    ];
    for (const [options, param, message] of cases) {
      await assert.rejects(generate(model, { ...base, ...options }), (err: unknown) => {
        assert.ok(err instanceof InvalidOptionError, String(err));
        assert.equal(err.param, param);
        assert.match(err.message, message);
        return true;
      });
    }
  });

  test('prompts longer than 75 tokens are chunked, not cut', async () => {
    const model = await load('sd15-optimum');
    const calls = spyOnUnet(model);
    const long = Array.from({ length: 100 }, (_, i) => `word${i % 10}`).join(' ');
    const a = await generate(model, { ...base, prompt: long, steps: 1 });
    const b = await generate(model, { ...base, prompt: `${long} and a dragon at the very end`, steps: 1 });
    const hidden = calls[0]!.find((f) => f.name === 'encoder_hidden_states')!;
    assert.ok(hidden.dims[1]! >= 154, `sequence ${hidden.dims[1]} should hold two chunks`);
    assert.notDeepEqual(a.image.pixels, b.image.pixels, 'tokens past 75 must still matter');
  });

  test('SDXL: a prompt whose "!"s need more chunks in tokenizer_2 than in tokenizer 1 still runs', async () => {
    const model = await load('sdxl');
    const words = Array.from({ length: 72 }, () => 'cat').join(' ');
    // tokenizer 1: "!!!!!!!!" is one or two tokens; tokenizer_2: eight pad tokens -> 80 > 75.
    const result = await generate(model, { ...base, prompt: `${words} !!!!!!!!`, steps: 1 });
    assert.equal(result.image.width, 256);
  });

  test('prompt weights change the image; weight 1 is the same as no weight', async () => {
    const model = await load('sd15-optimum');
    const plain = await generate(model, { ...base, prompt: 'a cat playing with a ball' });
    const one = await generate(model, { ...base, prompt: 'a cat playing with a (ball)1.0' });
    const weighted = await generate(model, { ...base, prompt: 'a cat playing with a (ball)1.8' });
    assert.deepEqual(one.image.pixels, plain.image.pixels);
    assert.notDeepEqual(weighted.image.pixels, plain.image.pixels);
  });

  test('negative prompt changes the image', async () => {
    for (const variant of ['sd15-optimum', 'sdxl'] as const) {
      const model = await load(variant);
      const plain = await generate(model, base);
      const neg = await generate(model, { ...base, negativePrompt: 'blurry, green' });
      assert.notDeepEqual(neg.image.pixels, plain.image.pixels, variant);
    }
  });

  test('same bytes from a separate process', async () => {
    const dir = await ensureFixture('sdxl');
    const model = await load('sdxl');
    const here = await png(model);
    const script = `
      import { DiffusionModel } from './src/engine/model.ts';
      import { generate } from './src/engine/pipeline.ts';
      import { encodeGeneratedPng } from './src/engine/image-codec.ts';
      const m = await DiffusionModel.load(${JSON.stringify(dir)});
      const r = await generate(m, ${JSON.stringify(base)});
      process.stdout.write((await encodeGeneratedPng(r.image, r.settings)).toString('base64'));
    `;
    const out = execFileSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { encoding: 'utf8' });
    assert.ok(Buffer.from(out, 'base64').equals(here));
  });
});

describe('engine model cache', () => {
  test('one load per folder; a replaced folder (re-pull) is loaded afresh', async () => {
    const home = mkdtempSync(join(tmpdir(), 'kiln-engine-'));
    try {
      cpSync(await ensureFixture('sd15-optimum'), join(home, 'demo'), { recursive: true });
      const engine = new Engine({ searchDirs: [home] });
      const first = await engine.model('demo');
      assert.equal(await engine.model('demo'), first);
      assert.equal(await engine.model(join(home, 'demo')), first, 'by path too');
      // A pull swaps the folder: new files, new model_index.json.
      rmSync(join(home, 'demo'), { recursive: true });
      cpSync(await ensureFixture('sd15-optimum124'), join(home, 'demo'), { recursive: true });
      const second = await engine.model('demo');
      assert.notEqual(second, first);
      assert.equal(second.textEncoder.input('input_ids').type, 'int64', 'the new files are in use');
      await Promise.all([first.release(), engine.close()]);
    } finally {
      rmSync(home, { recursive: true, force: true });
    }
  });
});

describe('broken model folders', () => {
  const scratch = mkdtempSync(join(tmpdir(), 'kiln-broken-'));
  after(() => rmSync(scratch, { recursive: true, force: true }));

  async function copyOf(variant: FixtureVariant, name: string): Promise<string> {
    const dir = join(scratch, name);
    cpSync(await ensureFixture(variant), dir, { recursive: true });
    return dir;
  }

  test('a missing sub-model is named', async () => {
    const dir = await copyOf('sd15-optimum', 'no-unet');
    unlinkSync(join(dir, 'unet/model.onnx'));
    await assert.rejects(DiffusionModel.load(dir), (err: unknown) => err instanceof ModelLoadError && /unet\/model\.onnx/.test(err.message));
  });

  test('a missing external-data file is named', async () => {
    const dir = await copyOf('sd15-optimum', 'no-weights');
    const weights = readdirSync(join(dir, 'unet')).find((f) => f !== 'model.onnx' && f !== 'config.json')!;
    assert.ok(weights, 'fixture has an external-data file');
    unlinkSync(join(dir, 'unet', weights));
    await assert.rejects(DiffusionModel.load(dir), (err: unknown) => {
      assert.ok(err instanceof ModelLoadError, String(err));
      assert.match(err.message, /unet\/model\.onnx/);
      assert.match(err.message, new RegExp(weights.replace(/\./g, '\\.')));
      assert.doesNotMatch(err.message, /\n\s+at /, 'no stack trace');
      return true;
    });
  });

  test('a missing tokenizer, or a folder that is not a model, is named', async () => {
    const dir = await copyOf('sdxl', 'no-tok2');
    rmSync(join(dir, 'tokenizer_2'), { recursive: true });
    assert.throws(() => detectLayout(dir), (err: unknown) => err instanceof ModelLoadError && /tokenizer_2\/vocab\.json/.test(err.message));
    assert.throws(() => detectLayout(scratch), (err: unknown) => err instanceof ModelLoadError && /model_index\.json/.test(err.message));
  });

  test('--device cuda fails clearly where the CUDA provider is not installed', { skip: cudaProviderInstalled() && 'CUDA provider present' }, async () => {
    await assert.rejects(DiffusionModel.load(await ensureFixture('sd15-optimum'), { device: 'cuda' }), (err: unknown) => {
      assert.ok(err instanceof DeviceUnavailableError, String(err));
      assert.match(err.message, /ONNXRUNTIME_NODE_INSTALL=cuda12/);
      return true;
    });
  });

  test('a UNet without the inputs the family needs is refused at load', async () => {
    const dir = await copyOf('sdxl', 'sd-unet-in-xl');
    cpSync(join(await ensureFixture('sd15-optimum124'), 'unet'), join(dir, 'unet'), { recursive: true, force: true });
    await assert.rejects(DiffusionModel.load(dir), (err: unknown) => err instanceof ModelLoadError && /text_embeds|encoder_hidden_states/.test(err.message));
  });
});
