/**
 * Model names stock OpenAI clients send: served by the default model unless the operator maps
 * them (--model-alias over aliases.json); the response names the model that drew; GPT image
 * names answer b64_json unasked, DALL-E names keep url.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { InvalidArgumentError } from 'commander';
import { parseModelAlias } from '../../src/cli/serve.js';
import { readModelAliases, readUserAliases, resolvePullSpec } from '../../src/models/aliases.js';
import { PullError } from '../../src/models/errors.js';
import { isOpenAiImageModel } from '../../src/catalog/catalog.js';
import { envelope, getJson, makeHome, postJson, startTestServer, type TestServer } from './helpers.js';

let t: TestServer;
before(async () => {
  const home = await makeHome({ 'kiln-tiny-xl': 'sdxl', other: 'sd-turbo', third: 'sd-turbo' });
  writeFileSync(join(home, 'aliases.json'), JSON.stringify({ 'gpt-image-1': { model: 'other' }, 'dall-e-2': { model: 'third' }, 'house-style': { model: 'gone' } }));
  t = await startTestServer({ home, modelAliases: { 'dall-e-2': 'other', mine: 'third' } });
});
after(async () => {
  await t.close();
  rmSync(t.home, { recursive: true, force: true });
});

const GEN = () => `${t.baseURL}/images/generations`;
const small = { prompt: 'a red circle', size: '256x256', steps: 1, n: 5 };

test('OpenAI names nothing maps are drawn by the default model, and the response says so', async () => {
  for (const model of ['dall-e-3', 'gpt-image-1-mini', 'gpt-image-1.5', 'gpt-image-2', 'gpt-image-9-preview', 'dall-e-4', 'DALL-E-3']) {
    const r = await postJson(GEN(), { ...small, model });
    assert.equal(r.status, 200, `${model}: ${r.text.slice(0, 200)}`);
    assert.equal(r.json.kiln.model, 'kiln-tiny-xl', model);
    assert.equal(r.json.kiln.requested_model, model);
    assert.equal(r.headers.get('x-kiln-model'), 'kiln-tiny-xl');
    const gpt = /^gpt-image/i.test(model);
    assert.equal(typeof r.json.data[0].b64_json, gpt ? 'string' : 'undefined', `${model}: b64_json ${gpt ? 'unasked' : 'only when asked'}`);
    assert.equal(typeof r.json.data[0].url, gpt ? 'undefined' : 'string', `${model}: url`);
  }
  // Asking explicitly still wins, both ways.
  const url = await postJson(GEN(), { ...small, model: 'gpt-image-2', response_format: 'url' });
  assert.match(url.json.data[0].url, /\/images\//);
  const b64 = await postJson(GEN(), { ...small, model: 'dall-e-3', response_format: 'b64_json' });
  assert.equal(typeof b64.json.data[0].b64_json, 'string');
  // A name the request gives as the model's own is not reported as "requested".
  const own = await postJson(GEN(), { ...small, model: 'kiln-tiny-xl' });
  assert.equal(own.json.kiln.model, 'kiln-tiny-xl');
  assert.equal('requested_model' in own.json.kiln, false);
});

test('aliases: --model-alias wins over aliases.json, which wins over the OpenAI fallback; a lost target is a 404 naming it', async () => {
  const cases: [string, string][] = [
    ['dall-e-2', 'other'], // both define it: the command line wins
    ['gpt-image-1', 'other'], // aliases.json
    ['mine', 'third'], // any name, not only OpenAI's
  ];
  for (const [model, drawnBy] of cases) {
    const r = await postJson(GEN(), { ...small, model });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.kiln.model, drawnBy, model);
    assert.equal(r.json.kiln.requested_model, model);
  }
  const gone = await postJson(GEN(), { ...small, model: 'house-style' });
  assert.equal(gone.status, 404);
  const e = envelope(gone.json);
  assert.equal(e.code, 'model_not_found');
  assert.match(e.message, /'house-style' is an alias for 'gone', which is not installed/);
  // Names nothing answers are still 404s.
  const unknown = await postJson(GEN(), { ...small, model: 'stable-diffusion-9' });
  assert.equal(unknown.status, 404);
  assert.match(envelope(unknown.json).message, /kiln pull stable-diffusion-9/);
});

test('GET /v1/models lists the aliases; /v1/models/{id} answers every name a request may use', async () => {
  const list = await getJson(`${t.baseURL}/models`);
  const ids = list.json.data.map((m: { id: string }) => m.id);
  for (const id of ['kiln-tiny-xl', 'other', 'third', 'dall-e-2', 'gpt-image-1', 'mine']) assert.ok(ids.includes(id), `${id} in ${ids}`);
  assert.ok(!ids.includes('house-style'), 'an alias whose model is gone is not listed');
  for (const id of ['dall-e-3', 'gpt-image-1', 'kiln-tiny-xl']) {
    const one = await getJson(`${t.baseURL}/models/${id}`);
    assert.equal(one.status, 200);
    assert.equal(one.json.id, id);
  }
  const missing = await getJson(`${t.baseURL}/models/house-style`);
  assert.equal(missing.status, 404);
  assert.equal(envelope(missing.json).param, 'model');
});

test('the OpenAI name rule, --model-alias parsing, and aliases.json serving entries', () => {
  for (const name of ['dall-e-2', 'dall-e-3', 'gpt-image-1', 'gpt-image-1-mini', 'gpt-image-1.5', 'gpt-image-2', 'gpt-image-x']) assert.ok(isOpenAiImageModel(name), name);
  for (const name of ['dalle-3', 'gpt-4o', 'my-dall-e', 'image-1']) assert.ok(!isOpenAiImageModel(name), name);

  assert.deepEqual(parseModelAlias('dall-e-3=sdxl', { a: 'b' }), { a: 'b', 'dall-e-3': 'sdxl' });
  assert.equal(parseModelAlias('x=./models/here').x, join(process.cwd(), 'models', 'here'));
  for (const bad of ['dall-e-3', '=sdxl', 'dall-e-3=', 'bad name=x']) assert.throws(() => parseModelAlias(bad), InvalidArgumentError, bad);

  const home = mkdtempSync(join(tmpdir(), 'kiln-aliases-'));
  try {
    writeFileSync(join(home, 'aliases.json'), JSON.stringify({ 'dall-e-3': { model: 'sdxl' }, mine: 'me/my-model' }));
    assert.deepEqual(readModelAliases(home), { 'dall-e-3': 'sdxl' });
    assert.deepEqual(Object.keys(readUserAliases(home)), ['mine'], 'serving aliases are not pull aliases');
    assert.throws(() => resolvePullSpec('dall-e-3', home), (e: unknown) => e instanceof PullError && /serving alias for "sdxl".*nothing to pull/.test(e.message));
    writeFileSync(join(home, 'aliases.json'), JSON.stringify({ 'dall-e-3': { model: 7 } }));
    assert.throws(() => readModelAliases(home), (e: unknown) => e instanceof PullError && /"model" must name an installed model/.test(e.message));
  } finally {
    rmSync(home, { recursive: true, force: true });
  }
});

test('--default-model may name an alias: requests without a model (and OpenAI names) are drawn by the model it stands for', async () => {
  const s = await startTestServer({ home: t.home, modelAliases: { mine: 'third' }, defaultModel: 'house' });
  writeFileSync(join(t.home, 'aliases.json'), JSON.stringify({ 'gpt-image-1': { model: 'other' }, 'dall-e-2': { model: 'third' }, 'house-style': { model: 'gone' }, house: { model: 'other' } }));
  try {
    const plain = await postJson(`${s.baseURL}/images/generations`, { prompt: 'a red circle', size: '256x256', steps: 1 });
    assert.equal(plain.status, 200, plain.text);
    assert.equal(plain.json.kiln.model, 'other');
    const openAi = await postJson(`${s.baseURL}/images/generations`, { prompt: 'a red circle', size: '256x256', steps: 1, model: 'dall-e-3' });
    assert.equal(openAi.status, 200, openAi.text);
    assert.equal(openAi.json.kiln.model, 'other');
    assert.equal(openAi.json.kiln.requested_model, 'dall-e-3');
    // The alias table is re-read: pointed elsewhere, the default follows.
    writeFileSync(join(t.home, 'aliases.json'), JSON.stringify({ house: { model: 'third' } }));
    const moved = await postJson(`${s.baseURL}/images/generations`, { prompt: 'a red circle', size: '256x256', steps: 1 });
    assert.equal(moved.status, 200, moved.text);
    assert.equal(moved.json.kiln.model, 'third');
  } finally {
    writeFileSync(join(t.home, 'aliases.json'), JSON.stringify({ 'gpt-image-1': { model: 'other' }, 'dall-e-2': { model: 'third' }, 'house-style': { model: 'gone' } }));
    await s.close();
  }
});

test('an alias of an alias is followed to its model; a loop is a 404 that shows it', async () => {
  const s = await startTestServer({ home: t.home, modelAliases: { first: 'second', second: 'third', loop1: 'loop2', loop2: 'loop1' } });
  try {
    const r = await postJson(`${s.baseURL}/images/generations`, { ...small, model: 'first' });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.kiln.model, 'third');
    assert.equal(r.json.kiln.requested_model, 'first');
    const loop = await postJson(`${s.baseURL}/images/generations`, { ...small, model: 'loop1' });
    assert.equal(loop.status, 404, loop.text);
    assert.match(envelope(loop.json).message, /'loop1' is an alias in a loop \(loop1 -> loop2 -> loop1\)/);
    const ids = (await getJson(`${s.baseURL}/models`)).json.data.map((m: { id: string }) => m.id);
    assert.ok(ids.includes('first') && ids.includes('second') && !ids.includes('loop1'), JSON.stringify(ids));
  } finally {
    await s.close();
  }
});
