/**
 * CORS in a real browser (Debian's Chromium through playwright-core): a page served from another
 * origin (a plain HTTP server on another port) calls Kiln with an API key, as a browser app on
 * the OpenAI SDK does. With `--cors-origin` naming the page's origin the call works and the page
 * reads the image, Kiln's headers and the error envelope of a refused call; Kiln without the
 * option, or naming another origin, is blocked by the browser.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { Browser, Page } from 'playwright-core';
import { startTestServer, type TestServer } from '../server/helpers.js';
import { chromiumMissing, launchChromium } from './harness.js';

const KEY = 'browser-key';

describe('CORS in Chromium', { skip: chromiumMissing() }, () => {
  let browser: Browser;
  let pages: Server;
  let pageOrigin: string;
  let allowed: TestServer;
  let closed: TestServer;
  let elsewhere: TestServer;
  let page: Page;

  before(async () => {
    pages = createServer((_req, res) => res.writeHead(200, { 'content-type': 'text/html' }).end('<!doctype html><title>an app</title>'));
    await new Promise<void>((r) => pages.listen(0, '127.0.0.1', r));
    pageOrigin = `http://127.0.0.1:${(pages.address() as { port: number }).port}`;
    [allowed, closed, elsewhere] = await Promise.all([
      startTestServer({ corsOrigins: [pageOrigin], apiKeys: [KEY] }),
      startTestServer({ apiKeys: [KEY] }),
      startTestServer({ corsOrigins: ['https://app.example'], apiKeys: [KEY] }),
    ]);
    browser = await launchChromium();
    page = await browser.newPage();
    await page.goto(`${pageOrigin}/`);
  });
  after(async () => {
    await browser?.close();
    await Promise.all([allowed, closed, elsewhere].map((s) => s?.close()));
    await new Promise((r) => pages?.close(r));
  });

  /** A generation from the page: what the page could read, or the browser's error. */
  const callFromPage = (server: TestServer, key?: string) =>
    page.evaluate(
      async ({ url, key }) => {
        try {
          const res = await fetch(`${url}/v1/images/generations`, {
            method: 'POST',
            headers: { 'content-type': 'application/json', ...(key ? { authorization: `Bearer ${key}` } : {}) },
            body: JSON.stringify({ prompt: 'a kiln', size: '256x256', steps: 1, n: 9, response_format: 'b64_json' }),
          });
          const json = await res.json();
          return { status: res.status, seedHeader: res.headers.get('x-kiln-seed'), requestId: res.headers.get('x-request-id'), json };
        } catch (err) {
          return { blocked: String(err) };
        }
      },
      { url: server.url, key },
    );

  test('the listed origin: the call works, the page reads the image and the headers, and a refused call\'s envelope', async () => {
    const ok: any = await callFromPage(allowed, KEY);
    assert.equal(ok.status, 200, JSON.stringify(ok).slice(0, 300));
    assert.equal(ok.seedHeader, '9');
    assert.ok(ok.requestId, 'x-request-id is readable');
    assert.equal(ok.json.data[0].seed, 9);
    assert.ok(ok.json.data[0].b64_json.length > 100);
    const refused: any = await callFromPage(allowed);
    assert.equal(refused.status, 401);
    assert.equal(refused.json.error.code, 'missing_api_key');
  });

  test('without --cors-origin, or with another origin listed, the browser blocks the call', async () => {
    for (const server of [closed, elsewhere]) {
      const r: any = await callFromPage(server, KEY);
      assert.match(r.blocked ?? '', /Failed to fetch/, JSON.stringify(r).slice(0, 300));
    }
  });
});
