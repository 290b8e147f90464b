/**
 * The image-prompt and pose fixtures of image-prompt-pose.test.ts, for any home that serves them
 * (one machine there, the `kiln worker` processes in test/scale/scale.test.ts): the golden SD 1.5
 * pipeline (diffusers safetensors: Kiln builds its graphs, its ControlNet-UNet and the adapter
 * UNets), an OpenPose ControlNet stand-in whose residuals fit that UNet's widths, the DWPose
 * stand-ins, the golden base IP-Adapter and image encoder in the h94 layout, and a random Plus
 * ("face") adapter made for the same UNet and encoder.
 */
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { hashString, uniformValues } from '../../src/graphs/onnx-builder.js';
import { readIpAdapter } from '../../src/graphs/ip-adapter.js';
import { writeSafetensors, type TensorToWrite } from '../../src/graphs/safetensors.js';
import { IP_ADAPTERS_DIR } from '../../src/catalog/image-prompt-assets.js';
import { buildControlNet, controlNetSpecForUnet } from '../../tools/fixtures/controlnet.js';
import { ensurePoseFixture, writeOnnx } from '../../tools/fixtures/variants.js';
import { GOLDEN_DIR, readConfig } from '../graphs/golden.js';

const IP = join(GOLDEN_DIR, 'ip_adapter', 'IP-Adapter', 'models');

/**
 * A Plus (Resampler) adapter for the golden SD 1.5 UNet and image encoder, in the h94 key layout:
 * 4 queries of width 16, one Resampler layer (one head of 64), the base adapter's layer widths.
 */
export function writeFaceAdapter(path: string): void {
  const layers = readIpAdapter(join(IP, 'ip-adapter_sd15.safetensors')).layers;
  const encoderWidth = 16; // image_encoder hidden_size (its penultimate hidden states)
  const cross = 8; // the UNet's cross_attention_dim
  const [H, inner, queries] = [16, 64, 4];
  const tensors: Record<string, TensorToWrite> = {};
  const put = (name: string, shape: number[], scale: number, offset = 0) => {
    const data = uniformValues(shape.reduce((a, b) => a * b, 1), scale, hashString(name));
    if (offset) for (let i = 0; i < data.length; i++) data[i]! += offset;
    tensors[name] = { dtype: 'F32', shape, data };
  };
  const norm = (name: string, width: number) => {
    put(`${name}.weight`, [width], 0.1, 1);
    put(`${name}.bias`, [width], 0.1);
  };
  put('image_proj.latents', [1, queries, H], 0.5);
  put('image_proj.proj_in.weight', [H, encoderWidth], 0.4);
  put('image_proj.proj_in.bias', [H], 0.1);
  norm('image_proj.layers.0.0.norm1', H);
  norm('image_proj.layers.0.0.norm2', H);
  put('image_proj.layers.0.0.to_q.weight', [inner, H], 0.3);
  put('image_proj.layers.0.0.to_kv.weight', [2 * inner, H], 0.3);
  put('image_proj.layers.0.0.to_out.weight', [H, inner], 0.2);
  norm('image_proj.layers.0.1.0', H);
  put('image_proj.layers.0.1.1.weight', [4 * H, H], 0.3);
  put('image_proj.layers.0.1.3.weight', [H, 4 * H], 0.2);
  put('image_proj.proj_out.weight', [cross, H], 0.4);
  put('image_proj.proj_out.bias', [cross], 0.1);
  norm('image_proj.norm_out', cross);
  for (const [n, width] of layers) {
    put(`ip_adapter.${n}.to_k_ip.weight`, [width, cross], 0.5);
    put(`ip_adapter.${n}.to_v_ip.weight`, [width, cross], 0.5);
  }
  writeSafetensors(path, tensors);
}

/** The OpenPose ControlNet stand-in (split layout) with residuals at the golden UNet's skip widths. */
export async function writeControlNet(dir: string): Promise<void> {
  await writeOnnx(dir, buildControlNet(controlNetSpecForUnet(readConfig('pipelines/sd15/unet')), hashString('controlnet/golden-sd15')));
  writeFileSync(join(dir, 'config.json'), JSON.stringify({ _class_name: 'ControlNetModel' }));
}

/**
 * Installs into `home` (which has models/) the golden SD 1.5 pipeline as the model `name`, the
 * OpenPose ControlNet and DWPose as installed models, and both SD 1.5 adapters (style: the golden
 * ip-adapter_sd15, face: writeFaceAdapter's) with their image encoder under ip-adapters/models/.
 */
export async function installImagePromptPose(home: string, name = 'sd15'): Promise<void> {
  symlinkSync(join(GOLDEN_DIR, 'pipelines', 'sd15'), join(home, 'models', name), 'dir');
  await writeControlNet(join(home, 'models', 'controlnet-openpose'));
  symlinkSync(await ensurePoseFixture(), join(home, 'models', 'dwpose'), 'dir');
  const models = join(home, IP_ADAPTERS_DIR, 'models');
  mkdirSync(models, { recursive: true });
  symlinkSync(join(IP, 'image_encoder'), join(models, 'image_encoder'), 'dir');
  symlinkSync(join(IP, 'ip-adapter_sd15.safetensors'), join(models, 'ip-adapter_sd15.safetensors'));
  writeFaceAdapter(join(models, 'ip-adapter-plus-face_sd15.safetensors'));
}
