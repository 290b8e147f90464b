/**
 * The pieces of kiln pull that need no Hub: spec and alias parsing, the file selection rule,
 * external-data references read from ONNX files, and the Hub environment variables.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { BUILTIN_ALIASES, parseRepoSpec, readUserAliases, resolvePullSpec } from '../../src/models/aliases.js';
import { PullError } from '../../src/models/errors.js';
import { hubConfigFromEnv, resolveUrl } from '../../src/models/hub.js';
import { externalDataLocations, safeRelativeLocation } from '../../src/models/onnx-refs.js';
import { missingLayoutFiles, planDiffusion, planFiles } from '../../src/models/select.js';
import type { RepoFile } from '../../src/models/hub.js';
import { tempHome } from './helpers.js';

const home = tempHome('kiln-units-');

test('repo specs: owner/name[@revision], Hub URLs, aliases with a revision, clear errors', () => {
  assert.deepEqual(parseRepoSpec('stabilityai/stable-diffusion-xl-base-1.0'), { repo: 'stabilityai/stable-diffusion-xl-base-1.0', revision: undefined });
  assert.deepEqual(parseRepoSpec('runwayml/stable-diffusion-v1-5@onnx'), { repo: 'runwayml/stable-diffusion-v1-5', revision: 'onnx' });
  assert.deepEqual(parseRepoSpec('https://huggingface.co/SimianLuo/LCM_Dreamshaper_v7/tree/main'), { repo: 'SimianLuo/LCM_Dreamshaper_v7', revision: 'main' });
  assert.deepEqual(parseRepoSpec('owner/repo@refs/pr/3'), { repo: 'owner/repo', revision: 'refs/pr/3' });
  const t = resolvePullSpec('lcm-dreamshaper-v7@abc123', home);
  assert.equal(t.repo, 'SimianLuo/LCM_Dreamshaper_v7');
  assert.equal(t.revision, 'abc123');
  assert.equal(t.defaultName, 'lcm-dreamshaper-v7');
  assert.equal(resolvePullSpec('owner/some-model', home).defaultName, 'some-model');
  assert.throws(() => resolvePullSpec('no-such-alias', home), (e: unknown) => e instanceof PullError && e.code === 'unknown-alias' && /be-stable-diffusion-xl-base-1\.0/.test(e.message));
  assert.throws(() => resolvePullSpec('a/b/c', home), (e: unknown) => e instanceof PullError && e.code === 'bad-spec');
  assert.throws(() => parseRepoSpec('owner/repo@../../x'), (e: unknown) => e instanceof PullError && e.code === 'bad-spec');
});

test('built-in aliases: the reference default, SD 1.5, LCM, ControlNet OpenPose and DWPose', () => {
  assert.equal(BUILTIN_ALIASES['be-stable-diffusion-xl-base-1.0']!.repo, 'stabilityai/stable-diffusion-xl-base-1.0');
  assert.equal(BUILTIN_ALIASES['lcm-dreamshaper-v7']!.repo, 'SimianLuo/LCM_Dreamshaper_v7');
  assert.ok(BUILTIN_ALIASES['stable-diffusion-v1-5']);
  const dw = resolvePullSpec('dwpose', home);
  assert.equal(dw.kind, 'annotator');
  assert.deepEqual(dw.files?.map((f) => f.path), ['yolox_l.onnx', 'dw-ll_ucoco_384.onnx']);
  const cn = resolvePullSpec('controlnet-openpose', home);
  assert.equal(cn.kind, 'controlnet');
  assert.deepEqual(cn.files, [{ path: 'SD/OpenPose/model.onnx', as: 'model.onnx' }]);
});

test('user aliases.json: strings and objects, overriding built-ins; malformed entries name the file and the alias', () => {
  const dir = tempHome('kiln-aliases-');
  writeFileSync(join(dir, 'aliases.json'), JSON.stringify({ mine: 'me/my-model@v2', dwpose: { repo: 'mirror/DWPose', files: ['a.onnx'], kind: 'annotator', dir: 'annotators/dwpose' } }));
  assert.deepEqual(readUserAliases(dir).mine, { repo: 'me/my-model', revision: 'v2' });
  const dw = resolvePullSpec('dwpose', dir);
  assert.equal(dw.repo, 'mirror/DWPose');
  assert.equal(dw.dir, 'annotators/dwpose');
  const bad = (value: unknown, re: RegExp) => {
    writeFileSync(join(dir, 'aliases.json'), typeof value === 'string' ? value : JSON.stringify(value));
    assert.throws(() => readUserAliases(dir), (e: unknown) => e instanceof PullError && e.code === 'alias-file' && re.test(e.message));
  };
  bad('{ not json', /aliases\.json is not valid JSON/);
  bad({ x: 42 }, /alias "x" must be/);
  bad({ x: { repo: 'not-a-repo' } }, /alias "x": "not-a-repo" is not an owner\/name/);
  bad({ x: { repo: 'a/b', files: ['../escape.onnx'] } }, /must be a relative path/);
  bad({ x: { repo: 'a/b', dir: 'somewhere' } }, /"dir" is a folder for file aliases/);
  bad({ 'bad name': 'a/b' }, /not a valid alias name/);
});

const lfs = (path: string, size: number): RepoFile => ({ path, size, lfs: { oid: 'a'.repeat(64), size } });
const git = (path: string, size = 500): RepoFile => ({ path, size, oid: 'b'.repeat(40) });

/** The official SDXL base repository's shape: ONNX folders beside PyTorch, OpenVINO and flax files. */
const SDXL_LISTING: RepoFile[] = [
  git('.gitattributes'), git('LICENSE.md'), git('README.md'), lfs('01.png', 5e6), git('model_index.json'),
  lfs('sd_xl_base_1.0.safetensors', 6.94e9), lfs('sd_xl_base_1.0_0.9vae.safetensors', 6.94e9), lfs('sd_xl_offset_example-lora_1.0.safetensors', 4.9e7),
  git('scheduler/scheduler_config.json'),
  git('text_encoder/config.json'), lfs('text_encoder/model.onnx', 4.92e8), lfs('text_encoder/model.safetensors', 4.92e8),
  lfs('text_encoder/model.fp16.safetensors', 2.46e8), lfs('text_encoder/openvino_model.bin', 4.92e8), git('text_encoder/openvino_model.xml'), lfs('text_encoder/flax_model.msgpack', 4.92e8),
  git('text_encoder_2/config.json'), lfs('text_encoder_2/model.onnx', 1.2e6), lfs('text_encoder_2/model.onnx_data', 2.78e9), lfs('text_encoder_2/model.safetensors', 2.78e9),
  lfs('text_encoder_2/openvino_model.bin', 2.78e9), git('text_encoder_2/openvino_model.xml'),
  git('tokenizer/merges.txt', 5.2e5), git('tokenizer/special_tokens_map.json'), git('tokenizer/tokenizer_config.json'), git('tokenizer/vocab.json', 1.06e6),
  git('tokenizer_2/merges.txt', 5.2e5), git('tokenizer_2/special_tokens_map.json'), git('tokenizer_2/tokenizer_config.json'), git('tokenizer_2/vocab.json', 1.06e6),
  git('unet/config.json'), lfs('unet/diffusion_flax_model.msgpack', 1.03e10), lfs('unet/diffusion_pytorch_model.fp16.safetensors', 5.14e9),
  lfs('unet/diffusion_pytorch_model.safetensors', 1.03e10), lfs('unet/model.onnx', 7.29e6), lfs('unet/model.onnx_data', 1.03e10),
  lfs('unet/openvino_model.bin', 1.03e10), git('unet/openvino_model.xml'),
  git('vae/config.json'), lfs('vae/diffusion_pytorch_model.safetensors', 3.35e8), lfs('vae/diffusion_flax_model.msgpack', 3.35e8),
  git('vae_1_0/config.json'), lfs('vae_1_0/diffusion_pytorch_model.safetensors', 3.35e8),
  git('vae_decoder/config.json'), lfs('vae_decoder/model.onnx', 1.98e8), lfs('vae_decoder/openvino_model.bin', 1.98e8), git('vae_decoder/openvino_model.xml'),
  git('vae_encoder/config.json'), lfs('vae_encoder/model.onnx', 1.37e8), lfs('vae_encoder/openvino_model.bin', 1.37e8), git('vae_encoder/openvino_model.xml'),
];

