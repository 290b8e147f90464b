/**
 * ControlNet residual inputs on Kiln-built UNets (UnetBuildOptions.controlResiduals): the inputs
 * the split layout's ControlNet-UNet takes (contracts §4.1, the names the engine feeds from a
 * ControlNet), against diffusers' UNet2DConditionModel called with down_block_additional_residuals
 * and mid_block_additional_residual on the golden tiny SD 1.5 and SDXL UNets
 * (fixtures/unet-residuals.safetensors, tools/oracle/unet_residuals.py; diffusers-golden has no
 * ControlNet cases). All-zero residuals give the plain UNet's bytes.
 *
 * Measured (t.diagnostic): Kiln vs diffusers with residuals 6.26e-7 (sd15), 1.01e-6 (sdxl), mid
 * residual alone 7.45e-7 / 1.25e-6, the plain UNets' own distance (7.6e-7 / 9.7e-7); the residuals
 * move the output by 0.41 / 0.39 (the mid one alone 0.0044 / 0.026), so a residual added at a
 * wrong place is far outside the tolerance.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { buildUnet, residualInputName } from '../../src/graphs/unet.js';
import { componentWeights, Params } from '../../src/graphs/weights.js';
import { assertWithinRounding, goldenPath, maxAbsDiff, readConfig, readGolden, readGoldenInts, readmeTolerance, runGraph, type Feed } from './golden.js';

const FIXTURE = join(import.meta.dirname, 'fixtures', 'unet-residuals.safetensors');

/** The residual formula tools/oracle/unet_residuals.py uses (exact in both: integer hashing, then one rounding to float32). */
function residualValues(n: number, j: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (((Math.imul(i + 7919 * j, 2654435761 | 0) >>> 0) / 2 ** 32 - 0.5) * 0.5);
  return out;
}

function graph(folder: string, controlResiduals: boolean): GraphBuilder {
  const g = new GraphBuilder('unet');
  const p = Params.of(g, componentWeights(goldenPath(folder), 'unet'));
  buildUnet(g, readConfig(folder), p, { controlResiduals });
  assert.deepEqual(p.unusedKeys(), []);
  return g;
}

async function out(g: GraphBuilder, feeds: Record<string, Feed>): Promise<Float32Array> {
  return (await runGraph(g, feeds, ['out_sample'])).out_sample!.data as Float32Array;
}

for (const name of ['unet_sd15', 'unet_sdxl']) {
  test(`${name} with ControlNet residuals matches diffusers; zero residuals give the plain UNet's bytes`, async (t) => {
    const folder = `components/${name}`;
    const inputs = Object.fromEntries(readGolden(`${folder}/inputs.safetensors`));
    const expected = readGolden(FIXTURE);
    const shapes = readGoldenInts(FIXTURE, `${name}.shapes`);
    const count = shapes.shape[0]!;
    const shapeOf = (j: number) => shapes.data.slice(j * 4, j * 4 + 4);
    const nameOf = (j: number) => residualInputName(j === count - 1 ? 'mid' : j);
    const residuals = (values: (j: number, n: number) => Float32Array): Record<string, Feed> =>
      Object.fromEntries(
        Array.from({ length: count }, (_, j) => {
          const shape = shapeOf(j);
          return [nameOf(j), { shape, data: values(j, shape.reduce((a, b) => a * b, 1)) }];
        }),
      );

    const withInputs = graph(folder, true);
    // The contract: the UNet's own inputs, then 12 (SD 1.x) or 9 (SDXL) down residuals and the mid one.
    const names = withInputs.inputs.map((v) => v.name);
    assert.deepEqual(names.slice(-count), Array.from({ length: count }, (_, j) => nameOf(j)));
    assert.equal(count - 1, name === 'unet_sd15' ? 12 : 9);

    const plain = await out(graph(folder, false), inputs);
    const zero = await out(withInputs, { ...inputs, ...residuals((_, n) => new Float32Array(n)) });
    assert.ok(Buffer.from(zero.buffer).equals(Buffer.from(plain.buffer)), 'zero residuals: the plain UNet byte for byte');

    const tolerance = readmeTolerance(`${folder}/outputs.safetensors`, 'sample');
    const full = await out(withInputs, { ...inputs, ...residuals((j, n) => residualValues(n, j)) });
    assertWithinRounding(t, `${name} with residuals`, full, expected.get(`${name}.out_sample`)!.data, tolerance);
    const midOnly = await out(withInputs, { ...inputs, ...residuals((j, n) => (j === count - 1 ? residualValues(n, j) : new Float32Array(n))) });
    assertWithinRounding(t, `${name} with the mid residual only`, midOnly, expected.get(`${name}.mid_only`)!.data, tolerance);
    t.diagnostic(`effect of the residuals: ${maxAbsDiff(full, plain).toExponential(3)}, of the mid one alone ${maxAbsDiff(midOnly, plain).toExponential(3)}`);
    assert.ok(maxAbsDiff(midOnly, plain) > 1000 * tolerance, 'the mid residual changes the output far beyond rounding');
  });
}
