import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdtemp, mkdir, copyFile, writeFile, rm, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createClipTokenizer, loadClipTokenizer, type ClipTokenizer } from '../src/engine/tokenizer.js';
import { COMPEL_GOLDEN_DIR, readGoldenJson } from './graphs/golden.js';

const DATA = join(import.meta.dirname, '..', 'models', '.clip-tokenizer');
const BOS = 49406;
const EOS = 49407;

let clip: ClipTokenizer;
let vocab: Record<string, number>;
let tmp: string;

before(async () => {
  clip = await loadClipTokenizer(DATA);
  vocab = JSON.parse(await readFile(join(DATA, 'vocab.json'), 'utf8')) as Record<string, number>;
  tmp = await mkdtemp(join(tmpdir(), 'kiln-tokenizer-'));
});

after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** A folder with the real vocabulary plus the given JSON config files. */
async function folder(name: string, files: Record<string, unknown>): Promise<string> {
  const dir = join(tmp, name);
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir);
  await copyFile(join(DATA, 'vocab.json'), join(dir, 'vocab.json'));
  await copyFile(join(DATA, 'merges.txt'), join(dir, 'merges.txt'));
  for (const [file, content] of Object.entries(files)) {
    await writeFile(join(dir, file), JSON.stringify(content));
  }
  return dir;
}

const id = (token: string): number => {
  const v = vocab[token];
  assert.ok(v !== undefined, `vocab lacks ${token}`);
  return v;
};

test('special ids and defaults of the SD 1.x tokenizer', () => {
  assert.equal(clip.bosTokenId, BOS);
  assert.equal(clip.eosTokenId, EOS);
  assert.equal(clip.padTokenId, EOS);
  assert.equal(clip.modelMaxLength, 77);
});

// Encodings published by other CLIP ports and docs (open_clip / transformers outputs).
const KNOWN: Array<[string, number[]]> = [
  ['a photo of a cat', [BOS, 320, 1125, 539, 320, 2368, EOS]],
  ['the black dog', [BOS, 518, 1449, 1929, EOS]],
  ['a running dog', [BOS, 320, 2761, 1929, EOS]],
  ['a boy', [BOS, 320, 1876, EOS]],
  ["Truck's 123 wheels!", [BOS, 4629, 568, 272, 273, 274, 8025, 256, EOS]],
  ['  WHEEL\n\t and fruit  ', [BOS, 6744, 537, 5190, EOS]],
  ["a... 're we're don't 10", [BOS, 320, 678, 982, 649, 982, 847, 713, 272, 271, EOS]],
  ['## #@ #...', [BOS, 15483, 35062, 31491, EOS]],
  ['! !! !!!', [BOS, 256, 748, 995, EOS]],
];

for (const [text, expected] of KNOWN) {
  test(`known encoding: ${JSON.stringify(text)}`, () => {
    assert.deepEqual(clip.encode(text), expected);
  });
}

test('known prefix of a long comma-separated prompt', () => {
  const ids = clip.encode(
    'a cute magical flying ghost dog, fantasy art, golden color, high quality, highly detailed, elegant',
  );
  assert.deepEqual(
    ids.slice(0, 16),
    [BOS, 320, 2242, 7823, 4610, 7108, 1929, 267, 5267, 794, 267, 3878, 3140, 267, 1400, 3027],
  );
  assert.equal(ids.at(-1), EOS);
});

test('tokenize has no BOS/EOS; encode wraps it', () => {
  assert.deepEqual(clip.tokenize('a photo of a cat'), [320, 1125, 539, 320, 2368]);
  assert.deepEqual(clip.encode('a photo of a cat'), [BOS, ...clip.tokenize('a photo of a cat'), EOS]);
});

test('empty and whitespace-only text', () => {
  assert.deepEqual(clip.encode(''), [BOS, EOS]);
  assert.deepEqual(clip.encode(' \t\r\n '), [BOS, EOS]);
  assert.deepEqual(clip.tokenize(''), []);
});

