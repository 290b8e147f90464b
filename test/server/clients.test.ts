/**
 * Stock apps against Kiln, unchanged: each test replays the exact requests an app sends in its
 * stock settings (read from the app's own source, named per test) and reads the answer the way
 * that app does. The server runs as an operator would start it for them: an API key (the apps
 * send one), the default model serving OpenAI's model names.
 *
 * The default model is an SDXL fixture (native size 1024x1024) whose kiln.json lowers its step
 * counts, so the apps' requests (which name no steps) stay fast here.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import OpenAI, { toFile } from 'openai';
import sharp from 'sharp';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { linkFarm, makeHome, rgbPng, startTestServer, type TestServer } from './helpers.js';

const KEY = 'sk-kiln-test';
let t: TestServer;
before(async () => {
  const home = await makeHome({});
  const model = linkFarm(await ensureFixture('sdxl'), join(home, 'models', 'kiln-tiny-xl'));
  writeFileSync(join(model, 'kiln.json'), JSON.stringify({ steps: { draft: 1, smooth: 2, hd: 2 } }));
  t = await startTestServer({ home, apiKeys: [KEY] });
});
after(async () => {
  await t.close();
  rmSync(t.home, { recursive: true, force: true });
});

const auth = { Authorization: `Bearer ${KEY}` };

/** Decodes an image the way the apps hand it on, and checks it is the size asked for. */
async function picture(bytes: Buffer, size: string, format = 'png'): Promise<void> {
  const meta = await sharp(bytes).metadata();
  assert.equal(meta.format, format);
  assert.equal(`${meta.width}x${meta.height}`, size);
}

/** A phone-style photo upload: a JPEG. */
const photo = () => sharp(Buffer.from(new Uint8Array(640 * 480 * 3).map((_, i) => (i * 7) % 251)), { raw: { width: 640, height: 480, channels: 3 } }).jpeg().toBuffer();

// Open WebUI: backend/open_webui/routers/images.py (image_generations, image_edits, get_image_data),
// defaults from backend/open_webui/config.py (IMAGE_SIZE '512x512', IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN '^gpt-image').
test('Open WebUI: dall-e-2 (its default model) and gpt-image-1 generations, and its multipart edits', async () => {
  /** get_image_data: a URL is fetched with the same Authorization header and must be image/*; else b64_json is decoded as image/png. */
  const read = async (res: any): Promise<Buffer[]> => {
    const out: Buffer[] = [];
    for (const image of res.data) {
      if (image.url) {
        const r = await fetch(image.url, { headers: auth });
        assert.equal(r.status, 200);
        assert.equal(r.headers.get('content-type')!.split('/')[0], 'image');
        out.push(Buffer.from(await r.arrayBuffer()));
      } else {
        out.push(Buffer.from(image.b64_json, 'base64'));
      }
    }
    return out;
  };
  const generate = async (data: Record<string, unknown>) => {
    const r = await fetch(`${t.baseURL}/images/generations`, { method: 'POST', headers: { ...auth, 'Content-Type': 'application/json' }, body: JSON.stringify(data) });
    assert.equal(r.status, 200, await r.clone().text());
    return (await r.json()) as any;
  };
  // No model configured: get_image_model() answers 'dall-e-2'; '' does not match '^gpt-image', so b64_json is asked for.
  const dalle = await generate({ model: 'dall-e-2', prompt: 'a lighthouse at dusk', n: 1, size: '512x512', response_format: 'b64_json' });
  for (const bytes of await read(dalle)) await picture(bytes, '512x512');
  // gpt-image-1 configured (IMAGE_SIZE 'auto' is allowed for it): no response_format.
  const gpt = await generate({ model: 'gpt-image-1', prompt: 'a lighthouse at dusk', n: 1, size: 'auto' });
  assert.equal(gpt.data[0].url, undefined);
  for (const bytes of await read(gpt)) await picture(bytes, '1024x1024');

  // image_edits: aiohttp FormData, every value str()'d; one image as 'image', several as 'image[]' (uuid names, the data URL's type).
  const edit = async (fields: Record<string, string>, files: [string, Buffer][]) => {
    const form = new FormData();
    for (const [k, v] of Object.entries(fields)) form.append(k, v);
    for (const [name, bytes] of files) form.append(name, new Blob([new Uint8Array(bytes)], { type: 'image/jpeg' }), `${crypto.randomUUID()}.jpg`);
    const r = await fetch(`${t.baseURL}/images/edits`, { method: 'POST', headers: auth, body: form });
    assert.equal(r.status, 200, await r.clone().text());
    return (await r.json()) as any;
  };
  const jpeg = await photo();
  const one = await edit({ model: 'dall-e-2', prompt: 'make it snowy', n: '1', size: '512x512', response_format: 'b64_json' }, [['image', jpeg]]);
  for (const bytes of await read(one)) await picture(bytes, '512x512');
  const many = await edit({ model: 'gpt-image-1', prompt: 'make it snowy' }, [
    ['image[]', jpeg],
    ['image[]', jpeg],
  ]);
  // No size sent: the API's default; gpt-image answers b64_json unasked.
  for (const bytes of await read(many)) await picture(bytes, '1024x1024');
});

