/**
 * What the playground's browser tests (and tools/playground-screenshots.ts) run on: Debian's
 * Chromium driven by playwright-core, and a real Kiln server on 127.0.0.1 serving the built-in
 * kiln-tiny models from the repository's models/ folder (real weights, so the pictures show
 * what the prompt says).
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type Browser } from 'playwright-core';
import { ensureControlNetFixture, ensureFixture, ensurePoseFixture } from '../../tools/fixtures/variants.js';
import { linkFarm, startTestServer, type TestServer } from '../server/helpers.js';
import type { ServerOptions } from '../../src/server/app.js';

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CHROMIUM = '/usr/bin/chromium';

export function chromiumMissing(): string | false {
  return existsSync(CHROMIUM) ? false : `${CHROMIUM} not found (CI installs Debian's chromium with apt-get): the playground's browser tests are skipped`;
}

/** Headless Chromium with nothing that reaches the network (each context gets fresh storage). */
export function launchChromium(): Promise<Browser> {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

/**
 * A server in a temp home on the built-in models, kiln-tiny (SD 1.x layout) as its default;
 * `withPose` adds `pose-demo`, a fixture model (random weights) with the ControlNet and DWPose
 * stand-ins that pose mode needs, as test/server/edit-modes.test.ts builds them.
 */
export async function startPlaygroundServer(options: Partial<ServerOptions> & { withPose?: boolean } = {}): Promise<TestServer> {
  const { withPose, ...rest } = options;
  const home = mkdtempSync(join(tmpdir(), 'kiln-playground-'));
  const models = join(home, 'models');
  mkdirSync(models);
  if (withPose) {
    const [unet, openpose, dwpose] = await Promise.all([ensureFixture('sd15-controlnet'), ensureControlNetFixture('sd15-openpose'), ensurePoseFixture()]);
    const own = linkFarm(unet, join(models, 'pose-demo'));
    linkFarm(openpose, join(own, 'controlnet-openpose'), ['annotators']);
    mkdirSync(join(own, 'annotators'));
    symlinkSync(dwpose, join(own, 'annotators', 'dwpose'));
  }
  const t = await startTestServer({ home, searchDirs: [models, join(REPO_ROOT, 'models')], defaultModel: 'kiln-tiny', ...rest });
  const close = t.close;
  return {
    ...t,
    async close() {
      await close();
      rmSync(home, { recursive: true, force: true });
    },
  };
}
