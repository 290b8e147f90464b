/**
 * Built graphs are cached: a safetensors pipeline folder is converted once per (source content,
 * options) into `<cacheDir>/<name>-<key>/`, and later loads use that folder as they would a
 * downloaded ONNX export.
 *
 * The key hashes the build format, the options, and the source's content as far as it can be
 * known cheaply: every config, tokenizer and scheduler file in full, and each weights file's
 * safetensors header (names, dtypes, shapes, offsets), size and modification time (hashing
 * gigabytes of weights on every start would cost more than it protects). Of kiln.json only what
 * changes the build counts (`checkpoint`, `vae`, `prediction_type`, and the files they name,
 * wherever they are): its generation defaults and LoRAs are applied without a rebuild.
 *
 * A build goes into a temporary folder that is renamed into place when complete, so an
 * interrupted build leaves no half-written entry (only a `.partial-*` folder, removed by the
 * next build of the same key).
 */
import { createHash } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, join, relative } from 'node:path';
import { KILN_JSON, readKilnJson, settingsPath } from './checkpoint.js';
import { BUILD_SETTINGS, convertPipeline, type ConvertOptions, type ConvertResult, type GraphDtype } from './convert.js';

/** Bump when the graphs Kiln writes change, so that old cache entries are rebuilt (2: text encoders take attention_mask). */
export const BUILD_FORMAT = 2;
/** The file a finished build writes last; a folder without it is not a cache entry. */
export const BUILD_INFO = 'kiln-build.json';

function listFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    const st = statSync(path);
    if (st.isDirectory()) out.push(...listFiles(path));
    else if (st.isFile()) out.push(path);
  }
  return out;
}

/** The cache key of a source folder and options (see the file comment for what it covers). */
export function buildKey(src: string, dtype: GraphDtype, kind = 'pipeline'): string {
  const h = createHash('sha256').update(`kiln-graphs ${BUILD_FORMAT}\ndtype ${dtype}\nkind ${kind}\n`);
  const hashFile = (path: string, rel: string): void => {
    const st = statSync(path);
    h.update(`${rel}\n${st.size}\n`);
    if (rel.endsWith('.safetensors')) {
      h.update(`${st.mtimeMs}\n`).update(safetensorsHeader(path));
    } else if (st.size <= 16 * 1024 * 1024) {
      h.update(readFileSync(path));
    } else {
      h.update(`${st.mtimeMs}\n`);
    }
  };
  for (const path of listFiles(src)) {
    const rel = relative(src, path);
    if (rel === 'kiln-source.json' || rel === KILN_JSON || rel.startsWith('.')) continue;
    hashFile(path, rel);
  }
  const settings = readKilnJson(src);
  for (const key of BUILD_SETTINGS) {
    const value = settings?.[key];
    if (value === undefined) continue;
    h.update(`kiln.json ${key} ${JSON.stringify(value)}\n`);
    if (key === 'prediction_type') continue;
    // The files it names, also outside the folder (a checkpoint referred to by its path).
    const path = settingsPath(src, value as string);
    const st = statSync(path, { throwIfNoEntry: false });
    if (st?.isFile()) hashFile(path, path);
    else if (st?.isDirectory()) for (const f of listFiles(path)) hashFile(f, f);
    else h.update('missing\n');
  }
  return h.digest('hex').slice(0, 16);
}

/** The 8-byte length and JSON header of a safetensors file (bounded; a bad file hashes what it has). */
function safetensorsHeader(path: string): Buffer {
  const fd = openSync(path, 'r');
  try {
    const head = Buffer.alloc(8);
    const n = readSync(fd, head, 0, 8, 0);
    const length = n === 8 ? Math.min(Number(head.readBigUInt64LE(0)), 100_000_000) : 0;
    const header = Buffer.alloc(length);
    readSync(fd, header, 0, length, 8);
    return Buffer.concat([head, header]);
  } finally {
    closeSync(fd);
  }
}

export interface CachedBuildOptions extends ConvertOptions {
  cacheDir: string;
  /** How often a process waiting for another one's build of the same entry looks again (ms). */
  pollMs?: number;
  /**
   * What `src` is built into (default: a whole pipeline, convertPipeline); `kind` names it in the
   * key, so a component folder built on its own never shares an entry with a pipeline build.
   */
  build?: { kind: string; convert: (src: string, out: string, options: ConvertOptions) => ConvertResult };
}

/**
 * The ONNX folder built from safetensors pipeline `src`: the cached one when it exists, else
 * built now. One build per entry at a time, across threads and processes: the builder holds
 * `.lock-<entry>` (a folder, created atomically, naming its process); the others wait for it, and
 * a lock whose process is gone is taken over.
 */
export async function ensureBuilt(src: string, options: CachedBuildOptions): Promise<string> {
  const dtype = options.dtype ?? 'fp32';
  const kind = options.build?.kind ?? 'pipeline';
  const convert = options.build?.convert ?? convertPipeline;
  const key = buildKey(src, dtype, kind);
  const name = `${basename(src).replace(/[^\w.-]/g, '_')}-${dtype}-${key}`;
  const target = join(options.cacheDir, name);
  const lock = join(options.cacheDir, `.lock-${name}`);
  mkdirSync(options.cacheDir, { recursive: true });
  for (;;) {
    if (existsSync(join(target, BUILD_INFO))) return target;
    if (tryLock(lock)) break;
    await new Promise((r) => setTimeout(r, options.pollMs ?? 500));
  }
  try {
    if (existsSync(join(target, BUILD_INFO))) return target;
    // Leftovers of an interrupted build of this entry (we hold the lock: nobody else is building it).
    for (const entry of readdirSync(options.cacheDir)) {
      if (entry.startsWith(`.partial-${name}`)) rmSync(join(options.cacheDir, entry), { recursive: true, force: true });
    }
    const partial = join(options.cacheDir, `.partial-${name}`);
    try {
      // Kiln's own builds: text encoders with attention_mask, for compel's masked down-weighting.
      const result = convert(src, partial, { ...options, dtype, textAttentionMask: true });
      const info = {
        format: BUILD_FORMAT,
        source: src,
        dtype,
        key,
        components: result.components.map((c) => ({ name: c.name, parameters: c.parameters, ...c.stats })),
        ...(result.warnings.length ? { warnings: result.warnings } : {}),
      };
      writeFileSync(join(partial, BUILD_INFO), `${JSON.stringify(info, null, 2)}\n`);
      rmSync(target, { recursive: true, force: true }); // a folder without BUILD_INFO is not an entry
      renameSync(partial, target);
    } catch (err) {
      rmSync(partial, { recursive: true, force: true });
      throw err;
    }
    return target;
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

/** Takes the build lock, or takes over one whose process has ended. */
function tryLock(lock: string): boolean {
  try {
    mkdirSync(lock);
    writeFileSync(join(lock, 'owner'), `${process.pid}\n`);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  let owner = NaN;
  try {
    owner = Number.parseInt(readFileSync(join(lock, 'owner'), 'utf8'), 10);
  } catch {
    // being created right now, or left empty by a crash: judged by its age below
  }
  const ageMs = Date.now() - statSync(lock, { throwIfNoEntry: false })?.mtimeMs!;
  const ownerAlive = Number.isInteger(owner) ? isAlive(owner) : ageMs < 10_000;
  if (!ownerAlive) rmSync(lock, { recursive: true, force: true });
  return false;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
