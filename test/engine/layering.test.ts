/**
 * The engine's layering rule, checked over its source: src/engine/ (with src/graphs/, the graph
 * builders it uses, which sit in the same layer) reads no environment variable, assumes no home
 * folder, and imports nothing above it (catalog, models, runner, server, cli, queue, store, jobs).
 * Callers resolve the home and pass folders (src/catalog/home.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const SRC = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'src');
const LAYER = ['engine', 'graphs'].map((d) => join(SRC, d));

function sourceFiles(dir: string): string[] {
  return readdirSync(dir)
    .sort()
    .flatMap((name) => {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) return sourceFiles(path);
      return name.endsWith('.ts') ? [path] : [];
    });
}

const inLayer = (path: string) => LAYER.some((d) => path === d || path.startsWith(d + sep));

/** What breaks the rule in one file's text, as `file:line: reason` lines. */
function violations(file: string, text: string): string[] {
  const found: string[] = [];
  const shown = relative(join(SRC, '..'), file);
  text.split('\n').forEach((line, i) => {
    const at = `${shown}:${i + 1}`;
    if (/\bprocess\.env\b/.test(line)) found.push(`${at}: reads process.env`);
    if (/\bhomedir\b/.test(line)) found.push(`${at}: uses the user's home folder (os.homedir)`);
    // Static imports and re-exports, side-effect imports and dynamic import() of relative paths.
    for (const m of line.matchAll(/(?:\bfrom\s*|\bimport\s*\(?\s*)['"](\.{1,2}\/[^'"]*)['"]/g)) {
      const target = resolve(dirname(file), m[1]!);
      if (!inLayer(target)) found.push(`${at}: imports ${m[1]} (${relative(SRC, target)}), above the engine`);
    }
  });
  return found;
}

test('the layering check finds what it is meant to find', () => {
  const file = join(SRC, 'engine', 'example.ts');
  const bad = [
    "import { kilnHome } from '../catalog/home.js';",
    "export { x } from '../models/registry.js';",
    "const m = await import('../server/app.js');",
    "const home = process.env.KILN_HOME;",
    "import { homedir } from 'node:os';",
  ].join('\n');
  assert.equal(violations(file, bad).length, 5, violations(file, bad).join('\n'));
  const good = ["import { ModelLoadError } from './errors.js';", "import { ensureBuilt } from '../graphs/cache.js';", "import sharp from 'sharp';"].join('\n');
  assert.deepEqual(violations(file, good), []);
  assert.deepEqual(violations(join(SRC, 'engine', 'pose', 'x.ts'), "import { createRng } from '../rng.js';"), []);
});

test('src/engine and src/graphs read no environment and import nothing above them', () => {
  const files = LAYER.flatMap(sourceFiles);
  assert.ok(files.length > 40, `found only ${files.length} source files under ${LAYER.join(', ')}`);
  const found = files.flatMap((f) => violations(f, readFileSync(f, 'utf8')));
  assert.deepEqual(found, []);
});
