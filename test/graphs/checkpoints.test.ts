/**
 * Single-file checkpoints as models (src/graphs/checkpoint.ts, families.ts): `kiln import`'s
 * folder, the graphs built from it, and what is refused.
 *
 * - The golden single files (diffusers' own conversion of pipelines/sd15 and pipelines/sdxl),
 *   imported with the pipeline folder as --config (their tiny shapes are not the real SD
 *   configs), run a golden pipeline case through the Engine: diffusers' latents within the
 *   golden tolerance, and the same bits as the pipeline folder itself, from the same graph.
 * - Kiln's shipped configs, against full-size checkpoints: sparse files whose headers carry every
 *   tensor an SD 1.5, SD 2.1 or SDXL original checkpoint has (LDM / SGM / OpenCLIP names and real
 *   shapes; the data is never read), imported and built in memory, every weight found.
 * - A separate VAE, prediction_type, inpainting (9 channels), pickle files and malformed files.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import onnxProto from 'onnx-proto';
import { Engine } from '../../src/engine/engine.js';
import { InvalidOptionError, ModelLoadError } from '../../src/engine/errors.js';
import { locateModel } from '../../src/engine/locate.js';
import { decodeLatents } from '../../src/engine/vae.js';
import { assertNotPickle, folderSources, importCheckpoint, importLora, readKilnJson, vaeSource } from '../../src/graphs/checkpoint.js';
import { entryValues } from '../../src/graphs/lora.js';
import { buildClipText } from '../../src/graphs/clip-text.js';
import { buildGraph } from '../../src/graphs/convert.js';
import { ldmUnetTable, unetLayoutFromConfig } from '../../src/graphs/keys-ldm.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import {
  CLIP_VIT_L_TEXT,
  OPENCLIP_BIGG_TEXT,
  OPENCLIP_VIT_H_TEXT,
  SD15_UNET,
  SD21_UNET,
  SD_VAE,
  SDXL_BASE_UNET,
  SDXL_VAE,
} from '../../src/graphs/reference-configs.js';
import { openSafetensors, readTensorBytes, writeSafetensors, type TensorToWrite } from '../../src/graphs/safetensors.js';
import { buildUnet } from '../../src/graphs/unet.js';
import { buildVaeDecoder, buildVaeEncoder } from '../../src/graphs/vae.js';
import { Params, RecordingWeights } from '../../src/graphs/weights.js';
import { assertGoldenCase, GOLDEN_DIR, pipelineCase, readGolden, runGoldenCase } from './golden.js';

const { onnx } = onnxProto;
const scratch = mkdtempSync(join(tmpdir(), 'kiln-checkpoints-'));
after(() => rmSync(scratch, { recursive: true, force: true }));
let counter = 0;
const fresh = (name: string): string => join(scratch, `${counter++}-${name}`);

type Kind = 'sd15' | 'sdxl';
const singleFile = (kind: Kind): string => join(GOLDEN_DIR, 'single_file', `${kind}-single-file.safetensors`);
const pipeline = (kind: Kind): string => join(GOLDEN_DIR, 'pipelines', kind);
const bits = (a: Float32Array): Uint32Array => new Uint32Array(a.buffer, a.byteOffset, a.length);

/** A built graph's nodes and declared initializers (names, types, shapes), without where the bytes are. */
function graphShape(path: string): string {
  const m = onnx.ModelProto.decode(readFileSync(path));
  const inits = (m.graph!.initializer ?? []).map((t) => `${t.name}:${t.dataType}:[${t.dims}]`).sort();
  return JSON.stringify({ nodes: m.graph!.node, inputs: m.graph!.input, outputs: m.graph!.output, inits });
}

/** One home and engine for the golden models of this file (each folder is built once). */
const home = fresh('home');
const models = join(home, 'models');
const engine = new Engine({ cacheDir: join(home, 'cache'), searchDirs: [models], lorasDir: join(home, 'loras'), onWarning: (m) => assert.fail(m) });
after(() => engine.close());
const cacheEntries = (prefix: string): string[] => readdirSync(join(home, 'cache')).filter((e) => e.startsWith(prefix));
/** The golden single file imported as `imported-<kind>` (once per file). */
function importGolden(kind: Kind) {
  const dir = join(models, `imported-${kind}`);
  return existsSync(dir) ? undefined : importCheckpoint(singleFile(kind), { dir, config: pipeline(kind) });
}

