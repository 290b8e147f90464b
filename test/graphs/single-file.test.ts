/**
 * Single-file checkpoints (diffusers-golden `single_file/`, written by diffusers' own conversion
 * scripts from `pipelines/sd15` and `pipelines/sdxl`) read through keys-ldm: every weight a
 * diffusers page asks for, bit for bit the diffusers folder's, every stored tensor used, the
 * family detected, and each component built from the file giving the component goldens.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { ModelLoadError } from '../../src/engine/errors.js';
import { buildClipText } from '../../src/graphs/clip-text.js';
import {
  detectFamily,
  ldmUnetTable,
  singleFileSources,
  unetLayoutFromConfig,
  unetLayoutFromKeys,
  type MappedWeights,
} from '../../src/graphs/keys-ldm.js';
import { entryValues } from '../../src/graphs/lora.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { SD15_UNET, SDXL_BASE_UNET, SDXL_REFINER_UNET, SD21_UNET } from '../../src/graphs/reference-configs.js';
import { openSafetensors, readTensorBytes, writeSafetensors, type TensorToWrite } from '../../src/graphs/safetensors.js';
import { buildUnet } from '../../src/graphs/unet.js';
import { buildVaeDecoder, buildVaeEncoder } from '../../src/graphs/vae.js';
import { componentWeights, Params, RecordingWeights, type WeightSource } from '../../src/graphs/weights.js';
import { GOLDEN_DIR, maxAbs, maxAbsDiff, readGolden, readmeTolerance, runGraphFloats, tempDir } from './golden.js';

type Kind = 'sd15' | 'sdxl';
const singleFile = (kind: Kind): string => join(GOLDEN_DIR, 'single_file', `${kind}-single-file.safetensors`);
const pipelineDir = (kind: Kind, component: string): string => join(GOLDEN_DIR, 'pipelines', kind, component);
const config = (kind: Kind, component: string): Record<string, unknown> =>
  JSON.parse(readFileSync(join(pipelineDir(kind, component), 'config.json'), 'utf8')) as Record<string, unknown>;
const open = (kind: Kind) => singleFileSources(singleFile(kind), { unet: config(kind, 'unet'), vae: config(kind, 'vae') });
const COMPONENTS: Record<Kind, ('unet' | 'vae' | 'text_encoder' | 'text_encoder_2')[]> = {
  sd15: ['unet', 'vae', 'text_encoder'],
  sdxl: ['unet', 'vae', 'text_encoder', 'text_encoder_2'],
};

const bits = (a: Float32Array): Uint32Array => new Uint32Array(a.buffer, a.byteOffset, a.length);

for (const kind of ['sd15', 'sdxl'] as const) {
  test(`${kind}: every diffusers weight resolves from the single file, bit for bit, and every stored tensor is used`, (t) => {
    const ck = open(kind);
    assert.equal(ck.detected.family, kind === 'sd15' ? 'sd1' : 'sdxl');
    assert.equal(ck.detected.inpainting, false);
    // The golden files hold only model weights: nothing ignored, nothing unmapped.
    assert.deepEqual(ck.unmapped, []);
    assert.deepEqual(ck.ignored, []);

    const used = new Set<string>();
    let computed = 0;
    let reshaped = 0;
    let rowRanges = 0;
    for (const component of COMPONENTS[kind]) {
      const source = ck[component] as MappedWeights;
      assert.ok(source, `${component} is served`);
      const reference = componentWeights(pipelineDir(kind, component), component);
      assert.deepEqual(source.keys().sort(), reference.keys().sort(), `${component}: the same keys as the diffusers folder`);
      for (const key of reference.keys()) {
        const want = reference.lookup(key)!;
        const got = source.lookup(key)!;
        assert.deepEqual(got.shape, want.shape, `${component} ${key}: shape`);
        // float16 in the file, float32 in the folder: the f16 grid makes the conversion lossless.
        assert.deepEqual(bits(entryValues(got)), bits(entryValues(want)), `${component} ${key}: values`);
        const view = source.views.get(key)!;
        used.add(view.tensor.name);
        if (got.source.kind === 'values') computed++;
        else {
          // No copies: each entry is a byte range inside the stored tensor.
          assert.ok(got.source.begin >= view.tensor.begin && got.source.begin + got.source.byteLength <= view.tensor.begin + view.tensor.byteLength);
          if (view.reshape) reshaped++;
          if (view.rows) rowRanges++;
        }
      }
    }
    assert.equal(used.size, ck.file.tensors.size, 'every tensor of the file is used');
    // VAE mid-block q/k/v/proj_out of encoder and decoder are [C, C, 1, 1] convs served as [C, C];
    // SDXL's OpenCLIP: q/k/v rows of 3 layers x (weight, bias), and text_projection transposed.
    assert.equal(reshaped, 8);
    assert.equal(rowRanges, kind === 'sdxl' ? 18 : 0);
    assert.equal(computed, kind === 'sdxl' ? 1 : 0);
    t.diagnostic(`${ck.file.tensors.size} stored tensors -> ${used.size} used; ${reshaped} reshaped, ${rowRanges} row ranges, ${computed} computed`);
  });
}

// ---------------------------------------------------------------------------------------------
// Component outputs from the single file

const f32 = (x: { data: Float32Array; shape: number[] }): ort.Tensor => new ort.Tensor('float32', x.data, x.shape);

/**
 * The golden tolerance the page tests use: the README's 1-vs-2-thread difference, or a few
 * float32 ulps of the tensor's magnitude where ONNX Runtime sums in another order than torch.
 */
