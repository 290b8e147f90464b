/**
 * `kiln serve --store s3://BUCKET/PREFIX` as a process, configured only through the AWS SDK's
 * standard environment (AWS_REGION, keys, AWS_ENDPOINT_URL_S3) pointed at a real s3rver, and
 * the values it refuses.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { rmSync } from 'node:fs';
import { promisify } from 'node:util';
import { ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { s3ClientConfig } from '../../src/store/s3.js';
import { makeHome, postJson } from '../server/helpers.js';
import { startS3, type TestS3 } from '../store/s3rver.js';

const run = promisify(execFile);
let s3: TestS3;
let home: string;

before(async () => {
  s3 = await startS3('kiln-cli');
  home = await makeHome({ 'kiln-tiny-xl': 'sdxl' });
});
after(async () => {
  await s3?.close();
  if (home) rmSync(home, { recursive: true, force: true });
});

const kilnArgs = (args: string[]) => ['--import', 'tsx', 'src/cli/main.ts', ...args];

test('kiln serve refuses a --store that is not s3://BUCKET[/PREFIX] or not there, and --s3-presigned-urls without one', async () => {
  for (const [args, message] of [
    [['--store', 'http://bucket/x'], /expected s3:\/\/BUCKET/],
    [['--store', 's3://UPPER'], /expected s3:\/\/BUCKET/],
    [['--s3-presigned-urls'], /--s3-presigned-urls needs --store/],
    [['--store', 's3://kiln-cli', '--s3-presigned-urls', '--url-ttl', '200h'], /at most 7 days/],
    // Start-up reads the URL secret from the bucket, so a missing bucket stops it with S3's reason.
    [['--store', 's3://no-such-bucket'], /--store s3:\/\/no-such-bucket: NoSuchBucket/],
  ] as const) {
    const err = await run(process.execPath, kilnArgs(['serve', '--home', home, '--port', '0', '--no-preload', ...args])).then(
      () => assert.fail(`${args.join(' ')} was accepted`),
      (e: { code?: number; stderr?: string }) => e,
    );
    assert.notEqual(err.code, 0);
    assert.match(err.stderr ?? '', message, args.join(' '));
  }
});

test('kiln serve --store s3://kiln-cli/prod: the result is in the bucket and its URL is served by Kiln', async () => {
  const child = spawn(process.execPath, kilnArgs(['serve', '--home', home, '--port', '0', '--no-preload', '--log-level', 'warn', '--store', 's3://kiln-cli/prod']), {
    env: { ...process.env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
  try {
    let stderr = '';
    const base = await new Promise<string>((resolve, reject) => {
      child.stderr!.on('data', (chunk) => {
        stderr += chunk;
        const m = /serving the images API at (http:\/\/\S+)\/v1/.exec(stderr);
        if (m) resolve(m[1]!);
      });
      void exited.then((code) => reject(new Error(`kiln serve exited (${code}): ${stderr}`)));
    });
    assert.match(stderr, /images and uploads in s3:\/\/kiln-cli\/prod/);
    const r = await postJson(`${base}/v1/images/generations`, { prompt: 'a kiln', size: '256x256', steps: 1 });
    assert.equal(r.status, 200, r.text);
    const url = new URL(r.json.data[0].url);
    assert.equal(url.origin, base);
    const key = url.pathname.replace(/^\/images\//, '');
    const raw = new S3Client(s3ClientConfig());
    try {
      const listed = await raw.send(new ListObjectsV2Command({ Bucket: 'kiln-cli', Prefix: 'prod/' }));
      assert.deepEqual(
        (listed.Contents ?? []).map((o) => o.Key).sort(),
        [`prod/images/${key}`, 'prod/url-secret'],
        'the image, and the URL secret every API host on the bucket shares',
      );
    } finally {
      raw.destroy();
    }
    const res = await fetch(url);
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-type'), 'image/png');
    await res.arrayBuffer();
  } finally {
    child.kill('SIGTERM');
    await exited;
  }
});
