/**
 * `kiln pull owner/name/path/to/file.safetensors[@revision]` (or the file's Hub URL, `/blob/` or
 * `/resolve/`): one file of a Hub repository, resumable and checked against the sha256 the Hub
 * lists (download.ts, as every pull), then installed by what it holds:
 *
 * - a single-file checkpoint: imported as a model (checkpoint.ts) into `$KILN_HOME/models/NAME/`,
 *   the downloaded file moved into the folder, with kiln-source.json saying where it came from;
 * - a LoRA: `$KILN_HOME/loras/NAME.safetensors`, beside `NAME.source.json`.
 *
 * NAME defaults to the file's stem. Pickle files are refused before anything is fetched.
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { basename, extname, join } from 'node:path';
import { ModelLoadError } from '../engine/errors.js';
import { kilnHome } from '../catalog/home.js';
import { importCheckpoint, importLora, PICKLE_EXTENSIONS, pickleMessage } from '../graphs/checkpoint.js';
import { detectFamily, type DetectedFamily } from '../graphs/keys-ldm.js';
import { readLora } from '../graphs/lora.js';
import { openSafetensors } from '../graphs/safetensors.js';
import { isValidModelName } from './aliases.js';
import { bytesOnDisk, downloadVerified } from './download.js';
import { PullError } from './errors.js';
import { hubConfigFromEnv, hubFetch, listRepoFiles, offlineError, resolveRevision, resolveUrl } from './hub.js';
import { acquireLock, checkDisk, install, manifestOrigin, type PullEvent, type PullOptions } from './pull.js';
import { plannedFile } from './select.js';
import { downloadsDir, MANIFEST_FILE, modelsDir, readManifest, type ManifestFile, type SourceManifest } from './registry.js';

const REPO_PART = /^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$/;
const REVISION = /^[A-Za-z0-9._/-]{1,255}$/;

export interface FileSpec {
  repo: string;
  revision: string;
  /** Path of the file in the repository. */
  path: string;
}

/**
 * A spec naming one weights file: `owner/name/<path>.<ext>[@revision]`, or a Hub URL
 * `https://huggingface.co/owner/name/(blob|resolve)/<revision>/<path>`. Undefined for anything
 * else (a repository or an alias). Pickle files are named too, so that they can be refused.
 */
export function parseFileSpec(spec: string): FileSpec | undefined {
  let s = spec.trim();
  const url = /^https?:\/\/(?:www\.)?(?:huggingface\.co|hf\.co)\/([^/]+)\/([^/]+)\/(?:blob|resolve)\/([^/]+)\/(.+)$/.exec(s);
  if (url) {
    s = `${url[1]}/${url[2]}/${decodeURIComponent(url[4]!.replace(/\?.*$/, ''))}@${decodeURIComponent(url[3]!)}`;
  }
  let revision = 'main';
  const at = s.lastIndexOf('@');
  if (at > 0) {
    revision = s.slice(at + 1);
    s = s.slice(0, at);
  }
  const parts = s.split('/');
  if (parts.length < 3) return undefined;
  const ext = extname(s).toLowerCase();
  if (ext !== '.safetensors' && !(PICKLE_EXTENSIONS as readonly string[]).includes(ext)) return undefined;
  const [owner, name, ...rest] = parts;
  if (!REPO_PART.test(owner!) || !REPO_PART.test(name!)) throw new PullError(`"${spec}": ${owner}/${name} is not a Hub repository id`, 'bad-spec');
  if (rest.some((p) => p === '' || p === '.' || p === '..')) throw new PullError(`"${spec}": the file path must stay inside the repository`, 'bad-spec');
  if (!REVISION.test(revision) || revision.includes('..')) throw new PullError(`invalid revision "${revision}" in "${spec}"`, 'bad-spec');
  return { repo: `${owner}/${name}`, revision, path: rest.join('/') };
}

export interface PullFileOptions extends PullOptions {
  /** Where LoRAs go (default `$KILN_HOME/loras`). */
  lorasDir?: string;
  /** Checkpoints: a diffusers folder to take the configs from (as `kiln import --config`). */
  config?: string;
}

export interface PullFileResult {
  kind: 'checkpoint' | 'lora';
  name: string;
  /** The model folder, or the LoRA file. */
  dir: string;
  repo: string;
  revision: string;
  commit: string;
  path: string;
  size: number;
  fetchedBytes: number;
  upToDate: boolean;
  dryRun: boolean;
  /** Checkpoints: the family found in the file. */
  detected?: DetectedFamily;
}