test('padding to 77 with EOS for a folder without config', async () => {
  const ids = clip.encodePadded('a photo of a cat');
  assert.equal(ids.length, 77);
  assert.deepEqual(ids.slice(0, 7), [BOS, 320, 1125, 539, 320, 2368, EOS]);
  assert.ok(ids.slice(7).every((x) => x === EOS));
  assert.deepEqual(clip.encodePadded(''), [BOS, ...new Array<number>(76).fill(EOS)]);
});

test('SDXL tokenizer_2: pad "!" (object form) pads with 0', async () => {
  const dir = await folder('sdxl2', {
    'tokenizer_config.json': { model_max_length: 77, pad_token: '!', bos_token: { content: '<|startoftext|>' } },
    'special_tokens_map.json': {
      bos_token: { content: '<|startoftext|>', lstrip: false, normalized: true, rstrip: false, single_word: false },
      eos_token: { content: '<|endoftext|>', lstrip: false, normalized: true, rstrip: false, single_word: false },
      pad_token: { content: '!', lstrip: false, normalized: false, rstrip: false, single_word: false },
      unk_token: { content: '<|endoftext|>', lstrip: false, normalized: true, rstrip: false, single_word: false },
    },
  });
  const t2 = await loadClipTokenizer(dir);
  assert.equal(t2.padTokenId, 0);
  assert.equal(t2.bosTokenId, BOS);
  assert.equal(t2.eosTokenId, EOS);
  const ids = t2.encodePadded('a photo of a cat');
  assert.equal(ids.length, 77);
  assert.deepEqual(ids.slice(0, 7), [BOS, 320, 1125, 539, 320, 2368, EOS]);
  assert.ok(ids.slice(7).every((x) => x === 0));
});

test('SDXL tokenizer_2: "!" in the prompt is the pad token id 0, as in transformers (diffusers #4153)', async () => {
  const t2 = await loadClipTokenizer(await folder('sdxl2-bang', { 'special_tokens_map.json': { pad_token: '!' } }));
  // transformers' output quoted in the issue: six `!` → six 0s.
  assert.deepEqual(t2.encode('! !! !!!'), [BOS, 0, 0, 0, 0, 0, 0, EOS]);
  assert.deepEqual(t2.tokenize('hello!'), [id('hello</w>'), 0]);
  assert.deepEqual(clip.tokenize('hello!'), [id('hello</w>'), id('!</w>')]);
  // Text around the special token is tokenized separately.
  assert.deepEqual(t2.tokenize('a!b'), [id('a</w>'), 0, id('b</w>')]);
});

test('special_tokens_map.json wins over tokenizer_config.json; plain string form works', async () => {
  const a = await loadClipTokenizer(await folder('cfg-only', { 'tokenizer_config.json': { pad_token: '!' } }));
  assert.equal(a.padTokenId, 0);
  const b = await loadClipTokenizer(
    await folder('both', {
      'tokenizer_config.json': { pad_token: '!' },
      'special_tokens_map.json': { pad_token: '<|endoftext|>' },
    }),
  );
  assert.equal(b.padTokenId, EOS);
});

test('model_max_length from config; absurd values fall back to 77', async () => {
  const short = await loadClipTokenizer(await folder('short', { 'tokenizer_config.json': { model_max_length: 8 } }));
  assert.equal(short.modelMaxLength, 8);
  assert.deepEqual(short.encodePadded('a photo of a cat with a hat'), [BOS, 320, 1125, 539, 320, 2368, 593, EOS]);
  assert.deepEqual(short.encodePadded('a cat'), [BOS, 320, 2368, EOS, EOS, EOS, EOS, EOS]);
  const huge = await loadClipTokenizer(
    await folder('huge', { 'tokenizer_config.json': { model_max_length: 1e30 } }),
  );
  assert.equal(huge.modelMaxLength, 77);
});

test('truncation of a 100-word prompt keeps BOS, the first 75 tokens, then EOS', () => {
  const words = Array.from({ length: 100 }, (_, i) => ['red', 'cat', 'house', 'tree', 'sky'][i % 5]);
  const text = words.join(' ');
  const tokens = clip.tokenize(text);
  assert.equal(tokens.length, 100); // each of these words is one token
  const ids = clip.encodePadded(text);
  assert.equal(ids.length, 77);
  assert.equal(ids[0], BOS);
  assert.equal(ids[76], EOS);
  assert.deepEqual(ids.slice(1, 76), tokens.slice(0, 75));
  // encode() does not truncate.
  assert.equal(clip.encode(text).length, 102);
});

