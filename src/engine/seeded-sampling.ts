/**
 * Makes a graph's in-graph random sampling seedable from JS.
 *
 * VAE encoders exported with `latent_dist.sample()` inside the graph (diffusers' script,
 * optimum < 1.23, Olive) draw ε with an unseeded `RandomNormalLike`, so img2img and inpainting
 * would differ on every run. Each such node is replaced by a graph input of the same name as
 * its output; Kiln feeds it noise from the request's seeded generator (or zeros for the mean).
 * The result is exactly `mean + std·ε` with a reproducible ε.
 */
import onnxProto from 'onnx-proto';
import type { onnx as OnnxTypes } from 'onnx-proto';

// onnx-proto is CommonJS: from ESM only its default export exists.
const { onnx } = onnxProto as unknown as { onnx: typeof OnnxTypes };

const RANDOM_OPS = new Set(['RandomNormalLike']);

export interface PatchedGraph {
  bytes: Uint8Array;
  /** Names of the new inputs, each to be fed standard normals shaped like the node's input. */
  noiseInputs: string[];
  /** Whether weights live in an external-data file (then the patched graph must sit beside it). */
  externalData: boolean;
}

/** Quick test before decoding a large protobuf: the op name appears verbatim in the bytes. */
export function mayHaveRandomOps(bytes: Uint8Array): boolean {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).includes('RandomNormalLike');
}

/** Returns the patched model, or undefined when the graph has no random sampling node. */
export function replaceRandomNormalLike(bytes: Uint8Array): PatchedGraph | undefined {
  if (!mayHaveRandomOps(bytes)) return undefined;
  const model = onnx.ModelProto.decode(bytes);
  const graph = model.graph!;
  const nodes = graph.node ?? [];
  const noiseInputs: string[] = [];
  graph.node = nodes.filter((node) => {
    if (!RANDOM_OPS.has(node.opType ?? '')) return true;
    const name = node.output![0]!;
    // dtype attribute: 1 = float, 10 = float16 (default: the input's type, float for VAEs).
    const dtype = node.attribute?.find((a) => a.name === 'dtype')?.i;
    // No shape: any rank; ORT takes the fed tensor's dims.
    graph.input!.push(onnx.ValueInfoProto.create({ name, type: { tensorType: { elemType: Number(dtype ?? 1) } } }));
    noiseInputs.push(name);
    return false;
  });
  if (!noiseInputs.length) return undefined;
  const externalData = (graph.initializer ?? []).some((t) => t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL);
  return { bytes: onnx.ModelProto.encode(model).finish(), noiseInputs, externalData };
}
