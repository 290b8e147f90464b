/**
 * Pose mode without HTTP: the documented order in which the pose assets of a model are found
 * (resolvePoseAssets, on folders with placeholder files), reading `user` (parsePoseUser), and
 * the no-person error crossing the worker boundary as a 400.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { poseRecipe, resolvePoseAssets, PoseUnavailableError } from '../../src/catalog/pose-assets.js';
import { builtinModelsDir } from '../../src/engine/locate.js';
import { BUILTIN_ALIASES } from '../../src/models/aliases.js';
import { parsePoseUser } from '../../src/server/params.js';
import { ApiError, toApiError } from '../../src/server/errors.js';
import { deserializeError, serializeError } from '../../src/runner/protocol.js';
import { NoPersonError } from '../../src/engine/pose-control.js';
import { InvalidOptionError } from '../../src/engine/errors.js';
import { GOLDEN_DIR } from '../graphs/golden.js';
import { linkFarm, markInstalled } from './helpers.js';

let root: string;
let sd15: string;
let sdxl: string;
before(async () => {
  root = mkdtempSync(join(tmpdir(), 'kiln-pose-assets-'));
  [sd15, sdxl] = await Promise.all([ensureFixture('sd15-controlnet'), ensureFixture('sdxl-controlnet')]);
});
after(() => rmSync(root, { recursive: true, force: true }));

let count = 0;
/** A fresh KILN_HOME with one model (a link farm of a fixture, which has controlnet/ unless `noControlUnet`). */
function setup(family: 'sd15' | 'sdxl' = 'sd15', noControlUnet = false): { home: string; model: string } {
  const home = join(root, `home-${++count}`);
  const model = linkFarm(family === 'sd15' ? sd15 : sdxl, join(home, 'models', 'm'), noControlUnet ? ['controlnet'] : []);
  return { home, model };
}
function touch(path: string): string {
  mkdirSync(join(path, '..'), { recursive: true });
  writeFileSync(path, '');
  return path;
}
const graph = (dir: string) => touch(join(dir, 'model.onnx'));
function dwpose(dir: string): string {
  touch(join(dir, 'yolox_l.onnx'));
  touch(join(dir, 'dw-ll_ucoco_384.onnx'));
  return dir;
}
const missing = (fn: () => unknown, pattern: RegExp) =>
  assert.throws(fn, (e: unknown) => e instanceof PoseUnavailableError && e.status === 400 && e.param === 'user' && pattern.test(e.message));

