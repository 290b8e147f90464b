/**
 * The real `config.json` / `scheduler_config.json` of the models Kiln builds graphs for, with the
 * key names and values of the Hub repositories (as their diffusers / transformers versions wrote
 * them: old files lack keys that newer versions add with defaults, e.g. SD 1.5's VAE has no
 * `scaling_factor`, so diffusers' default 0.18215 applies). They let benchmarks and opt-in tests
 * build the full-size architectures with random weights, no download.
 *
 * Each entry names the Hub file it reproduces and the public copies it was checked against.
 * Parameter counts (REFERENCE_MODELS) were measured with diffusers 0.31.0 / transformers
 * 4.45.0.dev0 on torch 1.13 (`bench/graphs_torch.py --config NAME --count-params`).
 */

import type { SchedulerConfig } from '../engine/schedulers/types.js';

export type JsonConfig = Readonly<Record<string, unknown>>;

const SD_DOWN = ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'];
const SD_UP = ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'];
const VAE_DOWN = ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'];
const VAE_UP = ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D'];

/**
 * runwayml/stable-diffusion-v1-5 unet/config.json (diffusers 0.6.0 file).
 * Checked against copies quoted verbatim in public code (e.g. kohya-ss sd-scripts
 * library/original_unet.py docstring, several from_config snippets).
 */
export const SD15_UNET: JsonConfig = {
  _class_name: 'UNet2DConditionModel',
  _diffusers_version: '0.6.0',
  act_fn: 'silu',
  attention_head_dim: 8,
  block_out_channels: [320, 640, 1280, 1280],
  center_input_sample: false,
  cross_attention_dim: 768,
  down_block_types: SD_DOWN,
  downsample_padding: 1,
  flip_sin_to_cos: true,
  freq_shift: 0,
  in_channels: 4,
  layers_per_block: 2,
  mid_block_scale_factor: 1,
  norm_eps: 1e-5,
  norm_num_groups: 32,
  out_channels: 4,
  sample_size: 64,
  up_block_types: SD_UP,
};

/**
 * stabilityai/stable-diffusion-2-1 unet/config.json (diffusers 0.10.0.dev0 file): per-block head
 * counts [5, 10, 20, 20] (head dim 64), linear proj_in/proj_out, upcast attention, 1024-wide
 * OpenCLIP context. Checked against the v2.1 copy in kohya-ss sd-scripts library/original_unet.py.
 */
export const SD21_UNET: JsonConfig = {
  _class_name: 'UNet2DConditionModel',
  _diffusers_version: '0.10.0.dev0',
  act_fn: 'silu',
  attention_head_dim: [5, 10, 20, 20],
  block_out_channels: [320, 640, 1280, 1280],
  center_input_sample: false,
  cross_attention_dim: 1024,
  down_block_types: SD_DOWN,
  downsample_padding: 1,
  dual_cross_attention: false,
  flip_sin_to_cos: true,
  freq_shift: 0,
  in_channels: 4,
  layers_per_block: 2,
  mid_block_scale_factor: 1,
  norm_eps: 1e-5,
  norm_num_groups: 32,
  num_class_embeds: null,
  only_cross_attention: false,
  out_channels: 4,
  sample_size: 96,
  up_block_types: SD_UP,
  use_linear_projection: true,
  upcast_attention: true,
};

/**
 * stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (diffusers 0.19.0.dev0 file).
 * Checked against verbatim copies in public training scripts (T2I-adapter SDXL trainer comments,
 * ControlNeXt SDXL UNET_CONFIG).
 */
