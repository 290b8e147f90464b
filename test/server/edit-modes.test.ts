/**
 * POST /v1/images/edits in its three modes, through the official openai SDK against real
 * servers on fixture models: image-to-image, inpainting (OpenAI's alpha masks and black/white
 * masks; a 9-channel inpainting model) and pose mode (`user=cn`, `pose:<w>`, the weight list;
 * the skeleton picture as b64_json_pose / url_pose), with the 400s when pose cannot be applied.
 *
 * Home A: models that carry their own pose assets (controlnet-openpose/, annotators/dwpose/ or
 * a kiln.json entry) and models that lack one of them. Home B: the installed fallbacks
 * (models/controlnet-openpose, models/controlnet-openpose-sdxl, models/dwpose).
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import OpenAI, { toFile } from 'openai';
import sharp from 'sharp';
import { ensureControlNetFixture, ensureFixture, ensurePoseFixture } from '../../tools/fixtures/variants.js';
import { linkFarm, makeHome, markInstalled, personPng, pixelsOf, rgbPng, startTestServer, type TestServer } from './helpers.js';

const SIZE = 256;
const FAST = { size: `${SIZE}x${SIZE}`, steps: 3 } as const;

let a: TestServer;
let b: TestServer;
const homes: string[] = [];

before(async () => {
  const [sd15cn, openpose, dwpose, openposeXl] = await Promise.all([
    ensureFixture('sd15-controlnet'),
    ensureControlNetFixture('sd15-openpose'),
    ensurePoseFixture(),
    ensureControlNetFixture('sdxl-openpose'),
  ]);
  const graphOnly = (src: string, dest: string) => linkFarm(src, dest, ['annotators']);

  // Home A.
  const homeA = await makeHome({ inpaint9: 'sd15-inpaint9' });
  homes.push(homeA);
  const models = join(homeA, 'models');
  // Everything in the model's own folder: controlnet-openpose/ (without annotators) and annotators/dwpose/.
  const own = linkFarm(sd15cn, join(models, 'sd15-cn'));
  graphOnly(openpose, join(own, 'controlnet-openpose'));
  mkdirSync(join(own, 'annotators'));
  symlinkSync(dwpose, join(own, 'annotators', 'dwpose'));
  // kiln.json names the ControlNet folder; DWPose comes from that folder's annotators/dwpose/.
  const viaJson = linkFarm(sd15cn, join(models, 'sd15-kilnjson'));
  writeFileSync(join(viaJson, 'kiln.json'), JSON.stringify({ controlnet_openpose: openpose }));
  // Missing, in the documented order: the ControlNet-UNet, the ControlNet graph, DWPose.
  // kiln.json names the SDXL OpenPose ControlNet for an SD 1.5 model.
  const wrongFamily = linkFarm(sd15cn, join(models, 'sd15-xlcn'));
  writeFileSync(join(wrongFamily, 'kiln.json'), JSON.stringify({ controlnet_openpose: openposeXl }));
  linkFarm(sd15cn, join(models, 'sd15-nocn'), ['controlnet']);
  linkFarm(sd15cn, join(models, 'sd15-nograph'));
  graphOnly(openpose, join(linkFarm(sd15cn, join(models, 'sd15-nodwpose')), 'controlnet-openpose'));
  a = await startTestServer({ home: homeA, defaultModel: 'sd15-cn' });

  // Home B: the installed ControlNets (per family) and DWPose.
  const homeB = await makeHome({ sd15: 'sd15-controlnet', xl: 'sdxl-controlnet' });
  homes.push(homeB);
  markInstalled(graphOnly(openpose, join(homeB, 'models', 'controlnet-openpose')), 'controlnet-openpose', 'controlnet');
  markInstalled(graphOnly(openposeXl, join(homeB, 'models', 'controlnet-openpose-sdxl')), 'controlnet-openpose-sdxl', 'controlnet');
  markInstalled(linkFarm(dwpose, join(homeB, 'models', 'dwpose')), 'dwpose', 'annotator');
  b = await startTestServer({ home: homeB, defaultModel: 'sd15' });
});
after(async () => {
  await Promise.all([a?.close(), b?.close()]);
  for (const home of homes) rmSync(home, { recursive: true, force: true });
});

const png = (bytes: Buffer, name = 'image.png') => toFile(bytes, name, { type: 'image/png' });
const b64 = (r: any, key = 'b64_json') => Buffer.from(r.data[0][key], 'base64');

async function edit(server: TestServer, fields: Record<string, unknown>): Promise<any> {
  return server.client().images.edit({ prompt: 'a dancer in a red dress', n: 7, response_format: 'b64_json', ...FAST, ...fields } as any);
}

/** Rejects with the SDK's BadRequestError carrying `param`; returns it. */
async function badRequest(p: Promise<unknown>, param: string, code?: string): Promise<InstanceType<typeof OpenAI.BadRequestError>> {
  let caught: unknown;
  await p.then(
    () => assert.fail('expected a 400'),
    (err: unknown) => (caught = err),
  );
  assert.ok(caught instanceof OpenAI.BadRequestError, `expected BadRequestError, got ${String(caught)}`);
  assert.equal(caught.status, 400);
  assert.equal(caught.param, param, caught.message);
  if (code) assert.equal(caught.code, code);
  return caught;
}

