/**
 * CLIP byte-level BPE tokenizer, matching Hugging Face's slow `CLIPTokenizer` as diffusers uses it
 * when `ftfy` is not installed (the usual case), so Kiln feeds the text encoders exactly the ids
 * a diffusers pipeline would.
 *
 * Pipeline (same order as transformers):
 *  1. Split the text on special tokens (BOS, EOS, UNK and the pad token). A special token in the
 *     prompt becomes its id — including `!` for SDXL's `tokenizer_2`, whose pad token is `!`
 *     (transformers registers the pad token as an added token, so every `!` there becomes id 0,
 *     not the `!</w>` id 256 the other tokenizer gives; diffusers issue #4153).
 *  2. Each remaining piece: BasicTokenizer cleanup (drop NUL, U+FFFD and Unicode category C
 *     characters; whitespace to spaces; spaces around CJK ideographs), NFC, split on whitespace,
 *     lowercase (accents kept), re-join with single spaces.
 *  3. CLIP pre-tokenization regex, bytes_to_unicode mapping, BPE with `</w>` word ends.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

export interface ClipTokenizer {
  readonly bosTokenId: number;
  readonly eosTokenId: number;
  readonly padTokenId: number;
  readonly modelMaxLength: number;
  /** Token ids of `text` without BOS/EOS, no truncation. */
  tokenize(text: string): number[];
  /** [BOS, ...tokens, EOS], no padding, no truncation. */
  encode(text: string): number[];
  /** Exactly modelMaxLength ids: BOS, at most (max-2) tokens, EOS, then padTokenId. */
  encodePadded(text: string): number[];
  /**
   * Ids back to text, for logs and tests. Like transformers' `decode(ids, skip_special_tokens=True)`:
   * BOS, EOS, UNK and pad ids are dropped; word ends become spaces. Lossy: the text comes back
   * lowercased and with punctuation spaced out (`cat .`). Throws RangeError on an id not in the vocabulary.
   */
  decode(ids: number[]): string;
  /** The vocabulary entry of an id (`cat</w>`), as transformers' `convert_ids_to_tokens`; undefined if none. */
  tokenText(id: number): string | undefined;
}

export interface ClipTokenizerOptions {
  /** Default `<|endoftext|>` (SD 1.x `tokenizer/`); SDXL `tokenizer_2/` uses `!`. */
  padToken?: string;
  /** Default 77. */
  modelMaxLength?: number;
  /** Default `<|startoftext|>`. */
  bosToken?: string;
  /** Default `<|endoftext|>`. */
  eosToken?: string;
  /** Used for BPE pieces missing from the vocabulary. Default `<|endoftext|>`. */
  unkToken?: string;
}

const DEFAULT_BOS = '<|startoftext|>';
const DEFAULT_EOS = '<|endoftext|>';
const DEFAULT_MAX_LENGTH = 77;
// transformers reads merges.txt lines [1, 49152 - 256 - 2 + 1): at most 48,894 merges.
const MAX_MERGES = 49152 - 256 - 2;
// The cache is keyed by user text, so bound it: a server must not grow without limit.
const CACHE_LIMIT = 20_000;

const PRETOKENIZE =
  /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+/giu;
const CONTROL = /\p{C}/u;
const SPACE_SEPARATOR = /\p{Zs}/u;

/** GPT-2/CLIP byte→character table: printable bytes map to themselves, the rest to U+0100.. */
function bytesToUnicode(): string[] {
  const table: string[] = new Array(256);
  const isPrintable = (b: number) =>
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    table[b] = String.fromCharCode(isPrintable(b) ? b : 256 + n++);
  }
  return table;
}

const BYTE_ENCODER = bytesToUnicode();
const BYTE_DECODER = new Map<string, number>(BYTE_ENCODER.map((c, b) => [c, b]));
const UTF8 = new TextEncoder();

function isCjkIdeograph(cp: number): boolean {
  return (
    (cp >= 0x4e00 && cp <= 0x9fff) ||
    (cp >= 0x3400 && cp <= 0x4dbf) ||
    (cp >= 0x20000 && cp <= 0x2a6df) ||
    (cp >= 0x2a700 && cp <= 0x2b73f) ||
    (cp >= 0x2b740 && cp <= 0x2b81f) ||
    (cp >= 0x2b820 && cp <= 0x2ceaf) ||
    (cp >= 0xf900 && cp <= 0xfaff) ||
    (cp >= 0x2f800 && cp <= 0x2fa1f)
  );
}

