// Loads every sub-model of models/kiln-tiny and models/kiln-tiny-xl with onnxruntime-node, prints
// I/O names/dtypes/shapes, runs them on dummy inputs, and times the UNet (batch 2 = CFG) and VAE decode.
// usage: node tools/kiln-tiny/check_onnx.mjs
import * as ort from 'onnxruntime-node';
import { join } from 'node:path';

const root = new URL('../../models/', import.meta.url).pathname;
const opts = { intraOpNumThreads: 2, interOpNumThreads: 1, graphOptimizationLevel: 'all' };
const ids = (pad, dtype) => {
  const row = [49406, 320, 736, 7117, 525, 320, 1746, 5994, 49407]; // a red circle on a blue background
  while (row.length < 77) row.push(pad);
  const a = [...row, 49406, 49407, ...new Array(75).fill(pad)];
  return dtype === 'int64' ? new ort.Tensor('int64', BigInt64Array.from(a.map(BigInt)), [2, 77])
    : new ort.Tensor('int32', Int32Array.from(a), [2, 77]);
};
const randn = (shape) => { const n = shape.reduce((a, b) => a * b, 1); const d = new Float32Array(n); for (let i = 0; i < n; i++) d[i] = Math.random() * 2 - 1; return new ort.Tensor('float32', d, shape); };
const meta = (s) => ({
  in: s.inputMetadata ? s.inputMetadata.map((m) => `${m.name}:${m.type}[${m.shape}]`) : s.inputNames,
  out: s.outputMetadata ? s.outputMetadata.map((m) => `${m.name}:${m.type}[${m.shape}]`) : s.outputNames,
});
async function time(fn, n) { await fn(); const t = []; for (let i = 0; i < n; i++) { const t0 = performance.now(); await fn(); t.push(performance.now() - t0); } t.sort((a, b) => a - b); return t[Math.floor(n / 2)]; }
const shp = (r) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, `${v.type}[${v.dims}]`]));

for (const name of ['kiln-tiny', 'kiln-tiny-xl']) {
  const dir = join(root, name);
  const xl = name.endsWith('xl');
  console.log(`\n== ${name}`);
  const te = await ort.InferenceSession.create(join(dir, 'text_encoder/model.onnx'), opts);
  console.log('text_encoder', meta(te));
  const r1 = await te.run({ input_ids: ids(49407, 'int32') });
  console.log('  ->', shp(r1));
  let ctxDim = r1.last_hidden_state.dims[2], pooledDim = 0;
  if (xl) {
    const te2 = await ort.InferenceSession.create(join(dir, 'text_encoder_2/model.onnx'), opts);
    console.log('text_encoder_2', meta(te2));
    const r2 = await te2.run({ input_ids: ids(0, 'int64') });
    console.log('  ->', shp(r2));
    ctxDim += r2.last_hidden_state.dims[2];
    pooledDim = r2.text_embeds.dims[1];
  }
  const unet = await ort.InferenceSession.create(join(dir, 'unet/model.onnx'), opts);
  console.log('unet', meta(unet));
  const feeds = (h) => {
    const f = { sample: randn([2, 4, h, h]), timestep: new ort.Tensor('int64', BigInt64Array.from([500n, 500n]), [2]), encoder_hidden_states: randn([2, 77, ctxDim]) };
    if (xl) { f.text_embeds = randn([2, pooledDim]); f.time_ids = new ort.Tensor('float32', Float32Array.from([8 * h, 8 * h, 0, 0, 8 * h, 8 * h, 8 * h, 8 * h, 0, 0, 8 * h, 8 * h]), [2, 6]); }
    return f;
  };
  for (const h of [32, 64, 128]) console.log(`  unet batch2 ${h}x${h}:`, shp(await unet.run(feeds(h))));
  const f32 = feeds(32);
  console.log(`  UNet batch-2 32x32 median ms: ${(await time(() => unet.run(f32), 30)).toFixed(1)}`);
  const vd = await ort.InferenceSession.create(join(dir, 'vae_decoder/model.onnx'), opts);
  console.log('vae_decoder', meta(vd));
  const z = { latent_sample: randn([1, 4, 32, 32]) };
  console.log('  ->', shp(await vd.run(z)), `decode 256 median ms: ${(await time(() => vd.run(z), 10)).toFixed(1)}`);
  console.log('  512 ->', shp(await vd.run({ latent_sample: randn([1, 4, 64, 64]) })));
  const ve = await ort.InferenceSession.create(join(dir, 'vae_encoder/model.onnx'), opts);
  console.log('vae_encoder', meta(ve));
  console.log('  ->', shp(await ve.run({ sample: randn([1, 3, 256, 256]) })));
}