function check(t: { diagnostic(m: string): void }, what: string, got: Float32Array, want: Float32Array, readme: number, ulps: number): void {
  const diff = maxAbsDiff(got, want);
  const tol = Math.max(readme, ulps * 2 ** -23 * maxAbs(want));
  t.diagnostic(`${what}: max abs diff ${diff.toExponential(2)} (tolerance ${tol.toExponential(2)}, max abs ${maxAbs(want).toPrecision(3)})`);
  assert.ok(diff <= tol, `${what}: max abs diff ${diff} over ${tol}`);
}

/** Builds `build` on both sources; the two graphs must give the same bytes (same values, same graph). */
async function both(
  make: (source: WeightSource) => GraphBuilder,
  single: WeightSource,
  folder: WeightSource,
  feeds: Record<string, ort.Tensor>,
): Promise<Record<string, Float32Array>> {
  const a = await runGraphFloats(make(single), feeds);
  const b = await runGraphFloats(make(folder), feeds);
  for (const k of Object.keys(b)) assert.deepEqual(bits(a[k]!), bits(b[k]!), `${k}: single file and folder give the same bytes`);
  return a;
}

for (const [kind, unetName] of [['sd15', 'unet_sd15'], ['sdxl', 'unet_sdxl']] as const) {
  test(`${kind}: the UNet built from the single file gives components/${unetName}'s sample`, async (t) => {
    const ck = open(kind);
    const cfg = config(kind, 'unet');
    const inputs = readGolden(`components/${unetName}/inputs.safetensors`);
    const names = ['sample', 'timestep', 'encoder_hidden_states', ...(kind === 'sdxl' ? ['text_embeds', 'time_ids'] : [])];
    const feeds = Object.fromEntries(names.map((n) => [n, f32(inputs.get(n)!)]));
    const make = (source: WeightSource): GraphBuilder => {
      const g = new GraphBuilder('unet');
      const p = Params.of(g, source);
      buildUnet(g, cfg, p);
      assert.deepEqual(p.unusedKeys(), []);
      return g;
    };
    // (lora.test.ts also checks that the single file's UNet and the folder's give the same bytes.)
    const out = await runGraphFloats(make(ck.unet), feeds);
    const file = `components/${unetName}/outputs.safetensors`;
    check(t, `${unetName} sample`, out.out_sample!, readGolden(file).get('sample')!.data, readmeTolerance(file, 'sample'), 8);
  });
}

