/**
 * `kiln pull taesd` / `kiln pull taesdxl` against the fake Hub (fake-hub.ts) serving repositories
 * laid out like madebyollin/taesd and madebyollin/taesdxl (the diffusers files beside the original
 * .pth checkpoints and PyTorch .bin): exactly config.json and the safetensors weights are fetched,
 * into $KILN_HOME/previews/<alias>/, where the previews look for them (engine/tiny-decoder.ts),
 * listed and removed like other installs, and the decoder they make loads there.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DiffusionModel } from '../../src/engine/model.js';
import { builtinModelsDir, locateModel } from '../../src/engine/locate.js';
import { PREVIEWS_DIR, TINY_DECODER_ALIASES, tinyDecoderDir, tinyDecoderFor } from '../../src/engine/tiny-decoder.js';
import { resolvePullSpec } from '../../src/models/aliases.js';
import { listModels, removeModel } from '../../src/models/installed.js';
import { pullModel } from '../../src/models/pull.js';
import { FakeHub } from './fake-hub.js';
import { filler, tempHome } from './helpers.js';

const TAESD_FIXTURE = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'taesd');
const fixture = (f: string) => readFileSync(join(TAESD_FIXTURE, f));

let hub: FakeHub;
before(async () => {
  hub = await FakeHub.start();
  for (const [repo, stem] of [
    ['madebyollin/taesd', 'taesd'],
    ['madebyollin/taesdxl', 'taesdxl'],
  ] as const) {
    hub.addRepo(repo, {
      main: {
        'config.json': fixture('config.json'),
        'diffusion_pytorch_model.safetensors': fixture('diffusion_pytorch_model.safetensors'),
        'diffusion_pytorch_model.bin': filler(150_000, 31),
        [`${stem}_decoder.pth`]: filler(120_000, 32),
        [`${stem}_encoder.pth`]: filler(120_000, 33),
        'README.md': Buffer.from(`# ${stem}\n`),
      },
    });
  }
});
after(async () => {
  await hub?.close();
});

const env = () => ({ HF_ENDPOINT: hub.url, HF_HOME: tempHome('kiln-hf-') });

test('the built-in aliases: madebyollin/taesd and taesdxl, two files each, into previews/<alias>', () => {
  const home = tempHome();
  assert.deepEqual(TINY_DECODER_ALIASES, { sd1: 'taesd', sd2: 'taesd', sdxl: 'taesdxl' });
  for (const [alias, repo] of [
    ['taesd', 'madebyollin/taesd'],
    ['taesdxl', 'madebyollin/taesdxl'],
  ]) {
    const t = resolvePullSpec(alias!, home);
    assert.equal(t.repo, repo);
    assert.equal(t.kind, 'files');
    assert.equal(t.dir, `${PREVIEWS_DIR}/${alias}`);
    assert.deepEqual(t.files, [{ path: 'config.json' }, { path: 'diffusion_pytorch_model.safetensors' }]);
  }
});

test('kiln pull taesd, taesdxl: only the diffusers files, installed where previews find them, and the decoder loads', async () => {
  hub.reset();
  const home = tempHome();
  for (const alias of ['taesd', 'taesdxl']) {
    const r = await pullModel(alias, { home, env: env(), retryDelayMs: 0 });
    const repo = `madebyollin/${alias}`;
    assert.equal(r.dir, join(home, PREVIEWS_DIR, alias));
    assert.deepEqual(readdirSync(r.dir).sort(), ['config.json', 'diffusion_pytorch_model.safetensors', 'kiln-source.json']);
    assert.ok(readFileSync(join(r.dir, 'diffusion_pytorch_model.safetensors')).equals(fixture('diffusion_pytorch_model.safetensors')));
    for (const skipped of ['diffusion_pytorch_model.bin', `${alias}_decoder.pth`, `${alias}_encoder.pth`, 'README.md']) {
      assert.equal(hub.bytesServed(repo, skipped), 0, `${skipped} is not fetched`);
    }
    assert.equal(hub.totalServed(repo), r.totalBytes);
    const manifest = JSON.parse(readFileSync(join(r.dir, 'kiln-source.json'), 'utf8')) as { repo: string; alias: string; kind: string };
    assert.deepEqual([manifest.repo, manifest.alias, manifest.kind], [repo, alias, 'files']);
    // A second pull of the same commit fetches nothing.
    const again = await pullModel(alias, { home, env: env(), retryDelayMs: 0 });
    assert.equal(again.upToDate, true);
  }
  assert.equal(tinyDecoderDir('sd1', home), join(home, PREVIEWS_DIR, 'taesd'));
  assert.equal(tinyDecoderDir('sd2', home), join(home, PREVIEWS_DIR, 'taesd'));
  assert.equal(tinyDecoderDir('sdxl', home), join(home, PREVIEWS_DIR, 'taesdxl'));
  // `kiln models` lists them; `kiln rm` removes one, and its family's previews go back to the linear map.
  assert.deepEqual(listModels({ home, builtinDir: null }).map((m) => [m.name, m.kind]), [['taesd', 'files'], ['taesdxl', 'files']]);
  await removeModel('taesdxl', { home });
  assert.equal(tinyDecoderDir('sdxl', home), undefined);

  const model = await DiffusionModel.load(locateModel('kiln-tiny', [builtinModelsDir()]));
  try {
    const decoder = await tinyDecoderFor(model, { home }, (m) => assert.fail(m));
    assert.ok(decoder);
    assert.equal(decoder.alias, 'taesd');
    const image = await decoder.decode(new Float32Array(4 * 4 * 6), [1, 4, 4, 6]);
    assert.deepEqual([image.width, image.height], [48, 32]);
  } finally {
    await model.release();
  }
});