describe('resolvePoseAssets: the documented order', () => {
  test('the ControlNet-UNet is required first', () => {
    const { home, model } = setup('sd15', true);
    graph(join(model, 'controlnet-openpose'));
    dwpose(join(model, 'annotators', 'dwpose'));
    missing(() => resolvePoseAssets(model, 'm', home), /ControlNet-UNet \(controlnet\/model\.onnx/);
  });

  test('a model Kiln builds from safetensors needs none: Kiln builds its ControlNet-UNet', () => {
    const home = join(root, `home-${++count}`);
    const model = linkFarm(join(GOLDEN_DIR, 'pipelines', 'sd15'), join(home, 'models', 'st'));
    graph(join(model, 'controlnet-openpose'));
    dwpose(join(model, 'annotators', 'dwpose'));
    const r = resolvePoseAssets(model, 'st', home);
    assert.equal(r.controlUnet, undefined);
    assert.equal(r.controlNet, join(model, 'controlnet-openpose', 'model.onnx'));
  });

  test('without a ControlNet-UNet the answer says what would make pose mode work for the family (or that built-in models have none)', async () => {
    const sd15Lines = /`kiln pull stable-diffusion-v1-5-controlnet && kiln pull controlnet-openpose && kiln pull dwpose`, then send model=stable-diffusion-v1-5-controlnet/;
    const { home, model } = setup('sd15', true);
    missing(() => resolvePoseAssets(model, 'm', home), new RegExp(`For SD 1\\.x: ${sd15Lines.source}`));
    const xl = setup('sdxl', true);
    missing(() => resolvePoseAssets(xl.model, 'm', xl.home), /SDXL ControlNet-UNet.*safetensors weights, for which Kiln builds the ControlNet-UNet, then `kiln pull controlnet-openpose-sdxl && kiln pull dwpose`.*Or use SD 1\.5: `kiln pull stable-diffusion-v1-5-controlnet/);
    assert.match(poseRecipe('sd2', false), /no pose models for SD 2\.x.*kiln pull stable-diffusion-v1-5-controlnet/);
    // Kiln's own kiln-tiny models, from the package's models/ folder.
    for (const name of ['kiln-tiny', 'kiln-tiny-xl']) {
      missing(() => resolvePoseAssets(join(builtinModelsDir(), name), name, home), new RegExp(`Kiln's built-in models have no pose models; pose mode works with SD 1\\.5: ${sd15Lines.source}`));
    }
    // Every alias named is one `kiln pull` knows.
    for (const alias of ['stable-diffusion-v1-5-controlnet', 'controlnet-openpose', 'controlnet-openpose-sdxl', 'dwpose']) assert.ok(BUILTIN_ALIASES[alias], alias);
  });

  test("ControlNet graph: the model's own folder, then kiln.json, then the installed one of the family", () => {
    const { home, model } = setup();
    missing(() => resolvePoseAssets(model, 'm', home), /no OpenPose ControlNet.*`kiln pull controlnet-openpose`/);
    dwpose(join(home, 'annotators', 'dwpose'));

    // c. installed (a kiln pull leaves a manifest; a plain folder under models/ is found too)
    const installed = join(home, 'models', 'controlnet-openpose');
    graph(installed);
    markInstalled(installed, 'controlnet-openpose', 'controlnet');
    let r = resolvePoseAssets(model, 'm', home);
    assert.equal(r.controlNet, join(installed, 'model.onnx'));
    assert.equal(r.sources.controlNet, 'installed controlnet-openpose');
    assert.equal(r.controlUnet, join(model, 'controlnet', 'model.onnx'));

    // b. kiln.json: a path relative to the model folder (a folder or the .onnx file), or an installed name
    const elsewhere = graph(join(root, `cn-${count}`, 'openpose'));
    writeFileSync(join(model, 'kiln.json'), JSON.stringify({ controlnet_openpose: `../../../cn-${count}/openpose` }));
    r = resolvePoseAssets(model, 'm', home);
    assert.equal(r.controlNet, elsewhere);
    assert.equal(r.sources.controlNet, 'kiln.json controlnet_openpose');
    writeFileSync(join(model, 'kiln.json'), JSON.stringify({ controlnet_openpose: elsewhere }));
    assert.equal(resolvePoseAssets(model, 'm', home).controlNet, elsewhere);
    const named = graph(join(home, 'models', 'my-openpose'));
    writeFileSync(join(model, 'kiln.json'), JSON.stringify({ steps: { draft: 4 }, controlnet_openpose: 'my-openpose' }));
    assert.equal(resolvePoseAssets(model, 'm', home).controlNet, named);
    // Set but wrong: a 400 that names kiln.json, not a silent fallback to the installed one.
    writeFileSync(join(model, 'kiln.json'), JSON.stringify({ controlnet_openpose: 'not-installed' }));
    missing(() => resolvePoseAssets(model, 'm', home), /kiln\.json sets controlnet_openpose to "not-installed".*`kiln pull not-installed`/);

    // a. the model's own controlnet-openpose/ wins over both
    const own = graph(join(model, 'controlnet-openpose'));
    r = resolvePoseAssets(model, 'm', home);
    assert.equal(r.controlNet, own);
    assert.equal(r.sources.controlNet, 'controlnet-openpose/ in the model folder');
  });

  test('SDXL models need controlnet-openpose-sdxl (the SD 1.x one does not fit)', () => {
    const { home, model } = setup('sdxl');
    dwpose(join(home, 'annotators', 'dwpose'));
    graph(join(home, 'models', 'controlnet-openpose'));
    missing(() => resolvePoseAssets(model, 'm', home), /\(SDXL\).*`kiln pull controlnet-openpose-sdxl`/);
    const xl = graph(join(home, 'models', 'controlnet-openpose-sdxl'));
    assert.equal(resolvePoseAssets(model, 'm', home).controlNet, xl);
  });

  test("DWPose: the model's annotators/dwpose/, the ControlNet's, the installed dwpose, then $KILN_HOME/annotators/dwpose/", () => {
    const { home, model } = setup();
    const cn = join(home, 'models', 'controlnet-openpose');
    graph(cn);
    missing(() => resolvePoseAssets(model, 'm', home), /DWPose.*`kiln pull dwpose`/);
    // One of the two files is not enough.
    touch(join(home, 'annotators', 'dwpose', 'yolox_l.onnx'));
    missing(() => resolvePoseAssets(model, 'm', home), /DWPose/);

    const homeLevel = dwpose(join(home, 'annotators', 'dwpose'));
    const expect = (dir: string, source: string) => {
      const r = resolvePoseAssets(model, 'm', home);
      assert.equal(r.dwpose, dir);
      assert.equal(r.sources.dwpose, source);
    };
    expect(homeLevel, '$KILN_HOME/annotators/dwpose');
    const installed = dwpose(join(home, 'models', 'dwpose'));
    markInstalled(installed, 'dwpose', 'annotator');
    expect(installed, 'installed dwpose');
    const besideCn = dwpose(join(cn, 'annotators', 'dwpose'));
    expect(besideCn, 'annotators/dwpose/ beside the ControlNet');
    const own = dwpose(join(model, 'annotators', 'dwpose'));
    expect(own, 'annotators/dwpose/ in the model folder');
  });
});

describe('user: cn, pose:<w>, the weight list', () => {
  test('pose mode and its scale', () => {
    assert.equal(parsePoseUser('cn'), 1);
    assert.equal(parsePoseUser(' CN '), 1);
    assert.equal(parsePoseUser('pose:0.5'), 0.5);
    assert.equal(parsePoseUser('pose:0'), 0);
    assert.equal(parsePoseUser('pose: 2'), 2);
    assert.equal(parsePoseUser('face:0.5,style:0.6,pose:1.0'), 1);
    assert.equal(parsePoseUser('style:0.6, pose:1.5'), 1.5);
  });

  test('not pose mode: no user, an end-user id, a weight list without pose', () => {
    for (const user of [undefined, '', 'user-1234', 'alice@example.com', 'team:alice', 'face:0.5,style:0.6', 'cnn', 'pose']) {
      assert.equal(parsePoseUser(user), undefined, String(user));
    }
  });

  test('malformed weights: 400 naming user', () => {
    for (const user of ['pose:3', 'pose:-0.1', 'pose:', 'pose:abc', 'face:x,pose:1', 'pose:1e400']) {
      assert.throws(() => parsePoseUser(user), (e: unknown) => e instanceof ApiError && e.status === 400 && e.param === 'user', user);
    }
  });
});

test('no person: crosses the worker boundary as NoPersonError and answers 400 (image, no_person_found)', () => {
  const back = deserializeError(serializeError(new NoPersonError()));
  assert.ok(back instanceof NoPersonError);
  const api = toApiError(back);
  assert.deepEqual([api.status, api.param, api.code], [400, 'image', 'no_person_found']);
  // Other InvalidOptionError subclasses keep their 400 and param.
  class Custom extends InvalidOptionError {
    override name = 'Custom';
  }
  const other = toApiError(deserializeError(serializeError(new Custom('bad', 'mask'))));
  assert.deepEqual([other.status, other.param], [400, 'mask']);
});