test('sd15: the VAE built from the single file gives components/vae\'s latents and image', async (t) => {
  const ck = open('sd15');
  const cfg = config('sd15', 'vae');
  const inputs = readGolden('components/vae/inputs.safetensors');
  const expected = readGolden('components/vae/outputs.safetensors');
  const file = 'components/vae/outputs.safetensors';
  const folder = componentWeights(pipelineDir('sd15', 'vae'), 'vae');
  const graph = (build: typeof buildVaeEncoder) => (source: WeightSource): GraphBuilder => {
    const g = new GraphBuilder('vae');
    build(g, cfg, Params.of(g, source));
    return g;
  };
  const enc = await both(graph(buildVaeEncoder), ck.vae!, folder, { sample: f32(inputs.get('image')!) });
  const dec = await both(graph(buildVaeDecoder), ck.vae!, folder, { latent_sample: f32(inputs.get('latent')!) });
  // latent_parameters = cat(mean, logvar) on channel 1.
  const params = enc.latent_parameters!;
  const half = 4 * 6 * 8;
  const mean = new Float32Array(2 * half);
  const logvar = new Float32Array(2 * half);
  for (let b = 0; b < 2; b++) {
    mean.set(params.subarray(2 * b * half, (2 * b + 1) * half), b * half);
    logvar.set(params.subarray((2 * b + 1) * half, (2 * b + 2) * half), b * half);
  }
  // Same per-tensor ulp allowances as test/graphs/vae.test.ts.
  check(t, 'latent_mean', mean, expected.get('latent_mean')!.data, readmeTolerance(file, 'latent_mean'), 8);
  check(t, 'latent_logvar', logvar, expected.get('latent_logvar')!.data, readmeTolerance(file, 'latent_logvar'), 9);
  check(t, 'decoded', dec.sample!, expected.get('decoded')!.data, readmeTolerance(file, 'decoded'), 20);
});

for (const [component, golden] of [['text_encoder', 'clip_l'], ['text_encoder_2', 'clip_g']] as const) {
  test(`sdxl: ${component} built from the single file gives components/${golden}'s outputs`, async (t) => {
    const ck = open('sdxl');
    const cfg = config('sdxl', component);
    const idsFile = openSafetensors(join(GOLDEN_DIR, 'components', golden, 'inputs.safetensors'));
    const bytes = readTensorBytes(idsFile, idsFile.tensors.get('input_ids')!);
    const ids = new BigInt64Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    const make = (source: WeightSource): GraphBuilder => {
      const g = new GraphBuilder(component);
      const p = Params.of(g, source);
      buildClipText(g, cfg, p, { hiddenStates: false });
      assert.deepEqual(p.unusedKeys(), []);
      return g;
    };
    const out = await both(make, ck[component]!, componentWeights(pipelineDir('sdxl', component), component), { input_ids: new ort.Tensor('int64', ids, [3, 77]) });
    const file = `components/${golden}/outputs.safetensors`;
    const expected = readGolden(file);
    const pooled = golden === 'clip_g' ? 'text_embeds' : 'pooler_output';
    for (const name of ['last_hidden_state', pooled]) check(t, `${golden} ${name}`, out[name]!, expected.get(name)!.data, readmeTolerance(file, name), 8);
  });
}

// ---------------------------------------------------------------------------------------------
// The UNet table at full size

