/**
 * LoRAs as people use them (src/engine/loras.ts, engine.ts, src/graphs/lora-graph.ts): named in
 * the prompt (`<lora:NAME:SCALE>`), in a model's kiln.json, or given to Engine.model; files in
 * the engine's loras folder; variants folded into the graphs and kept in a bounded cache. The
 * golden LoRA cases themselves (diffusers' outputs) are in pipelines.test.ts.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { linkSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Engine } from '../../src/engine/engine.js';
import { builtinModelsDir } from '../../src/engine/locate.js';
import { InvalidOptionError, ModelLoadError } from '../../src/engine/errors.js';
import { parametersText } from '../../src/engine/image-codec.js';
import { mergeLoras, parsePromptLoras } from '../../src/engine/loras.js';
import { LeaseCache } from '../../src/engine/lease-cache.js';
import { generate, type GenerateResult } from '../../src/engine/pipeline.js';
import { openSafetensors, readTensorBytes, writeSafetensors, type TensorToWrite } from '../../src/graphs/safetensors.js';
import type { DiffusionModel } from '../../src/engine/model.js';
import { GOLDEN_DIR, maxAbsDiff, pipelineCase, runGoldenCase } from './golden.js';

const scratch = mkdtempSync(join(tmpdir(), 'kiln-lora-use-'));
const lorasDir = join(scratch, 'loras');
mkdirSync(lorasDir);
const warnings: string[] = [];
const engine = new Engine({ cacheDir: join(scratch, 'cache'), searchDirs: [join(scratch, 'models')], lorasDir, onWarning: (m) => warnings.push(m) });
after(async () => {
  await engine.close();
  rmSync(scratch, { recursive: true, force: true });
});

const SD15 = join(GOLDEN_DIR, 'pipelines', 'sd15');
for (const kind of ['sd15', 'sdxl']) linkSync(join(GOLDEN_DIR, 'lora', `${kind}-lora.safetensors`), join(lorasDir, `${kind}-lora.safetensors`));
linkSync(join(GOLDEN_DIR, 'lora', 'sd15-lora.safetensors'), join(lorasDir, 'again.safetensors'));
const bits = (a: Float32Array): Uint32Array => new Uint32Array(a.buffer, a.byteOffset, a.length);

const sd15Case = pipelineCase('sd15_euler_4');

/** sd15_euler_4 on `model` with `prompt` (the case's own by default), one step. */
const run = (model: DiffusionModel, prompt = sd15Case.prompt): Promise<GenerateResult> => runGoldenCase(model, sd15Case, { prompt, steps: 1 });

test('<lora:NAME:SCALE> tags are taken out of the prompt; malformed ones are refused naming the tag', () => {
  assert.deepEqual(parsePromptLoras('a cat <lora:sd15-lora:0.7>, on a mat'), { prompt: 'a cat , on a mat', loras: [{ name: 'sd15-lora', scale: 0.7 }] });
  assert.deepEqual(parsePromptLoras('<LORA:a> b <lora:c.v2:-0.5>'), { prompt: 'b', loras: [{ name: 'a', scale: 1 }, { name: 'c.v2', scale: -0.5 }] });
  assert.deepEqual(parsePromptLoras('no tags (here:1.2)'), { prompt: 'no tags (here:1.2)', loras: [] });
  const refused = (prompt: string, message: RegExp) =>
    assert.throws(() => parsePromptLoras(prompt), (e: unknown) => e instanceof InvalidOptionError && e.param === 'prompt' && message.test(e.message), prompt);
  refused('<lora:../../etc/passwd:1>', /"\.\.\/\.\.\/etc\/passwd" is not a LoRA name/);
  refused('<lora:/abs/path:1>', /is not a LoRA name/);
  refused('<lora:a:1:2>', /<lora:NAME> or <lora:NAME:SCALE>/);
  refused('<lora:a:strong>', /the scale must be a number from -10 to 10/);
  refused('<lora:a:99>', /the scale must be a number/);
  refused('<lora:a:1> <lora:a:0.5>', /named twice/);
  refused(Array.from({ length: 9 }, (_, i) => `<lora:l${i}>`).join(' '), /at most 8 LoRA tags/);
  assert.deepEqual(mergeLoras([{ name: 'a', scale: 1 }, { name: 'b', scale: 0.5 }], [{ name: 'b', scale: 0.2 }, { name: 'c', scale: 1 }]), [
    { name: 'a', scale: 1 },
    { name: 'b', scale: 0.2 },
    { name: 'c', scale: 1 },
  ]);
  assert.equal(parametersText({ prompt: 'a cat', negativePrompt: '', seed: 1, width: 8, height: 8, steps: 1, scheduler: 'euler', guidanceScale: 1, quality: 'auto', model: 'm', loras: [{ name: 'x', scale: 0.7 }] }).split('\n')[0], 'a cat <lora:x:0.7>');
});

