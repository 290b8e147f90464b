/**
 * scheduler_config.json files as shipped on the Hugging Face Hub (copied key for key; the ones
 * Kiln also writes for imported checkpoints have their home in src/graphs/reference-configs.ts).
 */
import type { SchedulerConfig } from '../../src/engine/schedulers/index.js';
import { SD15_SCHEDULER, SD21_SCHEDULER, SDXL_SCHEDULER } from '../../src/graphs/reference-configs.js';

/** runwayml/stable-diffusion-v1-5 */
export const SD15_PNDM: SchedulerConfig = SD15_SCHEDULER;

/** stabilityai/stable-diffusion-2-1 (v-prediction) */
export const SD21_DDIM: SchedulerConfig = SD21_SCHEDULER;

/** stabilityai/stable-diffusion-xl-base-1.0 */
export const SDXL_EULER: SchedulerConfig = SDXL_SCHEDULER;

/** stabilityai/sd-turbo: the SDXL file above but for these two keys. */
export const SD_TURBO_EULER: SchedulerConfig = {
  ...SDXL_EULER,
  _diffusers_version: '0.24.0.dev0',
  timestep_spacing: 'trailing',
};

/** stabilityai/sdxl-turbo */
export const SDXL_TURBO_EULER_A: SchedulerConfig = {
  ...SD_TURBO_EULER,
  _class_name: 'EulerAncestralDiscreteScheduler',
};

/** SimianLuo/LCM_Dreamshaper_v7 */
export const LCM_DREAMSHAPER: SchedulerConfig = {
  _class_name: 'LCMScheduler',
  _diffusers_version: '0.22.0.dev0',
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  beta_start: 0.00085,
  clip_sample: false,
  clip_sample_range: 1.0,
  dynamic_thresholding_ratio: 0.995,
  num_train_timesteps: 1000,
  original_inference_steps: 50,
  prediction_type: 'epsilon',
  rescale_betas_zero_snr: false,
  sample_max_value: 1.0,
  set_alpha_to_one: true,
  steps_offset: 1,
  thresholding: false,
  timestep_scaling: 10.0,
  timestep_spacing: 'leading',
  trained_betas: null,
};

export const REAL_CONFIGS: Record<string, SchedulerConfig> = {
  SD15_PNDM,
  SD21_DDIM,
  SDXL_EULER,
  SD_TURBO_EULER,
  SDXL_TURBO_EULER_A,
  LCM_DREAMSHAPER,
};
