/**
 * A real S3-compatible server for tests: s3rver on a free loopback port with a temp folder,
 * one bucket made at start, and the AWS SDK's standard environment (AWS_REGION, the access
 * keys s3rver knows, AWS_ENDPOINT_URL_S3) pointed at it, so the code under test configures its
 * client exactly as in production. `stop()` and `restart()` (same port, same folder, objects
 * kept) stand for an outage and the store coming back.
 *
 * `ownProcess`: s3rver runs in a child process with OpenSSL's legacy provider. s3rver 3.7 makes
 * ListObjectsV2 continuation tokens with DES, which Node 17+ (OpenSSL 3) refuses by default: in
 * this process any listing of more than 1000 keys answers 500 InternalError. Tests that page
 * through listings need the child; the others keep the in-process server (no start-up cost).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Server } from 'node:http';
import S3rver from 's3rver';
import { freePort } from '../free-port.js';

export interface TestS3 {
  endpoint: string;
  port: number;
  bucket: string;
  stop(): Promise<void>;
  restart(): Promise<void>;
  /** Stops it and deletes its folder. */
  close(): Promise<void>;
}

/** A loopback port nobody listens on: a store that is down. */
export const closedPort = freePort;

const CHILD = fileURLToPath(new URL('./s3rver-child.ts', import.meta.url));

/** Starts s3rver-child.ts; resolves with its port once it answers. */
function startChild(directory: string, bucket: string, port: number): Promise<{ child: ChildProcess; port: number }> {
  const child = spawn(process.execPath, ['--openssl-legacy-provider', '--import', 'tsx', CHILD, directory, bucket, String(port)], { stdio: ['pipe', 'pipe', 'pipe'] });
  return new Promise((resolve, reject) => {
    let seen = '';
    const timer = setTimeout(() => fail(new Error(`s3rver not ready after 30 s:\n${seen.slice(-2000)}`)), 30_000);
    const onData = (chunk: Buffer) => {
      seen += chunk.toString();
      const m = /^listening (\d+)$/m.exec(seen);
      if (!m) return;
      cleanup();
      // Drained from now on, so that a chatty child never blocks on a full pipe.
      child.stdout!.resume();
      child.stderr!.resume();
      resolve({ child, port: Number(m[1]) });
    };
    const onExit = (code: number | null) => fail(new Error(`s3rver exited (${code}) before it was ready:\n${seen.slice(-2000)}`));
    const cleanup = () => {
      clearTimeout(timer);
      child.stdout!.off('data', onData);
      child.stderr!.off('data', onData);
      child.off('exit', onExit);
    };
    const fail = (err: Error) => {
      cleanup();
      child.kill('SIGKILL');
      reject(err);
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    child.once('exit', onExit);
  });
}

export async function startS3(bucket = 'kiln-test', options: { ownProcess?: boolean } = {}): Promise<TestS3> {
  const directory = mkdtempSync(join(tmpdir(), 'kiln-s3rver-'));
  let instance: S3rver | undefined;
  let child: ChildProcess | undefined;
  let port = 0;
  const run = async () => {
    if (options.ownProcess) {
      ({ child, port } = await startChild(directory, bucket, port));
      return;
    }
    const server = new S3rver({ address: '127.0.0.1', port, directory, silent: true, configureBuckets: [{ name: bucket, configs: [] }] });
    const address = (await server.run()) as AddressInfo;
    port = address.port;
    instance = server;
  };
  const stop = async () => {
    const running = child;
    child = undefined;
    if (running && running.exitCode === null && running.signalCode === null) {
      const exited = new Promise((r) => running.once('exit', r));
      running.kill('SIGTERM');
      await exited;
    }
    const server = instance;
    instance = undefined;
    if (!server) return;
    const http = (server as unknown as { httpServer: Server }).httpServer;
    const closed = server.close();
    // The SDK keeps connections alive; close() alone would wait for them to idle out.
    http.closeAllConnections();
    await closed;
  };
  await run();
  const endpoint = `http://127.0.0.1:${port}`;
  Object.assign(process.env, {
    AWS_REGION: 'us-east-1',
    AWS_ACCESS_KEY_ID: 'S3RVER',
    AWS_SECRET_ACCESS_KEY: 'S3RVER',
    AWS_ENDPOINT_URL_S3: endpoint,
    AWS_EC2_METADATA_DISABLED: 'true',
    // The SDK's notice that its 2027 releases need Node 22: true, but noise in test output.
    AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true',
  });
  return {
    endpoint,
    port,
    bucket,
    stop,
    restart: async () => {
      await stop();
      await run();
    },
    close: async () => {
      await stop();
      rmSync(directory, { recursive: true, force: true });
    },
  };
}
