/**
 * `kiln serve --n-as count`: `n` is OpenAI's number of images (1 to 10), each with its own seed,
 * all reported; the seed goes in `seed` (and counts up from there). The default server keeps `n`
 * as the seed.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { toFile } from 'openai';
import { envelope, makePng, postJson, startTestServer, type TestServer } from './helpers.js';

let counting: TestServer;
let seeding: TestServer;
before(async () => {
  [counting, seeding] = await Promise.all([startTestServer({ nMeaning: 'count' }), startTestServer()]);
});
after(() => Promise.all([counting.close(), seeding.close()]));

const FAST = { prompt: 'a yellow triangle', size: '256x256', steps: 2, response_format: 'b64_json' } as const;
const seedsOf = (json: any): number[] => json.data.map((d: { seed: number }) => d.seed);

test('n images, each with its own random seed, all in the response and the header', async () => {
  const { data: res, response } = await counting.client().images.generate({ ...FAST, n: 3 } as any).withResponse();
  assert.equal(res.data!.length, 3);
  const seeds = seedsOf(res);
  assert.equal(new Set(seeds).size, 3, `distinct seeds: ${seeds}`);
  assert.deepEqual((res as any).kiln.seeds, seeds);
  assert.equal((res as any).kiln.seed, seeds[0]);
  assert.equal(response.headers.get('x-kiln-seed'), seeds.join(','));
  const images = res.data!.map((d) => d.b64_json!);
  assert.equal(new Set(images).size, 3, 'different seeds, different images');

  const one = await postJson(`${counting.baseURL}/images/generations`, FAST);
  assert.equal(one.json.data.length, 1, 'n absent: one image');
  assert.equal('seeds' in one.json.kiln, false);
});

test('with a seed, the images take seed, seed+1, ...: each is the image that seed gives alone', async () => {
  const URL = `${counting.baseURL}/images/generations`;
  const two = await postJson(URL, { ...FAST, n: 2, seed: 41 });
  assert.deepEqual(seedsOf(two.json), [41, 42]);
  const alone = await postJson(URL, { ...FAST, seed: 42 });
  assert.equal(alone.json.data[0].b64_json, two.json.data[1].b64_json);
  // The seed server's n=42 is the same picture: only the meaning of n changed.
  const seedServer = await postJson(`${seeding.baseURL}/images/generations`, { ...FAST, n: 42 });
  assert.deepEqual(seedsOf(seedServer.json), [42]);
  assert.equal(seedServer.json.data[0].b64_json, two.json.data[1].b64_json);
});

test('n outside 1..10 is a 400 saying what n means here; edits count too', async () => {
  for (const n of [0, 11, 4294967295]) {
    const r = await postJson(`${counting.baseURL}/images/generations`, { ...FAST, n });
    assert.equal(r.status, 400);
    const e = envelope(r.json);
    assert.equal(e.param, 'n');
    assert.match(e.message, /number of images .* from 1 to 10; the seed goes in 'seed'/);
  }
  const edit = (await counting.client().images.edit({ ...FAST, n: 2, image: await toFile(await makePng(64, 64), 'a.png', { type: 'image/png' }) } as any)) as any;
  assert.equal(edit.data.length, 2);
  assert.equal(edit.kiln.mode, 'img2img');
  assert.equal(new Set(seedsOf(edit)).size, 2);
});
