/**
 * Issue 6's server half: a model pulled (from a fake Hub on loopback) into a running server's
 * home shows up in /v1/models, by its name and by its alias, and generates, without a restart.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import sharp from 'sharp';
import { FakeHub } from './fake-hub.js';
import { fixtureRepo } from './helpers.js';
import { startTestServer, type TestServer } from '../server/helpers.js';
import { pullModel } from '../../src/models/pull.js';

let hub: FakeHub | undefined;
let server: TestServer | undefined;
after(async () => {
  await server?.close();
  await hub?.close();
});

test('a pull into a running server is listed and served without a restart', async () => {
  hub = await FakeHub.start();
  hub.addRepo('stabilityai/stable-diffusion-xl-base-1.0', { main: await fixtureRepo('sdxl') });
  server = await startTestServer({ models: { 'kiln-tiny-xl': 'sd15-optimum' } });
  const env = { ...process.env, KILN_HOME: server.home, HF_ENDPOINT: hub.url, HF_HUB_OFFLINE: '' };
  process.env.KILN_HOME = server.home; // the server reads user aliases through $KILN_HOME
  const client = server.client();

  const before = (await client.models.list()).data.map((m) => m.id);
  assert.ok(!before.includes('sdxl-base'));

  await pullModel('stabilityai/stable-diffusion-xl-base-1.0', { name: 'sdxl-base', home: server.home, env });

  const after = (await client.models.list()).data.map((m) => m.id);
  assert.ok(after.includes('sdxl-base'), `listed: ${after.join(', ')}`);
  assert.ok(after.includes('be-stable-diffusion-xl-base-1.0'), 'the built-in alias of that repository is listed too');

  for (const model of ['sdxl-base', 'be-stable-diffusion-xl-base-1.0']) {
    const res = await client.images.generate({ model, prompt: 'a red circle', n: 3, size: '256x256', response_format: 'b64_json' });
    const png = Buffer.from(res.data![0]!.b64_json!, 'base64');
    assert.equal((await sharp(png).metadata()).width, 256, model);
  }
  // The reference's default model is now installed: it becomes the default.
  const byDefault = await client.images.generate({ prompt: 'a red circle', n: 3, size: '256x256', response_format: 'b64_json' });
  assert.equal((byDefault as unknown as { kiln: { model: string } }).kiln.model, 'be-stable-diffusion-xl-base-1.0');
});