// ---- pictures -----------------------------------------------------------------------------

const INPUT = () => rgbPng(SIZE, SIZE, (x, y) => [(x * 255) / SIZE, (y * 255) / SIZE, 128]);
/** The repainted square. */
const HOLE = { x0: 96, y0: 96, x1: 160, y1: 160 };
const inHole = (x: number, y: number, margin = 0) => x >= HOLE.x0 + margin && x < HOLE.x1 - margin && y >= HOLE.y0 + margin && y < HOLE.y1 - margin;

/** OpenAI's convention: opaque everywhere, fully transparent where to repaint (colours are noise). */
async function alphaMask(): Promise<Buffer> {
  const data = Buffer.alloc(SIZE * SIZE * 4);
  for (let y = 0; y < SIZE; y++) {
    for (let x = 0; x < SIZE; x++) {
      const i = (y * SIZE + x) * 4;
      data[i] = (x * 7) % 256;
      data[i + 1] = 255;
      data[i + 2] = (y * 3) % 256;
      data[i + 3] = inHole(x, y) ? 0 : 255;
    }
  }
  return sharp(data, { raw: { width: SIZE, height: SIZE, channels: 4 } }).png().toBuffer();
}

/** The black/white convention (no transparency): white is repainted. */
const bwMask = (invert = false) => rgbPng(SIZE, SIZE, (x, y) => (inHole(x, y) !== invert ? [255, 255, 255] : [0, 0, 0]));

function diffStats(out: Buffer, input: Buffer, where: (x: number, y: number) => boolean): { max: number; mean: number } {
  let max = 0;
  let sum = 0;
  let n = 0;
  for (let y = 0; y < SIZE; y++) {
    for (let x = 0; x < SIZE; x++) {
      if (!where(x, y)) continue;
      for (let c = 0; c < 3; c++) {
        const d = Math.abs(out[(y * SIZE + x) * 3 + c]! - input[(y * SIZE + x) * 3 + c]!);
        max = Math.max(max, d);
        sum += d;
        n++;
      }
    }
  }
  return { max, mean: sum / n };
}

async function assertPng(bytes: Buffer, size = SIZE): Promise<void> {
  const meta = await sharp(bytes).metadata();
  assert.deepEqual([meta.format, meta.width, meta.height], ['png', size, size]);
}

// ---- image-to-image and inpainting ----------------------------------------------------------

