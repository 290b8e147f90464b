/**
 * `kiln pull owner/name/path/file.safetensors` against the local fake Hub (test/models/fake-hub.ts):
 * one file, resumed after a cut connection and checked against the Hub's sha256, then installed
 * by what it holds (a single-file checkpoint as a model, a LoRA into $KILN_HOME/loras).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { readKilnJson } from '../../src/graphs/checkpoint.js';
import { PullError } from '../../src/models/errors.js';
import { parseFileSpec, pullFile, type PullFileOptions } from '../../src/models/pull-file.js';
import { FakeHub } from '../models/fake-hub.js';
import { tempHome } from '../models/helpers.js';
import { GOLDEN_DIR } from '../graphs/golden.js';

const run = promisify(execFile);
const SD15_FILE = readFileSync(join(GOLDEN_DIR, 'single_file', 'sd15-single-file.safetensors'));
const SD15_LORA = readFileSync(join(GOLDEN_DIR, 'lora', 'sd15-lora.safetensors'));
const SD15 = join(GOLDEN_DIR, 'pipelines', 'sd15');
const REPO = 'someone/checkpoints';

let hub: FakeHub;
const hfHome = tempHome('kiln-hf-');
before(async () => {
  hub = await FakeHub.start();
  hub.addRepo(REPO, {
    main: {
      'models/tiny v1.safetensors': SD15_FILE,
      'loras/style.safetensors': SD15_LORA,
      'old/model.ckpt': Buffer.from('PK\x03\x04'),
      'junk.safetensors': Buffer.from('not a safetensors file at all'),
      'README.md': Buffer.from('# checkpoints\n'),
    },
  });
});
after(async () => {
  await hub?.close();
});

const opts = (home: string, extra: Partial<PullFileOptions> = {}): PullFileOptions => ({ home, env: { HF_ENDPOINT: hub.url, HF_HOME: hfHome }, retryDelayMs: 0, ...extra });

test('file specs: owner/name/path@revision and Hub URLs; repositories and aliases are not files', () => {
  assert.deepEqual(parseFileSpec('a/b/c/d.safetensors@v1'), { repo: 'a/b', revision: 'v1', path: 'c/d.safetensors' });
  assert.deepEqual(parseFileSpec('https://huggingface.co/a/b/blob/main/x%20y.safetensors'), { repo: 'a/b', revision: 'main', path: 'x y.safetensors' });
  assert.deepEqual(parseFileSpec('https://huggingface.co/a/b/resolve/abc123/dir/m.safetensors?download=true'), { repo: 'a/b', revision: 'abc123', path: 'dir/m.safetensors' });
  assert.equal(parseFileSpec('a/b'), undefined);
  assert.equal(parseFileSpec('a/b@main'), undefined);
  assert.equal(parseFileSpec('sdxl'), undefined);
  assert.throws(() => parseFileSpec('a/b/../../x.safetensors'), (e: unknown) => e instanceof PullError && /inside the repository/.test(e.message));
});

test('a checkpoint file is fetched with resume and sha256, and imported as a model with the file moved in', async () => {
  const home = tempHome();
  const path = 'models/tiny v1.safetensors';
  hub.cutAfter.set(`${REPO}/${path}`, 500_000);
  const r = await pullFile(`${REPO}/${path}`, opts(home, { config: SD15 }));
  assert.equal(r.kind, 'checkpoint');
  assert.equal(r.name, 'tiny-v1');
  assert.equal(r.detected?.description, 'SD 1.x');
  // The cut connection was resumed, not started over.
  assert.ok(hub.bytesServed(REPO, path) < SD15_FILE.length + 100_000, `served ${hub.bytesServed(REPO, path)} of ${SD15_FILE.length}`);
  const dir = join(home, 'models', 'tiny-v1');
  assert.equal(r.dir, dir);
  assert.equal(readKilnJson(dir)?.checkpoint, 'tiny v1.safetensors');
  assert.ok(readFileSync(join(dir, 'tiny v1.safetensors')).equals(SD15_FILE));
  const manifest = JSON.parse(readFileSync(join(dir, 'kiln-source.json'), 'utf8')) as { repo: string; files: { path: string; from?: string; sha256?: string }[] };
  assert.equal(manifest.repo, REPO);
  assert.equal(manifest.files[0]!.from, path);
  assert.match(manifest.files[0]!.sha256!, /^[0-9a-f]{64}$/);
  assert.deepEqual(readdirSync(join(home, 'downloads')).filter((f) => !f.endsWith('.lock')), [], 'nothing left in downloads/');
  const again = await pullFile(`${REPO}/${path}`, opts(home, { config: SD15 }));
  assert.equal(again.upToDate, true);
});

test('a LoRA file goes into the loras folder; corrupt, pickle and non-model files are refused', async () => {
  const home = tempHome();
  const r = await pullFile(`${REPO}/loras/style.safetensors`, opts(home));
  assert.equal(r.kind, 'lora');
  assert.equal(r.dir, join(home, 'loras', 'style.safetensors'));
  assert.ok(readFileSync(r.dir).equals(SD15_LORA));
  assert.ok(existsSync(join(home, 'loras', 'style.source.json')));
  assert.equal((await pullFile(`${REPO}/loras/style.safetensors`, opts(home))).upToDate, true);

  hub.corrupt.add(`${REPO}/loras/style.safetensors`);
  try {
    await assert.rejects(pullFile(`${REPO}/loras/style.safetensors`, opts(home, { name: 'other', retries: 0 })), (e: unknown) => e instanceof PullError && /sha256/i.test(e.message));
  } finally {
    hub.corrupt.delete(`${REPO}/loras/style.safetensors`);
  }
  await assert.rejects(pullFile(`${REPO}/old/model.ckpt`, opts(home)), (e: unknown) => e instanceof PullError && /is a pickle file .* runs whatever code it carries/.test(e.message));
  await assert.rejects(pullFile(`${REPO}/junk.safetensors`, opts(home)), (e: unknown) => e instanceof PullError && /not a valid safetensors file/.test(e.message));
  await assert.rejects(pullFile(`${REPO}/missing.safetensors`, opts(home)), (e: unknown) => e instanceof PullError && /has no file missing\.safetensors \(its \.safetensors files: /.test(e.message));
  assert.ok(!existsSync(join(home, 'models', 'junk')));
});

test('kiln pull owner/name/path/file.safetensors installs it and prints how to use it', async () => {
  const home = tempHome();
  const { stdout } = await run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'pull', `${REPO}/loras/style.safetensors`, '--name', 'ink'], {
    env: { ...process.env, KILN_HOME: home, HF_ENDPOINT: hub.url, HF_HOME: hfHome },
  });
  assert.match(stdout, /^installed LoRA ink: .* from someone\/checkpoints\/loras\/style\.safetensors@main \(commit [0-9a-f]{7}\) in .*loras\/ink\.safetensors; use it with <lora:ink:0\.8>/);
  assert.ok(statSync(join(home, 'loras', 'ink.safetensors')).size === SD15_LORA.length);
});
