/**
 * A real S3-compatible server for tests: s3rver on a free loopback port with a temp folder,
 * one bucket made at start, and the AWS SDK's standard environment (AWS_REGION, the access
 * keys s3rver knows, AWS_ENDPOINT_URL_S3) pointed at it, so the code under test configures its
 * client exactly as in production. `stop()` and `restart()` (same port, same folder, objects
 * kept) stand for an outage and the store coming back.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
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

export async function startS3(bucket = 'kiln-test'): Promise<TestS3> {
  const directory = mkdtempSync(join(tmpdir(), 'kiln-s3rver-'));
  let instance: S3rver | undefined;
  let port = 0;
  const run = async () => {
    const server = new S3rver({ address: '127.0.0.1', port, directory, silent: true, configureBuckets: [{ name: bucket, configs: [] }] });
    const address = (await server.run()) as AddressInfo;
    port = address.port;
    instance = server;
  };
  const stop = async () => {
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