describe('image-to-image and inpainting', () => {
  test('no mask: image-to-image (strength 0.75), deterministic', async () => {
    const input = await INPUT();
    const r1 = await edit(a, { image: await png(input) });
    const r2 = await edit(a, { image: await png(input) });
    await assertPng(b64(r1));
    assert.equal(r1.kiln.mode, 'img2img');
    assert.equal(r1.kiln.strength, 0.75);
    assert.equal(r1.data[0].b64_json_pose, undefined);
    assert.ok(b64(r1).equals(b64(r2)), 'same inputs and seed, same bytes');
  });

  test('alpha mask and black/white mask: outside kept, inside repainted, both conventions agree, deterministic', async () => {
    const input = await INPUT();
    const inputPixels = (await pixelsOf(input)).data;
    const byAlpha = await edit(a, { image: await png(input), mask: await png(await alphaMask(), 'mask.png') });
    assert.equal(byAlpha.kiln.mode, 'inpaint');
    assert.equal(byAlpha.kiln.strength, 1, 'inpainting defaults to strength 1');
    const out = await pixelsOf(b64(byAlpha));
    assert.equal(out.width, SIZE);
    // 16 px from the hole's edge the softened blend mask is 0: the input's own pixels.
    const outside = diffStats(out.data, inputPixels, (x, y) => !inHole(x, y, -16));
    assert.ok(outside.max <= 2, `outside the mask: max difference ${outside.max}`);
    const inside = diffStats(out.data, inputPixels, (x, y) => inHole(x, y, 8));
    assert.ok(inside.mean > 10, `inside the mask: mean difference ${inside.mean.toFixed(1)}`);

    const again = await edit(a, { image: await png(input), mask: await png(await alphaMask(), 'mask.png') });
    assert.ok(b64(again).equals(b64(byAlpha)), 'same inputs and seed, same bytes');

    // The same region in the black/white convention: the same picture.
    const byBw = await edit(a, { image: await png(input), mask: await png(await bwMask(), 'mask.png') });
    assert.ok(b64(byBw).equals(b64(byAlpha)), 'white = repaint gives what transparent = repaint gives');
    // Inverted (white outside the square): the square is kept this time.
    const inverted = await pixelsOf(b64(await edit(a, { image: await png(input), mask: await png(await bwMask(true), 'mask.png') })));
    assert.ok(diffStats(inverted.data, inputPixels, (x, y) => inHole(x, y, 16)).max <= 2, 'an inverted mask keeps the square');
    assert.ok(diffStats(inverted.data, inputPixels, (x, y) => !inHole(x, y, -24)).mean > 10, 'and repaints the rest');

    const weaker = await edit(a, { image: await png(input), mask: await png(await bwMask(), 'mask.png'), strength: 0.5 });
    assert.equal(weaker.kiln.strength, 0.5);
    assert.ok(!b64(weaker).equals(b64(byBw)));
  });

  test('a mask whose size differs from the image: 400 (mask), nothing queued', async () => {
    const input = await INPUT();
    const small = await rgbPng(128, 128, () => [255, 255, 255]);
    const err = await badRequest(edit(a, { image: await png(input), mask: await png(small, 'mask.png') }), 'mask');
    assert.match(err.message, /128x128.*256x256/);
    // Not a PNG, JPEG or WebP: like images, 415 naming the mask.
    const gif = await sharp(input).gif().toBuffer();
    await assert.rejects(
      edit(a, { image: await png(input), mask: await toFile(gif, 'mask.gif', { type: 'image/gif' }) }),
      (e: unknown) => e instanceof OpenAI.APIError && e.status === 415 && e.param === 'mask',
    );
    // A mask and pose mode do not combine.
    await badRequest(edit(a, { image: await png(input), mask: await png(await bwMask(), 'mask.png'), user: 'cn' }), 'mask');
  });

  test('a 9-channel inpainting model: inpaints through the API; without a mask a 400 asks for one', async () => {
    const input = await INPUT();
    const r = await edit(a, { model: 'inpaint9', image: await png(input), mask: await png(await bwMask(), 'mask.png') });
    assert.equal(r.kiln.model, 'inpaint9');
    const out = await pixelsOf(b64(r));
    const inputPixels = (await pixelsOf(input)).data;
    assert.ok(diffStats(out.data, inputPixels, (x, y) => !inHole(x, y, -16)).max <= 2, 'unmasked pixels are the input');
    assert.ok(diffStats(out.data, inputPixels, (x, y) => inHole(x, y, 8)).mean > 10, 'masked pixels are repainted');
    // Not the same UNet as the latent-blending model: a different picture in the hole.
    const blended = await pixelsOf(b64(await edit(a, { image: await png(input), mask: await png(await bwMask(), 'mask.png') })));
    assert.ok(!out.data.equals(blended.data));
    const err = await badRequest(edit(a, { model: 'inpaint9', image: await png(input) }), 'mask');
    assert.match(err.message, /inpainting model/);
  });
});

