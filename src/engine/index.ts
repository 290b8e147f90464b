/**
 * `kiln/engine`: the diffusion engine as a library. It reads no environment and assumes no home:
 * the caller names the folders (models to look names up in, a cache for graphs built from
 * safetensors, LoRAs).
 */
export { Engine, type EngineOptions } from './engine.js';
export { DiffusionModel, detectLayout, type ModelLayout, type ModelFamily, type Distillation, type ModelDefaults } from './model.js';
export { img2img, prepareInitImage, DEFAULT_STRENGTH, type Img2ImgOptions } from './img2img.js';
export { inpaint, prepareMask, checkMaskMatchesImage, latentMask, type InpaintOptions } from './inpaint.js';
export { replaceRandomNormalLike } from './seeded-sampling.js';
export { controlnetGenerate, controlImageTensor, type ControlNetOptions } from './controlnet.js';
export { poseGenerate, NoPersonError, type PoseAssets, type PoseGenerateOptions, type PoseGenerateResult } from './pose-control.js';
export { estimatePose, drawSkeleton, loadPoseModels, DWPOSE_DETECTOR_FILE, DWPOSE_POSE_FILE, type Person, type PoseKeypoint } from './pose/index.js';
export {
  generate,
  runDiffusion,
  denoise,
  resolveSettings,
  resolveModelSize,
  guidanceEmbedding,
  MAX_STEPS,
  MAX_GUIDANCE,
  type GenerateOptions,
  type GenerateResult,
  type EffectiveSettings,
  type Progress,
  type StepLatents,
  type Timings,
} from './pipeline.js';
export { encodePrompts, encodeConditioning, chunkPrompt, type TextConditioning, type TextEncoders, type ConditioningOptions } from './conditioning.js';
export { encodePromptEmbeddings, loadTextEncoders, type PromptEmbeddings, type PromptEmbeddingsOptions } from './prompt-embeddings.js';
export { loadClipTokenizer, createClipTokenizer, type ClipTokenizer } from './tokenizer.js';
export { parsePromptWeights, type WeightedFragment } from './prompt-weights.js';
export * from './schedulers/index.js';
export { createRng, randomSeed, MAX_SEED, type Rng } from './rng.js';
export {
  QUALITY_NAMES,
  DEFAULT_QUALITY,
  DEFAULT_SIZES,
  DEFAULT_STEPS,
  SIZE_RANGES,
  parseSize,
  resolveSize,
  sizeForUpload,
  qualityTier,
  type QualityTier,
  type Size,
} from './presets.js';
export { decodeLatents, encodeImageToLatents, type RgbImage } from './vae.js';
export {
  createPreviewer,
  previewSteps,
  latentRgbMap,
  latentsToRgb,
  encodePreview,
  learnFromResult,
  type LatentRgbMap,
  type PartialImage,
  type PreviewerOptions,
} from './preview.js';
export { encodeImage, encodeGeneratedPng, insertPngText, readPngText, parametersText, OUTPUT_FORMATS, type OutputFormat } from './image-codec.js';
export { locateModel, builtinModelsDir, isModelPath, type LocateOptions } from './locate.js';
export { OnnxModel, setSessionThreads, type Device } from './onnx.js';
export { UnetBatcher, type UnetBatcherOptions, type BatchRunOptions, type BatcherStats } from './unet-batcher.js';
export * from './errors.js';
