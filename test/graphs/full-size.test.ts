/**
 * The full-size architectures (src/graphs/reference-configs.ts, the Hub repositories' real
 * configs) built with random weights and not written: parameter counts equal to PyTorch's, and
 * graph inputs and outputs as the ONNX contract gives them (reference/onnx-model-contracts.md
 * section 2). Building only, so the whole file takes about a second.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildClipText } from '../../src/graphs/clip-text.js';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import {
  CLIP_VIT_L_TEXT,
  OPENCLIP_BIGG_TEXT,
  OPENCLIP_VIT_H_TEXT,
  REFERENCE_MODELS,
  SD15_UNET,
  SD21_UNET,
  SD_VAE,
  SDXL_BASE_UNET,
  SDXL_REFINER_UNET,
  SDXL_VAE,
  type JsonConfig,
} from '../../src/graphs/reference-configs.js';
import { buildUnet } from '../../src/graphs/unet.js';
import { buildVaeDecoder, buildVaeEncoder } from '../../src/graphs/vae.js';
import { Params, RandomWeights } from '../../src/graphs/weights.js';
import { describeValues } from './golden.js';

/** Builds one graph from `config` with random weights; returns its parameter count and I/O. */
function build(
  component: string,
  config: JsonConfig,
  builder: (g: GraphBuilder, config: Record<string, unknown>, p: Params) => unknown,
): { params: number; inputs: Record<string, string>; outputs: Record<string, string>; g: GraphBuilder; result: unknown } {
  const g = new GraphBuilder(component);
  const p = Params.of(g, new RandomWeights(component));
  const result = builder(g, { ...config }, p);
  return { params: p.parameterCount, inputs: describeValues(g.inputs), outputs: describeValues(g.outputs), g, result };
}

/** PyTorch's count for a reference model, as reference-configs.ts records it. */
function referenceCount(name: string): number {
  const m = REFERENCE_MODELS.find((r) => r.name === name);
  assert.ok(m, `REFERENCE_MODELS has no ${name}`);
  return m.parameters;
}

const unetIO = (channels: number, context: number) => ({
  sample: `float32 [batch, ${channels}, height, width]`,
  timestep: 'float32 [batch]',
  encoder_hidden_states: `float32 [batch, sequence, ${context}]`,
});
const UNET_OUT = { out_sample: 'float32 [batch, 4, height, width]' };

const UNETS: Array<[string, JsonConfig, number, Record<string, string>]> = [
  ['sd15-unet', SD15_UNET, 859_520_964, unetIO(4, 768)],
  ['sd21-unet', SD21_UNET, 865_910_724, unetIO(4, 1024)],
  ['sdxl-base-unet', SDXL_BASE_UNET, 2_567_463_684, { ...unetIO(4, 2048), text_embeds: 'float32 [batch, 1280]', time_ids: 'float32 [batch, 6]' }],
  ['sdxl-refiner-unet', SDXL_REFINER_UNET, 2_259_526_660, { ...unetIO(4, 1280), text_embeds: 'float32 [batch, 1280]', time_ids: 'float32 [batch, 5]' }],
];

for (const [name, config, count, inputs] of UNETS) {
  test(`${name}: ${count.toLocaleString('en-US')} parameters, contract inputs and output`, () => {
    assert.equal(referenceCount(name), count);
    const unet = build('unet', config, buildUnet);
    assert.equal(unet.params, count);
    assert.deepEqual(unet.inputs, inputs);
    assert.deepEqual(unet.outputs, UNET_OUT);
  });
}

/**
 * CLIPTextModel's parameters summed from the config's shapes: token and position embeddings,
 * per layer two LayerNorms, q/k/v/out projections and the MLP (all with biases), the final
 * LayerNorm, and the bias-free text_projection when WithProjection.
 */
function clipTextParameters(c: JsonConfig, withProjection: boolean): number {
  const D = c.hidden_size as number;
  const I = c.intermediate_size as number;
  const layer = 2 * 2 * D + 4 * (D * D + D) + (D * I + I) + (I * D + D);
  const embeddings = (c.vocab_size as number) * D + (c.max_position_embeddings as number) * D;
  return embeddings + (c.num_hidden_layers as number) * layer + 2 * D + (withProjection ? D * (c.projection_dim as number) : 0);
}