test('full-size UNets: every weight the page asks for has one LDM name, and the known SGM names are among them', () => {
  const cases = [
    // SD 1.5: 686 UNet tensors in its single file; the upsamplers ride in output_blocks 2, 5, 8.
    { config: SD15_UNET, count: 686, names: ['input_blocks.9.0.op.weight', 'input_blocks.11.0.out_layers.3.weight', 'output_blocks.2.1.conv.weight', 'output_blocks.5.2.conv.weight', 'output_blocks.8.2.conv.weight', 'middle_block.1.proj_in.weight', 'out.2.weight'] },
    { config: SD21_UNET, count: 686, names: ['output_blocks.2.1.conv.weight', 'middle_block.1.transformer_blocks.0.attn2.to_k.weight'] },
    // SDXL base: 1680 tensors; 10 transformer layers in the lowest level, label_emb.
    { config: SDXL_BASE_UNET, count: 1680, names: ['label_emb.0.0.weight', 'label_emb.0.2.bias', 'input_blocks.8.1.transformer_blocks.9.ff.net.2.weight', 'middle_block.1.transformer_blocks.9.attn2.to_k.weight', 'output_blocks.2.2.conv.weight', 'output_blocks.5.2.conv.weight', 'output_blocks.8.0.skip_connection.weight'] },
    { config: SDXL_REFINER_UNET, count: undefined, names: ['label_emb.0.0.weight', 'output_blocks.11.0.skip_connection.weight', 'output_blocks.8.2.conv.weight'] },
  ];
  for (const c of cases) {
    const rec = new RecordingWeights('unet');
    const g = new GraphBuilder('unet');
    buildUnet(g, c.config as Record<string, unknown>, Params.of(g, rec));
    const asked = [...rec.shapes.keys()];
    const table = ldmUnetTable(unetLayoutFromConfig(c.config as Record<string, unknown>));
    const ldm = asked.map((k) => {
      const name = table.toLdm(k);
      assert.ok(name !== undefined, `${k} has no LDM name`);
      assert.equal(table.toDiffusers(name), k, `${k} round-trips`);
      return name;
    });
    assert.equal(new Set(ldm).size, ldm.length, 'no two weights share an LDM name');
    if (c.count !== undefined) assert.equal(ldm.length, c.count);
    for (const n of c.names) assert.ok(ldm.includes(n), `${n} is among the LDM names`);
    // The layout read back from the diffusers keys is the config's (what LoRA matching relies on).
    assert.deepEqual(unetLayoutFromKeys(asked), unetLayoutFromConfig(c.config as Record<string, unknown>));
  }
});

// ---------------------------------------------------------------------------------------------
// Family detection and what is not a weight

/** A synthetic checkpoint: only names and shapes matter (zeros). */
function synthetic(tensors: Record<string, number[]>, metadata?: Record<string, string>): string {
  const out: Record<string, TensorToWrite> = {};
  for (const [name, shape] of Object.entries(tensors)) out[name] = { dtype: 'F16', shape, data: new Uint16Array(shape.reduce((a, b) => a * b, 1)) };
  const path = join(tempDir('single-file'), 'model.safetensors');
  writeSafetensors(path, out, metadata);
  return path;
}

const convIn = (channels: number): Record<string, number[]> => ({ 'model.diffusion_model.input_blocks.0.0.weight': [8, channels, 3, 3] });

test('the family detector names SD 1.x, SD 2.x, SDXL base, SDXL refiner and inpainting', () => {
  const cases: [Record<string, number[]>, string, boolean, string][] = [
    [{ ...convIn(4), 'cond_stage_model.transformer.text_model.final_layer_norm.weight': [8] }, 'sd1', false, 'SD 1.x'],
    [{ ...convIn(9), 'cond_stage_model.transformer.text_model.final_layer_norm.weight': [8] }, 'sd1', true, 'SD 1.x inpainting'],
    [{ ...convIn(4), 'cond_stage_model.model.ln_final.weight': [8] }, 'sd2', false, 'SD 2.x'],
    [
      { ...convIn(9), 'model.diffusion_model.label_emb.0.0.weight': [8, 8], 'conditioner.embedders.0.transformer.text_model.final_layer_norm.weight': [8], 'conditioner.embedders.1.model.ln_final.weight': [8] },
      'sdxl',
      true,
      'SDXL base inpainting',
    ],
    [{ ...convIn(4), 'model.diffusion_model.label_emb.0.0.weight': [8, 8], 'conditioner.embedders.0.model.ln_final.weight': [8] }, 'sdxl-refiner', false, 'SDXL refiner'],
  ];
  for (const [tensors, family, inpainting, description] of cases) {
    const d = detectFamily(openSafetensors(synthetic(tensors)));
    assert.deepEqual([d.family, d.inpainting, d.description], [family, inpainting, description]);
  }
  assert.equal(detectFamily(openSafetensors(singleFile('sd15'))).family, 'sd1');
  assert.equal(detectFamily(openSafetensors(singleFile('sdxl'))).family, 'sdxl');
});