test("selection on the official SDXL repository's shape: the ONNX files, their data and configs, nothing else", () => {
  assert.deepEqual(missingLayoutFiles(SDXL_LISTING), []);
  const { files, skipped } = planDiffusion(SDXL_LISTING);
  assert.deepEqual(files.map((f) => `${f.role} ${f.path}`).sort(), [
    'external text_encoder_2/model.onnx_data',
    'external unet/model.onnx_data',
    'file LICENSE.md',
    'file README.md',
    'file model_index.json',
    'file scheduler/scheduler_config.json',
    'file text_encoder/config.json',
    'file text_encoder_2/config.json',
    'file tokenizer/merges.txt',
    'file tokenizer/special_tokens_map.json',
    'file tokenizer/tokenizer_config.json',
    'file tokenizer/vocab.json',
    'file tokenizer_2/merges.txt',
    'file tokenizer_2/special_tokens_map.json',
    'file tokenizer_2/tokenizer_config.json',
    'file tokenizer_2/vocab.json',
    'file unet/config.json',
    'file vae/config.json',
    'file vae_1_0/config.json',
    'file vae_decoder/config.json',
    'file vae_encoder/config.json',
    'onnx text_encoder/model.onnx',
    'onnx text_encoder_2/model.onnx',
    'onnx unet/model.onnx',
    'onnx vae_decoder/model.onnx',
    'onnx vae_encoder/model.onnx',
  ]);
  assert.ok(skipped.every((p) => !/model\.onnx/.test(p)));
  assert.ok(files.find((f) => f.path === 'unet/model.onnx_data')!.sha256);
  assert.ok(files.find((f) => f.path === 'model_index.json')!.gitOid);
  // ~13.9 GB: the figure the README gives for the reference default.
  const total = files.reduce((s, f) => s + f.size, 0);
  assert.ok(total > 13.8e9 && total < 14.1e9, String(total));
});