test('a LoRA at scale 0 gives the base model\'s bytes; at 0.7 it changes them, and the settings list it', async () => {
  const base = await engine.model(SD15);
  const plain = await run(base);
  assert.equal(plain.settings.loras, undefined);
  const zero = await run(base, `${sd15Case.prompt} <lora:sd15-lora:0>`);
  assert.deepEqual(bits(zero.latents), bits(plain.latents));
  assert.deepEqual(zero.settings.loras, [{ name: 'sd15-lora', scale: 0 }]);
  assert.equal(zero.settings.prompt, sd15Case.prompt);
  const unetDir = join(readdirSync(join(scratch, 'cache')).map((e) => join(scratch, 'cache', e)).find((e) => /sd15-fp32-/.test(e))!, 'unet');
  assert.deepEqual(readdirSync(unetDir).filter((f) => f.includes('.lora-')), [], 'scale 0: no variant graph');
  const fused = await run(base, `<lora:sd15-lora:0.7> ${sd15Case.prompt}`);
  assert.ok(maxAbsDiff(fused.latents, plain.latents) > 1e-3, 'the LoRA changes the result');
  assert.deepEqual(fused.settings.loras, [{ name: 'sd15-lora', scale: 0.7 }]);
  assert.deepEqual(readdirSync(unetDir).filter((f) => f.includes('.lora-')).length, 1, 'one variant graph beside the base');
  // Several LoRAs at once, each with its own scale: 0.4 + 0.3 of the same LoRA is 0.7 up to rounding.
  const split = await run(base, `${sd15Case.prompt} <lora:sd15-lora:0.4> <lora:again:0.3>`);
  assert.deepEqual(split.settings.loras, [{ name: 'sd15-lora', scale: 0.4 }, { name: 'again', scale: 0.3 }]);
  const diff = maxAbsDiff(split.latents, fused.latents);
  assert.ok(diff > 0 && diff < 1e-4, `two LoRAs add up (max abs diff ${diff})`);
});