/** The install name a file gets: its stem, with what a folder name cannot hold replaced. */
export function defaultFileName(path: string): string {
  const stem = basename(path).replace(/\.[^.]+$/, '');
  const name = stem.replace(/[^A-Za-z0-9._-]+/g, '-').replace(/^[^A-Za-z0-9]+/, '').slice(0, 128);
  return name || 'model';
}

/** `source.json` of a pulled LoRA, beside it. */
const loraSourcePath = (lorasDir: string, name: string): string => join(lorasDir, `${name}.source.json`);

export async function pullFile(spec: string | FileSpec, options: PullFileOptions = {}): Promise<PullFileResult> {
  const target = typeof spec === 'string' ? parseFileSpec(spec) : spec;
  if (!target) throw new PullError(`"${spec}" does not name a .safetensors file of a Hub repository (owner/name/path/file.safetensors)`, 'bad-spec');
  const what = `${target.repo}/${target.path}@${target.revision}`;
  const ext = extname(target.path).toLowerCase();
  if (ext !== '.safetensors') throw new PullError(pickleMessage(what, `its extension is ${ext}`), 'bad-spec');
  const env = options.env ?? process.env;
  const home = options.home ?? kilnHome(env);
  const lorasDir = options.lorasDir ?? join(home, 'loras');
  const config = hubConfigFromEnv(env);
  if (options.timeoutMs) config.timeoutMs = options.timeoutMs;
  if (config.offline) throw offlineError(what, config);
  const name = options.name ?? defaultFileName(target.path);
  if (!isValidModelName(name)) throw new PullError(`"${name}" is not a valid name (letters, digits, ".", "_", "-"); pass --name`, 'bad-spec');
  const emit = options.onEvent ?? ((_e: PullEvent) => {});

  const { commit, gated } = await resolveRevision(target.repo, target.revision, config, options.fetch);
  if (gated && !config.token) {
    throw new PullError(`${target.repo} is a gated model: accept its terms at ${config.endpoint}/${target.repo} and set HF_TOKEN to a token of that account`, 'auth');
  }
  const modelDir = join(modelsDir(home), name);
  emit({ type: 'resolved', repo: target.repo, revision: target.revision, commit, name, dir: modelDir });
  const listing = await listRepoFiles(target.repo, commit, config, options.fetch);
  const file = listing.find((f) => f.path === target.path);
  if (!file) {
    const near = listing.filter((f) => f.path.endsWith('.safetensors')).map((f) => f.path).slice(0, 8);
    throw new PullError(`${target.repo}@${target.revision} has no file ${target.path}${near.length ? ` (its .safetensors files: ${near.join(', ')})` : ''}`, 'not-found');
  }
  const base: Omit<PullFileResult, 'kind' | 'dir' | 'fetchedBytes' | 'upToDate' | 'dryRun'> = {
    name,
    repo: target.repo,
    revision: target.revision,
    commit,
    path: target.path,
    size: file.size,
  };
  const manifestFile: ManifestFile = { path: basename(target.path), ...(target.path !== basename(target.path) ? { from: target.path } : {}), size: file.size, ...(file.lfs ? { sha256: file.lfs.oid } : file.oid ? { gitOid: file.oid } : {}) };
  const same = (m: SourceManifest | undefined): boolean =>
    !!m && m.repo.toLowerCase() === target.repo.toLowerCase() && m.commit === commit && m.files.length === 1 && m.files[0]!.path === manifestFile.path && m.files[0]!.size === file.size;

  // Already installed from this commit: nothing to fetch.
  const installed = readManifest(modelDir);
  if (same(installed)) return { ...base, kind: 'checkpoint', dir: modelDir, fetchedBytes: 0, upToDate: true, dryRun: !!options.dryRun };
  const loraTarget = join(lorasDir, `${name}.safetensors`);
  if (existsSync(loraTarget) && existsSync(loraSourcePath(lorasDir, name))) {
    const m = JSON.parse(await readFile(loraSourcePath(lorasDir, name), 'utf8').catch(() => '{}')) as SourceManifest;
    if (same(m)) return { ...base, kind: 'lora', dir: loraTarget, fetchedBytes: 0, upToDate: true, dryRun: !!options.dryRun };
  }

  await mkdir(downloadsDir(home), { recursive: true });
  const release = await acquireLock(home, name);
  try {
    const staging = join(downloadsDir(home), `${name}.file`);
    const dest = join(staging, basename(target.path));
    const stateFile = join(staging, '.kiln-pull.json');
    const state = JSON.stringify({ repo: target.repo, commit, path: target.path });
    const resumable = existsSync(stateFile) && (await readFile(stateFile, 'utf8').catch(() => '')) === state;
    const onDisk = resumable ? await bytesOnDisk(dest, file.size) : 0;
    await checkDisk(file.size - onDisk, file.size, home, modelDir, options);
    emit({ type: 'plan', files: [plannedFile(file, 'weights', basename(target.path))], totalBytes: file.size, onDiskBytes: onDisk });
    if (options.dryRun) return { ...base, kind: 'checkpoint', dir: modelDir, fetchedBytes: 0, upToDate: false, dryRun: true };
    if (!resumable) await rm(staging, { recursive: true, force: true });
    await mkdir(staging, { recursive: true });
    await writeFile(stateFile, state);
    emit({ type: 'file-start', path: target.path, size: file.size });
    const outcome = await downloadVerified(
      { url: resolveUrl(config, target.repo, commit, target.path), dest, label: `${target.repo}/${target.path}`, size: file.size, sha256: file.lfs?.oid, gitOid: file.lfs ? undefined : file.oid },
      {
        config,
        fetch: hubFetch(config, options.fetch),
        signal: options.signal,
        retries: options.retries,
        retryDelayMs: options.retryDelayMs,
        onBytes: (bytes) => emit({ type: 'bytes', path: target.path, bytes }),
        onRetry: (attempt, err) => emit({ type: 'retry', path: target.path, attempt, message: err.message }),
      },
    );
    emit({ type: 'file-done', path: target.path, size: file.size, fetchedBytes: outcome.fetched });

    const manifest: SourceManifest = {
      ...manifestOrigin(config.endpoint, target, commit),
      kind: 'diffusion',
      pulledAt: new Date().toISOString(),
      files: [manifestFile],
    };
    const fail = async (err: unknown): Promise<never> => {
      // Verified bytes that are not a usable file are not worth resuming.
      await rm(staging, { recursive: true, force: true });
      if (err instanceof ModelLoadError) throw new PullError(`${what}: ${err.message.replace(dest, 'the downloaded file')}`, 'layout');
      throw err;
    };
    let detected: DetectedFamily | undefined;
    let isLora = false;
    try {
      const st = openSafetensors(dest);
      try {
        detected = detectFamily(st);
      } catch (err) {
        if (!(err instanceof ModelLoadError)) throw err;
        try {
          readLora(dest);
          isLora = true;
        } catch {
          throw err; // neither: the family detector says what was found
        }
      }
    } catch (err) {
      return await fail(err);
    }

    if (isLora) {
      try {
        const r = importLora(dest, { lorasDir, name, force: true, move: true });
        await writeFile(loraSourcePath(lorasDir, name), `${JSON.stringify(manifest, null, 2)}\n`);
        await rm(staging, { recursive: true, force: true });
        emit({ type: 'installed', name, dir: r.path });
        return { ...base, kind: 'lora', dir: r.path, fetchedBytes: outcome.fetched, upToDate: false, dryRun: false };
      } catch (err) {
        return await fail(err);
      }
    }

    if (existsSync(modelDir) && !installed && !options.force) {
      throw new PullError(`${modelDir} exists and was not installed by kiln pull; remove it, or pass --force to replace it`, 'exists');
    }
    const folder = join(downloadsDir(home), `${name}.import`);
    try {
      importCheckpoint(dest, { dir: folder, force: true, move: true, config: options.config });
      await writeFile(join(folder, MANIFEST_FILE), `${JSON.stringify(manifest, null, 2)}\n`);
      await install(folder, modelDir, home);
      await rm(staging, { recursive: true, force: true });
    } catch (err) {
      await rm(folder, { recursive: true, force: true });
      return await fail(err);
    }
    emit({ type: 'installed', name, dir: modelDir });
    return { ...base, kind: 'checkpoint', dir: modelDir, fetchedBytes: outcome.fetched, upToDate: false, dryRun: false, detected };
  } finally {
    await release();
  }
}