// LibreChat: api/app/clients/tools/structured/DALLE3.js (the `dalle` tool) and the URL handling it
// relies on, api/server/services/Files/images/parse.js (getImageBasename).
test('LibreChat DALL-E 3 tool: dall-e-3 with quality, style and its wide and tall sizes; the URL names a .png it can save', async () => {
  const openai = new OpenAI({ apiKey: KEY, baseURL: t.baseURL, maxRetries: 0 });
  for (const [quality, style, size] of [
    ['standard', 'vivid', '1024x1024'],
    ['hd', 'natural', '1792x1024'],
    ['standard', 'vivid', '1024x1792'],
  ] as const) {
    const resp = await openai.images.generate({ model: 'dall-e-3', quality, style, size, prompt: 'A watercolor of a fox in a birch forest, morning light', n: 1 });
    const theImageUrl = resp.data![0]!.url!;
    assert.ok(theImageUrl, 'an image URL');
    // getImageBasename: the URL's path must end in an image extension (it names the saved file by it).
    const imageBasename = basename(new URL(theImageUrl).pathname);
    assert.match(imageBasename, /\.(jpg|jpeg|png|gif|bmp|tiff|svg)$/i);
    // processFileURL downloads it (no key: the URL is signed).
    const r = await fetch(theImageUrl);
    assert.equal(r.status, 200);
    await picture(Buffer.from(await r.arrayBuffer()), size);
  }
});

// LibreChat: api/app/clients/tools/structured/OpenAIImageTools.js (image_gen_oai and image_edit_oai).
test('LibreChat OpenAI image tools: gpt-image-1 with background/quality/size auto reads b64_json; edits post image[] with form-data', async () => {
  const openai = new OpenAI({ apiKey: KEY, baseURL: t.baseURL, maxRetries: 0 });
  // The tool's defaults: background 'auto', n 1, output_format 'png' (no output_compression for png), quality 'auto', size 'auto'.
  const resp = await openai.images.generate({
    model: 'gpt-image-1',
    prompt: 'A ceramic teapot on a wooden table',
    n: 1,
    background: 'auto',
    output_format: 'png',
    output_compression: undefined,
    quality: 'auto',
    size: 'auto',
  });
  const base64Image = resp.data![0]!.b64_json!;
  assert.ok(base64Image, 'b64_json without asking for it');
  const url = `data:image/png;base64,${base64Image}`; // as the tool builds its content
  await picture(Buffer.from(url.split(',')[1]!, 'base64'), '1024x1024');

  // image_edit_oai: model, prompt, quality, size, then each image as image[] with its filename and type; Authorization header.
  const form = new FormData();
  form.append('model', 'gpt-image-1');
  form.append('prompt', 'Add a sprig of mint');
  form.append('quality', 'auto');
  form.append('size', 'auto');
  form.append('image[]', new Blob([new Uint8Array(await photo())], { type: 'image/jpeg' }), 'teapot.jpg');
  form.append('image[]', new Blob([new Uint8Array(await rgbPng(300, 300, () => [200, 180, 90]))], { type: 'image/png' }), 'swatch.png');
  const r = await fetch(`${t.baseURL}/images/edits`, { method: 'POST', headers: auth, body: form });
  assert.equal(r.status, 200, await r.clone().text());
  const data = (await r.json()) as any;
  assert.ok(data.data && data.data.length, 'response.data.data[0]');
  // size auto on an edit follows the 640x480 upload's shape at the model's native area.
  await picture(Buffer.from(data.data[0].b64_json, 'base64'), '1152x896');
});