for (const kind of ['sd15', 'sdxl'] as const) {
  test(`${kind}: the imported golden single file runs ${kind}_euler_4 as diffusers, and as the pipeline folder, bit for bit`, async (t) => {
    const r = importGolden(kind)!;
    assert.equal(r.detected.family, kind === 'sd15' ? 'sd1' : 'sdxl');
    // The weights are the file itself, hard-linked: no second copy.
    assert.equal(r.held, 'link');
    assert.equal(statSync(r.checkpoint).ino, statSync(singleFile(kind)).ino);
    assert.deepEqual(readKilnJson(r.dir)?.checkpoint, `${kind}-single-file.safetensors`);
    for (const c of ['unet', 'vae', 'text_encoder']) assert.ok(!existsSync(join(r.dir, c, 'diffusion_pytorch_model.safetensors')) && !existsSync(join(r.dir, c, 'model.safetensors')), `no ${c} weights copied`);

    const c = pipelineCase(`${kind}_euler_4`);
    const imported = await runGoldenCase(await engine.model(`imported-${kind}`), c);
    const folder = await runGoldenCase(await engine.model(pipeline(kind)), c);
    assertGoldenCase(t, imported, c);
    assert.deepEqual(bits(imported.latents), bits(folder.latents), 'the single file and the folder give the same bits');
    assert.equal(imported.settings.model, `imported-${kind}`);
    // The same graphs: nodes and initializer declarations equal (the single file's float16 tensors are
    // cast once, the folder's float32 ones used in place, so only where the bytes live differs).
    const entry = (prefix: string): string => join(home, 'cache', cacheEntries(prefix)[0]!);
    for (const component of kind === 'sdxl' ? ['unet', 'text_encoder', 'text_encoder_2', 'vae_decoder', 'vae_encoder'] : ['unet', 'text_encoder', 'vae_decoder', 'vae_encoder']) {
      assert.equal(graphShape(join(entry(`imported-${kind}-`), component, 'model.onnx')), graphShape(join(entry(`${kind}-`), component, 'model.onnx')), component);
    }
  });
}

test("the golden (tiny) files do not fit Kiln's real SD configs: refused at import, naming --config", () => {
  assert.throws(
    () => importCheckpoint(singleFile('sd15'), { dir: fresh('tiny') }),
    (e: unknown) =>
      e instanceof ModelLoadError &&
      /single_file\/sd15-single-file\.safetensors does not fit Kiln's SD 1\.x configs: unet: weight ".*" in .*single_file\/sd15-single-file\.safetensors has shape \[\d+, \d+\] but config\.json implies \[1280, 320\]/.test(e.message) &&
      /kiln import FILE --config DIR/.test(e.message),
  );
});

// ---------------------------------------------------------------------------------------------
// Full-size checkpoints (headers only)

function recorded(build: (g: GraphBuilder, p: Params) => void, component: string): Map<string, number[]> {
  const rec = new RecordingWeights(component);
  const g = new GraphBuilder(component);
  build(g, Params.of(g, rec));
  return rec.shapes;
}

