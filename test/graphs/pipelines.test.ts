/**
 * Whole pipelines against diffusers 0.31 (diffusers-golden `pipelines/`): each case's safetensors
 * pipeline folder is built into ONNX graphs by Kiln (through the Engine, as a user's folder would
 * be), then run through Kiln's own tokenizer, conditioning, scheduler, guidance and VAE from the
 * case's starting latents. The final latents must match diffusers' and the 8-bit image must be
 * within one level per channel. LoRA cases go through Kiln's normal path: the case's LoRA file in
 * the engine's loras folder, named in the prompt as `<lora:NAME:SCALE>`.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { linkSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { Engine } from '../../src/engine/engine.js';
import { InvalidOptionError } from '../../src/engine/errors.js';
import { generate } from '../../src/engine/pipeline.js';
import { chunkPrompt } from '../../src/engine/conditioning.js';
import type { DiffusionModel } from '../../src/engine/model.js';
import { assertGoldenCase, GOLDEN_DIR, pipelineCases, runGoldenCase, type GoldenCase } from './golden.js';

interface PipelineCase extends GoldenCase {
  folder: string;
  lora: { file: string; scale: number } | null;
  token_ids: Record<string, Record<string, number[]>>;
}

const cases = pipelineCases<PipelineCase>();
const loraName = (c: PipelineCase): string => basename(c.lora!.file, '.safetensors');

let cacheDir: string;
let engine: Engine;
before(() => {
  cacheDir = mkdtempSync(join(tmpdir(), 'kiln-golden-pipelines-'));
  const lorasDir = join(cacheDir, 'loras');
  mkdirSync(lorasDir);
  for (const c of cases) if (c.lora) linkSync(join(GOLDEN_DIR, c.lora.file), join(lorasDir, `${loraName(c)}.safetensors`));
  engine = new Engine({ cacheDir, searchDirs: [], lorasDir, onWarning: (m) => assert.fail(`unexpected warning: ${m}`) });
});
after(async () => {
  await engine.close();
  rmSync(cacheDir, { recursive: true, force: true });
});

const model = (folder: string): Promise<DiffusionModel> => engine.model(join(GOLDEN_DIR, 'pipelines', folder));

describe('diffusers pipelines, from the cases\' latents', () => {
  for (const c of cases) {
    test(c.id, async (t) => {
      const m = await model(c.folder);
      // Token ids: Kiln's tokenizers give transformers' ids for each prompt.
      const tokenizers = m.isXL ? { tokenizer: m.tokenizer, tokenizer_2: m.tokenizer2! } : { tokenizer: m.tokenizer };
      for (const [name, tok] of Object.entries(tokenizers)) {
        assert.deepEqual(chunkPrompt(tok, c.prompt).ids[0], c.token_ids[name]!.prompt, `${name} ids of the prompt`);
      }

      // The LoRA as people name it; Kiln takes the tag out of the prompt text.
      const result = await runGoldenCase(m, c, { prompt: c.lora ? `${c.prompt} <lora:${loraName(c)}:${c.lora.scale}>` : c.prompt });
      assert.equal(result.settings.prompt, c.prompt);
      assert.deepEqual(result.settings.loras, c.lora ? [{ name: loraName(c), scale: c.lora.scale }] : undefined);
      assertGoldenCase(t, result, c);
    });
  }
});

test('an SD 1.x LoRA named in a prompt for the SDXL model is refused, naming both families (param prompt)', async () => {
  const sdxl = await model('sdxl');
  await assert.rejects(
    generate(sdxl, { prompt: 'a cabin <lora:sd15-lora:0.7>', seed: 0, size: '64x64', allowedSizes: ['64x64'], steps: 1 }),
    (e: unknown) =>
      e instanceof InvalidOptionError &&
      e.param === 'prompt' &&
      /sd15-lora\.safetensors is a LoRA for SD 1\.x \(metadata ss_base_model_version "sd_v1"\) and cannot be applied to this SDXL model's unet/.test(e.message),
  );
});