export const SDXL_BASE_UNET: JsonConfig = {
  _class_name: 'UNet2DConditionModel',
  _diffusers_version: '0.19.0.dev0',
  act_fn: 'silu',
  addition_embed_type: 'text_time',
  addition_embed_type_num_heads: 64,
  addition_time_embed_dim: 256,
  attention_head_dim: [5, 10, 20],
  block_out_channels: [320, 640, 1280],
  center_input_sample: false,
  class_embed_type: null,
  class_embeddings_concat: false,
  conv_in_kernel: 3,
  conv_out_kernel: 3,
  cross_attention_dim: 2048,
  cross_attention_norm: null,
  down_block_types: ['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
  downsample_padding: 1,
  dual_cross_attention: false,
  encoder_hid_dim: null,
  encoder_hid_dim_type: null,
  flip_sin_to_cos: true,
  freq_shift: 0,
  in_channels: 4,
  layers_per_block: 2,
  mid_block_only_cross_attention: null,
  mid_block_scale_factor: 1,
  mid_block_type: 'UNetMidBlock2DCrossAttn',
  norm_eps: 1e-5,
  norm_num_groups: 32,
  num_attention_heads: null,
  num_class_embeds: null,
  only_cross_attention: false,
  out_channels: 4,
  projection_class_embeddings_input_dim: 2816,
  resnet_out_scale_factor: 1.0,
  resnet_skip_time_act: false,
  resnet_time_scale_shift: 'default',
  sample_size: 128,
  time_cond_proj_dim: null,
  time_embedding_act_fn: null,
  time_embedding_dim: null,
  time_embedding_type: 'positional',
  timestep_post_act: null,
  transformer_layers_per_block: [1, 2, 10],
  up_block_types: ['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
  upcast_attention: null,
  use_linear_projection: true,
};

/**
 * stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json (diffusers 0.19.0.dev0 file): the
 * base's keys, in the same order, but for these: 384 base channels, 4 levels with attention at
 * levels 1 and 2 only, 4 transformer layers, 1280-wide context (bigG only),
 * 2560 = 1280 pooled + 5 x 256 (sizes, crop, aesthetic score).
 * Checked against Stability-AI/generative-models configs/inference/sd_xl_refiner.yaml
 * (model_channels 384, channel_mult [1,2,4,4], attention_resolutions [4,2], num_head_channels 64,
 * transformer_depth 4, context_dim 1280, adm_in_channels 2560).
 */
export const SDXL_REFINER_UNET: JsonConfig = {
  ...SDXL_BASE_UNET,
  attention_head_dim: [6, 12, 24, 24],
  block_out_channels: [384, 768, 1536, 1536],
  cross_attention_dim: 1280,
  down_block_types: ['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  projection_class_embeddings_input_dim: 2560,
  transformer_layers_per_block: 4,
  up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
};

/**
 * runwayml/stable-diffusion-v1-5 vae/config.json (diffusers 0.6.0 file; no scaling_factor key,
 * so AutoencoderKL's default 0.18215 applies). Checked against copies in public converters
 * (VAE_CONFIG_SD1 tables) and a re-saved copy of the repo (same values, defaults filled in).
 */
export const SD_VAE: JsonConfig = {
  _class_name: 'AutoencoderKL',
  _diffusers_version: '0.6.0',
  act_fn: 'silu',
  block_out_channels: [128, 256, 512, 512],
  down_block_types: VAE_DOWN,
  in_channels: 3,
  latent_channels: 4,
  layers_per_block: 2,
  norm_num_groups: 32,
  out_channels: 3,
  sample_size: 512,
  up_block_types: VAE_UP,
};

/** The scaling factor SD 1.x / 2.x VAEs use (AutoencoderKL's default; absent from SD_VAE). */
export const SD_VAE_SCALING_FACTOR = 0.18215;

/**
 * stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (diffusers 0.20.0.dev0 file):
 * same architecture as SD's, scaling 0.13025, force_upcast (overflows in fp16).
 */
export const SDXL_VAE: JsonConfig = {
  _class_name: 'AutoencoderKL',
  _diffusers_version: '0.20.0.dev0',
  _name_or_path: '../sdxl-vae/',
  act_fn: 'silu',
  block_out_channels: [128, 256, 512, 512],
  down_block_types: VAE_DOWN,
  force_upcast: true,
  in_channels: 3,
  latent_channels: 4,
  layers_per_block: 2,
  norm_num_groups: 32,
  out_channels: 3,
  sample_size: 1024,
  scaling_factor: 0.13025,
  up_block_types: VAE_UP,
};

/**
 * runwayml/stable-diffusion-v1-5 text_encoder/config.json (openai/clip-vit-large-patch14 text
 * tower, transformers 4.22.0.dev0 file): quick_gelu, 768 wide, 12 layers.
 */
export const CLIP_VIT_L_TEXT: JsonConfig = {
  _name_or_path: 'openai/clip-vit-large-patch14',
  architectures: ['CLIPTextModel'],
  attention_dropout: 0.0,
  bos_token_id: 0,
  dropout: 0.0,
  eos_token_id: 2,
  hidden_act: 'quick_gelu',
  hidden_size: 768,
  initializer_factor: 1.0,
  initializer_range: 0.02,
  intermediate_size: 3072,
  layer_norm_eps: 1e-5,
  max_position_embeddings: 77,
  model_type: 'clip_text_model',
  num_attention_heads: 12,
  num_hidden_layers: 12,
  pad_token_id: 1,
  projection_dim: 768,
  torch_dtype: 'float32',
  transformers_version: '4.22.0.dev0',
  vocab_size: 49408,
};

/**
 * stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14 text tower,
 * transformers 4.25.0.dev0 file): gelu, 1024 wide, 23 of its 24 layers (SD 2.x conditions on the
 * penultimate layer, so the converted model stops there).
 */
export const OPENCLIP_VIT_H_TEXT: JsonConfig = {
  _name_or_path: 'hf-models/stable-diffusion-v2-768x768/text_encoder',
  architectures: ['CLIPTextModel'],
  attention_dropout: 0.0,
  bos_token_id: 0,
  dropout: 0.0,
  eos_token_id: 2,
  hidden_act: 'gelu',
  hidden_size: 1024,
  initializer_factor: 1.0,
  initializer_range: 0.02,
  intermediate_size: 4096,
  layer_norm_eps: 1e-5,
  max_position_embeddings: 77,
  model_type: 'clip_text_model',
  num_attention_heads: 16,
  num_hidden_layers: 23,
  pad_token_id: 1,
  projection_dim: 512,
  torch_dtype: 'float32',
  transformers_version: '4.25.0.dev0',
  vocab_size: 49408,
};

/**
 * stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text
 * tower with its projection, transformers 4.32.0.dev0 file): gelu, 1280 wide, 32 layers.
 */
export const OPENCLIP_BIGG_TEXT: JsonConfig = {
  architectures: ['CLIPTextModelWithProjection'],
  attention_dropout: 0.0,
  bos_token_id: 0,
  dropout: 0.0,
  eos_token_id: 2,
  hidden_act: 'gelu',
  hidden_size: 1280,
  initializer_factor: 1.0,
  initializer_range: 0.02,
  intermediate_size: 5120,
  layer_norm_eps: 1e-5,
  max_position_embeddings: 77,
  model_type: 'clip_text_model',
  num_attention_heads: 20,
  num_hidden_layers: 32,
  pad_token_id: 1,
  projection_dim: 1280,
  torch_dtype: 'float16',
  transformers_version: '4.32.0.dev0',
  vocab_size: 49408,
};

/**
 * runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (diffusers 0.6.0 file; no
 * prediction_type / timestep_spacing keys: the defaults epsilon / leading apply).
 */
export const SD15_SCHEDULER: Readonly<SchedulerConfig> = {
  _class_name: 'PNDMScheduler',
  _diffusers_version: '0.6.0',
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  beta_start: 0.00085,
  num_train_timesteps: 1000,
  set_alpha_to_one: false,
  skip_prk_steps: true,
  steps_offset: 1,
  trained_betas: null,
  clip_sample: false,
};

/**
 * stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (diffusers 0.8.0 file):
 * DDIM over SD's scaled-linear betas, v-prediction.
 */
export const SD21_SCHEDULER: Readonly<SchedulerConfig> = {
  _class_name: 'DDIMScheduler',
  _diffusers_version: '0.8.0',
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  beta_start: 0.00085,
  clip_sample: false,
  num_train_timesteps: 1000,
  prediction_type: 'v_prediction',
  set_alpha_to_one: false,
  skip_prk_steps: true,
  steps_offset: 1,
  trained_betas: null,
};

/** stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (diffusers 0.19.0.dev0 file). */
export const SDXL_SCHEDULER: Readonly<SchedulerConfig> = {
  _class_name: 'EulerDiscreteScheduler',
  _diffusers_version: '0.19.0.dev0',
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  beta_start: 0.00085,
  clip_sample: false,
  interpolation_type: 'linear',
  num_train_timesteps: 1000,
  prediction_type: 'epsilon',
  sample_max_value: 1.0,
  set_alpha_to_one: false,
  skip_prk_steps: true,
  steps_offset: 1,
  timestep_spacing: 'leading',
  trained_betas: null,
  use_karras_sigmas: false,
};

/**
 * madebyollin/taesd config.json (diffusers AutoencoderTiny): also diffusers' defaults, and the
 * layout of madebyollin/taesdxl (same widths and blocks, trained on SDXL's latents). Kiln builds
 * only its decoder (taesd.ts): 1,222,531 parameters, as PyTorch counts them
 * (tools/oracle/taesd_golden.py).
 */
export const TAESD: JsonConfig = {
  _class_name: 'AutoencoderTiny',
  act_fn: 'relu',
  decoder_block_out_channels: [64, 64, 64, 64],
  encoder_block_out_channels: [64, 64, 64, 64],
  force_upcast: false,
  in_channels: 3,
  latent_channels: 4,
  latent_magnitude: 3,
  latent_shift: 0.5,
  num_decoder_blocks: [3, 3, 3, 1],
  num_encoder_blocks: [1, 3, 3, 3],
  out_channels: 3,
  scaling_factor: 1.0,
  upsampling_scaling_factor: 2,
};

export type ReferenceKind = 'unet' | 'vae' | 'clip-text';

export interface ReferenceModel {
  name: string;
  kind: ReferenceKind;
  config: JsonConfig;
  /** Hub repository and file the config reproduces. */
  source: string;
  /**
   * Parameters of the whole module as diffusers / transformers build it from this config
   * (random init, counted with PyTorch: sum of p.numel()). For a VAE this is encoder +
   * decoder + quant convs; for CLIP text the projection is included only WithProjection.
   */
  parameters: number;
  /**
   * The same count split by the graphs Kiln builds separately (VAE: encoder + quant_conv,
   * decoder + post_quant_conv), measured the same way.
   */
  parts?: Readonly<Record<string, number>>;
}

const VAE_PARTS = { encoder: 34_163_664, decoder: 49_490_199 } as const;

/** Every reference architecture, with the parameter count PyTorch reports for it. */
export const REFERENCE_MODELS: readonly ReferenceModel[] = [
  { name: 'sd15-unet', kind: 'unet', config: SD15_UNET, source: 'runwayml/stable-diffusion-v1-5 unet/config.json', parameters: 859_520_964 },
  { name: 'sd21-unet', kind: 'unet', config: SD21_UNET, source: 'stabilityai/stable-diffusion-2-1 unet/config.json', parameters: 865_910_724 },
  { name: 'sdxl-base-unet', kind: 'unet', config: SDXL_BASE_UNET, source: 'stabilityai/stable-diffusion-xl-base-1.0 unet/config.json', parameters: 2_567_463_684 },
  { name: 'sdxl-refiner-unet', kind: 'unet', config: SDXL_REFINER_UNET, source: 'stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json', parameters: 2_259_526_660 },
  { name: 'sd-vae', kind: 'vae', config: SD_VAE, source: 'runwayml/stable-diffusion-v1-5 vae/config.json', parameters: 83_653_863, parts: VAE_PARTS },
  { name: 'sdxl-vae', kind: 'vae', config: SDXL_VAE, source: 'stabilityai/stable-diffusion-xl-base-1.0 vae/config.json', parameters: 83_653_863, parts: VAE_PARTS },
  { name: 'clip-vit-l-text', kind: 'clip-text', config: CLIP_VIT_L_TEXT, source: 'runwayml/stable-diffusion-v1-5 text_encoder/config.json', parameters: 123_060_480 },
  { name: 'openclip-vit-h-text', kind: 'clip-text', config: OPENCLIP_VIT_H_TEXT, source: 'stabilityai/stable-diffusion-2-1 text_encoder/config.json', parameters: 340_387_840 },
  { name: 'openclip-bigg-text', kind: 'clip-text', config: OPENCLIP_BIGG_TEXT, source: 'stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json', parameters: 694_659_840 },
];
