/**
 * Options every `kiln` command shares: --version, and --home (which wins over $KILN_HOME); and
 * the parsing of serve's and worker's --max-models and serve's --cors-origin.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { collectCorsOrigin, modelMemoryLine } from '../../src/cli/serve.js';

const run = promisify(execFile);
const scratch = mkdtempSync(join(tmpdir(), 'kiln-cli-options-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

// $KILN_HOME points somewhere else, so only --home can make these commands see the test home.
const kiln = (args: string[]) =>
  run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { env: { ...process.env, KILN_HOME: join(scratch, 'elsewhere') } });

test('kiln --version prints the package version', async () => {
  const { version } = JSON.parse(readFileSync('package.json', 'utf8'));
  for (const flag of ['--version', '-V']) {
    const { stdout } = await kiln([flag]);
    assert.equal(stdout.trim(), version);
  }
});

test('--home is taken by every command, and wins over $KILN_HOME', async () => {
  const home = join(scratch, 'home');
  mkdirSync(join(home, 'models'), { recursive: true });
  symlinkSync(await ensureFixture('sdxl'), join(home, 'models', 'my-fixture'), 'dir');
  writeFileSync(join(home, 'aliases.json'), JSON.stringify({ 'my-alias': 'someone/some-repo' }));

  const { stdout: help } = await kiln(['--help']);
  const commands = [...help.matchAll(/^  ([a-z]+)(?:\|[a-z]+)? /gm)].map((m) => m[1]!).filter((c) => c !== 'help');
  assert.ok(commands.length >= 6, `commands found in the help: ${commands.join(', ')}`);
  for (const command of commands) {
    const { stdout } = await kiln([command, '--help']);
    assert.match(stdout, /--home <dir>/, `kiln ${command} --help lists --home`);
  }

  const { stdout: models } = await kiln(['models', '--home', home]);
  assert.match(models, /^my-fixture\s+SDXL/m);
  const { stdout: aliases } = await kiln(['models', '--aliases', '--home', home]);
  assert.match(aliases, /^my-alias\s+someone\/some-repo/m);
  const out = join(scratch, 'x.png');
  const { stdout: generated } = await kiln(['generate', '--home', home, '--model', 'my-fixture', '--prompt', 'x', '--steps', '1', '--size', '256x256', '--out', out]);
  assert.match(generated, /model=my-fixture/);
});

test('--max-models takes a positive count on kiln serve and kiln worker; 0 or a word is refused before anything starts', { timeout: 60_000 }, async () => {
  // The refusal names the flag, so each command is shown to take it.
  for (const [command, bad, extra] of [['serve', '0', ['--port', '0']], ['worker', 'two', ['--queue', 'redis://127.0.0.1:1']]] as const) {
    await assert.rejects(kiln([command, ...extra, '--max-models', bad]), (e: { stderr: string }) => /--max-models <n>.*expected a positive integer/.test(e.stderr), `kiln ${command} --max-models ${bad}`);
  }
});

test('--cors-origin takes * or an origin (scheme://host[:port]); a path, another scheme or a non-URL is refused', () => {
  assert.deepEqual(collectCorsOrigin('https://app.example', collectCorsOrigin('*')), ['*', 'https://app.example']);
  assert.deepEqual(collectCorsOrigin('http://127.0.0.1:5173/'), ['http://127.0.0.1:5173'], 'a trailing slash is the origin');
  for (const bad of ['https://app.example/path', 'ftp://app.example', 'app.example', '']) {
    assert.throws(() => collectCorsOrigin(bad), /expected \* or an origin/, bad);
  }
});

test('the start-up banner states the model memory bounds when set, and nothing otherwise', () => {
  assert.equal(modelMemoryLine(2, 600_000), 'kiln: at most 2 model(s) loaded per worker; models unused for 10 min unloaded\n');
  assert.equal(modelMemoryLine(undefined, 45_000), 'kiln: models unused for 45 s unloaded\n');
  assert.equal(modelMemoryLine(undefined, undefined), '');
});

test('kiln serve --max-requests-per-key without API keys is refused, saying why', { timeout: 60_000 }, async () => {
  await assert.rejects(
    run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'serve', '--port', '0', '--home', join(scratch, 'no-keys'), '--max-requests-per-key', '2'], { env: { ...process.env, KILN_API_KEYS: '' } }),
    (e: { stderr: string }) => /--max-requests-per-key needs API keys \(--api-key or KILN_API_KEYS\)/.test(e.stderr),
  );
});
