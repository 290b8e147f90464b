/**
 * LoRA fusing against diffusers 0.31 + PEFT 0.13 (diffusers-golden `lora/`): kohya files for the
 * tiny SD1.5 and SDXL pipelines, fused at scale 0.7 by diffusers' `fuse_lora`. The module map
 * must be diffusers' own, the fused weights bit for bit PEFT's, the fused UNet and text encoders
 * give diffusers' outputs, scale 0 is the base model's bytes, and a LoRA for another family is
 * refused.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { ModelLoadError } from '../../src/engine/errors.js';
import { float32ToFloat16Bits } from '../../src/engine/float16.js';
import { buildClipText } from '../../src/graphs/clip-text.js';
import { singleFileSources } from '../../src/graphs/keys-ldm.js';
import { entryValues, readLora, withLoras, type LoraComponent } from '../../src/graphs/lora.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { openSafetensors, readTensorBytes, readTensorFloat32, writeSafetensors, type TensorToWrite } from '../../src/graphs/safetensors.js';
import { buildUnet } from '../../src/graphs/unet.js';
import { componentWeights, Params, type WeightSource } from '../../src/graphs/weights.js';
import { GOLDEN_DIR, maxAbs, maxAbsDiff, readGolden, readGoldenJson, readmeTolerance, runGraphFloats, tempDir } from './golden.js';

type Kind = 'sd15' | 'sdxl';
interface LoraManifest {
  n_modules: number;
  scale: number;
  peft_lora_layers_injected: Record<string, number>;
  modules: Record<string, [string, string]>;
}
const manifest = readGoldenJson<Record<Kind, LoraManifest>>('lora/manifest.json');
const loraPath = (kind: Kind): string => join(GOLDEN_DIR, 'lora', `${kind}-lora.safetensors`);
const pipelineDir = (kind: Kind, component: string): string => join(GOLDEN_DIR, 'pipelines', kind, component);
const base = (kind: Kind, component: string): WeightSource => componentWeights(pipelineDir(kind, component), component);
const COMPONENTS: Record<Kind, LoraComponent[]> = { sd15: ['unet', 'text_encoder'], sdxl: ['unet', 'text_encoder', 'text_encoder_2'] };
const bits = (a: Float32Array): Uint32Array => new Uint32Array(a.buffer, a.byteOffset, a.length);

for (const kind of ['sd15', 'sdxl'] as const) {
  test(`${kind}: every kohya module maps to diffusers' module, as many per component as PEFT injects`, (t) => {
    const lora = readLora(loraPath(kind));
    const m = manifest[kind];
    assert.equal(lora.format, 'kohya');
    assert.equal(lora.family, kind === 'sd15' ? 'sd1' : 'sdxl');
    assert.equal(lora.modules.length, m.n_modules);
    assert.deepEqual(lora.unsupported, []);
    let total = 0;
    for (const component of COMPONENTS[kind]) {
      const fused = withLoras(base(kind, component), [{ file: lora, scale: m.scale }], component);
      const report = fused.reports[0]!;
      assert.deepEqual(report.unmatched, []);
      assert.deepEqual(fused.unmatchedSummary(), []);
      // The counts per component are PEFT's (the file's 274 / 327 modules are their sum).
      assert.equal(report.matched.length, m.peft_lora_layers_injected[component]);
      assert.equal(fused.changedWeights, report.matched.length);
      for (const { key, module } of report.matched) assert.equal(`${component}.${module}`, m.modules[key]![0], key);
      total += report.matched.length;
      t.diagnostic(`${component}: ${report.matched.length} modules`);
    }
    assert.equal(total, m.n_modules);
  });

  test(`${kind}: fused weights equal diffusers' fuse_lora(0.7) bit for bit`, (t) => {
    const sample = openSafetensors(join(GOLDEN_DIR, 'lora', `${kind}-lora.fused_weights_sample.safetensors`));
    const lora = readLora(loraPath(kind));
    let worst = 0;
    for (const component of COMPONENTS[kind]) {
      const fused = withLoras(base(kind, component), [{ file: lora, scale: 0.7 }], component);
      for (const tensor of sample.tensors.values()) {
        if (!tensor.name.startsWith(`${component}.`) || (component === 'text_encoder' && tensor.name.startsWith('text_encoder_2.'))) continue;
        const key = tensor.name.slice(component.length + 1);
        const entry = fused.lookup(key, tensor.shape)!;
        assert.equal(entry.source.kind, 'values', `${key} is computed`);
        assert.deepEqual(entry.shape, tensor.shape);
        const got = entryValues(entry);
        const want = readTensorFloat32(sample, tensor);
        const diff = maxAbsDiff(got, want);
        worst = Math.max(worst, diff);
        t.diagnostic(`${tensor.name}: max abs diff ${diff}`);
        assert.deepEqual(bits(got), bits(want), `${tensor.name}: bit for bit`);
      }
    }
    assert.equal(worst, 0);
  });

  test(`${kind}: scale 0 gives the base weights, entry for entry`, () => {
    for (const component of COMPONENTS[kind]) {
      const b = base(kind, component);
      const fused = withLoras(b, [{ file: loraPath(kind), scale: 0 }], component);
      assert.equal(fused.changedWeights, 0);
      assert.equal(fused.reports[0]!.matched.length, manifest[kind].peft_lora_layers_injected[component]);
      for (const key of b.keys()) assert.deepEqual(fused.lookup(key, []), b.lookup(key, []), key);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Outputs with the LoRA fused

/** As the page tests: the README's thread-to-thread difference or 8 float32 ulps of the tensor's magnitude. */
function check(t: { diagnostic(m: string): void }, file: string, name: string, got: Float32Array, want: Float32Array): void {
  const diff = maxAbsDiff(got, want);
  const tol = Math.max(readmeTolerance(file, name), 8 * 2 ** -23 * maxAbs(want));
  t.diagnostic(`${name}: max abs diff ${diff.toExponential(2)} (tolerance ${tol.toExponential(2)}, max abs ${maxAbs(want).toPrecision(3)})`);
  assert.ok(diff <= tol, `${name}: max abs diff ${diff} over ${tol}`);
}