test('a model\'s kiln.json LoRAs apply by default; a prompt tag overrides a scale', async () => {
  const dir = join(scratch, 'models', 'with-lora');
  mkdirSync(dir, { recursive: true });
  for (const f of readdirSync(SD15)) symlinkSync(join(SD15, f), join(dir, f));
  writeFileSync(join(dir, 'kiln.json'), JSON.stringify({ loras: [{ name: 'sd15-lora', scale: 0.7 }] }));
  const m = await engine.model('with-lora');
  const byDefault = await run(m);
  assert.deepEqual(byDefault.settings.loras, [{ name: 'sd15-lora', scale: 0.7 }]);
  assert.equal(byDefault.settings.model, 'with-lora');
  // The same graphs as the prompt tag on the pipeline folder: the same bits.
  const tagged = await run(await engine.model(SD15), `${sd15Case.prompt} <lora:sd15-lora:0.7>`);
  assert.deepEqual(bits(byDefault.latents), bits(tagged.latents));
  const off = await run(m, `${sd15Case.prompt} <lora:sd15-lora:0>`);
  assert.deepEqual(bits(off.latents), bits((await run(await engine.model(SD15))).latents), 'scale 0 from the prompt: the base bytes');
  // A kiln.json naming an unknown LoRA fails the load, naming it.
  writeFileSync(join(dir, 'kiln.json'), JSON.stringify({ loras: [{ name: 'nope', scale: 1 }] }));
  await assert.rejects(engine.model('with-lora'), (e: unknown) => e instanceof ModelLoadError && /unknown LoRA "nope" \(in the model's kiln\.json\)/.test(e.message));
});

test('unknown names, another family and exported ONNX models are refused as the request\'s fault (param prompt)', async () => {
  const base = await engine.model(SD15);
  await assert.rejects(
    run(base, 'x <lora:missing:1>'),
    (e: unknown) =>
      e instanceof InvalidOptionError && e.param === 'prompt' && /^unknown LoRA "missing" in the prompt \(installed LoRAs: .*again, .*sd15-lora, sdxl-lora/.test(e.message) && !e.message.includes(lorasDir),
  );
  await assert.rejects(run(base, 'x <lora:..:1>'), (e: unknown) => e instanceof InvalidOptionError && e.param === 'prompt');
  // (The SD 1.x LoRA on the SDXL model: pipelines.test.ts, where that model is built anyway.)
  await assert.rejects(
    run(base, 'x <lora:sdxl-lora:0.7>'),
    (e: unknown) => e instanceof InvalidOptionError && e.param === 'prompt' && /is a LoRA for SDXL .* cannot be applied to this SD 1\.x model's unet/.test(e.message),
  );
  const tiny = await engine.model(join(builtinModelsDir(), 'kiln-tiny')); // shipped as an ONNX export
  await assert.rejects(
    generate(tiny, { prompt: 'a <lora:sd15-lora:1>', seed: 0, size: '256x256', steps: 1 }),
    (e: unknown) => e instanceof InvalidOptionError && e.param === 'prompt' && /ONNX export/.test(e.message),
  );
});

/** A copy of the sd15 LoRA with `edit` applied to its bytes or tensors, in the loras folder as `name`. */
function hostile(name: string, edit: { bytes?: (b: Buffer) => Buffer; tensors?: (t: Record<string, TensorToWrite>) => void }): string {
  const path = join(lorasDir, `${name}.safetensors`);
  const source = join(GOLDEN_DIR, 'lora', 'sd15-lora.safetensors');
  if (edit.bytes) writeFileSync(path, edit.bytes(readFileSync(source)));
  else {
    const file = openSafetensors(source);
    const tensors: Record<string, TensorToWrite> = {};
    for (const t of file.tensors.values()) tensors[t.name] = { dtype: t.dtype, shape: t.shape, data: readTensorBytes(file, t) };
    edit.tensors!(tensors);
    writeSafetensors(path, tensors, file.metadata);
  }
  return name;
}

test('hostile and malformed LoRA files get clear errors; modules that match nothing are reported', async () => {
  const base = await engine.model(SD15);
  const headerLength = (b: Buffer) => Number(b.readBigUInt64LE(0));
  const cases: [string, RegExp][] = [
    [hostile('truncated', { bytes: (b) => b.subarray(0, b.length >> 1) }), /is not a valid safetensors file: tensor ".*" has data_offsets .* outside the \d+ data bytes/],
    [
      hostile('past-end', {
        bytes: (b) => {
          const c = Buffer.from(b.subarray(0, 100));
          c.writeBigUInt64LE(1_000_000n);
          return c;
        },
      }),
      /the header length 1000000 runs past the end of the file/,
    ],
    [
      hostile('overlapping', {
        bytes: (b) => {
          const n = headerLength(b);
          const header = JSON.parse(b.subarray(8, 8 + n).toString()) as Record<string, { data_offsets?: number[] }>;
          const [a, c] = Object.keys(header).filter((k) => k !== '__metadata__');
          header[c!]!.data_offsets = [...header[a!]!.data_offsets!];
          const json = Buffer.from(JSON.stringify(header).padEnd(n, ' '));
          return Buffer.concat([b.subarray(0, 8), json, b.subarray(8 + n)]);
        },
      }),
      /tensors ".*" and ".*" overlap|has shape .* but \d+ bytes of data/,
    ],
    [hostile('pickled', { bytes: () => Buffer.concat([Buffer.from('PK\x03\x04'), Buffer.alloc(64)]) }), /is a pickle file .* runs whatever code it carries/],
    [hostile('not-a-lora', { tensors: (t) => Object.keys(t).forEach((k) => (t[k.replace(/lora_(down|up)/, 'hada_w1_$1')] = t[k]!, delete t[k])) }), /is not a LoRA file Kiln can read/],
  ];
  for (const [name, message] of cases) {
    await assert.rejects(run(base, `x <lora:${name}:1>`), (e: unknown) => e instanceof ModelLoadError && message.test(e.message), name);
  }
  // Modules naming nothing in the model: applied anyway for the rest, reported with count and examples.
  const extra = hostile('extra-modules', {
    tensors: (t) => {
      t['lora_unet_no_such_block_proj.lora_down.weight'] = t['lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight']!;
      t['lora_unet_no_such_block_proj.lora_up.weight'] = t['lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight']!;
    },
  });
  warnings.length = 0;
  const r = await run(base, `x <lora:${extra}:0.5>`);
  assert.deepEqual(r.settings.loras, [{ name: extra, scale: 0.5 }]);
  assert.equal(warnings.length, 1, warnings.join('\n'));
  assert.match(warnings[0]!, /extra-modules\.safetensors: 1 LoRA module matches nothing in the unet: lora_unet_no_such_block_proj/);
});

test('variants are kept in a bounded LRU cache; one in use is freed only when its request ends', async () => {
  const small = new Engine({ cacheDir: join(scratch, 'cache'), searchDirs: [], lorasDir, loraCacheSize: 1, onWarning: () => {} });
  try {
    const base = await small.model(SD15);
    const [a, b] = await Promise.all([run(base, 'x <lora:sd15-lora:0.6>'), run(base, 'x <lora:sd15-lora:0.6>')]);
    assert.deepEqual(bits(a.latents), bits(b.latents));
    assert.equal(small.loraVariants, 1, 'two requests at once share one variant');
    await run(base, 'x <lora:sd15-lora:0.5>');
    assert.equal(small.loraVariants, 1, 'the older variant is out');
  } finally {
    await small.close();
  }
  // The cache itself: an evicted entry in use is released after its lease ends.
  const released: string[] = [];
  const cache = new LeaseCache<string>(1, async (name) => void released.push(name));
  const variant = (name: string) => async () => name;
  const first = await cache.acquire('a', variant('a'));
  const second = await cache.acquire('b', variant('b'));
  assert.equal(cache.size, 2, 'a is in use: kept');
  first.release();
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(released, ['a']);
  second.release();
  assert.equal(cache.size, 1);
  await assert.rejects(cache.acquire('c', async () => Promise.reject(new Error('build failed'))), /build failed/);
  // b, idle, was freed to make room before c was built; c failed, so nothing is kept.
  assert.deepEqual(cache.keys(), [], 'a failed build is not kept');
  assert.deepEqual(released, ['a', 'b']);
});

test('an Engine given no cacheDir or lorasDir names the option a safetensors model or a LoRA needs, rather than guessing a folder', async () => {
  const bare = new Engine();
  try {
    await assert.rejects(bare.model(SD15), (e: unknown) => e instanceof ModelLoadError && /pass the Engine's cacheDir option/.test(e.message));
    await assert.rejects(
      bare.model(join(builtinModelsDir(), 'kiln-tiny'), { loras: [{ name: 'sd15-lora', scale: 1 }] }),
      (e: unknown) => e instanceof ModelLoadError && /given no lorasDir option/.test(e.message),
    );
    // The built-in ONNX models need neither, and are found by name without any home.
    const tiny = await bare.model('kiln-tiny');
    assert.equal(tiny.name, 'kiln-tiny');
  } finally {
    await bare.close();
  }
});

test('maxModels 1: an unloaded model takes its LoRA variants (kiln.json\'s and a prompt\'s) with it; loaded again, the same bits', async () => {
  const models = join(scratch, 'models-capped');
  const dir = join(models, 'capped-lora');
  mkdirSync(dir, { recursive: true });
  for (const f of readdirSync(SD15)) symlinkSync(join(SD15, f), join(dir, f));
  writeFileSync(join(dir, 'kiln.json'), JSON.stringify({ loras: [{ name: 'sd15-lora', scale: 0.7 }] }));
  const unloaded: string[] = [];
  const capped = new Engine({ cacheDir: join(scratch, 'cache'), searchDirs: [models], lorasDir, maxModels: 1, onWarning: () => {}, onUnload: (name) => unloaded.push(name) });
  try {
    const a = await capped.lease('capped-lora');
    const byDefault = await run(a.model);
    assert.deepEqual(byDefault.settings.loras, [{ name: 'sd15-lora', scale: 0.7 }]);
    const variantUnet = a.model.unet;
    a.release();
    assert.equal(capped.loraVariants, 1, "kiln.json's variant");
    const b = await capped.lease(SD15);
    const tagged = await run(b.model, `${sd15Case.prompt} <lora:sd15-lora:0.5>`);
    b.release();
    assert.deepEqual(unloaded, ['capped-lora']);
    assert.ok(variantUnet.released, "the kiln.json variant's UNet session went with its model");
    assert.equal(capped.loraVariants, 1, 'only the prompt variant of the model loaded now');
    const again = await capped.lease('capped-lora');
    assert.deepEqual(unloaded, ['capped-lora', 'sd15']);
    assert.equal(capped.loraVariants, 1, "the prompt variant went with sd15; kiln.json's is back");
    assert.deepEqual(bits((await run(again.model)).latents), bits(byDefault.latents), 'the same bits as before the unload');
    again.release();
    const b2 = await capped.lease(SD15);
    assert.deepEqual(bits((await run(b2.model, `${sd15Case.prompt} <lora:sd15-lora:0.5>`)).latents), bits(tagged.latents));
    b2.release();
  } finally {
    await capped.close();
  }
});
