/**
 * The `kiln pull`, `kiln models` and `kiln rm` commands end to end, as a user runs them,
 * against the fake Hub.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { FakeHub } from './fake-hub.js';
import { fixtureRepo, tempHome } from './helpers.js';

const run = promisify(execFile);
const MAIN = join(import.meta.dirname, '..', '..', 'src', 'cli', 'main.ts');
let hub: FakeHub;
const home = tempHome();

before(async () => {
  hub = await FakeHub.start();
  hub.addRepo('kiln-test/tiny-sd', { main: await fixtureRepo('sd15-optimum') });
});
after(async () => {
  await hub?.close();
});

async function kiln(args: string[], extraEnv: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  const env = { PATH: process.env.PATH, HOME: home, KILN_HOME: home, HF_HOME: join(home, 'hf'), HF_ENDPOINT: hub.url, ...extraEnv };
  try {
    const { stdout, stderr } = await run(process.execPath, ['--import', 'tsx', MAIN, ...args], { env, timeout: 60_000 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

test('kiln pull, kiln models, kiln rm', async () => {
  const pull = await kiln(['pull', 'kiln-test/tiny-sd', '--name', 'tiny']);
  assert.equal(pull.code, 0, pull.stderr);
  assert.match(pull.stderr, /pulling kiln-test\/tiny-sd@main \(commit [0-9a-f]{7}\) into .*models\/tiny/);
  assert.match(pull.stderr, /unet\/model\.onnx_data .* ✓/);
  assert.match(pull.stdout, /installed tiny: \d+ files, .*kiln generate --model tiny/);
  assert.ok(existsSync(join(home, 'models', 'tiny', 'kiln-source.json')));

  // Independent commands run side by side (each CLI start costs about a second).
  const [models, again, aliases, offline] = await Promise.all([
    kiln(['models']),
    kiln(['pull', 'kiln-test/tiny-sd', '--name', 'tiny']),
    kiln(['models', '--aliases']),
    kiln(['pull', 'be-stable-diffusion-xl-base-1.0'], { HF_HUB_OFFLINE: '1' }),
  ]);
  assert.equal(models.code, 0, models.stderr);
  assert.match(models.stdout, /^NAME +FAMILY +SIZE +SOURCE/m);
  assert.match(models.stdout, /^tiny +SD 1\.x +\d+(\.\d)? MB +kiln-test\/tiny-sd@main \([0-9a-f]{7}\)/m);
  assert.match(again.stdout, /tiny is up to date/);
  assert.match(aliases.stdout, /^be-stable-diffusion-xl-base-1\.0 +stabilityai\/stable-diffusion-xl-base-1\.0 +~6\.9 GB/m);
  assert.equal(offline.code, 1);
  assert.match(offline.stderr, /^kiln: HF_HUB_OFFLINE is set/);

  const rm = await kiln(['rm', 'tiny']);
  assert.equal(rm.code, 0, rm.stderr);
  assert.match(rm.stdout, /removed tiny/);
  assert.ok(!existsSync(join(home, 'models', 'tiny')));
});
