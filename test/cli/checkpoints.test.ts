/**
 * The command line for single-file checkpoints and LoRAs: `kiln import` (a checkpoint as a model,
 * `--lora` a LoRA), `kiln generate --lora NAME:SCALE` and `--model FILE`, `kiln convert FILE
 * --lora FILE:SCALE`, `kiln serve --default-model FILE`, and what they refuse. The files are the
 * diffusers-golden single-file checkpoints and LoRAs (tiny weights: imported with the pipeline
 * folder as --config).
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { readPngText } from '../../src/engine/image-codec.js';
import { DiffusionModel } from '../../src/engine/model.js';
import { BUILD_INFO } from '../../src/graphs/cache.js';
import { assertGoldenCase, GOLDEN_DIR, pipelineCase, runGoldenCase } from '../graphs/golden.js';

const run = promisify(execFile);
const scratch = mkdtempSync(join(tmpdir(), 'kiln-cli-checkpoints-'));
after(() => rmSync(scratch, { recursive: true, force: true }));
const home = join(scratch, 'home');
const SD15_FILE = join(GOLDEN_DIR, 'single_file', 'sd15-single-file.safetensors');
const SD15 = join(GOLDEN_DIR, 'pipelines', 'sd15');
const SD15_LORA = join(GOLDEN_DIR, 'lora', 'sd15-lora.safetensors');

function kiln(args: string[]) {
  return run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { env: { ...process.env, KILN_HOME: home } });
}

/** Runs a command that must fail: its one-line message (no stack trace). */
async function refused(args: string[]): Promise<string> {
  let stderr = '';
  await assert.rejects(kiln(args), (err: unknown) => {
    const e = err as { code: number; stderr: string };
    assert.notEqual(e.code, 0);
    assert.doesNotMatch(e.stderr, /\n\s+at /, 'no stack trace');
    stderr = e.stderr.trim();
    return true;
  });
  return stderr;
}

test('kiln import installs a checkpoint (hard-linked) and a LoRA; kiln generate applies --lora and <lora:...>, and the PNG says so', async () => {
  const imported = await kiln(['import', SD15_FILE, '--name', 'tiny', '--config', SD15]);
  assert.match(imported.stdout, /^installed tiny: SD 1\.x checkpoint \(hard-linked, no copy\) in .*models\/tiny; its graphs are built on first use\./);
  assert.equal(statSync(join(home, 'models', 'tiny', 'sd15-single-file.safetensors')).ino, statSync(SD15_FILE).ino);
  const lora = await kiln(['import', '--lora', SD15_LORA, '--name', 'golden']);
  assert.match(lora.stdout, /^installed LoRA golden \(274 modules\) as .*loras\/golden\.safetensors; use it with <lora:golden:0\.8>/);
  assert.ok(existsSync(join(home, 'loras', 'golden.safetensors')));

  const out = join(scratch, 'lora.png');
  const { stdout } = await kiln(['generate', '--model', 'tiny', '--prompt', 'a horse', '--lora', 'golden:0.7', '--seed', '1', '--size', '256x256', '--steps', '1', '--out', out]);
  assert.match(stdout, /256x256 model=tiny seed=1 steps=1 .* loras=golden:0\.7 /);
  assert.match(readPngText(readFileSync(out)).parameters!, /^a horse <lora:golden:0\.7>\n/);
  assert.match(await refused(['generate', '--model', 'tiny', '--prompt', 'x', '--lora', 'nope:1', '--steps', '1', '--size', '256x256', '--out', join(scratch, 'x.png')]), /^kiln: unknown LoRA "nope" \(in --lora\)/);
  assert.match(await refused(['import', SD15_FILE, '--name', 'tiny', '--config', SD15]), /already exists \(pass --force/);
});

test('pickle files are refused (import, serve), and a file that does not fit the shipped configs says how to import it', async () => {
  const ckpt = join(scratch, 'model.ckpt');
  writeFileSync(ckpt, 'PK\x03\x04 a torch zip');
  // (importLora and the loras folder refuse them too: test/graphs/checkpoints.test.ts, lora-use.test.ts.)
  for (const args of [['import', ckpt], ['serve', '--default-model', ckpt, '--port', '0', '--home', home]]) {
    assert.match(await refused(args), /^kiln: .*model\.ckpt is a pickle file \(its extension is \.ckpt\): .*loading one runs whatever code it carries/, args.join(' '));
  }
  // The tiny golden file has no full-size configs: given as a model, the message says how to import it.
  assert.match(await refused(['generate', '--model', SD15_FILE, '--prompt', 'x', '--steps', '1']), /does not fit Kiln's SD 1\.x configs: .*kiln import FILE --config DIR/);
});

test('kiln convert FILE --config DIR --lora FILE:SCALE writes an ONNX folder with the LoRA applied, which gives diffusers\' LoRA case', async (t) => {
  const out = join(scratch, 'converted');
  const { stdout } = await kiln(['convert', SD15_FILE, '--config', SD15, '--out', out, '--lora', `${SD15_LORA}:0.7`]);
  assert.match(stdout, /SD 1\.x checkpoint/);
  assert.match(stdout, /^unet: 256 weights with LoRA deltas$/m);
  assert.match(stdout, /^text_encoder: 18 weights with LoRA deltas$/m);
  assert.ok(existsSync(join(out, BUILD_INFO)));
  assert.deepEqual(readdirSync(scratch).filter((f) => f.startsWith('.kiln-convert-')), [], 'the scratch import is removed');

  const c = pipelineCase('sd15_euler_4_lora');
  const model = await DiffusionModel.load(out);
  try {
    assertGoldenCase(t, await runGoldenCase(model, c), c);
  } finally {
    await model.release();
  }
  const family = await refused(['convert', SD15_FILE, '--config', SD15, '--out', join(scratch, 'wrong'), '--lora', `${join(GOLDEN_DIR, 'lora', 'sdxl-lora.safetensors')}:0.7`]);
  assert.match(family, /is a LoRA for SDXL .* cannot be applied to this SD 1\.x model's unet/);
});