/** transformers' BasicTokenizer(do_lower_case, strip_accents=False, do_split_on_punc=False). */
function basicClean(text: string): string {
  let out = '';
  for (const ch of text) {
    const cp = ch.codePointAt(0)!;
    if (ch === '\t' || ch === '\n' || ch === '\r' || SPACE_SEPARATOR.test(ch)) {
      out += ' ';
    } else if (cp === 0 || cp === 0xfffd || CONTROL.test(ch)) {
      continue;
    } else if (isCjkIdeograph(cp)) {
      out += ` ${ch} `;
    } else {
      out += ch;
    }
  }
  // Python's str.split() also splits on U+2028/U+2029, which survive the cleanup above; JS \s does too.
  return out
    .normalize('NFC')
    .split(/\s+/u)
    .filter((w) => w.length > 0)
    .map((w) => w.toLowerCase())
    .join(' ');
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function validateMaxLength(value: number): number {
  if (!Number.isInteger(value) || value < 2) {
    throw new RangeError(`CLIP tokenizer: modelMaxLength must be an integer >= 2, got ${value}`);
  }
  return value;
}

export function createClipTokenizer(
  vocab: Record<string, number>,
  merges: string[],
  options: ClipTokenizerOptions = {},
): ClipTokenizer {
  const encoder = new Map<string, number>();
  const decoder = new Map<number, string>();
  for (const [token, id] of Object.entries(vocab)) {
    if (!Number.isInteger(id)) throw new TypeError(`CLIP tokenizer: vocab id of ${JSON.stringify(token)} is not an integer`);
    encoder.set(token, id);
    decoder.set(id, token);
  }

  // Ranks keyed "left right": byte-encoded symbols never contain a space (space is byte 0x20 → 'Ġ').
  const ranks = new Map<string, number>();
  for (const line of merges) {
    const trimmed = line.trim();
    if (trimmed === '' || trimmed.startsWith('#version')) continue;
    if (ranks.size >= MAX_MERGES) break;
    const parts = trimmed.split(/\s+/);
    if (parts.length !== 2) throw new Error(`CLIP tokenizer: malformed merge line ${JSON.stringify(line)}`);
    const key = `${parts[0]} ${parts[1]}`;
    if (!ranks.has(key)) ranks.set(key, ranks.size);
  }

  const idOf = (token: string, role: string): number => {
    const id = encoder.get(token);
    if (id === undefined) throw new Error(`CLIP tokenizer: ${role} token ${JSON.stringify(token)} is not in the vocabulary`);
    return id;
  };
  const bosToken = options.bosToken ?? DEFAULT_BOS;
  const eosToken = options.eosToken ?? DEFAULT_EOS;
  const unkToken = options.unkToken ?? DEFAULT_EOS;
  const padToken = options.padToken ?? DEFAULT_EOS;
  const bosTokenId = idOf(bosToken, 'bos');
  const eosTokenId = idOf(eosToken, 'eos');
  const unkTokenId = idOf(unkToken, 'unk');
  const padTokenId = idOf(padToken, 'pad');
  const modelMaxLength = validateMaxLength(options.modelMaxLength ?? DEFAULT_MAX_LENGTH);

  const specialTokens = [...new Set([bosToken, eosToken, unkToken, padToken])];
  const specialIds = new Set(specialTokens.map((t) => encoder.get(t)!));
  // Longest first so the alternation picks the longest special token at a position (like HF's trie).
  const specialSplit = new RegExp(
    `(${[...specialTokens].sort((a, b) => b.length - a.length).map(escapeRegExp).join('|')})`,
    'u',
  );
  const specialSet = new Set(specialTokens);

  // Pre-seeded like transformers: the regex can still produce these after lowercasing (`<|ENDOFTEXT|>`).
  const cache = new Map<string, number[]>();
  const seed = () => {
    cache.clear();
    for (const t of [DEFAULT_BOS, DEFAULT_EOS]) {
      const id = encoder.get(t);
      if (id !== undefined) cache.set(t, [id]);
    }
  };
  seed();

  const bpe = (word: string): number[] => {
    const cached = cache.get(word);
    if (cached) return cached;
    let symbols = Array.from(word);
    symbols[symbols.length - 1] += '</w>';
    while (symbols.length > 1) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i < symbols.length - 1; i++) {
        const r = ranks.get(`${symbols[i]} ${symbols[i + 1]}`);
        if (r !== undefined && r < bestRank) {
          bestRank = r;
          best = i;
        }
      }
      if (best < 0) break;
      const first = symbols[best];
      const second = symbols[best + 1];
      // Merge every non-overlapping occurrence, left to right.
      const next: string[] = [];
      for (let i = 0; i < symbols.length; ) {
        if (i < symbols.length - 1 && symbols[i] === first && symbols[i + 1] === second) {
          next.push(first + second);
          i += 2;
        } else {
          next.push(symbols[i]);
          i += 1;
        }
      }
      symbols = next;
    }
    const ids = symbols.map((s) => encoder.get(s) ?? unkTokenId);
    if (cache.size >= CACHE_LIMIT) seed();
    cache.set(word, ids);
    return ids;
  };

  const tokenizePiece = (piece: string, out: number[]) => {
    const cleaned = basicClean(piece);
    for (const match of cleaned.matchAll(PRETOKENIZE)) {
      let mapped = '';
      for (const b of UTF8.encode(match[0])) mapped += BYTE_ENCODER[b];
      // A loop, not push(...ids): spreading a huge word's ids could overflow the argument limit.
      for (const tokenId of bpe(mapped)) out.push(tokenId);
    }
  };

  const tokenize = (text: string): number[] => {
    const out: number[] = [];
    // With a capture group, split() keeps the special tokens at odd indices.
    for (const part of text.split(specialSplit)) {
      if (part === '') continue;
      if (specialSet.has(part)) out.push(encoder.get(part)!);
      else tokenizePiece(part, out);
    }
    return out;
  };

  const encode = (text: string) => [bosTokenId, ...tokenize(text), eosTokenId];

  const encodePadded = (text: string): number[] => {
    const tokens = tokenize(text).slice(0, modelMaxLength - 2);
    const ids = [bosTokenId, ...tokens, eosTokenId];
    while (ids.length < modelMaxLength) ids.push(padTokenId);
    return ids;
  };

  const decode = (ids: number[]): string => {
    const bytes: number[] = [];
    for (const id of ids) {
      if (specialIds.has(id)) continue;
      const token = decoder.get(id);
      if (token === undefined) throw new RangeError(`CLIP tokenizer: id ${id} is not in the vocabulary`);
      for (const ch of token) {
        const b = BYTE_DECODER.get(ch);
        // Non-byte characters only appear in tokens outside the byte alphabet; keep them as UTF-8.
        if (b === undefined) bytes.push(...UTF8.encode(ch));
        else bytes.push(b);
      }
    }
    const text = new TextDecoder('utf-8').decode(new Uint8Array(bytes));
    return text.replaceAll('</w>', ' ').trim();
  };

  const tokenText = (id: number) => decoder.get(id);

  return { bosTokenId, eosTokenId, padTokenId, modelMaxLength, tokenize, encode, encodePadded, decode, tokenText };
}