/** diffusers AutoencoderKL names -> the original LDM ones (the inverse of keys-ldm's VAE table). */
function ldmVaeName(key: string, shape: number[], levels: number): [string, number[]] {
  const resnet = (r: string) => r.replace(/^conv_shortcut\./, 'nin_shortcut.');
  let m = /^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$/.exec(key);
  if (m) {
    const part = { group_norm: 'norm', to_q: 'q', to_k: 'k', to_v: 'v', 'to_out.0': 'proj_out' }[m[2] as 'to_q'];
    // Stored as 1x1 convs in the original files.
    return [`${m[1]}.mid.attn_1.${part}.${m[3]}`, m[2] !== 'group_norm' && m[3] === 'weight' ? [...shape, 1, 1] : shape];
  }
  if ((m = /^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$/.exec(key))) return [`${m[1]}.mid.block_${Number(m[2]) + 1}.${resnet(m[3]!)}`, shape];
  if ((m = /^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$/.exec(key))) return [`encoder.down.${m[1]}.block.${m[2]}.${resnet(m[3]!)}`, shape];
  if ((m = /^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$/.exec(key))) return [`encoder.down.${m[1]}.downsample.conv.${m[2]}`, shape];
  if ((m = /^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$/.exec(key))) return [`decoder.up.${levels - 1 - Number(m[1])}.block.${m[2]}.${resnet(m[3]!)}`, shape];
  if ((m = /^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$/.exec(key))) return [`decoder.up.${levels - 1 - Number(m[1])}.upsample.conv.${m[2]}`, shape];
  if ((m = /^(encoder|decoder)\.conv_norm_out\.(.+)$/.exec(key))) return [`${m[1]}.norm_out.${m[2]}`, shape];
  return [key, shape];
}

/** transformers CLIP names -> OpenCLIP's (fused q/k/v, transposed projection). */
function openClipNames(shapes: Map<string, number[]>): Map<string, number[]> {
  const out = new Map<string, number[]>();
  for (const [key, shape] of shapes) {
    let m: RegExpExecArray | null;
    if (key === 'text_model.embeddings.token_embedding.weight') out.set('token_embedding.weight', shape);
    else if (key === 'text_model.embeddings.position_embedding.weight') out.set('positional_embedding', shape);
    else if ((m = /^text_model\.final_layer_norm\.(.+)$/.exec(key))) out.set(`ln_final.${m[1]}`, shape);
    else if (key === 'text_projection.weight') out.set('text_projection', [shape[1]!, shape[0]!]);
    else if ((m = /^text_model\.encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$/.exec(key))) out.set(`transformer.resblocks.${m[1]}.attn.in_proj_${m[2]}`, [3 * shape[0]!, ...shape.slice(1)]);
    else if ((m = /^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$/.exec(key))) {
      const part = { layer_norm1: 'ln_1', layer_norm2: 'ln_2', 'self_attn.out_proj': 'attn.out_proj', 'mlp.fc1': 'mlp.c_fc', 'mlp.fc2': 'mlp.c_proj' }[m[2]!]!;
      out.set(`transformer.resblocks.${m[1]}.${part}.${m[3]}`, shape);
    } else throw new Error(`no OpenCLIP name for ${key}`);
  }
  return out;
}

type FullSize = 'sd15' | 'sd21' | 'sdxl';

/**
 * A sparse float16 checkpoint with every tensor a real original checkpoint of `kind` has, under
 * its original names and shapes (the bytes are zeros that are never read). `inChannels` 9 makes
 * it an inpainting model.
 */
