/**
 * s3rver in a process of its own, for startS3({ ownProcess: true }): argv is the folder, the
 * bucket and the port (0: any). Prints `listening PORT` once it answers; exits on SIGTERM, or
 * when its parent goes (stdin closes), so no server outlives the test that started it.
 */
import type { AddressInfo } from 'node:net';
import type { Server } from 'node:http';
import S3rver from 's3rver';

const [directory, bucket, port] = process.argv.slice(2);
const server = new S3rver({ address: '127.0.0.1', port: Number(port), directory, silent: true, configureBuckets: [{ name: bucket!, configs: [] }] });
const address = (await server.run()) as AddressInfo;
process.stdout.write(`listening ${address.port}\n`);

let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  const closed = server.close();
  // The SDK keeps connections alive; close() alone would wait for them to idle out.
  (server as unknown as { httpServer: Server }).httpServer.closeAllConnections();
  await closed;
  process.exit(0);
};
process.on('SIGTERM', () => void stop());
process.stdin.on('end', () => void stop());
process.stdin.resume();