test('selection: other producers\' data file names, ONNX variants and safety checkers are told apart', () => {
  const listing = [
    git('model_index.json'), git('unet/config.json'), lfs('unet/model.onnx', 7e5), lfs('unet/weights.pb', 3.4e9),
    lfs('unet/model_fp16.onnx', 1e6), lfs('unet/model_fp16.onnx_data', 1.7e9), lfs('text_encoder/model.onnx', 1e6), lfs('text_encoder/model.onnx.data', 4.9e8),
    lfs('text_encoder/0f8e2b6c-uuid', 1e3), lfs('safety_checker/model.onnx', 1.2e9), git('safety_checker/config.json'), lfs('controlnet/model.onnx', 1.7e9),
    git('feature_extractor/preprocessor_config.json'),
  ];
  const paths = planDiffusion(listing).files.map((f) => f.path).sort();
  assert.deepEqual(paths, [
    'controlnet/model.onnx',
    'model_index.json',
    'text_encoder/0f8e2b6c-uuid',
    'text_encoder/model.onnx',
    'text_encoder/model.onnx.data',
    'unet/config.json',
    'unet/model.onnx',
    'unet/weights.pb',
  ]);
  assert.deepEqual(missingLayoutFiles(listing), ['scheduler/scheduler_config.json', 'tokenizer/vocab.json', 'tokenizer/merges.txt', 'vae_decoder/model.onnx']);
  assert.deepEqual(missingLayoutFiles([git('model_index.json')], { text_encoder_2: ['transformers', 'X'] }).slice(-3), [
    'tokenizer_2/vocab.json',
    'tokenizer_2/merges.txt',
    'text_encoder_2/model.onnx',
  ]);
  assert.throws(() => planFiles(listing, [{ path: 'yolox_l.onnx' }], 'yzd-v/DWPose@main'), /yzd-v\/DWPose@main has no yolox_l\.onnx/);
});