for (const [kind, unetName] of [['sd15', 'unet_sd15'], ['sdxl', 'unet_sdxl']] as const) {
  test(`${kind}: the UNet with the LoRA fused at 0.7 gives diffusers' sample (folder and single-file base)`, async (t) => {
    const config = readGoldenJson<Record<string, unknown>>(`pipelines/${kind}/unet/config.json`);
    const inputs = readGolden(`components/${unetName}/inputs.safetensors`);
    const names = ['sample', 'timestep', 'encoder_hidden_states', ...(kind === 'sdxl' ? ['text_embeds', 'time_ids'] : [])];
    const feeds = Object.fromEntries(names.map((n) => [n, new ort.Tensor('float32', inputs.get(n)!.data, inputs.get(n)!.shape)]));
    const build = async (source: WeightSource): Promise<Float32Array> => {
      const g = new GraphBuilder('unet');
      buildUnet(g, config, Params.of(g, withLoras(source, [{ file: loraPath(kind), scale: 0.7 }], 'unet')));
      return (await runGraphFloats(g, feeds)).out_sample!;
    };
    const fromFolder = await build(base(kind, 'unet'));
    const file = `lora/${kind}-lora.outputs.safetensors`;
    check(t, file, `${unetName}.sample`, fromFolder, readGolden(file).get(`${unetName}.sample`)!.data);
    // The same LoRA on the single-file checkpoint's UNet: the same bytes.
    const single = singleFileSources(join(GOLDEN_DIR, 'single_file', `${kind}-single-file.safetensors`), { unet: config });
    assert.deepEqual(bits(await build(single.unet)), bits(fromFolder));
  });
}