test('exactly 75 tokens fit without padding; 76 are cut to 75', () => {
  const t75 = Array.from({ length: 75 }, () => 'cat').join(' ');
  assert.deepEqual(clip.encodePadded(t75), [BOS, ...new Array<number>(75).fill(2368), EOS]);
  assert.deepEqual(clip.encodePadded(`${t75} dog`), [BOS, ...new Array<number>(75).fill(2368), EOS]);
});

test('lowercasing', () => {
  assert.deepEqual(clip.encode('A PHOTO Of A Cat'), clip.encode('a photo of a cat'));
});

test('punctuation splits from words', () => {
  assert.deepEqual(clip.tokenize('cat, dog.'), [id('cat</w>'), id(',</w>'), id('dog</w>'), id('.</w>')]);
  // Runs of punctuation stay together as one pre-token.
  assert.deepEqual(clip.tokenize('wow!!'), [id('wow</w>'), id('!!</w>')]);
  assert.deepEqual(clip.tokenize('(cat)'), [id('(</w>'), id('cat</w>'), id(')</w>')]);
});

test("apostrophes: it's, don't, I'll, we've", () => {
  assert.deepEqual(clip.tokenize("it's"), [id('it</w>'), id("'s</w>")]);
  assert.deepEqual(clip.tokenize("don't"), [id('don</w>'), id("'t</w>")]);
  assert.deepEqual(clip.tokenize("I'll"), [id('i</w>'), id("'ll</w>")]);
  assert.deepEqual(clip.tokenize("we've"), [id('we</w>'), id("'ve</w>")]);
  // Uppercase contraction is lowercased first.
  assert.deepEqual(clip.tokenize("IT'S"), clip.tokenize("it's"));
});

test('numbers are split digit by digit', () => {
  assert.deepEqual(clip.tokenize('1990s'), [272, id('9</w>'), id('9</w>'), 271, id('s</w>')]);
  assert.deepEqual(clip.tokenize('3 cats'), [id('3</w>'), id('cats</w>')]);
  assert.deepEqual(clip.tokenize('2.0'), [id('2</w>'), id('.</w>'), id('0</w>')]);
});

test('unicode: accents kept, NFC-normalized, CJK split to bytes', () => {
  // Accents are not stripped (strip_accents=False in the CLIP path)...
  assert.notDeepEqual(clip.tokenize('café'), clip.tokenize('cafe'));
  // é is UTF-8 C3 A9, which bytes_to_unicode writes as "Ã©": one vocabulary entry here.
  assert.deepEqual(clip.tokenize('café'), [id('caf\u00c3\u00a9</w>')]);
  assert.notDeepEqual(clip.tokenize('café'), [id('caf'), id('\u00e9</w>')]);
  // ...and composed/decomposed forms are the same after NFC.
  assert.deepEqual(clip.tokenize('cafe\u0301'), clip.tokenize('caf\u00e9'));
  assert.deepEqual(clip.tokenize('xa\u0303y'), clip.tokenize('x\u00e3y'));
  assert.deepEqual(clip.tokenize('CAFÉ'), clip.tokenize('café'));
  // A CJK ideograph is its own word of UTF-8 bytes.
  const cat = clip.tokenize('猫');
  assert.equal(cat.length, 3);
  assert.equal(clip.decode(cat), '猫');
  assert.deepEqual(clip.tokenize('猫cat'), [...cat, id('cat</w>')]);
});