const hidden = (count: number, D: number) => Object.fromEntries(Array.from({ length: count }, (_, i) => [`hidden_states.${i}`, `float32 [batch, sequence, ${D}]`]));

const CLIPS: Array<[string, JsonConfig, number, boolean, Record<string, string>]> = [
  [
    'clip-vit-l-text',
    CLIP_VIT_L_TEXT,
    123_060_480,
    false,
    { last_hidden_state: 'float32 [batch, sequence, 768]', pooler_output: 'float32 [batch, 768]', ...hidden(13, 768) },
  ],
  // SD 2.x's converted tower has 23 of ViT-H's 24 layers (the penultimate is what SD 2.x reads).
  [
    'openclip-vit-h-text',
    OPENCLIP_VIT_H_TEXT,
    340_387_840,
    false,
    { last_hidden_state: 'float32 [batch, sequence, 1024]', pooler_output: 'float32 [batch, 1024]', ...hidden(24, 1024) },
  ],
  [
    'openclip-bigg-text',
    OPENCLIP_BIGG_TEXT,
    694_659_840,
    true,
    { text_embeds: 'float32 [batch, 1280]', last_hidden_state: 'float32 [batch, sequence, 1280]', ...hidden(33, 1280) },
  ],
];

for (const [name, config, count, withProjection, outputs] of CLIPS) {
  test(`${name}: ${count.toLocaleString('en-US')} parameters (summed from the shapes too), contract input and outputs in order`, () => {
    assert.equal(referenceCount(name), count);
    assert.equal(clipTextParameters(config, withProjection), count);
    const clip = build('text_encoder', config, buildClipText);
    const built = clip.result as ReturnType<typeof buildClipText>;
    assert.equal(built.withProjection, withProjection);
    assert.equal(clip.params, count);
    assert.deepEqual(clip.inputs, { input_ids: 'int64 [batch, sequence]' });
    // Order matters (consumers pick outputs by position): compare the name lists, then the shapes.
    assert.deepEqual(Object.keys(clip.outputs), Object.keys(outputs));
    assert.deepEqual(built.outputs, Object.keys(outputs));
    assert.deepEqual(clip.outputs, outputs);
  });
}

test('OpenCLIP bigG: text_embeds, last_hidden_state, hidden_states.0..32 are 35 outputs; SDXL reads hidden_states.31', () => {
  const names = build('text_encoder_2', OPENCLIP_BIGG_TEXT, buildClipText).g.outputs.map((o) => o.name);
  assert.equal(names.length, 35);
  assert.deepEqual(names.slice(0, 2), ['text_embeds', 'last_hidden_state']);
  assert.equal(names.at(-2), 'hidden_states.31');
});

for (const [name, config] of [
  ['sd-vae', SD_VAE],
  ['sdxl-vae', SDXL_VAE],
] as const) {
  test(`${name}: 83,653,863 parameters (encoder + quant_conv 34,163,664; post_quant_conv + decoder 49,490,199), contract I/O`, () => {
    const reference = REFERENCE_MODELS.find((r) => r.name === name)!;
    assert.deepEqual([reference.parameters, reference.parts], [83_653_863, { encoder: 34_163_664, decoder: 49_490_199 }]);
    const encoder = build('vae', config, buildVaeEncoder);
    const decoder = build('vae', config, buildVaeDecoder);
    assert.deepEqual([encoder.params, decoder.params], [34_163_664, 49_490_199]);
    assert.equal(encoder.params + decoder.params, 83_653_863);
    assert.deepEqual(encoder.inputs, { sample: 'float32 [batch, 3, height, width]' });
    assert.deepEqual(encoder.outputs, { latent_parameters: 'float32 [batch, 8, latent_height, latent_width]' });
    assert.deepEqual(decoder.inputs, { latent_sample: 'float32 [batch, 4, latent_height, latent_width]' });
    assert.deepEqual(decoder.outputs, { sample: 'float32 [batch, 3, height, width]' });
  });
}

test('every reference model is covered here', () => {
  const covered = [...UNETS.map(([n]) => n), ...CLIPS.map(([n]) => n), 'sd-vae', 'sdxl-vae'];
  assert.deepEqual(REFERENCE_MODELS.map((m) => m.name).sort(), covered.sort());
});