// LobeChat: packages/model-runtime/src/core/openaiCompatibleFactory/createImage.ts (generateByImageMode),
// with gpt-image-1's parameters from packages/model-bank (gptImage1ParamsSchema: prompt, size, imageUrls).
test('LobeChat OpenAI-compatible image runtime: gpt-image-1 at 1536x1024 and auto, dall-e-3 with b64_json, edits with input_fidelity', async () => {
  const client = new OpenAI({ apiKey: KEY, baseURL: t.baseURL, maxRetries: 0 });
  /** What the runtime returns: b64_json as a PNG data URL, else the URL. */
  const imageUrlOf = (img: any): string => {
    const imageData = img.data[0];
    if (imageData.b64_json) return `data:image/png;base64,${imageData.b64_json}`;
    if (imageData.url) return imageData.url;
    throw new Error('Invalid image response: missing both b64_json and url fields');
  };
  const bytesOf = async (imageUrl: string) =>
    imageUrl.startsWith('data:') ? Buffer.from(imageUrl.split(',')[1]!, 'base64') : Buffer.from(await (await fetch(imageUrl)).arrayBuffer());
  const run = async (model: string, params: Record<string, unknown>, edit = false) => {
    const userInput: Record<string, unknown> = { ...params };
    if (userInput.size === 'auto') delete userInput.size;
    const defaultInput = { n: 1, ...(model.includes('dall-e') ? { response_format: 'b64_json' } : {}), ...(edit ? { input_fidelity: 'high' } : {}) };
    const options = { model, ...defaultInput, ...userInput };
    return imageUrlOf(edit ? await client.images.edit(options as any) : await client.images.generate(options as any));
  };
  await picture(await bytesOf(await run('gpt-image-1', { prompt: 'a paper boat on a pond', size: '1536x1024' })), '1536x1024');
  await picture(await bytesOf(await run('gpt-image-1', { prompt: 'a paper boat on a pond', size: 'auto' })), '1024x1024');
  const dalle = await run('dall-e-3', { prompt: 'a paper boat on a pond', size: '1024x1792', quality: 'hd' });
  assert.ok(dalle.startsWith('data:image/png;base64,'));
  await picture(await bytesOf(dalle), '1024x1792');
  // convertImageUrlToFile: each image URL fetched into a File with its type; one File alone, several as a list (image[]).
  const file = () => toFile(photo(), 'photo.jpg', { type: 'image/jpeg' });
  await picture(await bytesOf(await run('gpt-image-1', { prompt: 'paint it red', image: await file(), size: '1024x1536' }, true)), '1024x1536');
  await picture(await bytesOf(await run('gpt-image-1', { prompt: 'paint it red', image: [await file(), await file()] }, true)), '1024x1024');
});

// SillyTavern: public/scripts/extensions/stable-diffusion/index.js (generateOpenAiImage); its server,
// src/endpoints/openai.js ('/generate-image'), forwards the body unchanged with the key.
test('SillyTavern OpenAI source: dall-e-3 wide with quality and style, dall-e-2 at 512, always b64_json', async () => {
  const send = async (body: Record<string, unknown>) => {
    const r = await fetch(`${t.baseURL}/images/generations`, { method: 'POST', headers: { 'Content-Type': 'application/json', ...auth }, body: JSON.stringify(body) });
    assert.equal(r.status, 200, await r.clone().text());
    const data = (await r.json()) as any;
    return { format: 'png', data: data?.data[0]?.b64_json as string };
  };
  // A landscape setting (width > height) on DALL-E 3 becomes 1792x1024.
  const wide = await send({ prompt: 'Seraphina in the forest clearing', model: 'dall-e-3', size: '1792x1024', n: 1, quality: 'standard', style: 'vivid', response_format: 'b64_json' });
  await picture(Buffer.from(wide.data, 'base64'), '1792x1024', wide.format);
  // DALL-E 2 at 512 or less: 512x512, quality and style undefined (JSON.stringify leaves them out).
  const small = await send({ prompt: 'Seraphina in the forest clearing', model: 'dall-e-2', size: '512x512', n: 1, quality: undefined, style: undefined, response_format: 'b64_json' });
  await picture(Buffer.from(small.data, 'base64'), '512x512', small.format);
});
