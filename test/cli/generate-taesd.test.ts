/**
 * `kiln generate --preview-dir` with the family's tiny decoder installed in $KILN_HOME/previews/
 * (the diffusers-made TAESD fixture as taesdxl, for the SDXL fixture model): the preview PNGs are
 * the decoder's pictures, other than the linear map's of a home without it; the image is the same.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import sharp from 'sharp';
import { ensureFixture } from '../../tools/fixtures/variants.js';

const run = promisify(execFile);
const TAESD_FIXTURE = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'taesd');
const scratch = mkdtempSync(join(tmpdir(), 'kiln-cli-taesd-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

/** `kiln generate` with previews in scratch/<name>/ under the given home; its preview files and image. */
async function generate(name: string, home: string): Promise<{ previews: Buffer[]; image: Buffer }> {
  const model = await ensureFixture('sdxl');
  const dir = join(scratch, name);
  const out = join(scratch, `${name}.png`);
  const args = ['generate', '--model', model, '--prompt', 'a fox', '--seed', '3', '--size', '256x256', '--steps', '6', '--out', out, '--preview-dir', dir, '--previews', '2'];
  // Budget Infinity: the decoder is used whatever it costs beside the tiny model (no timing in the test).
  await run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { env: { ...process.env, KILN_HOME: home, KILN_PREVIEW_BUDGET: 'Infinity' } });
  const files = readdirSync(dir).sort();
  assert.deepEqual(files, ['partial-0-step-2.png', 'partial-1-step-4.png']);
  return { previews: files.map((f) => readFileSync(join(dir, f))), image: readFileSync(out) };
}

test('kiln generate --preview-dir: with previews/taesdxl the PNGs are the tiny decoder\'s, without it the linear map\'s', async () => {
  const withDecoder = join(scratch, 'home-taesd');
  mkdirSync(join(withDecoder, 'previews', 'taesdxl'), { recursive: true });
  for (const f of ['config.json', 'diffusion_pytorch_model.safetensors']) copyFileSync(join(TAESD_FIXTURE, f), join(withDecoder, 'previews', 'taesdxl', f));
  const tiny = await generate('tiny', withDecoder);
  const linear = await generate('linear', join(scratch, 'home-plain'));
  for (const [i, p] of tiny.previews.entries()) {
    const meta = await sharp(p).metadata();
    assert.deepEqual([meta.format, meta.width, meta.height], ['png', 256, 256]);
    assert.ok(!p.equals(linear.previews[i]!), `preview ${i} comes from the tiny decoder`);
  }
  assert.ok(tiny.image.equals(linear.image), 'previews change nothing in the image');
});