for (const [kind, component, golden] of [
  ['sd15', 'text_encoder', 'clip_l'],
  ['sdxl', 'text_encoder', 'clip_l'],
  ['sdxl', 'text_encoder_2', 'clip_g'],
] as const) {
  test(`${kind}: ${component} with the LoRA fused at 0.7 gives diffusers' ${golden} outputs`, async (t) => {
    const config = readGoldenJson<Record<string, unknown>>(`pipelines/${kind}/${component}/config.json`);
    const idsFile = openSafetensors(join(GOLDEN_DIR, 'components', golden, 'inputs.safetensors'));
    const bytes = readTensorBytes(idsFile, idsFile.tensors.get('input_ids')!);
    const ids = new BigInt64Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    const g = new GraphBuilder(component);
    const built = buildClipText(g, config, Params.of(g, withLoras(base(kind, component), [{ file: loraPath(kind), scale: 0.7 }], component)));
    const out = await runGraphFloats(g, { input_ids: new ort.Tensor('int64', ids, [3, 77]) });
    const file = `lora/${kind}-lora.outputs.safetensors`;
    const expected = readGolden(file);
    const layers = built.config.layers;
    const perState = 3 * 77 * built.config.hidden;
    const stacked = expected.get(`${golden}.hidden_states`)!.data;
    const pooled = built.withProjection ? 'text_embeds' : 'pooler_output';
    check(t, file, `${golden}.last_hidden_state`, out.last_hidden_state!, expected.get(`${golden}.last_hidden_state`)!.data);
    check(t, file, `${golden}.${pooled}`, out[pooled]!, expected.get(`${golden}.${pooled}`)!.data);
    check(t, file, `${golden}.penultimate`, out[`hidden_states.${layers - 1}`]!, expected.get(`${golden}.penultimate`)!.data);
    for (let i = 0; i <= layers; i++) check(t, file, `${golden}.hidden_states`, out[`hidden_states.${i}`]!, stacked.subarray(i * perState, (i + 1) * perState));
  });
}

// ---------------------------------------------------------------------------------------------
// Other formats, other families, reports

/** A copy of a LoRA file with `edit` applied to its tensors (and metadata). */
function editedLora(kind: Kind, edit: (t: Record<string, TensorToWrite>) => void, metadata?: Record<string, string>): string {
  const file = openSafetensors(loraPath(kind));
  const tensors: Record<string, TensorToWrite> = {};
  for (const t of file.tensors.values()) tensors[t.name] = { dtype: t.dtype, shape: t.shape, data: readTensorBytes(file, t) };
  edit(tensors);
  const path = join(tempDir('lora'), `${kind}-edited.safetensors`);
  writeSafetensors(path, tensors, metadata);
  return path;
}