test('files that are none of these are refused, naming what was found', () => {
  const refused = (tensors: Record<string, number[]>, ...parts: RegExp[]): void => {
    const path = synthetic(tensors);
    assert.throws(
      () => detectFamily(openSafetensors(path)),
      (e: unknown) => e instanceof ModelLoadError && parts.every((p) => p.test(e.message)) && e.message.includes(path),
    );
  };
  refused({ ...convIn(8), 'cond_stage_model.transformer.text_model.final_layer_norm.weight': [8] }, /8 input channels/, /instruct-pix2pix/);
  refused({ 'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight': [4, 8], 'lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight': [8, 4] }, /a LoRA file/, /Found 2 tensors/);
  refused({ 'model.diffusion_model.double_blocks.0.img_attn.qkv.weight': [24, 8], 'model.diffusion_model.img_in.weight': [8, 64] }, /Flux/, /model\.diffusion_model\.\* \(2\)/);
  refused({ 'encoder.down.0.block.0.conv1.weight': [8, 8, 3, 3], 'decoder.up.0.block.0.conv1.weight': [8, 8, 3, 3] }, /a VAE alone/);
  refused({ 'conv_in.weight': [8, 4, 3, 3], 'down_blocks.0.resnets.0.conv1.weight': [8, 8, 3, 3] }, /diffusers-named UNet/);
  refused({ ...convIn(4), 'model.diffusion_model.label_emb.0.0.weight': [8, 8], 'cond_stage_model.transformer.text_model.final_layer_norm.weight': [8] }, /label_emb/, /no conditioner/);
  refused({ ...convIn(4) }, /without SDXL's label_emb and without an SD 1\.x/);
});

test('buffers, EMA copies and training-only tensors are left out with a reason; unknown tensors are listed', () => {
  const source = openSafetensors(singleFile('sd15'));
  const tensors: Record<string, TensorToWrite> = {};
  for (const t of source.tensors.values()) tensors[t.name] = { dtype: t.dtype, shape: t.shape, data: readTensorBytes(source, t) };
  const extra: Record<string, number[]> = {
    'cond_stage_model.transformer.text_model.embeddings.position_ids': [1, 77],
    'model_ema.diffusion_modelinput_blocks00weight': [8, 4, 3, 3],
    'model_ema.num_updates': [],
    alphas_cumprod: [1000],
    'first_stage_model.loss.logvar': [],
    'model.diffusion_model.some_new_block.weight': [8],
  };
  for (const [name, shape] of Object.entries(extra)) tensors[name] = { dtype: 'F32', shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)) };
  const path = join(tempDir('single-file'), 'sd15-extra.safetensors');
  writeSafetensors(path, tensors);
  const ck = singleFileSources(path, { unet: config('sd15', 'unet') });
  assert.deepEqual(ck.unmapped, ['model.diffusion_model.some_new_block.weight']);
  assert.deepEqual(ck.ignored.map((i) => i.name).sort(), Object.keys(extra).filter((n) => !n.includes('some_new')).sort());
  assert.ok(ck.ignored.every((i) => i.reason.length > 10));
  // The VAE levels came from the keys this time (no vae config given): same names as before.
  assert.deepEqual(ck.vae!.keys().sort(), componentWeights(pipelineDir('sd15', 'vae'), 'vae').keys().sort());
});

test('a single file opened with a config that does not fit it leaves its UNet tensors unmapped', () => {
  // The SD 1.5 file read with the SDXL UNet layout: the block numbering no longer lines up.
  const ck = singleFileSources(singleFile('sd15'), { unet: config('sdxl', 'unet') });
  assert.ok(ck.unmapped.length > 0 && ck.unmapped.every((n) => n.startsWith('model.diffusion_model.')));
  const g = new GraphBuilder('unet');
  assert.throws(() => buildUnet(g, config('sdxl', 'unet'), Params.of(g, ck.unet)), ModelLoadError);
});
