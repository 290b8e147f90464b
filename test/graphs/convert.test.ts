/**
 * Entry points of Kiln's own graphs: `kiln convert`, the build cache behind every place a model
 * is accepted, `kiln generate --model <safetensors folder>`, and the server with such a folder
 * as its default model. The folders are the golden diffusers pipelines (real save_pretrained
 * output, tiny random weights).
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import ort from 'onnxruntime-node';
import sharp from 'sharp';
import { BUILD_INFO, buildKey, ensureBuilt } from '../../src/graphs/cache.js';
import { detectLayout } from '../../src/engine/model.js';
import { GOLDEN_DIR } from './golden.js';
import { startTestServer } from '../server/helpers.js';

const run = promisify(execFile);
const scratch = mkdtempSync(join(tmpdir(), 'kiln-convert-'));
after(() => rmSync(scratch, { recursive: true, force: true }));
const SD15 = join(GOLDEN_DIR, 'pipelines', 'sd15');
const SDXL = join(GOLDEN_DIR, 'pipelines', 'sdxl');

function kiln(args: string[]) {
  return run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { env: { ...process.env, KILN_HOME: join(scratch, 'home') } });
}

test('kiln convert writes the diffusers ONNX layout; each graph loads in a plain ONNX Runtime session', async () => {
  const out = join(scratch, 'sdxl-onnx');
  const { stdout } = await kiln(['convert', SDXL, '--out', out]);
  assert.match(stdout, /^unet: 0\.4 M parameters, .* used in place/m);
  assert.match(stdout, /ONNX layout \(fp32\) in \d+\.\d s$/m);
  const expected: Record<string, string[]> = {
    text_encoder: ['input_ids'],
    text_encoder_2: ['input_ids'],
    unet: ['sample', 'timestep', 'encoder_hidden_states', 'text_embeds', 'time_ids'],
    vae_encoder: ['sample'],
    vae_decoder: ['latent_sample'],
  };
  for (const [folder, inputs] of Object.entries(expected)) {
    const session = await ort.InferenceSession.create(join(out, folder, 'model.onnx'));
    assert.deepEqual([...session.inputNames].sort(), [...inputs].sort(), folder);
    await session.release();
    assert.ok(existsSync(join(out, folder, 'config.json')), `${folder}/config.json`);
  }
  for (const f of ['model_index.json', 'scheduler/scheduler_config.json', 'tokenizer/vocab.json', 'tokenizer_2/merges.txt']) assert.ok(existsSync(join(out, f)), f);
  // fp32 weights are used in place: the graph's weights file is the source's, hard-linked (or,
  // across filesystems, copied once).
  const linked = statSync(join(out, 'unet', 'diffusion_pytorch_model.safetensors'));
  const source = statSync(join(SDXL, 'unet', 'diffusion_pytorch_model.safetensors'));
  assert.equal(linked.size, source.size);
  assert.ok(!existsSync(join(out, 'unet', 'model.onnx_data')), 'nothing needed computing');
  const layout = detectLayout(out);
  assert.equal(layout.family, 'sdxl');
  assert.equal(layout.vaeScalingFactor, 0.13025);
});

test('text encoders take attention_mask with kiln convert --attention-mask and in Kiln\'s own cache builds', async () => {
  const out = join(scratch, 'sd15-masked');
  await kiln(['convert', SD15, '--out', out, '--attention-mask']);
  const cached = await ensureBuilt(SD15, { cacheDir: join(scratch, 'mask-cache') });
  for (const dir of [out, cached]) {
    const session = await ort.InferenceSession.create(join(dir, 'text_encoder', 'model.onnx'));
    assert.deepEqual([...session.inputNames], ['input_ids', 'attention_mask'], dir);
    await session.release();
  }
});

test('kiln convert refuses what is not a safetensors pipeline, and a non-empty output folder', async () => {
  const cases: [string[], RegExp][] = [
    [['convert', scratch, '--out', join(scratch, 'x')], /is not a diffusers folder with safetensors weights/],
    [['convert', SD15, '--out', GOLDEN_DIR], /exists and is not empty/],
  ];
  for (const [args, message] of cases) {
    await assert.rejects(kiln(args), (err: unknown) => {
      const e = err as { code: number; stderr: string };
      assert.notEqual(e.code, 0);
      assert.match(e.stderr.trim(), message);
      assert.doesNotMatch(e.stderr, /\n\s+at /, 'no stack trace');
      return true;
    });
  }
});

test('the build cache: built once per content and options, never half-written, one builder at a time', async () => {
  const cacheDir = join(scratch, 'cache');
  const src = join(scratch, 'sd15-copy');
  cpSync(SD15, src, { recursive: true });

  const [a, b] = await Promise.all([ensureBuilt(src, { cacheDir, pollMs: 20 }), ensureBuilt(src, { cacheDir, pollMs: 20 })]);
  assert.equal(a, b, 'two concurrent requests share one build');
  const builtAt = statSync(join(a, BUILD_INFO)).mtimeMs;
  assert.equal(await ensureBuilt(src, { cacheDir }), a);
  assert.equal(statSync(join(a, BUILD_INFO)).mtimeMs, builtAt, 'the second use does not rebuild');
  assert.notEqual(buildKey(src, 'fp16'), buildKey(src, 'fp32'), 'options are part of the key');

  // Changed content is a new entry.
  const configPath = join(src, 'scheduler', 'scheduler_config.json');
  const config = JSON.parse(readFileSync(configPath, 'utf8')) as Record<string, unknown>;
  writeFileSync(configPath, JSON.stringify({ ...config, steps_offset: 0 }));
  const changed = await ensureBuilt(src, { cacheDir });
  assert.notEqual(changed, a);

  // An interrupted build leaves no entry and no partial folder behind.
  writeFileSync(configPath, JSON.stringify({ ...config, steps_offset: 2 }));
  const interrupted = ensureBuilt(src, {
    cacheDir,
    onProgress: (e) => {
      if (e.component === 'unet') throw new Error('interrupted');
    },
  });
  await assert.rejects(interrupted, /interrupted/);
  const entries = readdirSync(cacheDir);
  assert.equal(entries.filter((e) => e.startsWith('.')).length, 0, `leftovers: ${entries.join(', ')}`);
  assert.equal(entries.length, 2);

  // A lock left by a process that died is taken over.
  const key = buildKey(src, 'fp32');
  const lock = join(cacheDir, `.lock-sd15-copy-fp32-${key}`);
  mkdirSync(lock);
  writeFileSync(join(lock, 'owner'), '999999999\n');
  const rebuilt = await ensureBuilt(src, { cacheDir, pollMs: 20 });
  assert.ok(existsSync(join(rebuilt, BUILD_INFO)));
  assert.ok(!existsSync(lock));
});

test('kiln generate --model takes a safetensors pipeline folder (built on first use, with progress)', async () => {
  const out = join(scratch, 'golden.png');
  const { stdout } = await kiln(['generate', '--model', SD15, '--prompt', 'a red circle', '--seed', '3', '--size', '256x256', '--steps', '2', '--out', out]);
  assert.match(stdout, /256x256 model=sd15 seed=3 steps=2/);
  const meta = await sharp(readFileSync(out)).metadata();
  assert.equal(meta.width, 256);
  assert.equal(meta.height, 256);
  const cache = join(scratch, 'home', 'cache');
  assert.equal(readdirSync(cache).filter((e) => e.startsWith('sd15-fp32-')).length, 1);
});

test('the server serves a safetensors pipeline folder as its default model', async () => {
  const home = mkdtempSync(join(tmpdir(), 'kiln-convert-serve-'));
  mkdirSync(join(home, 'models'));
  symlinkSync(SDXL, join(home, 'models', 'golden-sdxl'), 'dir');
  const server = await startTestServer({ home, defaultModel: 'golden-sdxl', searchDirs: [join(home, 'models')], preload: true });
  try {
    const client = server.client();
    const models = await client.models.list();
    assert.ok(models.data.some((m) => m.id === 'golden-sdxl'));
    const res = await client.images.generate({ prompt: 'a cabin', size: '256x256', response_format: 'b64_json', n: 5 });
    const png = Buffer.from(res.data![0]!.b64_json!, 'base64');
    const meta = await sharp(png).metadata();
    assert.equal(meta.width, 256);
    assert.ok(readdirSync(join(home, 'cache')).some((e) => e.startsWith('golden-sdxl-fp32-') || e.startsWith('sdxl-fp32-')));
  } finally {
    await server.close();
    rmSync(home, { recursive: true, force: true });
  }
});

test('a folder that does not fit its configs fails at load with one line naming the component, key and shapes', async () => {
  const broken = (name: string, change: (dir: string) => void): string => {
    const dir = join(scratch, name);
    cpSync(SD15, dir, { recursive: true });
    change(dir);
    return dir;
  };
  const editJson = (path: string, edit: (v: Record<string, unknown>) => void) => {
    const value = JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
    edit(value);
    writeFileSync(path, JSON.stringify(value));
  };
  const cases: [string, RegExp][] = [
    [
      broken('wrong-class', (d) => editJson(join(d, 'unet', 'config.json'), (c) => (c._class_name = 'ControlNetModel'))),
      /^kiln: unet: config\.json names ControlNetModel; Kiln builds UNet2DConditionModel here$/,
    ],
    [
      broken('wrong-shape', (d) => editJson(join(d, 'unet', 'config.json'), (c) => (c.block_out_channels = [8, 16, 16, 32]))),
      /^kiln: unet: weight "down_blocks\.3\.resnets\.0\.conv1\.weight" in .* has shape \[24, 16, 3, 3\] but config\.json implies \[32, 16, 3, 3\]$/,
    ],
    [
      broken('truncated', (d) => {
        const path = join(d, 'vae', 'diffusion_pytorch_model.safetensors');
        writeFileSync(path, readFileSync(path).subarray(0, 100_000));
      }),
      /^kiln: .*vae\/diffusion_pytorch_model\.safetensors is not a valid safetensors file: tensor ".*" has data_offsets \[\d+, \d+\] outside the \d+ data bytes$/,
    ],
  ];
  for (const [dir, message] of cases) {
    await assert.rejects(kiln(['generate', '--model', dir, '--prompt', 'x', '--steps', '1', '--size', '256x256', '--out', join(scratch, 'x.png')]), (err: unknown) => {
      const e = err as { code: number; stderr: string };
      assert.notEqual(e.code, 0);
      assert.match(e.stderr.trim(), message);
      assert.doesNotMatch(e.stderr, /\n\s+at /, 'no stack trace');
      return true;
    });
  }
  // Nothing half-built is left in the cache.
  const cache = join(scratch, 'home', 'cache');
  assert.deepEqual(readdirSync(cache).filter((e) => /^(wrong|truncated)|^\./.test(e)), []);
});