function fullSizeCheckpoint(kind: FullSize, inChannels = 4): string {
  const unetConfig = { ...(kind === 'sd15' ? SD15_UNET : kind === 'sd21' ? SD21_UNET : SDXL_BASE_UNET), in_channels: inChannels } as Record<string, unknown>;
  const tensors = new Map<string, number[]>();
  const table = ldmUnetTable(unetLayoutFromConfig(unetConfig));
  for (const [key, shape] of recorded((g, p) => buildUnet(g, unetConfig, p), 'unet')) tensors.set(`model.diffusion_model.${table.toLdm(key)}`, shape);
  const vaeConfig = (kind === 'sdxl' ? SDXL_VAE : SD_VAE) as Record<string, unknown>;
  const vaeShapes = new Map([...recorded((g, p) => buildVaeEncoder(g, vaeConfig, p), 'vae'), ...recorded((g, p) => buildVaeDecoder(g, vaeConfig, p), 'vae')]);
  for (const [key, shape] of vaeShapes) {
    const [name, stored] = ldmVaeName(key, shape, 4);
    tensors.set(`first_stage_model.${name}`, stored);
  }
  const clip = (config: unknown) => recorded((g, p) => buildClipText(g, config as Record<string, unknown>, p), 'text_encoder');
  if (kind === 'sd15') for (const [k, s] of clip(CLIP_VIT_L_TEXT)) tensors.set(`cond_stage_model.transformer.${k}`, s);
  if (kind === 'sd21') for (const [k, s] of openClipNames(clip(OPENCLIP_VIT_H_TEXT))) tensors.set(`cond_stage_model.model.${k}`, s);
  if (kind === 'sdxl') {
    for (const [k, s] of clip(CLIP_VIT_L_TEXT)) tensors.set(`conditioner.embedders.0.transformer.${k}`, s);
    for (const [k, s] of openClipNames(clip(OPENCLIP_BIGG_TEXT))) tensors.set(`conditioner.embedders.1.model.${k}`, s);
  }
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const [name, shape] of tensors) {
    const bytes = shape.reduce((a, b) => a * b, 1) * 2;
    header[name] = { dtype: 'F16', shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  const json = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  const path = fresh(`${kind}-${inChannels}.safetensors`);
  const fd = openSync(path, 'w');
  try {
    writeSync(fd, Buffer.concat([length, json]));
    // The last byte makes the file its full size; everything before it is a hole.
    writeSync(fd, Buffer.alloc(1), 0, 1, 8 + json.length + offset - 1);
  } finally {
    closeSync(fd);
  }
  return path;
}

const PLANS = {
  unet: buildUnet,
  vae_encoder: buildVaeEncoder,
  vae_decoder: buildVaeDecoder,
  text_encoder: buildClipText,
  text_encoder_2: buildClipText,
} as const;

test("full-size SD 1.5, SD 2.1 and SDXL checkpoints import with Kiln's shipped configs and every graph finds its weights", (t) => {
  const expected: Record<FullSize, { family: string; pipeline: string; prediction?: string; components: string[] }> = {
    sd15: { family: 'sd1', pipeline: 'StableDiffusionPipeline', components: ['unet', 'vae_encoder', 'vae_decoder', 'text_encoder'] },
    sd21: { family: 'sd2', pipeline: 'StableDiffusionPipeline', prediction: 'v_prediction', components: ['unet', 'vae_encoder', 'vae_decoder', 'text_encoder'] },
    sdxl: { family: 'sdxl', pipeline: 'StableDiffusionXLPipeline', components: ['unet', 'vae_encoder', 'vae_decoder', 'text_encoder', 'text_encoder_2'] },
  };
  for (const kind of ['sd15', 'sd21', 'sdxl'] as const) {
    const started = performance.now();
    const file = fullSizeCheckpoint(kind);
    const r = importCheckpoint(file, { dir: fresh(kind) });
    const want = expected[kind];
    assert.equal(r.detected.family, want.family);
    const json = (rel: string) => JSON.parse(readFileSync(join(r.dir, rel), 'utf8')) as Record<string, unknown>;
    assert.equal(json('model_index.json')._class_name, want.pipeline);
    assert.equal(json('scheduler/scheduler_config.json').prediction_type ?? 'epsilon', want.prediction ?? 'epsilon');
    assert.equal(readKilnJson(r.dir)?.prediction_type, want.prediction);
    // SD 2.x and SDXL's second tokenizer pad with "!", the others with the end token.
    assert.equal(json('tokenizer/special_tokens_map.json').pad_token, kind === 'sd21' ? '!' : '<|endoftext|>');
    if (kind === 'sdxl') assert.equal(json('tokenizer_2/special_tokens_map.json').pad_token, '!');
    // Every graph built (in memory: weights are deferred, never read) from the shipped configs.
    const configs = Object.fromEntries(['unet', 'vae', 'text_encoder', 'text_encoder_2'].filter((c) => existsSync(join(r.dir, c))).map((c) => [c, json(`${c}/config.json`)]));
    const { sources, warnings } = folderSources(r.dir, Object.keys(configs) as never, configs);
    assert.deepEqual(warnings, []);
    let parameters = 0;
    for (const component of want.components) {
      const from = component.startsWith('vae') ? 'vae' : component;
      const built = buildGraph({ build: PLANS[component as keyof typeof PLANS] }, component, configs[from]!, sources[from as 'unet']!);
      parameters += built.parameters;
    }
    t.diagnostic(`${kind}: ${(statSync(file).size / 1e9).toFixed(2)} GB checkpoint (sparse), ${(parameters / 1e6).toFixed(1)} M parameters found, ${((performance.now() - started) / 1000).toFixed(1)} s`);
  }
});

test('inpainting checkpoints (9 input channels) get the inpainting pipeline and UNet config; SD 2 inpainting defaults to epsilon', () => {
  for (const [kind, pipelineClass, prediction] of [
    ['sd15', 'StableDiffusionInpaintPipeline', 'epsilon'],
    ['sd21', 'StableDiffusionInpaintPipeline', 'epsilon'],
  ] as const) {
    const r = importCheckpoint(fullSizeCheckpoint(kind, 9), { dir: fresh(`${kind}-inpaint`) });
    assert.equal(r.detected.inpainting, true);
    const json = (rel: string) => JSON.parse(readFileSync(join(r.dir, rel), 'utf8')) as Record<string, unknown>;
    assert.equal(json('model_index.json')._class_name, pipelineClass);
    assert.equal(json('unet/config.json').in_channels, 9);
    assert.equal(json('scheduler/scheduler_config.json').prediction_type ?? 'epsilon', prediction);
  }
});

test('a golden single file widened to 9 input channels imports as an inpainting model and its UNet builds', () => {
  const source = openSafetensors(singleFile('sd15'));
  const tensors: Record<string, TensorToWrite> = {};
  for (const t of source.tensors.values()) tensors[t.name] = { dtype: t.dtype, shape: t.shape, data: readTensorBytes(source, t) };
  const convIn = tensors['model.diffusion_model.input_blocks.0.0.weight']!;
  const [out, , kh, kw] = convIn.shape as number[];
  tensors['model.diffusion_model.input_blocks.0.0.weight'] = { dtype: 'F16', shape: [out!, 9, kh!, kw!], data: new Uint16Array(out! * 9 * kh! * kw!) };
  const file = fresh('sd15-inpainting.safetensors');
  writeSafetensors(file, tensors);
  // The pipeline folder's configs say 4 channels; the file's 9 win.
  const r = importCheckpoint(file, { dir: fresh('inpaint'), config: pipeline('sd15') });
  assert.equal(r.detected.description, 'SD 1.x inpainting');
  const config = JSON.parse(readFileSync(join(r.dir, 'unet', 'config.json'), 'utf8')) as Record<string, unknown>;
  assert.equal(config.in_channels, 9);
  const { sources } = folderSources(r.dir, ['unet'], { unet: config });
  const built = buildGraph({ build: buildUnet }, 'unet', config, sources.unet!);
  assert.deepEqual(built.g.inputs[0]!.type!.tensorType!.shape!.dim![1], { dimValue: 9 });
});

test('a checkpoint given as a model path becomes a folder Kiln keeps for it, imported again when the file changes', () => {
  const cacheDir = fresh('cache');
  const file = fullSizeCheckpoint('sd15');
  const dir = locateModel(file, [], { cacheDir });
  assert.equal(readKilnJson(dir)?.checkpoint, file, 'referred to by path: nothing linked or copied');
  assert.equal(locateModel(file, [], { cacheDir }), dir, 'the same folder the next time');
  const before = statSync(join(dir, 'kiln.json')).mtimeMs;
  writeSync(openSync(file, 'r+'), Buffer.alloc(1), 0, 1, statSync(file).size - 1); // touched
  assert.equal(locateModel(file, [], { cacheDir }), dir);
  assert.ok(statSync(join(dir, 'kiln.json')).mtimeMs >= before);
  // The tiny golden file has no full-size configs: the load says to import it with --config.
  assert.throws(() => locateModel(singleFile('sd15'), [], { cacheDir }), (e: unknown) => e instanceof ModelLoadError && /--config DIR/.test(e.message));
});

// ---------------------------------------------------------------------------------------------
// A separate VAE, prediction_type, kiln.json defaults

/** The sd15 single file's VAE on its own, decoder conv_out bias shifted (so that using it shows), LDM- or diffusers-named. */
function separateVae(naming: 'ldm' | 'diffusers'): string {
  const source = openSafetensors(singleFile('sd15'));
  const tensors: Record<string, TensorToWrite> = {};
  const diffusers = naming === 'diffusers' ? openSafetensors(join(pipeline('sd15'), 'vae', 'diffusion_pytorch_model.safetensors')) : undefined;
  const file = diffusers ?? source;
  for (const t of file.tensors.values()) {
    if (!diffusers && !t.name.startsWith('first_stage_model.')) continue;
    const name = diffusers ? t.name : t.name.slice('first_stage_model.'.length);
    tensors[name] = { dtype: t.dtype, shape: t.shape, data: readTensorBytes(file, t) };
  }
  const bias = tensors['decoder.conv_out.bias']!;
  const values = diffusers ? new Float32Array(3).fill(0.25) : new Uint16Array(3).fill(0x3400); // 0.25 in both
  tensors['decoder.conv_out.bias'] = { dtype: bias.dtype, shape: bias.shape, data: values };
  if (!diffusers) tensors['loss.logvar'] = { dtype: 'F32', shape: [], data: new Float32Array(1) }; // a training leftover, left out
  const path = fresh(`vae-${naming}.safetensors`);
  writeSafetensors(path, tensors);
  return path;
}

test('a separate VAE (--vae, LDM- or diffusers-named) replaces the embedded one; prediction_type and defaults come from kiln.json', async () => {
  // Both namings of the same VAE serve the same tensors.
  const ldmFile = separateVae('ldm');
  const ldm = vaeSource(ldmFile, undefined);
  const diffusers = vaeSource(separateVae('diffusers'), undefined);
  assert.deepEqual(ldm.keys().sort(), diffusers.keys().sort());
  for (const key of diffusers.keys()) assert.deepEqual(bits(entryValues(ldm.lookup(key, [])!)), bits(entryValues(diffusers.lookup(key, [])!)), key);

  const r = importCheckpoint(singleFile('sd15'), { dir: join(models, 'own-vae'), config: pipeline('sd15'), vae: ldmFile, predictionType: 'v_prediction' });
  assert.match(readKilnJson(r.dir)!.vae!, /^vae-.*\.safetensors$/, 'the VAE file is hard-linked into the folder');
  importGolden('sd15');
  const plain = await engine.model('imported-sd15');
  const own = await engine.model('own-vae');
  const latents = readGolden('components/vae/inputs.safetensors').get('latent')!;
  const first = latents.data.subarray(0, 4 * 6 * 8);
  const a = await decodeLatents(plain, first, [1, 4, 6, 8]);
  const b = await decodeLatents(own, first, [1, 4, 6, 8]);
  assert.notDeepEqual(b.pixels, a.pixels, 'the separate VAE is the one used');
  // prediction_type is a build setting, written into the built scheduler config.
  assert.equal(own.layout.schedulerConfig.prediction_type, 'v_prediction');
  assert.equal(plain.layout.schedulerConfig.prediction_type ?? 'epsilon', 'epsilon');
  // Generation defaults are applied without a rebuild, on the next load.
  const settingsPath = join(r.dir, 'kiln.json');
  const settings = JSON.parse(readFileSync(settingsPath, 'utf8')) as Record<string, unknown>;
  writeFileSync(settingsPath, JSON.stringify({ ...settings, steps: { draft: 3 }, guidance_scale: 4 }));
  const reloaded = await engine.model('own-vae');
  assert.notEqual(reloaded, own);
  assert.equal(reloaded.layout.defaults.steps.draft, 3);
  assert.equal(reloaded.layout.defaults.guidanceScale, 4);
  assert.equal(cacheEntries('own-vae-').length, 1, 'no rebuild');
});

// ---------------------------------------------------------------------------------------------
// What is refused

test('pickle files are refused by extension and by content, saying why and what to use', () => {
  const zip = fresh('model.safetensors');
  writeFileSync(zip, Buffer.concat([Buffer.from('PK\x03\x04'), Buffer.alloc(60)]));
  const pickle = fresh('pickled.safetensors');
  writeFileSync(pickle, Buffer.from([0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8]));
  const ckpt = fresh('model.ckpt');
  writeFileSync(ckpt, 'anything');
  const says = (why: RegExp) => (e: unknown) =>
    e instanceof ModelLoadError && why.test(e.message) && /runs whatever code it carries/.test(e.message) && /\.safetensors version/.test(e.message);
  for (const [path, why] of [
    [ckpt, /its extension is \.ckpt/],
    [zip, /zip archive, as torch\.save writes/],
    [pickle, /pickle protocol header/],
  ] as const) {
    assert.throws(() => assertNotPickle(path), says(why));
    assert.throws(() => importCheckpoint(path, { dir: fresh('x') }), says(why));
    assert.throws(() => importLora(path, { lorasDir: fresh('loras') }), says(why));
  }
  assert.throws(() => locateModel(ckpt, []), says(/\.ckpt/));
  // A real safetensors file whose header length happens to start with 0x80 0x02 is not a pickle.
  const tricky = fresh('tricky.safetensors');
  const header = Buffer.from(JSON.stringify({ a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }).padEnd(0x280, ' '));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(header.length));
  writeFileSync(tricky, Buffer.concat([length, header, Buffer.alloc(4)]));
  assert.equal(length[0], 0x80);
  assert.doesNotThrow(() => assertNotPickle(tricky));
});

