/**
 * Fixture repositories for the fake Hub: the engine's tiny fixture model folders, as Hub
 * repositories laid out like the real ones (ONNX folders beside PyTorch and OpenVINO files,
 * a big checkpoint at the top), plus the files a pull must leave out.
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, sep } from 'node:path';
import { after } from 'node:test';
import { ensureFixture, type FixtureVariant } from '../../tools/fixtures/variants.js';

export function readTree(dir: string): Record<string, Buffer> {
  const out: Record<string, Buffer> = {};
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else out[relative(dir, p).split(sep).join('/')] = readFileSync(p);
    }
  };
  walk(dir);
  return out;
}

/** Deterministic filler bytes. */
export function filler(size: number, seed = 1): Buffer {
  const b = Buffer.alloc(size);
  let x = seed * 2654435761;
  for (let i = 0; i < size; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

const BIG = filler(4 * 1024 * 1024, 7);

/**
 * Files a pull must skip, shaped like the official SDXL repository's neighbours of the ONNX files.
 * The text encoder has PyTorch `.bin` weights but no safetensors, so these neighbours never make
 * a complete diffusers safetensors layout (which `auto` would install instead of the ONNX one).
 */
export function foreignFiles(): Record<string, Buffer> {
  return {
    'sd_xl_base_1.0.safetensors': BIG, // the big single-file checkpoint
    'sd_xl_offset_example-lora_1.0.safetensors': filler(40_000, 2),
    'unet/diffusion_pytorch_model.safetensors': filler(60_000, 3),
    'unet/diffusion_pytorch_model.fp16.safetensors': filler(30_000, 4),
    'unet/openvino_model.xml': Buffer.from('<?xml version="1.0"?><net name="unet"/>\n'),
    'unet/openvino_model.bin': filler(50_000, 5),
    'text_encoder/pytorch_model.bin': filler(20_000, 8),
    'text_encoder/openvino_model.xml': Buffer.from('<?xml version="1.0"?><net name="te"/>\n'),
    'vae/diffusion_pytorch_model.safetensors': filler(25_000, 9),
    'vae/config.json': Buffer.from('{"_class_name": "AutoencoderKL", "scaling_factor": 0.18215}\n'),
    'vae_decoder/openvino_model.xml': Buffer.from('<?xml version="1.0"?><net name="vd"/>\n'),
    'safety_checker/model.onnx': filler(30_000, 10),
    'safety_checker/config.json': Buffer.from('{}\n'),
    'feature_extractor/preprocessor_config.json': Buffer.from('{}\n'),
    'unet/model_fp16.onnx': filler(10_000, 11),
    '01.png': filler(5_000, 12),
    '.gitattributes': Buffer.from('*.onnx filter=lfs diff=lfs merge=lfs -text\n'),
    'README.md': Buffer.from('---\nlicense: openrail++\n---\n# fixture model card\n'),
  };
}

/** Paths of the foreign files that a diffusion pull does take (model card, component configs). */
export const TAKEN_FOREIGN = ['README.md', 'vae/config.json'];

/** A fixture variant as a Hub repository: its model folder plus the foreign files. */
export async function fixtureRepo(variant: FixtureVariant, withForeign = true): Promise<Record<string, Buffer>> {
  const files = readTree(await ensureFixture(variant));
  return withForeign ? { ...files, ...foreignFiles() } : files;
}

/** A fresh KILN_HOME, removed after the test file. */
export function tempHome(prefix = 'kiln-home-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}
