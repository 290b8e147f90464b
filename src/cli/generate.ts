/**
 * `kiln generate`: one image from the command line, with a progress bar on a terminal.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { SingleBar, Presets } from 'cli-progress';
import { Engine } from '../engine/engine.js';
import { BuildProgress } from './convert.js';
import { isModelPath } from '../engine/locate.js';
import { kilnHome, loraCacheSize, modelSearchDirs, previewBudget } from '../catalog/home.js';
import { createModelCatalog } from '../catalog/catalog.js';
import { defaultModelName } from '../catalog/installed-models.js';
import { randomSeed } from '../engine/rng.js';
import { encodeGeneratedPng } from '../engine/image-codec.js';
import type { Device } from '../engine/onnx.js';
import { generate, type Progress } from '../engine/pipeline.js';
import type { AppliedLora } from '../engine/loras.js';
import { createPreviewer } from '../engine/preview.js';
import { resolveModelSize } from '../engine/pipeline.js';

export interface GenerateFlags {
  model?: string;
  prompt: string;
  negative?: string;
  seed?: number;
  size: string;
  quality: string;
  scheduler?: string;
  steps?: number;
  guidance?: number;
  device: Device;
  out?: string;
  /** `--lora NAME[:SCALE]`, repeatable: LoRAs from $KILN_HOME/loras, added to the model's own. */
  lora?: AppliedLora[];
  /** Write partial images (previews) here as they come. */
  previewDir?: string;
  /** How many (default 3). */
  previews?: number;
}

export async function generateCommand(flags: GenerateFlags): Promise<void> {
  const build = new BuildProgress();
  // The home (--home sets $KILN_HOME) and tuning come from the environment here; the engine is given folders and values.
  const home = kilnHome();
  const catalog = createModelCatalog(modelSearchDirs(home), { home });
  const budget = previewBudget();
  const engine = new Engine({ device: flags.device, ...catalog.folders, loraCacheSize: loraCacheSize(), previewBudget: budget, onBuildProgress: build.handle });
  const modelName = flags.model ?? defaultModelName(catalog.folders.searchDirs, home);
  const seed = flags.seed ?? randomSeed();
  const started = performance.now();
  const bar = process.stderr.isTTY
    ? new SingleBar({ format: ' {stage} |{bar}| {value}/{total} steps | {duration_formatted}', hideCursor: true }, Presets.shades_classic)
    : undefined;
  try {
    // Names (aliases included) resolve through the catalog; the engine loads the folder.
    const modelDir = catalog.locate(modelName);
    const model = await engine.model(modelDir, { loras: flags.lora, name: isModelPath(modelName) ? undefined : modelName });
    build.stop();
    const onProgress = (p: Progress) => {
      if (!bar) return;
      if (p.stage === 'encode') bar.start(p.totalSteps, 0, { stage: 'encode ' });
      else bar.update(p.step, { stage: p.stage === 'decode' ? 'decode ' : 'denoise' });
    };
    // Previews are written while the loop goes on; the bar keeps its line (nothing is printed for them).
    const writes: Promise<void>[] = [];
    let previewer: ReturnType<typeof createPreviewer> | undefined;
    if (flags.previewDir) {
      const dir = flags.previewDir;
      await mkdir(dir, { recursive: true });
      const { width, height } = resolveModelSize(model, { size: flags.size });
      previewer = createPreviewer(model, {
        count: flags.previews ?? 3,
        width,
        height,
        format: 'png',
        onPartial: (p) => writes.push(writeFile(join(dir, `partial-${p.index}-step-${p.step}.png`), p.bytes)),
        tinyDecoder: { home, cacheDir: catalog.folders.cacheDir },
        budget,
      });
    }
    const result = await generate(model, {
      onStepLatents: previewer?.onStepLatents,
      prompt: flags.prompt,
      negativePrompt: flags.negative,
      seed,
      size: flags.size,
      quality: flags.quality,
      scheduler: flags.scheduler,
      steps: flags.steps,
      guidanceScale: flags.guidance,
      onProgress,
    });
    bar?.stop();
    await previewer?.flush();
    await Promise.all(writes);
    const png = await encodeGeneratedPng(result.image, result.settings);
    const out = flags.out ?? `kiln-${seed}.png`;
    await writeFile(out, png);
    const s = result.settings;
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const loras = s.loras?.length ? ` loras=${s.loras.map((l) => `${l.name}:${l.scale}`).join(',')}` : '';
    process.stdout.write(
      `${out}: ${s.width}x${s.height} model=${s.model} seed=${s.seed} steps=${s.steps} scheduler=${s.scheduler} ` +
        `guidance=${s.guidanceScale}${loras}${flags.previewDir ? ` previews=${writes.length}` : ''} time=${seconds}s (generation ${(result.timings.totalMs / 1000).toFixed(2)}s)\n`,
    );
  } finally {
    bar?.stop();
    build.stop();
    await engine.close();
  }
}