test('malformed checkpoints are refused with the file and the fault named', () => {
  const bytes = readFileSync(singleFile('sd15'));
  const headerLength = Number(bytes.readBigUInt64LE(0));
  const write = (name: string, data: Buffer): string => {
    const path = fresh(name);
    writeFileSync(path, data);
    return path;
  };
  const pastEnd = Buffer.from(bytes.subarray(0, 64));
  pastEnd.writeBigUInt64LE(BigInt(bytes.length * 2));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString()) as Record<string, { data_offsets: number[] }>;
  const names = Object.keys(header).filter((k) => k !== '__metadata__');
  header[names[1]!]!.data_offsets = [header[names[0]!]!.data_offsets[0]!, header[names[1]!]!.data_offsets[1]! - header[names[1]!]!.data_offsets[0]! + header[names[0]!]!.data_offsets[0]!];
  const overlapJson = Buffer.from(JSON.stringify(header).padEnd(headerLength, ' '));
  const overlapping = Buffer.concat([bytes.subarray(0, 8), overlapJson.subarray(0, headerLength), bytes.subarray(8 + headerLength)]);
  const cases: [string, Buffer, RegExp][] = [
    ['truncated.safetensors', bytes.subarray(0, bytes.length >> 1), /is not a valid safetensors file: tensor ".*" has data_offsets \[\d+, \d+\] outside the \d+ data bytes/],
    ['past-end.safetensors', pastEnd, /the header length \d+ runs past the end of the file/],
    ['overlapping.safetensors', overlapping, /tensors ".*" and ".*" overlap/],
    ['empty.safetensors', Buffer.alloc(0), /too short for the 8-byte header length/],
  ];
  for (const [name, data, message] of cases) {
    const path = write(name, data);
    assert.throws(() => importCheckpoint(path, { dir: fresh('x') }), (e: unknown) => e instanceof ModelLoadError && message.test(e.message) && e.message.includes(path), name);
  }
  // A LoRA or a VAE given as a model is told what it is.
  assert.throws(
    () => importCheckpoint(join(GOLDEN_DIR, 'lora', 'sd15-lora.safetensors'), { dir: fresh('x') }),
    (e: unknown) => e instanceof ModelLoadError && /looks like a LoRA file/.test(e.message) && /kiln import --lora/.test(e.message),
  );
  // An existing model folder is not replaced without force.
  const dir = fresh('exists');
  mkdirSync(dir);
  assert.throws(() => importCheckpoint(singleFile('sd15'), { dir, config: pipeline('sd15') }), (e: unknown) => e instanceof InvalidOptionError && /already exists/.test(e.message));
});