test('external-data references are read from the ONNX files, whatever the producer named them', async () => {
  const ref = async (variant: Parameters<typeof ensureFixture>[0], path: string) => externalDataLocations(join(await ensureFixture(variant), path));
  assert.deepEqual(await ref('sdxl', 'unet/model.onnx'), ['model.onnx_data']);
  assert.deepEqual(await ref('sd15-legacy', 'unet/model.onnx'), ['weights.pb']);
  assert.deepEqual(await ref('sd15-external-data', 'text_encoder/model.onnx'), ['model.onnx.data']);
  assert.deepEqual(await ref('sdxl-turbo', 'text_encoder_2/model.onnx'), ['model.onnx.data']);
  assert.deepEqual(await ref('sdxl', 'vae_decoder/model.onnx'), []);
  const junk = join(tempHome('kiln-onnx-'), 'model.onnx');
  writeFileSync(junk, Buffer.from([0x0a, 0xff, 0xff, 0xff, 0x0f]));
  assert.throws(() => externalDataLocations(junk));
  assert.equal(safeRelativeLocation('model.onnx_data'), 'model.onnx_data');
  assert.equal(safeRelativeLocation('./weights/w.bin'), 'weights/w.bin');
  assert.equal(safeRelativeLocation('../../etc/passwd'), undefined);
  assert.equal(safeRelativeLocation('/etc/passwd'), undefined);
});

test("Hub settings follow huggingface_hub's environment variables", () => {
  const hfHome = tempHome('kiln-hfhome-');
  const none = hubConfigFromEnv({ HF_HOME: hfHome });
  assert.equal(none.endpoint, 'https://huggingface.co');
  assert.equal(none.token, undefined);
  assert.equal(none.offline, false);
  const c = hubConfigFromEnv({ HF_HOME: hfHome, HF_ENDPOINT: 'https://hf-mirror.com/', HF_TOKEN: ' hf_abc \n', HF_HUB_OFFLINE: 'on' });
  assert.equal(c.endpoint, 'https://hf-mirror.com');
  assert.equal(c.token, 'hf_abc');
  assert.equal(c.offline, true);
  assert.equal(hubConfigFromEnv({ HF_HOME: hfHome, HF_HUB_OFFLINE: '0' }).offline, false);
  assert.equal(hubConfigFromEnv({ HF_HOME: hfHome, HUGGING_FACE_HUB_TOKEN: 'hf_legacy' }).token, 'hf_legacy');
  writeFileSync(join(hfHome, 'token'), 'hf_from_file\n');
  assert.equal(hubConfigFromEnv({ HF_HOME: hfHome }).token, 'hf_from_file');
  assert.equal(hubConfigFromEnv({ HF_HOME: hfHome, HF_TOKEN: 'hf_env' }).token, 'hf_env');
  assert.equal(hubConfigFromEnv({ HF_HOME: hfHome, HF_HUB_DOWNLOAD_TIMEOUT: '30' }).timeoutMs, 30_000);
  assert.equal(
    resolveUrl(c, 'owner/repo', 'refs/pr/1', 'unet/model.onnx_data'),
    'https://hf-mirror.com/owner/repo/resolve/refs%2Fpr%2F1/unet/model.onnx_data',
  );
});