test('extra whitespace, newlines, tabs, NBSP and control characters', () => {
  const base = clip.tokenize('a photo of a cat');
  assert.deepEqual(clip.tokenize('  a\n\nphoto \t of\r\na\u00a0cat  '), base);
  assert.deepEqual(clip.tokenize('a\u2028photo\u2029of a cat'), base);
  // Control/format characters are removed, joining their neighbours (BasicTokenizer._clean_text).
  assert.deepEqual(clip.tokenize('ca\u200bt'), clip.tokenize('cat'));
  assert.deepEqual(clip.tokenize('ca\u0000t\ufffd'), clip.tokenize('cat'));
  assert.deepEqual(clip.tokenize('ca\u000bt'), clip.tokenize('cat'));
});

test('special tokens written in the prompt map to their ids', () => {
  assert.deepEqual(clip.tokenize('cat<|endoftext|>dog'), [id('cat</w>'), EOS, id('dog</w>')]);
  assert.deepEqual(clip.tokenize('<|startoftext|>cat'), [BOS, id('cat</w>')]);
  // Lowercasing turns this into the special token too (transformers' BPE cache does the same).
  assert.deepEqual(clip.tokenize('A<|ENDOFTEXT|>b'), [id('a</w>'), EOS, id('b</w>')]);
});

test('repeated calls give identical results (cache)', () => {
  const text = 'an astronaut riding a horse on mars, photorealistic';
  const first = clip.encode(text);
  assert.deepEqual(clip.encode(text), first);
  assert.deepEqual(clip.encode(text.toUpperCase()), first);
});

test('decode round-trips words and drops special and pad ids', () => {
  assert.equal(clip.decode(clip.encodePadded('A Photo of a Cat')), 'a photo of a cat');
  assert.equal(clip.decode(clip.encode("it's a cat, 1990s")), "it 's a cat , 1 9 9 0 s");
  assert.equal(clip.decode(clip.encode('naïve café')), 'naïve café');
  assert.throws(() => clip.decode([999_999]), RangeError);
});

test('missing vocab.json or merges.txt is a clear error naming the path', async () => {
  const dir = join(tmp, 'missing');
  await mkdir(dir, { recursive: true });
  await assert.rejects(loadClipTokenizer(dir), (err: Error) => err.message.includes(join(dir, 'vocab.json')) || err.message.includes(join(dir, 'merges.txt')));
  await copyFile(join(DATA, 'vocab.json'), join(dir, 'vocab.json'));
  await assert.rejects(loadClipTokenizer(dir), (err: Error) => err.message.includes(join(dir, 'merges.txt')));
  await rm(join(dir, 'vocab.json'));
  await copyFile(join(DATA, 'merges.txt'), join(dir, 'merges.txt'));
  await assert.rejects(loadClipTokenizer(dir), (err: Error) => err.message.includes(join(dir, 'vocab.json')));
});

test('malformed config JSON is an error naming the file', async () => {
  const dir = await folder('badjson', {});
  await writeFile(join(dir, 'tokenizer_config.json'), '{ not json');
  await assert.rejects(loadClipTokenizer(dir), (err: Error) => err.message.includes('tokenizer_config.json'));
});

test('a pad token missing from the vocabulary is rejected', () => {
  assert.throws(() => createClipTokenizer(vocab, [], { padToken: '<pad>' }), /pad token "<pad>"/);
  assert.throws(() => createClipTokenizer(vocab, [], { modelMaxLength: 1 }), RangeError);
});

// transformers' tests/models/clip/test_tokenization_clip.py toy vocabulary.
test('toy vocabulary from the transformers test suite', () => {
  const toy = [
    'l', 'o', 'w', 'e', 'r', 's', 't', 'i', 'd', 'n', 'lo', 'l</w>', 'w</w>', 'r</w>', 't</w>',
    'low</w>', 'er</w>', 'lowest</w>', 'newer</w>', 'wider', '<unk>', '<|startoftext|>', '<|endoftext|>',
  ];
  const toyVocab = Object.fromEntries(toy.map((t, i) => [t, i]));
  const t = createClipTokenizer(toyVocab, ['#version: 0.2', 'l o', 'lo w</w>', 'e r</w>'], { unkToken: '<unk>' });
  // tokens: lo w er</w> n e w er</w>
  assert.deepEqual(t.tokenize('lower newer'), [10, 2, 16, 9, 3, 2, 16]);
  assert.deepEqual(t.encode('lower newer'), [21, 10, 2, 16, 9, 3, 2, 16, 22]);
  // `z` is not in this vocabulary: the unknown token.
  assert.deepEqual(t.tokenize('z'), [20]);
  // Merge ranks matter: `lo w</w>` applies to `low` at the end of a word only.
  assert.deepEqual(t.tokenize('low'), [15]);
  assert.equal(t.decode(t.encode('lower newer')), 'lower newer');
});