test('an SD 1.5 LoRA on the SDXL model is refused with a message naming both families', () => {
  const message = /is a LoRA for SD 1\.x \(metadata ss_base_model_version "sd_v1"\) and cannot be applied to this SDXL model's (unet|text_encoder)/;
  const refused = (e: unknown): boolean => e instanceof ModelLoadError && message.test(e.message);
  assert.throws(() => withLoras(base('sdxl', 'unet'), [{ file: loraPath('sd15'), scale: 0.7 }], 'unet'), refused);
  // CLIP-L is the same model in both families: the metadata decides, given the model's family.
  assert.throws(() => withLoras(base('sdxl', 'text_encoder'), [{ file: loraPath('sd15'), scale: 0.7 }], 'text_encoder', { family: 'sdxl' }), refused);
  // And the other way round.
  assert.throws(
    () => withLoras(base('sd15', 'unet'), [{ file: loraPath('sdxl'), scale: 0.7 }], 'unet'),
    (e: unknown) => e instanceof ModelLoadError && /a LoRA for SDXL .* SD 1\.x model's unet/.test(e.message),
  );
  // Without metadata the shapes still tell: the SD 1.5 cross-attention is 8 wide, SDXL's 18.
  const bare = editedLora('sd15', () => {});
  assert.equal(readLora(bare).family, undefined);
  assert.throws(
    () => withLoras(base('sdxl', 'unet'), [{ file: bare, scale: 0.7 }], 'unet'),
    (e: unknown) => e instanceof ModelLoadError && /does not fit unet weight ".*" of shape \[/.test(e.message) && /made for another model/.test(e.message),
  );
});

test('a diffusers/PEFT-format LoRA (lora_A / lora_B) fuses to the same values as its kohya twin', () => {
  const kohya = openSafetensors(loraPath('sdxl'));
  const map = manifest.sdxl.modules;
  const tensors: Record<string, TensorToWrite> = {};
  for (const [name, [module]] of Object.entries(map)) {
    const part = (p: string): TensorToWrite => {
      const t = kohya.tensors.get(`${name}.${p}`)!;
      return { dtype: t.dtype, shape: t.shape, data: readTensorBytes(kohya, t) };
    };
    tensors[`${module}.lora_A.weight`] = part('lora_down.weight');
    tensors[`${module}.lora_B.weight`] = part('lora_up.weight');
    tensors[`${module}.alpha`] = part('alpha');
  }
  const path = join(tempDir('lora'), 'sdxl-peft.safetensors');
  writeSafetensors(path, tensors);
  const peft = readLora(path);
  assert.equal(peft.format, 'peft');
  assert.equal(peft.family, 'sdxl'); // from its text_encoder_2 modules
  for (const component of COMPONENTS.sdxl) {
    const b = base('sdxl', component);
    const a = withLoras(b, [{ file: loraPath('sdxl'), scale: 0.7 }], component);
    const p = withLoras(b, [{ file: peft, scale: 0.7 }], component);
    assert.deepEqual(p.reports[0]!.unmatched, []);
    assert.equal(p.changedWeights, a.changedWeights);
    for (const key of b.keys()) {
      const ea = a.lookup(key, [])!;
      const ep = p.lookup(key, [])!;
      assert.equal(ep.source.kind, ea.source.kind, key);
      if (ea.source.kind === 'values') assert.deepEqual(bits(entryValues(ep)), bits(entryValues(ea)), key);
    }
  }
});

test('modules that match nothing are reported with count and names; unknown tensor kinds are listed', () => {
  const path = editedLora('sd15', (t) => {
    const down = t['lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight']!;
    const up = t['lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight']!;
    t['lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight'] = down;
    t['lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight'] = up;
    t['lora_unet_no_such_block_proj.lora_down.weight'] = down;
    t['lora_unet_no_such_block_proj.lora_up.weight'] = up;
    // A LoHa module: reported as not read, not fused.
    t['lora_unet_down_blocks_1_resnets_0_conv2.hada_w1_a'] = { dtype: 'F16', shape: [4, 4], data: new Uint16Array(16) };
    t['lora_unet_down_blocks_1_resnets_0_conv2.alpha'] = { dtype: 'F16', shape: [], data: new Uint16Array(1) };
    delete t['lora_unet_down_blocks_1_resnets_0_conv2.lora_down.weight'];
    delete t['lora_unet_down_blocks_1_resnets_0_conv2.lora_up.weight'];
  });
  const lora = readLora(path);
  assert.deepEqual(lora.unsupported.sort(), ['lora_unet_down_blocks_1_resnets_0_conv2.alpha', 'lora_unet_down_blocks_1_resnets_0_conv2.hada_w1_a']);
  const fused = withLoras(base('sd15', 'unet'), [{ file: lora, scale: 0.7 }], 'unet');
  assert.deepEqual(fused.reports[0]!.unmatched.sort(), ['lora_unet_down_blocks_7_resnets_0_conv1', 'lora_unet_no_such_block_proj']);
  assert.equal(fused.reports[0]!.matched.length, 255);
  const [summary] = fused.unmatchedSummary();
  assert.match(summary!, /: 2 LoRA modules match nothing in the unet: lora_unet_/);
});

test('malformed LoRA files are refused clearly', () => {
  const noUp = editedLora('sd15', (t) => delete t['lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight']);
  assert.throws(() => readLora(noUp), (e: unknown) => e instanceof ModelLoadError && /"lora_unet_down_blocks_0_resnets_0_conv1" has a down matrix but no up matrix/.test(e.message));
  const badRank = editedLora('sd15', (t) => {
    t['lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight'] = { dtype: 'F16', shape: [8, 3, 1, 1], data: new Uint16Array(24) };
  });
  assert.throws(() => readLora(badRank), (e: unknown) => e instanceof ModelLoadError && /do not make a rank-4 product/.test(e.message));
  // Half-applied modules would be wrong: a LoCon CP core or a DoRA magnitude beside down/up is refused.
  for (const extra of ['lora_mid.weight', 'dora_scale']) {
    const path = editedLora('sd15', (t) => {
      t[`lora_unet_down_blocks_0_resnets_0_conv1.${extra}`] = { dtype: 'F16', shape: [4, 4, 3, 3], data: new Uint16Array(144) };
    });
    assert.throws(() => readLora(path), (e: unknown) => e instanceof ModelLoadError && e.message.includes(`"lora_unet_down_blocks_0_resnets_0_conv1" has "${extra}"`));
  }
  const notLora = join(tempDir('lora'), 'weights.safetensors');
  writeSafetensors(notLora, { 'conv_in.weight': { dtype: 'F32', shape: [2], data: new Float32Array(2) } });
  assert.throws(() => readLora(notLora), (e: unknown) => e instanceof ModelLoadError && /no lora_down\/lora_up \(kohya\) or lora_A\/lora_B \(PEFT\) tensors/.test(e.message));
});

test('two LoRAs add their deltas in order; the scale multiplies alpha / rank', () => {
  const b = base('sd15', 'text_encoder');
  const key = 'text_model.encoder.layers.0.mlp.fc1.weight';
  const w = entryValues(b.lookup(key, [])!);
  const one = entryValues(withLoras(b, [{ file: loraPath('sd15'), scale: 0.7 }], 'text_encoder').lookup(key, [])!);
  const two = entryValues(withLoras(b, [{ file: loraPath('sd15'), scale: 0.7 }, { file: loraPath('sd15'), scale: -0.7 }], 'text_encoder').lookup(key, [])!);
  // (W + d) - d is W up to one float32 rounding of W + d.
  let moved = 0;
  for (let i = 0; i < w.length; i++) {
    moved = Math.max(moved, Math.abs(one[i]! - w[i]!));
    assert.ok(Math.abs(two[i]! - w[i]!) <= 2 ** -23 * Math.abs(one[i]!) * 2, `element ${i}`);
  }
  assert.ok(moved > 1e-3, 'the LoRA changes the weight');
});

test('any rank, linear and 3x3 conv, PEFT without alpha: the fuse is the float32 sum in rank order', () => {
  // Seeded float16 values (what LoRA files hold), ranks that exercise the 4-at-a-time loop and its tail.
  let seed = 12345;
  const rand = (): number => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  const f16 = (shape: number[]): TensorToWrite => {
    const n = shape.reduce((a, b) => a * b, 1);
    const bits16 = new Uint16Array(n);
    for (let i = 0; i < n; i++) bits16[i] = float32ToFloat16Bits(new Float32Array([rand() * 0.5]))[0]!;
    return { dtype: 'F16', shape, data: bits16 };
  };
  const f32t = (shape: number[]): TensorToWrite => ({ dtype: 'F32', shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, rand) });
  const dir = tempDir('lora');
  writeSafetensors(join(dir, 'diffusion_pytorch_model.safetensors'), { 'lin.weight': f32t([6, 10]), 'conv.weight': f32t([5, 3, 3, 3]) });
  const b: WeightSource = componentWeights(dir, 'unet');
  const cases = [
    { module: 'lin', rank: 6, down: [6, 10], up: [6, 6], alpha: 3 },
    { module: 'conv', rank: 9, down: [9, 3, 3, 3], up: [5, 9, 1, 1], alpha: undefined },
  ];
  const tensors: Record<string, TensorToWrite> = {};
  for (const c of cases) {
    tensors[`unet.${c.module}.lora_A.weight`] = f16(c.down);
    tensors[`unet.${c.module}.lora_B.weight`] = f16(c.up);
    if (c.alpha !== undefined) tensors[`unet.${c.module}.alpha`] = { dtype: 'F32', shape: [], data: new Float32Array([c.alpha]) };
  }
  const path = join(dir, 'lora.safetensors');
  writeSafetensors(path, tensors);
  const scale = 0.8;
  const fused = withLoras(b, [{ file: path, scale }], 'unet');
  assert.equal(fused.changedWeights, 2);
  const lora = openSafetensors(path);
  const read = (name: string): Float32Array => readTensorFloat32(lora, lora.tensors.get(name)!);
  const f = Math.fround;
  for (const c of cases) {
    const w = entryValues(b.lookup(`${c.module}.weight`, [])!);
    const down = read(`unet.${c.module}.lora_A.weight`);
    const up = read(`unet.${c.module}.lora_B.weight`);
    const factor = f(((c.alpha ?? c.rank) / c.rank) * scale);
    const n = down.length / c.rank;
    const want = new Float32Array(w.length);
    for (let o = 0; o < c.up[0]!; o++) {
      for (let i = 0; i < n; i++) {
        let acc = f(up[o * c.rank]! * down[i]!);
        for (let k = 1; k < c.rank; k++) acc = f(acc + f(up[o * c.rank + k]! * down[k * n + i]!));
        want[o * n + i] = f(w[o * n + i]! + f(acc * factor));
      }
    }
    assert.deepEqual(bits(entryValues(fused.lookup(`${c.module}.weight`, [])!)), bits(want), c.module);
  }
});
