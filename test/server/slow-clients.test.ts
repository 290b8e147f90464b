/**
 * Slow clients (slowloris): headers dribbled past the header limit, a body that stalls or comes
 * a byte at a time (cut one rate window after it slowed down), a body that keeps just above the
 * rate but runs past the whole-request deadline: each gets a 408 in the envelope and its
 * connection closed, within its limit plus Node's or the guard's check interval. The limits are
 * short here (the defaults are 10 s, 2 min and 1 KiB/s over 10 s); a client at full speed is
 * not affected.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { openSlowConnection, type SlowConnection } from '../../tools/hostile/requests.js';
import { startTestServer, envelope, type TestServer } from './helpers.js';
import { EventEmitter } from 'node:events';
import type { IncomingMessage } from 'node:http';
import { BodyRateGuard, connectionsCheckingInterval } from '../../src/server/slow-clients.js';

const limits = { headersTimeoutMs: 800, bodyTimeoutMs: 2500, minBodyRate: 1024, bodyRateWindowMs: 800 };
// Node checks its deadlines every connectionsCheckingInterval; the rate guard 4 times a window.
const nodeSlack = connectionsCheckingInterval(limits) + 400;
const guardSlack = limits.bodyRateWindowMs / 4 + 400;

let t: TestServer;
before(async () => {
  t = await startTestServer(limits);
});
after(() => t.close());

async function closed(c: SlowConnection, withinMs: number): Promise<number> {
  const deadline = performance.now() + withinMs + 5_000;
  while (c.closedAt === undefined && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  c.close();
  assert.ok(c.closedByServer, `${c.kind}: still open ${((performance.now() - c.openedAt) / 1000).toFixed(1)} s after it opened`);
  return c.closedAt! - c.openedAt;
}

/** Raw bytes written by `send` on a fresh connection; the answer and when the server closed it. */
function rawExchange(send: (write: (b: string | Buffer) => void) => NodeJS.Timeout | void): Promise<{ ms: number; data: string }> {
  const u = new URL(t.url);
  return new Promise((resolve) => {
    const started = performance.now();
    const socket = connect(Number(u.port), u.hostname);
    let data = '';
    let timer: NodeJS.Timeout | void;
    socket.on('data', (c) => (data += c.toString('latin1')));
    socket.on('error', () => {});
    // A server that never closes it fails the caller's time bound instead of hanging the test.
    const safety = setTimeout(() => socket.destroy(), 10_000);
    socket.on('close', () => {
      clearInterval(timer as NodeJS.Timeout);
      clearTimeout(safety);
      resolve({ ms: performance.now() - started, data });
    });
    timer = send((b) => socket.writable && socket.write(b));
  });
}

function answer408(data: string, code = 'request_timeout') {
  assert.match(data, /^HTTP\/1\.1 408 /);
  assert.match(data, /\r\nConnection: close\r\n/i);
  assert.equal(envelope(JSON.parse(data.slice(data.indexOf('\r\n\r\n') + 4))).code, code);
}

test('headers dribbled a byte at a time: 408 and closed at the header limit', async () => {
  const c = openSlowConnection(t.url, 'headers', { dribbleMs: 100 });
  const ms = await closed(c, limits.headersTimeoutMs + nodeSlack);
  assert.equal(c.status, 408);
  assert.ok(ms >= limits.headersTimeoutMs - 50 && ms <= limits.headersTimeoutMs + nodeSlack, `closed after ${ms.toFixed(0)} ms`);
});

test('an upload or a JSON body that stalls after most of it was sent: 408 and closed one rate window later', async () => {
  for (const kind of ['upload', 'json'] as const) {
    const c = openSlowConnection(t.url, kind, { dribbleMs: 200, uploadBytes: 500_000, jsonBytes: 200_000 });
    const ms = await closed(c, limits.bodyRateWindowMs + guardSlack);
    assert.equal(c.status, 408, kind);
    assert.ok(ms >= limits.bodyRateWindowMs - 50 && ms <= limits.bodyRateWindowMs + guardSlack, `${kind}: closed after ${ms.toFixed(0)} ms`);
  }
  // The answer itself, on a body that stops halfway.
  const { ms, data } = await rawExchange((write) => {
    write('POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt":');
  });
  answer408(data);
  assert.ok(ms <= limits.bodyRateWindowMs + guardSlack, `closed after ${ms.toFixed(0)} ms`);
});

test('a body kept just above the minimum rate: 408 and closed at the whole-request deadline', async () => {
  const { ms, data } = await rawExchange((write) => {
    write('POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n');
    // 1.5 KiB every 100 ms: fine for the rate check, far too slow for 100 kB in 2.5 s.
    return setInterval(() => write(Buffer.alloc(150, 0x20)), 100);
  });
  answer408(data);
  assert.ok(ms >= limits.bodyTimeoutMs - 50 && ms <= limits.bodyTimeoutMs + nodeSlack, `closed after ${ms.toFixed(0)} ms`);
});

test('a client at full speed is not affected, on a connection it keeps using', async () => {
  for (let i = 0; i < 3; i++) {
    const res = await fetch(`${t.url}/v1/images/generations`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'a quick fox', size: '256x256', steps: 1, response_format: 'b64_json', pad: 'x'.repeat(500_000) }),
    });
    assert.equal(res.status, 200);
    await res.arrayBuffer();
    // Idle between requests for longer than the header limit: keep-alive is not the header clock.
    if (i === 0) await new Promise((r) => setTimeout(r, limits.headersTimeoutMs + nodeSlack));
  }
});

test('the rate guard keeps no listener per request on a kept-alive socket', () => {
  // Stand-ins with the only members the guard reads: a socket's byte count and events, a request's `complete`.
  const socket = Object.assign(new EventEmitter(), { bytesRead: 0, destroyed: false });
  const guard = new BodyRateGuard({ minBodyRate: 1024, bodyRateWindowMs: 800 }, () => {});
  try {
    for (let i = 0; i < 25; i++) {
      const request = Object.assign(new EventEmitter(), { socket, complete: false });
      guard.track(request as unknown as IncomingMessage);
      request.complete = true;
      request.emit('end');
      assert.equal(request.listenerCount('end'), 0);
    }
    assert.equal(socket.listenerCount('close'), 0, 'one close listener left per request the socket carried');
  } finally {
    guard.close();
  }
});