test('merges without a #version header are all used', () => {
  const toyVocab = { a: 0, b: 1, 'b</w>': 2, 'ab</w>': 3, '<|startoftext|>': 4, '<|endoftext|>': 5 };
  assert.deepEqual(createClipTokenizer(toyVocab, ['a b</w>']).tokenize('ab'), [3]);
  assert.deepEqual(createClipTokenizer(toyVocab, []).tokenize('ab'), [0, 2]);
});

// ---------------------------------------------------------------------------------------------
// Hugging Face's ids for text beyond ASCII: transformers' slow CLIPTokenizer (no ftfy, as diffusers
// runs it) on accents, CJK, other scripts, emoji, mixed scripts, odd whitespace and control
// characters (fixtures/clip-tokenizer-ids.json, tools/oracle/clip_tokenizer_ids.py), and the ids
// compel-golden records for its parse examples, with both SD's and SDXL's tokenizer_2 padding.

interface ReferenceIds {
  text: string;
  tokenizer: number[];
  tokenizer_2: number[];
}

test("non-Latin text, emoji and odd whitespace: transformers' ids, both tokenizers", async () => {
  const t2 = await loadClipTokenizer(await folder('sdxl2-reference', { 'special_tokens_map.json': { pad_token: '!' } }));
  const fixture = JSON.parse(await readFile(join(import.meta.dirname, 'fixtures', 'clip-tokenizer-ids.json'), 'utf8')) as { cases: ReferenceIds[] };
  assert.ok(fixture.cases.length >= 50);
  const wrong: string[] = [];
  for (const c of fixture.cases) {
    if (JSON.stringify(clip.encode(c.text)) !== JSON.stringify(c.tokenizer)) wrong.push(`tokenizer ${JSON.stringify(c.text)}: ${clip.encode(c.text)} vs ${c.tokenizer}`);
    if (JSON.stringify(t2.encode(c.text)) !== JSON.stringify(c.tokenizer_2)) wrong.push(`tokenizer_2 ${JSON.stringify(c.text)}: ${t2.encode(c.text)} vs ${c.tokenizer_2}`);
  }
  assert.deepEqual(wrong, []);
  // The fixture exercises what it claims: multi-byte pieces and ids that only tokenizer_2 changes.
  assert.ok(fixture.cases.some((c) => c.tokenizer.length > [...c.text].length + 2), 'some text splits into byte pieces');
  assert.ok(fixture.cases.some((c) => JSON.stringify(c.tokenizer) !== JSON.stringify(c.tokenizer_2)));
});

test("compel-golden's parse examples: the golden tokenizers' ids of each raw prompt", async () => {
  const golden = (name: string) => folder(`compel-${name}`, Object.fromEntries(
    ['tokenizer_config.json', 'special_tokens_map.json'].map((f) => [f, JSON.parse(readFileSync(join(COMPEL_GOLDEN_DIR, name, f), 'utf8'))]),
  ));
  const [t1, t2] = await Promise.all([loadClipTokenizer(await golden('tokenizer')), loadClipTokenizer(await golden('tokenizer_2'))]);
  const { parse_examples } = readGoldenJson<{ parse_examples: { prompt: string; tokenizer_ids: number[]; tokenizer_2_ids: number[] }[] }>(join(COMPEL_GOLDEN_DIR, 'cases.json'));
  for (const e of parse_examples) {
    assert.deepEqual(t1.encode(e.prompt), e.tokenizer_ids, `tokenizer ${JSON.stringify(e.prompt)}`);
    assert.deepEqual(t2.encode(e.prompt), e.tokenizer_2_ids, `tokenizer_2 ${JSON.stringify(e.prompt)}`);
  }
});
