/**
 * kiln pull against a local fake Hub (fake-hub.ts) serving the engine's fixture models as Hub
 * repositories, beside the PyTorch/OpenVINO files a pull must skip.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ensureFixture, FIXTURE_VARIANTS, type FixtureVariant } from '../../tools/fixtures/variants.js';
import { DiffusionModel, detectLayout } from '../../src/engine/model.js';
import { generate } from '../../src/engine/pipeline.js';
import { encodeGeneratedPng } from '../../src/engine/image-codec.js';
import { defaultModelName, listInstalledModels, locateModel } from '../../src/catalog/installed-models.js';
import { pullModel, type PullOptions } from '../../src/models/pull.js';
import { PullError } from '../../src/models/errors.js';
import { resolvePullSpec } from '../../src/models/aliases.js';
import { listModels, removeModel } from '../../src/models/installed.js';
import type { SourceManifest } from '../../src/models/registry.js';
import { FakeHub } from './fake-hub.js';
import { filler, fixtureRepo, foreignFiles, readTree, TAKEN_FOREIGN, tempHome } from './helpers.js';

const SERVED: FixtureVariant[] = [...FIXTURE_VARIANTS, 'sdxl-turbo'];
let hub: FakeHub;
const hfHome = tempHome('kiln-hf-');

before(async () => {
  hub = await FakeHub.start();
  for (const v of SERVED) hub.addRepo(`kiln-test/${v}`, { main: await fixtureRepo(v) });
  hub.addRepo('kiln-test/pinned', { main: await fixtureRepo('sd15-optimum'), v1: await fixtureRepo('sd15-legacy') });
  hub.addRepo('kiln-test/gated', { main: await fixtureRepo('sd15-optimum', false) }, { gated: true });

  // PyTorch only: a diffusers repository without any ONNX export.
  const sd = await fixtureRepo('sd15-optimum', false);
  const pytorchOnly: Record<string, Buffer> = { ...foreignFiles() };
  for (const p of Object.keys(sd)) if (!p.endsWith('.onnx') && !p.endsWith('.onnx_data')) pytorchOnly[p] = sd[p]!;
  pytorchOnly['unet/diffusion_pytorch_model.safetensors'] = filler(3_000_000, 21);
  hub.addRepo('kiln-test/pytorch-only', { main: pytorchOnly });

  // SDXL whose second encoder lacks its ONNX file (its folder is there).
  const xl = await fixtureRepo('sdxl', false);
  delete xl['text_encoder_2/model.onnx'];
  hub.addRepo('kiln-test/sdxl-no-te2', { main: xl });

  // SDXL whose model_index.json names text_encoder_2 but which has no such folder at all.
  const xl2 = await fixtureRepo('sdxl', false);
  for (const p of Object.keys(xl2)) if (p.startsWith('text_encoder_2/') || p.startsWith('tokenizer_2/')) delete xl2[p];
  hub.addRepo('kiln-test/sdxl-index-only', { main: xl2 });

  // The unet's external data is missing: only the graph (which names it) can tell.
  const noData = await fixtureRepo('sd15-legacy', false);
  delete noData['unet/weights.pb'];
  hub.addRepo('kiln-test/no-data', { main: noData });

  // Not diffusion layouts: DWPose-like loose ONNX files, a ControlNet graph with external data.
  const ext = readTree(await ensureFixture('sd15-external-data'));
  const vae = readTree(await ensureFixture('sd15-optimum'));
  hub.addRepo('kiln-test/DWPose', {
    main: {
      'yolox_l.onnx': vae['vae_decoder/model.onnx']!,
      'dw-ll_ucoco_384.onnx': vae['vae_encoder/model.onnx']!,
      'dw-ll_ucoco_384.pth': filler(200_000, 22),
      'README.md': Buffer.from('# DWPose\n'),
    },
  });
  hub.addRepo('kiln-test/ControlNet', {
    main: {
      'StableDiffusionXL/OpenPose/model.onnx': ext['unet/model.onnx']!,
      'StableDiffusionXL/OpenPose/model.onnx.data': ext['unet/model.onnx.data']!,
      'StableDiffusionXL/Canny/model.onnx': ext['unet/model.onnx']!,
      'StableDiffusionXL/Canny/model.onnx.data': filler(ext['unet/model.onnx.data']!.length, 23),
    },
  });
});

after(async () => {
  await hub?.close();
});

function env(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return { HF_ENDPOINT: hub.url, HF_HOME: hfHome, ...extra };
}

function opts(home: string, extra: Partial<PullOptions> = {}): PullOptions {
  return { home, env: env(), retryDelayMs: 0, ...extra };
}

const manifestOf = (dir: string) => JSON.parse(readFileSync(join(dir, 'kiln-source.json'), 'utf8')) as SourceManifest;
const isPullError = (code: PullError['code'], re?: RegExp) => (err: unknown) => {
  assert.ok(err instanceof PullError, `expected a PullError, got ${String(err)}`);
  assert.equal(err.code, code, err.message);
  if (re) assert.match(err.message, re);
  return true;
};

async function png(dir: string): Promise<Buffer> {
  const model = await DiffusionModel.load(dir, { name: 'fixture' }); // same name: the PNG's parameters chunk names the model
  try {
    const r = await generate(model, { prompt: 'a red circle on a blue background', seed: 7, size: '256x256', steps: 2 });
    return await encodeGeneratedPng(r.image, r.settings);
  } finally {
    await model.release();
  }
}

for (const variant of SERVED) {
  test(`full pull of ${variant}: exactly the layout's files, verified, installed, and it generates`, async () => {
    hub.reset();
    const home = tempHome();
    const repo = `kiln-test/${variant}`;
    const events: string[] = [];
    const r = await pullModel(repo, opts(home, { onEvent: (e) => events.push(e.type) }));
    const dir = join(home, 'models', variant);
    assert.equal(r.dir, dir);
    assert.equal(r.name, variant);
    assert.equal(r.upToDate, false);

    const source = readTree(await ensureFixture(variant));
    const installed = readTree(dir);
    assert.deepEqual(Object.keys(installed).sort(), [...Object.keys(source), ...TAKEN_FOREIGN, 'kiln-source.json'].sort());
    for (const [p, data] of Object.entries(source)) assert.ok(installed[p]!.equals(data), `${p} differs`);
    for (const p of Object.keys(foreignFiles())) {
      if (!TAKEN_FOREIGN.includes(p)) assert.equal(hub.bytesServed(repo, p), 0, `${p} must not be downloaded`);
    }
    // Every byte fetched once; nothing left behind in downloads/.
    assert.equal(hub.totalServed(repo), r.totalBytes);
    assert.equal(r.fetchedBytes, r.totalBytes);
    assert.ok(!existsSync(join(home, 'downloads', variant)));
    assert.ok(!existsSync(join(home, 'downloads', `${variant}.lock`)));
    assert.ok(events.includes('plan') && events.includes('bytes') && events.at(-1) === 'installed');

    const m = manifestOf(dir);
    assert.equal(m.repo, repo);
    assert.equal(m.revision, 'main');
    assert.equal(m.commit, hub.commitOf(repo, 'main'));
    assert.equal(m.kind, 'diffusion');
    assert.equal(m.endpoint, hub.url);
    const unet = m.files.find((f) => f.path === 'unet/model.onnx')!;
    assert.match(unet.sha256!, /^[0-9a-f]{64}$/);
    assert.match(m.files.find((f) => f.path === 'model_index.json')!.gitOid!, /^[0-9a-f]{40}$/);

    assert.equal(detectLayout(dir).label, detectLayout(await ensureFixture(variant)).label);
    assert.ok((await png(dir)).equals(await png(await ensureFixture(variant))), 'the pulled model must draw what the fixture draws');

    // Pulling the same commit again fetches nothing.
    hub.reset();
    const again = await pullModel(repo, opts(home));
    assert.equal(again.upToDate, true);
    assert.equal(hub.totalServed(repo), 0);
  });
}

test('an interrupted download resumes: bytes already on disk are not fetched again', async () => {
  hub.reset();
  const home = tempHome();
  const repo = 'kiln-test/sdxl';
  const path = 'unet/model.onnx_data';
  const size = readTree(await ensureFixture('sdxl'))[path]!.length;
  const cut = 20_000;
  assert.ok(size > cut);
  hub.cutAfter.set(`${repo}/${path}`, cut);
  await assert.rejects(pullModel(repo, opts(home, { retries: 0 })), isPullError('network', /resume/));
  assert.ok(!existsSync(join(home, 'models', 'sdxl')), 'nothing installed after a failed pull');
  assert.equal(statSync(join(home, 'downloads', 'sdxl', `${path}.incomplete`)).size, cut);
  const servedFirst = hub.totalServed(repo);

  const r = await pullModel(repo, opts(home));
  assert.equal(hub.bytesServed(repo, path), size, 'the cut file: first part once, the rest once');
  assert.ok(hub.requests.some((q) => q.range === `bytes=${cut}-`), 'resumed with an HTTP range');
  assert.equal(hub.totalServed(repo), r.totalBytes, 'no byte fetched twice over both pulls');
  assert.equal(r.fetchedBytes, r.totalBytes - servedFirst);
  assert.ok(readTree(join(home, 'models', 'sdxl'))[path]!.equals(readTree(await ensureFixture('sdxl'))[path]!));
});

test('a connection cut mid-file is retried with a range request within the same pull', async () => {
  hub.reset();
  const home = tempHome();
  const repo = 'kiln-test/lcm';
  const path = 'unet/model.onnx_data';
  hub.cutAfter.set(`${repo}/${path}`, 10_000);
  const retries: string[] = [];
  const r = await pullModel(repo, opts(home, { onEvent: (e) => e.type === 'retry' && retries.push(e.path) }));
  assert.deepEqual(retries, [path]);
  assert.ok(hub.requests.some((q) => q.range === 'bytes=10000-'));
  assert.equal(hub.totalServed(repo), r.totalBytes);
  assert.ok(existsSync(join(home, 'models', 'lcm', path)));
});

test('a corrupted file (wrong sha256) is refused and nothing half-written stays in the models folder', async () => {
  hub.reset();
  const home = tempHome();
  const repo = 'kiln-test/sd15-optimum';
  hub.corrupt.add(`${repo}/unet/model.onnx_data`);
  await assert.rejects(pullModel(repo, opts(home)), isPullError('integrity', /unet\/model\.onnx_data: sha256 mismatch/));
  assert.deepEqual(readdirSync(join(home, 'models')), []);
  const staging = join(home, 'downloads', 'sd15-optimum');
  assert.ok(!existsSync(join(staging, 'unet/model.onnx_data')) && !existsSync(join(staging, 'unet/model.onnx_data.incomplete')));
  assert.deepEqual(listInstalledModels([join(home, 'models')], home), []);

  // A small file stored in git is checked against its git blob sha1.
  hub.reset();
  const home2 = tempHome();
  hub.corrupt.add(`${repo}/model_index.json`);
  await assert.rejects(pullModel(repo, opts(home2)), isPullError('integrity', /model_index\.json: git sha1 mismatch/));
  assert.deepEqual(readdirSync(join(home2, 'models')), []);

  // Once the Hub serves the right bytes, the same pull completes.
  hub.reset();
  const r = await pullModel(repo, opts(home));
  assert.ok(existsSync(join(r.dir, 'unet/model.onnx_data')));
});

test('a repository with no usable layout fails before downloading large files, saying what is missing', async () => {
  hub.reset();
  const home = tempHome();
  await assert.rejects(
    pullModel('kiln-test/pytorch-only', opts(home)),
    isPullError('layout', /not a usable diffusers ONNX layout: missing text_encoder\/model\.onnx, unet\/model\.onnx, vae_decoder\/model\.onnx\..*PyTorch\/safetensors/),
  );
  assert.equal(hub.totalServed('kiln-test/pytorch-only'), 0, 'nothing downloaded');

  await assert.rejects(pullModel('kiln-test/sdxl-no-te2', opts(home)), isPullError('layout', /missing text_encoder_2\/model\.onnx\.$/));
  assert.equal(hub.totalServed('kiln-test/sdxl-no-te2'), 0);

  // Only model_index.json says there is a second encoder: it alone is fetched (a few hundred bytes).
  await assert.rejects(
    pullModel('kiln-test/sdxl-index-only', opts(home)),
    isPullError('layout', /missing tokenizer_2\/vocab\.json, tokenizer_2\/merges\.txt, text_encoder_2\/model\.onnx/),
  );
  assert.deepEqual([...hub.served.keys()].filter((k) => k.startsWith('kiln-test/sdxl-index-only/')), ['kiln-test/sdxl-index-only/model_index.json']);
  assert.deepEqual(readdirSync(join(home, 'models')), []);
  assert.ok(!existsSync(join(home, 'downloads', 'sdxl-index-only')), 'a layout failure leaves no partial download');

  await assert.rejects(
    pullModel('kiln-test/no-data', opts(home)),
    isPullError('layout', /unet\/model\.onnx needs its external data unet\/weights\.pb, which the repository does not have/),
  );
  assert.deepEqual(readdirSync(join(home, 'models')), []);
});

test('aliases: built-in ones resolve, user aliases.json extends them, aliases of installed models are located and listed', async () => {
  hub.reset();
  const home = tempHome();
  const builtin = resolvePullSpec('be-stable-diffusion-xl-base-1.0', home);
  assert.equal(builtin.repo, 'stabilityai/stable-diffusion-xl-base-1.0');
  assert.equal(builtin.revision, 'main');
  assert.equal(builtin.kind, 'diffusion');

  writeFileSync(
    join(home, 'aliases.json'),
    JSON.stringify({ 'tiny-sd': 'kiln-test/sd15-optimum', 'be-stable-diffusion-xl-base-1.0': { repo: 'kiln-test/sdxl' } }),
  );
  const r = await pullModel('tiny-sd', opts(home));
  assert.equal(r.name, 'tiny-sd');
  assert.equal(r.alias, 'tiny-sd');
  assert.equal(r.repo, 'kiln-test/sd15-optimum');
  assert.equal(manifestOf(join(home, 'models', 'tiny-sd')).alias, 'tiny-sd');

  // The reference default, installed under another name, is still found by its alias.
  await pullModel('kiln-test/sdxl', opts(home, { name: 'my-xl' }));
  {
    // The home is passed, never read from the environment: the aliases are <home>'s.
    const dirs = [join(home, 'models')];
    const entries = listInstalledModels(dirs, home);
    assert.deepEqual(
      entries.map((e) => [e.name, e.aliasOf]),
      [
        ['my-xl', undefined],
        ['tiny-sd', undefined],
        ['be-stable-diffusion-xl-base-1.0', 'my-xl'],
      ],
    );
    assert.equal(locateModel('be-stable-diffusion-xl-base-1.0', dirs, { home }), join(home, 'models', 'my-xl'));
    assert.equal(defaultModelName(dirs, home), 'be-stable-diffusion-xl-base-1.0');
    const listed = listModels({ home, builtinDir: null });
    assert.deepEqual(listed.find((m) => m.name === 'my-xl')!.aliases, ['be-stable-diffusion-xl-base-1.0']);
  }
});

test('file aliases install explicit files (DWPose-like), external data follows its graph, into models/ or a dir', async () => {
  hub.reset();
  const home = tempHome();
  writeFileSync(
    join(home, 'aliases.json'),
    JSON.stringify({
      pose: { repo: 'kiln-test/DWPose', files: ['yolox_l.onnx', 'dw-ll_ucoco_384.onnx'], kind: 'annotator' },
      'cn-pose': {
        repo: 'kiln-test/ControlNet',
        files: [{ path: 'StableDiffusionXL/OpenPose/model.onnx', as: 'model.onnx' }],
        kind: 'controlnet',
        dir: 'annotators/cn-pose',
      },
    }),
  );
  await pullModel('pose', opts(home));
  assert.deepEqual(readdirSync(join(home, 'models', 'pose')).sort(), ['dw-ll_ucoco_384.onnx', 'kiln-source.json', 'yolox_l.onnx']);
  assert.equal(hub.bytesServed('kiln-test/DWPose', 'dw-ll_ucoco_384.pth'), 0);

  const cn = await pullModel('cn-pose', opts(home));
  assert.equal(cn.dir, join(home, 'annotators', 'cn-pose'));
  assert.deepEqual(readdirSync(cn.dir).sort(), ['kiln-source.json', 'model.onnx', 'model.onnx.data']);
  assert.deepEqual(
    manifestOf(cn.dir).files.map((f) => [f.path, f.from]),
    [
      ['model.onnx', 'StableDiffusionXL/OpenPose/model.onnx'],
      ['model.onnx.data', 'StableDiffusionXL/OpenPose/model.onnx.data'],
    ],
  );
  assert.equal(hub.bytesServed('kiln-test/ControlNet', 'StableDiffusionXL/Canny/model.onnx.data'), 0);

  const listed = listModels({ home, builtinDir: null });
  assert.deepEqual(listed.map((m) => [m.name, m.kind, m.family]), [
    ['pose', 'annotator', 'annotator'],
    ['cn-pose', 'controlnet', 'ControlNet'],
  ]);
  assert.deepEqual(listInstalledModels([join(home, 'models')], home), [], 'non-diffusion installs are not served as models');
  const removed = await removeModel('cn-pose', { home });
  assert.equal(removed.dir, cn.dir);
  assert.ok(!existsSync(cn.dir));
});

test('a revision is pinned: repo@rev installs that revision, fetched by its commit', async () => {
  hub.reset();
  const home = tempHome();
  const repo = 'kiln-test/pinned';
  const v1 = hub.commitOf(repo, 'v1');
  const main = hub.commitOf(repo, 'main');
  const r = await pullModel(`${repo}@v1`, opts(home));
  assert.equal(r.revision, 'v1');
  assert.equal(r.commit, v1);
  const dir = join(home, 'models', 'pinned');
  const legacy = readTree(await ensureFixture('sd15-legacy'));
  const installed = readTree(dir);
  for (const [p, data] of Object.entries(legacy)) assert.ok(installed[p]?.equals(data), p);
  assert.ok('unet/weights.pb' in installed && !('unet/model.onnx_data' in installed));
  const m = manifestOf(dir);
  assert.equal(m.revision, 'v1');
  assert.equal(m.commit, v1);
  const resolves = hub.requests.filter((q) => q.server === 'api' && q.path.includes('/resolve/'));
  assert.ok(resolves.length > 0 && resolves.every((q) => q.path.includes(`/resolve/${v1}/`)));
  assert.ok(!hub.requests.some((q) => q.path.includes(main)));

  // Moving the same name to main swaps the whole folder.
  const r2 = await pullModel(repo, opts(home, { name: 'pinned' }));
  assert.equal(r2.commit, main);
  const now = readTree(dir);
  assert.ok('unet/model.onnx_data' in now && !('unet/weights.pb' in now));
  assert.equal(manifestOf(dir).commit, main);
  assert.equal(detectLayout(dir).label, 'SD 1.x');
});

test('HF_HUB_OFFLINE=1 fails fast, before any request', async () => {
  hub.reset();
  const home = tempHome();
  for (const value of ['1', 'true', 'YES']) {
    const started = performance.now();
    await assert.rejects(
      pullModel('be-stable-diffusion-xl-base-1.0', { home, env: env({ HF_HUB_OFFLINE: value }) }),
      isPullError('offline', /HF_HUB_OFFLINE is set: .*stabilityai\/stable-diffusion-xl-base-1\.0@main/),
    );
    assert.ok(performance.now() - started < 500);
  }
  assert.equal(hub.requests.length, 0);
  assert.ok(!existsSync(join(home, 'downloads')));
});

test('HF_TOKEN is sent as a Bearer header to the Hub, never to the CDN; gated repos need it', async () => {
  hub.reset();
  const home = tempHome();
  await assert.rejects(pullModel('kiln-test/gated', opts(home)), isPullError('auth', /gated.*HF_TOKEN/));
  assert.equal(hub.totalServed('kiln-test/gated'), 0);
  await assert.rejects(
    pullModel('kiln-test/gated', { ...opts(home), env: env({ HF_TOKEN: 'hf_wrong' }) }),
    isPullError('auth', /refused HF_TOKEN \(401\)/),
  );

  hub.reset();
  const r = await pullModel('kiln-test/gated', { ...opts(home), env: env({ HF_TOKEN: hub.token }) });
  assert.equal(r.name, 'gated');
  const api = hub.requests.filter((q) => q.server === 'api');
  const cdn = hub.requests.filter((q) => q.server === 'cdn');
  assert.ok(api.length > 3 && cdn.length > 3);
  assert.ok(api.every((q) => q.authorization === `Bearer ${hub.token}`), 'every Hub request carries the token');
  assert.ok(cdn.every((q) => q.authorization === undefined), 'the token never follows a redirect to another origin');

  // The token file huggingface_hub writes ($HF_HOME/token) works too.
  hub.reset();
  writeFileSync(join(hfHome, 'token'), `${hub.token}\n`);
  try {
    await pullModel('kiln-test/gated', opts(tempHome()));
    assert.ok(hub.requests.filter((q) => q.server === 'api').every((q) => q.authorization === `Bearer ${hub.token}`));
  } finally {
    writeFileSync(join(hfHome, 'token'), '');
  }
});

test('not enough free disk space fails before downloading; --dry-run plans without downloading', async () => {
  hub.reset();
  const home = tempHome();
  await assert.rejects(
    pullModel('kiln-test/sdxl', opts(home, { statfs: async () => ({ bavail: 100, bsize: 4096 }) })),
    isPullError('disk', /not enough free disk space in .*downloads: the download needs .* is available/),
  );
  assert.equal(hub.totalServed('kiln-test/sdxl'), 0);

  const plan = await pullModel('kiln-test/sdxl', opts(home, { dryRun: true }));
  assert.equal(plan.dryRun, true);
  assert.equal(hub.totalServed('kiln-test/sdxl'), 0);
  assert.ok(plan.files.some((f) => f.path === 'unet/model.onnx_data'));
  assert.ok(plan.skipped!.includes('sd_xl_base_1.0.safetensors') && plan.skipped!.includes('unet/openvino_model.bin'));
  assert.ok(!existsSync(join(home, 'models', 'sdxl')));
});

test('kiln rm removes an installed model; names that exist but were not pulled are protected', async () => {
  hub.reset();
  const home = tempHome();
  await pullModel('kiln-test/sd15-legacy', opts(home, { name: 'old' }));
  assert.equal(listModels({ home, builtinDir: null })[0]!.family, 'SD 1.x');
  const removed = await removeModel('old', { home });
  assert.ok(removed.bytes > 0);
  assert.deepEqual(listInstalledModels([join(home, 'models')], home), []);

  // A folder kiln did not pull (no readable kiln-source.json) is not overwritten without --force.
  const handMade = join(home, 'models', 'hand-made');
  await pullModel('kiln-test/sd15-legacy', opts(home, { name: 'hand-made' }));
  writeFileSync(join(handMade, 'kiln-source.json'), '{}');
  await assert.rejects(pullModel('kiln-test/sd15-legacy', opts(home, { name: 'hand-made' })), isPullError('exists', /--force/));
  const forced = await pullModel('kiln-test/sd15-legacy', opts(home, { name: 'hand-made', force: true }));
  assert.equal(manifestOf(forced.dir).repo, 'kiln-test/sd15-legacy');
});