// ---- pose mode ------------------------------------------------------------------------------

describe('pose mode (user=cn)', () => {
  test('cn with b64_json: the image and its skeleton picture, deterministic; pose:0.5 and the weight list', async () => {
    const person = await personPng();
    const cn = await edit(a, { image: await png(person), user: 'cn' });
    assert.equal(cn.kiln.mode, 'pose');
    assert.equal(cn.kiln.control_scale, 1);
    assert.equal(cn.kiln.people, 1);
    assert.equal(cn.kiln.strength, undefined);
    await assertPng(b64(cn));
    const pose = b64(cn, 'b64_json_pose');
    await assertPng(pose);
    const lit = (await pixelsOf(pose)).data.reduce((n, v) => n + (v > 0 ? 1 : 0), 0);
    assert.ok(lit > 500, `a skeleton is drawn (${lit} lit values)`);

    const again = await edit(a, { image: await png(person), user: 'cn' });
    assert.ok(b64(again).equals(b64(cn)), 'same image bytes');
    assert.ok(b64(again, 'b64_json_pose').equals(pose), 'same pose bytes');

    const half = await edit(a, { image: await png(person), user: 'pose:0.5' });
    assert.equal(half.kiln.control_scale, 0.5);
    assert.ok(!b64(half).equals(b64(cn)), 'pose:0.5 differs from cn');
    assert.ok(b64(half, 'b64_json_pose').equals(pose), 'the same skeleton');
    // The list form: its pose weight, with image-prompt weights of 0 (no adapter) the same image.
    const list = await edit(a, { image: await png(person), user: 'face:0,style:0,pose:0.5' });
    assert.ok(b64(list).equals(b64(half)));
    // Pose with an image prompt, and a list without pose (an image prompt): this home has no
    // IP-Adapters, a 400 naming the pulls (image-prompt-pose.test.ts and image-prompts.test.ts have the rest).
    await badRequest(edit(a, { image: await png(person), user: 'face:0.5,style:0.6,pose:1.0' }), 'user', 'image_prompt_model_missing');
    await badRequest(edit(a, { image: await png(person), user: 'face:0.5,style:0.6' }), 'user', 'image_prompt_model_missing');
    // Not a pose weight: 400 (user), nothing queued.
    await badRequest(edit(a, { image: await png(person), user: 'pose:3' }), 'user');
    await badRequest(edit(a, { image: await png(person), user: 'style:0.6,pose:x' }), 'user');
  });

  test('cn with url: url and url_pose are signed PNG URLs', async () => {
    const person = await personPng(300); // not the output size: the skeleton is drawn at 256x256
    const r = await edit(a, { image: await png(person), user: 'cn', response_format: 'url' });
    assert.equal(r.data[0].b64_json_pose, undefined);
    const fetched = await Promise.all(
      [r.data[0].url, r.data[0].url_pose].map(async (url: string) => {
        assert.match(url, /\/images\/.+\?expires=\d+&signature=/);
        const res = await fetch(url);
        assert.equal(res.status, 200);
        assert.equal(res.headers.get('content-type'), 'image/png');
        return Buffer.from(await res.arrayBuffer());
      }),
    );
    await assertPng(fetched[0]!);
    await assertPng(fetched[1]!);
    const asB64 = await edit(a, { image: await png(person), user: 'cn' });
    assert.ok(fetched[0]!.equals(b64(asB64)) && fetched[1]!.equals(b64(asB64, 'b64_json_pose')), 'url and b64_json carry the same bytes');
  });

  test('no person in the picture: 400 (image), never an unposed image', async () => {
    const err = await badRequest(edit(a, { image: await png(await personPng(320, false)), user: 'cn' }), 'image', 'no_person_found');
    assert.match(err.message, /no person/);
  });

  test('a missing ControlNet-UNet, ControlNet graph or DWPose: 400 (user) naming it and its kiln pull', async () => {
    const jobs = async () => (await (await fetch(`${a.url}/metrics`)).text()).split('\n').filter((l) => l.startsWith('kiln_jobs_total{')).join('\n');
    const before = await jobs();
    const person = await png(await personPng());
    let err = await badRequest(edit(a, { model: 'sd15-nocn', image: person, user: 'cn' }), 'user', 'pose_model_missing');
    assert.match(err.message, /ControlNet-UNet/);
    assert.match(err.message, /controlnet\/model\.onnx/);
    err = await badRequest(edit(a, { model: 'sd15-nograph', image: person, user: 'pose:0.8' }), 'user', 'pose_model_missing');
    assert.match(err.message, /controlnet-openpose/);
    assert.match(err.message, /kiln pull controlnet-openpose`/);
    err = await badRequest(edit(a, { model: 'sd15-nodwpose', image: person, user: 'cn' }), 'user', 'pose_model_missing');
    assert.match(err.message, /DWPose/);
    assert.match(err.message, /kiln pull dwpose`/);
    assert.equal(await jobs(), before, 'none of these reached the queue');
  });

  test('a ControlNet of the other family (kiln.json names the SDXL one for an SD 1.5 model): 400 (user) saying so, before any step', async () => {
    const person = await png(await personPng());
    const err = await badRequest(edit(a, { model: 'sd15-xlcn', image: person, user: 'cn' }), 'user');
    assert.match(err.message, /does not fit model sd15-xlcn \(SD 1\.x\): it produces 10 residuals, the model's ControlNet-UNet takes 13; it takes text_embeds, time_ids/);
    // The server still serves pose requests for a model that fits.
    const ok = await edit(a, { model: 'sd15-cn', image: await png(await personPng()), user: 'cn' });
    assert.ok(ok.data[0].b64_json_pose);
  });

  test("kiln.json's controlnet_openpose (DWPose from the ControlNet folder) gives the same picture as the model's own assets", async () => {
    const person = await personPng();
    const own = await edit(a, { image: await png(person), user: 'cn' });
    const viaJson = await edit(a, { model: 'sd15-kilnjson', image: await png(person), user: 'cn' });
    assert.ok((await pixelsOf(b64(viaJson))).data.equals((await pixelsOf(b64(own))).data));
    assert.ok(b64(viaJson, 'b64_json_pose').equals(b64(own, 'b64_json_pose')));
  });

  test('installed controlnet-openpose / controlnet-openpose-sdxl and dwpose are found by family', async () => {
    const person = await personPng();
    const sd15 = await edit(b, { image: await png(person), user: 'cn' });
    const own = await edit(a, { image: await png(person), user: 'cn' });
    assert.ok((await pixelsOf(b64(sd15))).data.equals((await pixelsOf(b64(own))).data), 'the same assets, found elsewhere');
    const xl = await edit(b, { model: 'xl', image: await png(person), user: 'cn' });
    await assertPng(b64(xl));
    await assertPng(b64(xl, 'b64_json_pose'));
    // The ControlNets and DWPose are not diffusion models: /v1/models does not offer them.
    const ids = (await b.client().models.list()).data.map((m) => m.id).sort();
    assert.deepEqual(ids, ['sd15', 'xl']);
  });
});

test('/openapi.json documents the mask, the pose forms of user and the pose picture fields', async () => {
  const doc: any = await (await fetch(`${a.url}/openapi.json`)).json();
  const editOp = doc.paths['/v1/images/edits'].post;
  const props = editOp.requestBody.content['multipart/form-data'].schema.properties;
  assert.match(props.mask.description, /transparent/);
  assert.match(props.user.description, /pose:<w>/);
  assert.match(props.strength.description, /inpainting/);
  const item = editOp.responses['200'].content['application/json'].schema.properties.data.items.properties;
  assert.ok(item.url_pose && item.b64_json_pose);
});
