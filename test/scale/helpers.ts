/**
 * Scale-out test rig: Debian's redis-server on a free loopback port with a temp dir (no
 * persistence), `kiln worker` child processes, and the API in-process with `redisQueue`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePort } from '../free-port.js';

/** Resolves once `child`'s output matches `pattern` (rejects if it exits first or after `ms`). */
export function waitForOutput(child: ChildProcess, pattern: RegExp, ms: number, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let seen = '';
    const onData = (chunk: Buffer) => {
      seen += chunk.toString();
      if (pattern.test(seen)) done();
    };
    const onExit = (code: number | null) => fail(new Error(`${what} exited (${code}) before it was ready:\n${seen.slice(-2000)}`));
    const timer = setTimeout(() => fail(new Error(`${what} not ready after ${ms} ms:\n${seen.slice(-2000)}`)), ms);
    const cleanup = () => {
      clearTimeout(timer);
      child.stdout?.off('data', onData);
      child.stderr?.off('data', onData);
      child.off('exit', onExit);
    };
    const done = () => {
      cleanup();
      resolve();
    };
    const fail = (err: Error) => {
      cleanup();
      reject(err);
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    child.once('exit', onExit);
  });
}

async function stopChild(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  await exited;
  clearTimeout(timer);
}

export class RedisServer {
  private child: ChildProcess | undefined;
  readonly dir = mkdtempSync(join(tmpdir(), 'kiln-redis-'));
  constructor(readonly port: number) {}

  static async start(): Promise<RedisServer> {
    const r = new RedisServer(await freePort());
    await r.start();
    return r;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    const child = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--dir', this.dir, '--save', '', '--appendonly', 'no'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    await waitForOutput(child, /Ready to accept connections/, 20_000, 'redis-server');
  }

  async stop(): Promise<void> {
    if (this.child) await stopChild(this.child);
    this.child = undefined;
  }

  async close(): Promise<void> {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export class WorkerProcess {
  log = '';
  constructor(readonly child: ChildProcess) {
    child.stdout?.on('data', (c: Buffer) => (this.log += c.toString()));
    child.stderr?.on('data', (c: Buffer) => (this.log += c.toString()));
  }

  /** A `kiln worker` on `home`'s models (and the built-in kiln-tiny ones), with short lock/stall/heartbeat settings. */
  static async start(queueUrl: string, home: string, extra: string[] = []): Promise<WorkerProcess> {
    const child = spawn(
      process.execPath,
      [
        '--import', 'tsx', 'src/cli/main.ts', 'worker',
        '--queue', queueUrl,
        '--home', home,
        // Small on purpose, so that a killed worker's job is found stalled soon: the test waits for the outcome, not for a time.
        '--lock-duration', '2s',
        '--stalled-interval', '500ms',
        '--heartbeat', '500ms',
        '--shutdown-timeout', '5s',
        ...extra,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KILN_HOME: home } },
    );
    const w = new WorkerProcess(child);
    await waitForOutput(child, /takes jobs from/, 60_000, 'kiln worker');
    return w;
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** Jobs this worker finished (its log lines). */
  get jobsDone(): number {
    return (this.log.match(/info: job done/g) ?? []).length;
  }

  kill(): Promise<void> {
    return stopChild(this.child, 'SIGKILL');
  }

  stop(): Promise<void> {
    return stopChild(this.child, 'SIGTERM');
  }
}

/** Polls `check` until it returns a value (bounded: `tries` x `everyMs`). */
export async function until<T>(check: () => Promise<T | undefined | false>, what: string | (() => string), tries = 240, everyMs = 250): Promise<T> {
  let last: unknown;
  for (let i = 0; i < tries; i++) {
    try {
      const v = await check();
      if (v !== undefined && v !== false) return v as T;
    } catch (err) {
      last = err;
    }
    await sleep(everyMs);
  }
  throw new Error(`gave up waiting for ${typeof what === 'function' ? what() : what}${last ? ` (last error: ${(last as Error).message})` : ''}`);
}
