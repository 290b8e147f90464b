/**
 * Reading `../shared/data/compel-golden/` (compel 2.3.1 on tiny random CLIP encoders with the real
 * vocabulary; its README spells out compel's rule). Its `tokenizer/` and `tokenizer_2/` folders hold the configs
 * only (the vocabulary is `../clip-tokenizer/`, the same files as models/.clip-tokenizer), so
 * `compelFolder()` lays out a complete transformers-style folder: the tokenizer configs with the
 * vocabulary beside them, and links to the encoders' safetensors folders.
 */
import { copyFileSync, mkdirSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { COMPEL_GOLDEN_DIR, readGolden, readGoldenJson, tempDir, type GoldenTensor } from './golden.js';

export type EncoderSet = 'sd15' | 'sdxl';

export interface EncoderCall {
  type: 'encoder_call';
  encoder: 'text_encoder' | 'text_encoder_2';
  called_from: 'build_weighted_embedding_tensor' | 'empty_z' | 'get_pooled_embeddings';
  input_ids: number[][];
  attention_mask: number[][] | null;
  output_used: 'last_hidden_state' | 'hidden_states[-2]' | 'text_embeds';
  out_key: string;
}

export interface WeightedEvent {
  type: 'weighted_embedding';
  encoder: 'text_encoder' | 'text_encoder_2';
  token_ids: number[];
  per_token_weights: number[];
  attention_mask: number[];
  out_key: string;
}

export interface LerpEvent {
  type: 'lerp';
  per_embedding_weights: number[];
  per_embedding_weights_f32_normalized: number[];
  out_key: string;
}

export type CompelEvent = EncoderCall | WeightedEvent | LerpEvent;

export interface CompelCase {
  id: string;
  key_prefix: string;
  encoder_set: EncoderSet;
  /** Absent for the pair, which has `positive` and `negative`. */
  prompt?: string;
  positive?: string;
  negative?: string;
  options: { truncate_long_prompts: boolean };
  parsed_fragments?: { text: string; weight: number }[][];
  parsed_fragments_positive?: { text: string; weight: number }[];
  parsed_fragments_negative?: { text: string; weight: number }[];
  token_ids: Record<string, number[]>;
  events: CompelEvent[];
  outputs: Record<string, { key: string; shape: number[] }>;
}

export interface ParseExample {
  prompt: string;
  fragments: { text: string; weight: number }[][];
  compel_sd15_call: string;
  tokenizer_ids: number[];
  tokenizer_2_ids: number[];
}

interface CasesFile {
  cases: CompelCase[];
  parse_examples: ParseExample[];
}

let cached: CasesFile | undefined;
export function compelCases(): CasesFile {
  cached ??= readGoldenJson<CasesFile>(join(COMPEL_GOLDEN_DIR, 'cases.json'));
  return cached;
}

let outputs: Map<string, GoldenTensor> | undefined;
/** A tensor of outputs.safetensors by key. */
export function compelTensor(key: string): GoldenTensor {
  outputs ??= readGolden(join(COMPEL_GOLDEN_DIR, 'outputs.safetensors'));
  const t = outputs.get(key);
  if (!t) throw new Error(`compel-golden outputs.safetensors has no ${key}`);
  return t;
}

/**
 * The README's run-to-run spread of each encoder (OpenBLAS thread counts): sd15 and
 * text_encoder bit-stable, text_encoder_2 up to 9.5e-7 (so every sdxl tensor that includes it).
 */
export function compelReadme(set: EncoderSet, encoder?: 'text_encoder' | 'text_encoder_2'): number {
  return set === 'sdxl' && encoder !== 'text_encoder' ? 9.5e-7 : 0;
}

const VOCAB = join(import.meta.dirname, '..', '..', 'models', '.clip-tokenizer');

/** A transformers-style folder for the golden encoders: tokenizer[_2]/ complete, text_encoder[_2]/ linked. */
export function compelFolder(set: EncoderSet): string {
  const dir = tempDir(`compel-${set}`);
  const names = set === 'sdxl' ? ['', '_2'] : [''];
  for (const n of names) {
    const tok = join(dir, `tokenizer${n}`);
    mkdirSync(tok);
    for (const f of ['tokenizer_config.json', 'special_tokens_map.json']) copyFileSync(join(COMPEL_GOLDEN_DIR, `tokenizer${n}`, f), join(tok, f));
    for (const f of ['vocab.json', 'merges.txt']) copyFileSync(join(VOCAB, f), join(tok, f));
    symlinkSync(join(COMPEL_GOLDEN_DIR, `text_encoder${n}`), join(dir, `text_encoder${n}`));
  }
  return dir;
}

/** The prompts of a case in compel's call order (the pair: positive, negative), with compel's parse of each. */
export function casePrompts(c: CompelCase): { prompt: string; fragments: { text: string; weight: number }[] }[] {
  if (c.prompt !== undefined) return [{ prompt: c.prompt, fragments: c.parsed_fragments![0] ?? [] }];
  return [
    { prompt: c.positive!, fragments: c.parsed_fragments_positive! },
    { prompt: c.negative!, fragments: c.parsed_fragments_negative! },
  ];
}
