import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import sharp from 'sharp';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { readPngText } from '../../src/engine/image-codec.js';

const run = promisify(execFile);
const scratch = mkdtempSync(join(tmpdir(), 'kiln-cli-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

function kiln(args: string[]) {
  return run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], {
    env: { ...process.env, KILN_HOME: join(scratch, 'home') },
  });
}

test('kiln generate writes a PNG with its parameters and prints a summary line', async () => {
  const model = await ensureFixture('sdxl');
  const out = join(scratch, 'cat.png');
  const args = ['generate', '--model', model, '--prompt', 'a (cat)1.2', '--seed', '7', '--size', '256x256', '--steps', '3', '--scheduler', 'dpmpp_2m', '--out', out];
  const { stdout } = await kiln(args);
  assert.match(stdout, /256x256 .*seed=7 steps=3 scheduler=dpmpp_2m .*time=\d+\.\d+s/);
  const png = readFileSync(out);
  const meta = await sharp(png).metadata();
  assert.equal(meta.width, 256);
  assert.match(readPngText(png).parameters!, /^a \(cat\)1\.2\nSteps: 3, Sampler: dpmpp_2m, CFG scale: 7, Seed: 7/);
  // A second run in another process gives the same bytes.
  await kiln(args.map((a) => (a === out ? join(scratch, 'again.png') : a)));
  assert.ok(readFileSync(join(scratch, 'again.png')).equals(png));
});

test('kiln generate --preview-dir writes the partial images as PNGs at the image size', async () => {
  const model = await ensureFixture('sdxl');
  const dir = join(scratch, 'previews');
  const { stdout } = await kiln(['generate', '--model', model, '--prompt', 'a fox', '--seed', '3', '--size', '256x256', '--steps', '8', '--out', join(scratch, 'fox.png'), '--preview-dir', dir]);
  assert.match(stdout, / previews=3 /);
  const files = readdirSync(dir).sort();
  assert.deepEqual(files, ['partial-0-step-2.png', 'partial-1-step-4.png', 'partial-2-step-6.png']);
  for (const f of files) {
    const meta = await sharp(readFileSync(join(dir, f))).metadata();
    assert.deepEqual([meta.format, meta.width, meta.height], ['png', 256, 256], f);
  }
  await kiln(['generate', '--model', model, '--prompt', 'a fox', '--seed', '3', '--size', '256x256', '--steps', '8', '--out', join(scratch, 'fox2.png'), '--preview-dir', join(scratch, 'one'), '--previews', '1']);
  assert.deepEqual(readdirSync(join(scratch, 'one')), ['partial-0-step-4.png']);
  assert.ok(readFileSync(join(scratch, 'fox2.png')).equals(readFileSync(join(scratch, 'fox.png'))), 'previews change nothing in the image');
});

test('kiln generate: bad options and unknown models exit non-zero with one clear line', async () => {
  const model = await ensureFixture('sd15-optimum');
  const cases: [string[], RegExp][] = [
    [['--model', model, '--quality', 'ultra'], /^kiln: unknown quality "ultra"; allowed: draft, low, smooth/],
    [['--model', model, '--size', '300x300'], /^kiln: unsupported size "300x300"; allowed: 256x256, 512x512, 1024x1024/],
    [['--model', model, '--scheduler', 'warp'], /^kiln: unknown scheduler "warp"/],
    [['--model', 'no-such-model'], /^kiln: model "no-such-model" is not installed .*kiln pull no-such-model/],
    [['--model', model, '--seed', '-3'], /error: option .*--seed.* argument '-3' is invalid/],
  ];
  for (const [extra, message] of cases) {
    await assert.rejects(kiln(['generate', '--prompt', 'x', '--steps', '1', '--out', join(scratch, 'x.png'), ...extra]), (err: unknown) => {
      const e = err as { code: number; stderr: string };
      assert.notEqual(e.code, 0);
      assert.match(e.stderr.trim(), message);
      assert.doesNotMatch(e.stderr, /\n\s+at /, 'no stack trace');
      return true;
    });
  }
});