async function readRequired(path: string): Promise<string> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new Error(`CLIP tokenizer: missing ${path}`);
    }
    throw err;
  }
}

async function readOptionalJson(path: string): Promise<Record<string, unknown> | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  try {
    const value: unknown = JSON.parse(text);
    if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new Error('not a JSON object');
    return value as Record<string, unknown>;
  } catch (err) {
    throw new Error(`CLIP tokenizer: cannot parse ${path}: ${(err as Error).message}`);
  }
}

/** A token entry in HF configs is either "text" or {"content": "text", ...}. */
function tokenContent(value: unknown): string | undefined {
  if (typeof value === 'string') return value;
  if (value && typeof value === 'object' && typeof (value as { content?: unknown }).content === 'string') {
    return (value as { content: string }).content;
  }
  return undefined;
}

/**
 * Loads a Hugging Face tokenizer folder (vocab.json, merges.txt, optional tokenizer_config.json and
 * special_tokens_map.json). As in transformers, special_tokens_map.json wins over tokenizer_config.json.
 * A `model_max_length` that is missing or absurd (HF writes 1e30 when unset) falls back to 77, the
 * CLIP text encoder's position count.
 */
export async function loadClipTokenizer(dir: string): Promise<ClipTokenizer> {
  const vocabPath = join(dir, 'vocab.json');
  const mergesPath = join(dir, 'merges.txt');
  const [vocabText, mergesText] = await Promise.all([readRequired(vocabPath), readRequired(mergesPath)]);
  let vocab: Record<string, number>;
  try {
    vocab = JSON.parse(vocabText) as Record<string, number>;
  } catch (err) {
    throw new Error(`CLIP tokenizer: cannot parse ${vocabPath}: ${(err as Error).message}`);
  }
  const config = (await readOptionalJson(join(dir, 'tokenizer_config.json'))) ?? {};
  const specialMap = (await readOptionalJson(join(dir, 'special_tokens_map.json'))) ?? {};
  const pick = (key: string) => tokenContent(specialMap[key]) ?? tokenContent(config[key]);

  const rawMax = config.model_max_length;
  const modelMaxLength =
    typeof rawMax === 'number' && Number.isInteger(rawMax) && rawMax >= 2 && rawMax <= 1_000_000
      ? rawMax
      : DEFAULT_MAX_LENGTH;

  return createClipTokenizer(vocab, mergesText.split(/\r?\n/), {
    padToken: pick('pad_token'),
    bosToken: pick('bos_token'),
    eosToken: pick('eos_token'),
    unkToken: pick('unk_token'),
    modelMaxLength,
  });
}
