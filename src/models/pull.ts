/**
 * `kiln pull`: fetch exactly the files a model needs from the Hub into `$KILN_HOME/models/<name>/`.
 *
 *   1. Resolve the spec (alias or `owner/name[@revision]`) and the revision to a commit; every
 *      file is then fetched at that commit, so a branch moving mid-pull cannot mix versions.
 *   2. List the repository at that commit and choose the layout and its files (select.ts's
 *      chooseLayout: the diffusers safetensors layout, fp16 variant where present, when it is
 *      complete, else the ONNX layout; `format` forces one). A repository with neither complete
 *      fails here, before any download.
 *   3. Check free space for what is not on disk yet (`fs.statfs`).
 *   4. Download into `$KILN_HOME/downloads/<name>/` (resumable, verified: download.ts):
 *      `model_index.json` first (re-checking the layout with it), then small files, then each
 *      `model.onnx` (or safetensors shard index), whose external-data references (or weight map)
 *      decide which data files (or shards) follow, then the weights.
 *   5. Check the folder (the engine's detectLayout for ONNX, each file's header for safetensors),
 *      write `kiln-source.json` (with the layout and precision it holds), and rename the
 *      folder to `$KILN_HOME/models/<name>` in one step (an older install of the same name is
 *      swapped out the same way). Nothing half-written ever appears under models/.
 *
 * An interrupted pull leaves its verified files and partial file in downloads/<name>/; the next
 * pull of the same name and commit resumes there (a different commit starts over).
 */
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { cp, mkdir, open, readFile, rename, rm, stat, statfs as fsStatfs, unlink, writeFile } from 'node:fs/promises';
import { dirname, join, relative, sep } from 'node:path';
import { kilnHome } from '../catalog/home.js';
import { ModelLoadError } from '../engine/errors.js';
import { detectLayout } from '../engine/model.js';
import { isValidModelName, resolvePullSpec, type InstallKind, type PullTarget } from './aliases.js';
import { bytesOnDisk, downloadVerified } from './download.js';
import { PullError } from './errors.js';
import { hubConfigFromEnv, hubFetch, listRepoFiles, offlineError, resolveRevision, resolveUrl, type HubConfig, type RepoFile } from './hub.js';
import { externalDataLocations, safeRelativeLocation } from './onnx-refs.js';
import {
  downloadsDir,
  lockHolder,
  lockPath,
  MANIFEST_FILE,
  modelsDir,
  readManifest,
  stagingDir,
  type ManifestFile,
  type SourceManifest,
} from './registry.js';
import { openSafetensors } from '../graphs/safetensors.js';
import {
  chooseLayout,
  externalTarget,
  planFiles,
  plannedFile,
  shardIndexFiles,
  type FormatChoice,
  type LayoutFormat,
  type PlannedFile,
  type WeightVariant,
} from './select.js';

/** Free space kept beyond the files themselves. */
export const DISK_HEADROOM = 64 * 1024 * 1024;
const STATE_FILE = '.kiln-pull.json';

export type PullEvent =
  | { type: 'resolved'; repo: string; revision: string; commit: string; name: string; dir: string }
  | { type: 'plan'; files: PlannedFile[]; totalBytes: number; onDiskBytes: number; layout?: LayoutFormat; variant?: LayoutVariant }
  | { type: 'replan'; files: PlannedFile[]; totalBytes: number; added: string[]; dropped: string[] }
  | { type: 'file-start'; path: string; size: number }
  | { type: 'bytes'; path: string; bytes: number }
  | { type: 'file-done'; path: string; size: number; fetchedBytes: number }
  | { type: 'retry'; path: string; attempt: number; message: string }
  | { type: 'installed'; name: string; dir: string };

/** The precision of a safetensors install: every component fp16, none (`default`), or some (`mixed`). */
export type LayoutVariant = WeightVariant | 'mixed';

/** kiln-source.json of a diffusion install, with the layout it holds (older installs have no `layout`: ONNX). */
export interface DiffusionManifest extends SourceManifest {
  layout?: LayoutFormat;
  /** Safetensors layout: the precision taken, overall and per component. */
  variant?: LayoutVariant;
  components?: Record<string, WeightVariant>;
}

/** The head of every kiln-source.json: where the files came from, and the commit they were fetched at. */
export function manifestOrigin(endpoint: string, target: { repo: string; revision: string }, commit: string): Pick<SourceManifest, 'format' | 'source' | 'endpoint' | 'repo' | 'revision' | 'commit'> {
  return { format: 1, source: 'huggingface', endpoint, repo: target.repo, revision: target.revision, commit };
}

export interface StatfsLike {
  bavail: number | bigint;
  bsize: number | bigint;
}

export interface PullOptions {
  /** Install name (folder under models/); default: the alias, or the repository's name. */
  name?: string;
  /** Kiln's data folder (default: kilnHome(env)). */
  home?: string;
  /** Environment for HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, ... (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** Replace a folder of the same name that kiln did not pull. */
  force?: boolean;
  /**
   * Diffusion repositories: which layout to install (`kiln pull --format`). Default: the alias's
   * `format`, else `auto` (the safetensors layout when complete, else ONNX; select.ts).
   */
  format?: FormatChoice;
  /** Resolve, list, plan and check space, but download nothing. */
  dryRun?: boolean;
  signal?: AbortSignal;
  onEvent?: (event: PullEvent) => void;
  /** Retries per file within this pull (default 5) and their base delay (default 1000 ms). */
  retries?: number;
  retryDelayMs?: number;
  /** Idle timeout of a download attempt (default HF_HUB_DOWNLOAD_TIMEOUT or 60 s). */
  timeoutMs?: number;
  /** The fetch underneath (tests); the token and offline rules are applied on top. */
  fetch?: typeof fetch;
  /** Free-space probe (default fs.statfs). */
  statfs?: (path: string) => Promise<StatfsLike>;
}

export interface PullResult {
  name: string;
  dir: string;
  repo: string;
  revision: string;
  commit: string;
  alias?: string;
  kind: InstallKind;
  /** Diffusion installs: the layout chosen, and for safetensors the precision. */
  layout?: LayoutFormat;
  variant?: LayoutVariant;
  files: ManifestFile[];
  totalBytes: number;
  /** Bytes received over the network by this pull. */
  fetchedBytes: number;
  /** The same commit was already installed: nothing was fetched. */
  upToDate: boolean;
  /** `dryRun`: the plan, nothing downloaded. */
  dryRun: boolean;
  /** Repository files left out (dry runs). */
  skipped?: string[];
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['kB', 'MB', 'GB', 'TB'];
  let v = n;
  let i = -1;
  do {
    v /= 1000;
    i++;
  } while (v >= 1000 && i < units.length - 1);
  return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

/** Pulls `spec` (an alias or `owner/name[@revision]`) and installs it. See the file comment. */
export async function pullModel(spec: string, options: PullOptions = {}): Promise<PullResult> {
  const env = options.env ?? process.env;
  const home = options.home ?? kilnHome(env);
  const target = resolvePullSpec(spec, home);
  const config = hubConfigFromEnv(env);
  if (options.timeoutMs) config.timeoutMs = options.timeoutMs;
  // Offline: fail before any request, with the repository named.
  if (config.offline) throw offlineError(`${target.repo}@${target.revision}`, config);
  const name = options.name ?? target.defaultName;
  if (!isValidModelName(name)) {
    throw new PullError(`"${name}" is not a valid model name (letters, digits, ".", "_", "-"); pass --name`, 'bad-spec');
  }
  const installDir = target.dir && !options.name ? join(home, target.dir) : join(modelsDir(home), name);
  await mkdir(downloadsDir(home), { recursive: true });
  const release = await acquireLock(home, name);
  try {
    return await pullLocked(target, name, installDir, home, config, options);
  } finally {
    await release();
  }
}

/** Takes the pull lock of `name` (one pull per install name at a time); returns its release. */
export async function acquireLock(home: string, name: string): Promise<() => Promise<void>> {
  const path = lockPath(home, name);
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fh = await open(path, 'wx');
      await fh.writeFile(String(process.pid));
      await fh.close();
      return async () => {
        await unlink(path).catch(() => {});
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const holder = lockHolder(path);
      if (holder !== undefined) {
        throw new PullError(`another kiln pull of "${name}" is running (pid ${holder}); if none is, delete ${path}`, 'busy');
      }
      await unlink(path).catch(() => {}); // stale: its process is gone
    }
  }
  throw new PullError(`cannot take the lock ${path}`, 'busy');
}

interface PullState {
  repo: string;
  commit: string;
  kind: InstallKind;
}

function sameState(a: PullState | undefined, b: PullState): boolean {
  return !!a && a.repo === b.repo && a.commit === b.commit && a.kind === b.kind;
}

async function readState(staging: string): Promise<PullState | undefined> {
  try {
    return JSON.parse(await readFile(join(staging, STATE_FILE), 'utf8')) as PullState;
  } catch {
    return undefined;
  }
}

function manifestIntact(dir: string, m: SourceManifest): boolean {
  return m.files.every((f) => {
    try {
      return statSync(join(dir, f.path)).size === f.size;
    } catch {
      return false;
    }
  });
}

async function pullLocked(
  target: PullTarget,
  name: string,
  installDir: string,
  home: string,
  config: HubConfig,
  options: PullOptions,
): Promise<PullResult> {
  const emit = options.onEvent ?? (() => {});
  const what = `${target.repo}@${target.revision}`;
  const requested: FormatChoice = options.format ?? target.format ?? 'auto';
  if (target.files && options.format && options.format !== 'auto') {
    throw new PullError(`--format applies to diffusion repositories; ${target.alias ?? target.repo} installs a list of files`, 'bad-spec');
  }
  const { commit, gated } = await resolveRevision(target.repo, target.revision, config, options.fetch);
  if (gated && !config.token) {
    throw new PullError(
      `${target.repo} is a gated model: accept its terms at ${config.endpoint}/${target.repo} and set HF_TOKEN to a token of that account`,
      'auth',
    );
  }
  emit({ type: 'resolved', repo: target.repo, revision: target.revision, commit, name, dir: installDir });
  const base: Omit<PullResult, 'files' | 'totalBytes' | 'fetchedBytes' | 'upToDate' | 'dryRun'> = {
    name,
    dir: installDir,
    repo: target.repo,
    revision: target.revision,
    commit,
    alias: target.alias,
    kind: target.kind,
  };

  // Already installed at this commit (in the layout asked for, if one is): nothing to do.
  if (existsSync(installDir)) {
    const current = readManifest(installDir) as DiffusionManifest | undefined;
    if (!current && !options.force) {
      throw new PullError(`${installDir} exists and was not installed by kiln pull; remove it, or pass --force to replace it`, 'exists');
    }
    const wantedTargets = target.files?.map((f) => f.as ?? f.path);
    if (
      current &&
      current.repo.toLowerCase() === target.repo.toLowerCase() &&
      current.commit === commit &&
      current.kind === target.kind &&
      (target.kind !== 'diffusion' || requested === 'auto' || (current.layout ?? 'onnx') === requested) &&
      (!wantedTargets || wantedTargets.every((t) => current.files.some((f) => f.path === t))) &&
      manifestIntact(installDir, current)
    ) {
      const totalBytes = current.files.reduce((s, f) => s + f.size, 0);
      const layout = target.kind === 'diffusion' ? { layout: current.layout ?? ('onnx' as const), ...(current.variant ? { variant: current.variant } : {}) } : {};
      return { ...base, ...layout, files: current.files, totalBytes, fetchedBytes: 0, upToDate: true, dryRun: !!options.dryRun };
    }
  }

  const listing = await listRepoFiles(target.repo, commit, config, options.fetch);
  const byPath = new Map(listing.map((f) => [f.path, f]));
  let plan: PlannedFile[];
  let skipped: string[];
  let layout: LayoutFormat | undefined;
  let components: Record<string, WeightVariant> | undefined;
  if (target.files) {
    ({ files: plan, skipped } = planFiles(listing, target.files, what));
  } else {
    ({ files: plan, skipped, format: layout, components } = chooseLayout(listing, requested, what));
  }
  const variant = components ? overallVariant(components) : undefined;
  const layoutInfo = layout ? { layout, ...(variant ? { variant } : {}) } : {};

  const staging = stagingDir(home, name);
  const state: PullState = { repo: target.repo, commit, kind: target.kind };
  const resumable = existsSync(staging) && sameState(await readState(staging), state);
  const onDisk = async (f: PlannedFile) => (resumable ? bytesOnDisk(join(staging, f.target), f.size) : 0);
  const sum = (files: PlannedFile[]) => files.reduce((s, f) => s + f.size, 0);
  let totalBytes = sum(plan);
  let onDiskBytes = 0;
  for (const f of plan) onDiskBytes += await onDisk(f);
  await checkDisk(totalBytes - onDiskBytes, totalBytes, home, installDir, options);
  emit({ type: 'plan', files: plan, totalBytes, onDiskBytes, ...layoutInfo });
  if (options.dryRun) {
    return { ...base, ...layoutInfo, files: plan.map(toManifestFile), totalBytes, fetchedBytes: 0, upToDate: false, dryRun: true, skipped };
  }

  if (!resumable) await rm(staging, { recursive: true, force: true });
  await mkdir(staging, { recursive: true });
  await writeFile(join(staging, STATE_FILE), JSON.stringify(state));

  const fetchImpl = hubFetch(config, options.fetch);
  let fetchedBytes = 0;
  const download = async (f: PlannedFile) => {
    const dest = join(staging, f.target);
    emit({ type: 'file-start', path: f.target, size: f.size });
    const outcome = await downloadVerified(
      { url: resolveUrl(config, target.repo, commit, f.path), dest, label: `${target.repo}/${f.path}`, size: f.size, sha256: f.sha256, gitOid: f.gitOid },
      {
        config,
        fetch: fetchImpl,
        signal: options.signal,
        retries: options.retries,
        retryDelayMs: options.retryDelayMs,
        onBytes: (bytes) => emit({ type: 'bytes', path: f.target, bytes }),
        onRetry: (attempt, err) => emit({ type: 'retry', path: f.target, attempt, message: err.message }),
      },
    );
    fetchedBytes += outcome.fetched;
    emit({ type: 'file-done', path: f.target, size: f.size, fetchedBytes: outcome.fetched });
  };

  try {
    // model_index.json first: with it, the layout check is complete before anything large.
    const index = plan.find((f) => f.target === 'model_index.json');
    if (layout && index) {
      await download(index);
      let parsed: Record<string, unknown> | undefined;
      try {
        parsed = JSON.parse(await readFile(join(staging, index.target), 'utf8')) as Record<string, unknown>;
      } catch {
        throw new PullError(`${what}: model_index.json is not valid JSON`, 'layout');
      }
      chooseLayout(listing, layout, what, parsed); // throws when it names a component the layout lacks
    }
    const bySize = (a: PlannedFile, b: PlannedFile) => a.size - b.size || a.target.localeCompare(b.target);
    for (const f of plan.filter((f) => (f.role === 'file' || f.role === 'index') && f !== index).sort(bySize)) await download(f);
    const onnxFiles = plan.filter((f) => f.role === 'onnx').sort(bySize);
    for (const f of onnxFiles) await download(f);

    // The graphs say which external-data files they need, the shard indexes which shards.
    const needed = new Map<string, PlannedFile>();
    for (const onnx of onnxFiles) {
      let locations: string[];
      try {
        locations = externalDataLocations(join(staging, onnx.target));
      } catch (err) {
        throw new PullError(`${what}: ${onnx.path} is not a readable ONNX model (${(err as Error).message})`, 'layout');
      }
      for (const location of locations) {
        const rel = safeRelativeLocation(location);
        if (!rel) throw new PullError(`${what}: ${onnx.path} refers to external data outside its folder ("${location}"); refused`, 'layout');
        const ext = externalTarget(onnx, rel);
        const file: RepoFile | undefined = byPath.get(ext.path);
        if (!file) throw new PullError(`${what}: ${onnx.path} needs its external data ${ext.path}, which the repository does not have`, 'layout');
        needed.set(ext.target, plan.find((p) => p.target === ext.target) ?? plannedFile(file, 'external', ext.target));
      }
    }
    for (const shardIndex of plan.filter((f) => f.role === 'index')) {
      let shards: string[];
      try {
        shards = shardIndexFiles(await readFile(join(staging, shardIndex.target), 'utf8'));
      } catch (err) {
        throw new PullError(`${what}: ${shardIndex.path} is not a usable safetensors index (${(err as Error).message})`, 'layout');
      }
      for (const shard of shards) {
        const ext = externalTarget(shardIndex, shard);
        const file: RepoFile | undefined = byPath.get(ext.path);
        if (!file) throw new PullError(`${what}: ${shardIndex.path} lists the shard ${ext.path}, which the repository does not have`, 'layout');
        needed.set(ext.target, plan.find((p) => p.target === ext.target) ?? plannedFile(file, 'shard', ext.target));
      }
    }
    const dependent = (f: PlannedFile) => f.role === 'external' || f.role === 'shard';
    const resolved = [...needed.values()].map((f) => ({ ...f, guessed: undefined }));
    const guessed = plan.filter(dependent);
    const dropped = guessed.filter((f) => !needed.has(f.target)).map((f) => f.target);
    const added = resolved.filter((f) => !guessed.some((g) => g.target === f.target)).map((f) => f.target);
    plan = [...plan.filter((f) => !dependent(f)), ...resolved];
    if (dropped.length || added.length) {
      totalBytes = sum(plan);
      let have = 0;
      for (const f of plan) have += await bytesOnDisk(join(staging, f.target), f.size);
      await checkDisk(totalBytes - have, totalBytes, home, installDir, options);
      emit({ type: 'replan', files: plan, totalBytes, added, dropped });
    }
    for (const f of [...plan.filter((f) => f.role === 'weights'), ...resolved].sort(bySize)) await download(f);

    await removeStrays(staging, new Set(plan.map((f) => f.target)));
    if (layout === 'onnx') {
      try {
        detectLayout(staging);
      } catch (err) {
        if (err instanceof ModelLoadError) throw new PullError(`${what}: ${err.message.replace(staging, 'the downloaded folder')}`, 'layout');
        throw err;
      }
    } else if (layout === 'safetensors') {
      checkSafetensorsFiles(staging, plan, what);
    }
    const manifest: DiffusionManifest = {
      ...manifestOrigin(config.endpoint, target, commit),
      ...(target.alias ? { alias: target.alias } : {}),
      kind: target.kind,
      ...layoutInfo,
      ...(components ? { components } : {}),
      pulledAt: new Date().toISOString(),
      files: plan.map(toManifestFile).sort((a, b) => a.path.localeCompare(b.path)),
    };
    await writeFile(join(staging, MANIFEST_FILE), `${JSON.stringify(manifest, null, 2)}\n`);
    await unlink(join(staging, STATE_FILE));
    await install(staging, installDir, home);
    emit({ type: 'installed', name, dir: installDir });
    return { ...base, ...layoutInfo, files: manifest.files, totalBytes, fetchedBytes, upToDate: false, dryRun: false };
  } catch (err) {
    // A repository that cannot be installed: nothing worth resuming.
    if (err instanceof PullError && err.code === 'layout') await rm(staging, { recursive: true, force: true });
    throw err;
  }
}

function overallVariant(components: Record<string, WeightVariant>): LayoutVariant {
  const values = new Set(Object.values(components));
  return values.size === 1 ? [...values][0]! : 'mixed';
}

/**
 * Every downloaded safetensors file has a valid header (sizes and hashes are already checked),
 * so a file that is not safetensors fails the pull rather than the first conversion.
 */
function checkSafetensorsFiles(staging: string, plan: readonly PlannedFile[], what: string): void {
  for (const f of plan.filter((p) => p.role === 'weights' || p.role === 'shard')) {
    try {
      openSafetensors(join(staging, f.target));
    } catch (err) {
      if (err instanceof ModelLoadError) throw new PullError(`${what}: ${err.message.replace(staging, 'the downloaded folder')}`, 'layout');
      throw err;
    }
  }
}

function toManifestFile(f: PlannedFile): ManifestFile {
  return {
    path: f.target,
    ...(f.path !== f.target ? { from: f.path } : {}),
    size: f.size,
    ...(f.sha256 ? { sha256: f.sha256 } : f.gitOid ? { gitOid: f.gitOid } : {}),
  };
}

/** Deletes files in the staging folder that are not in the final plan (stale partials, dropped guesses). */
async function removeStrays(staging: string, keep: Set<string>): Promise<void> {
  const walk = async (dir: string) => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) {
        await walk(path);
        if (readdirSync(path).length === 0) await rm(path, { recursive: true });
        continue;
      }
      const rel = relative(staging, path).split(sep).join('/');
      if (rel === STATE_FILE || keep.has(rel)) continue;
      await unlink(path);
    }
  };
  await walk(staging);
}

async function freeBytes(dir: string, options: PullOptions): Promise<number> {
  const s = await (options.statfs ?? fsStatfs)(dir);
  return Number(s.bavail) * Number(s.bsize);
}

/** Fails when the file systems that will hold the download lack room for it. */
export async function checkDisk(need: number, total: number, home: string, installDir: string, options: PullOptions): Promise<void> {
  const downloads = downloadsDir(home);
  await mkdir(downloads, { recursive: true });
  const checks: { dir: string; need: number }[] = [{ dir: downloads, need }];
  // A models folder on another file system gets a full copy at install time.
  const parent = dirname(installDir);
  await mkdir(parent, { recursive: true });
  if ((await stat(parent)).dev !== (await stat(downloads)).dev) checks.push({ dir: parent, need: total });
  for (const c of checks) {
    if (c.need <= 0) continue;
    const free = await freeBytes(c.dir, options);
    if (c.need + DISK_HEADROOM > free) {
      throw new PullError(
        `not enough free disk space in ${c.dir}: the download needs ${formatBytes(c.need)} ` +
          `(+${formatBytes(DISK_HEADROOM)} headroom), ${formatBytes(free)} is available. Free some space or set KILN_HOME to a larger disk.`,
        'disk',
      );
    }
  }
}

/** Moves the finished staging folder to `installDir` atomically, swapping out an older install. */
export async function install(staging: string, installDir: string, home: string): Promise<void> {
  await mkdir(dirname(installDir), { recursive: true });
  const token = randomBytes(4).toString('hex');
  let old: string | undefined;
  if (existsSync(installDir)) {
    old = join(downloadsDir(home), `.replaced-${token}`);
    try {
      await rename(installDir, old);
    } catch {
      old = `${installDir}.kiln-old-${token}`;
      await rename(installDir, old);
    }
  }
  try {
    try {
      await rename(staging, installDir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EXDEV') throw err;
      // models/ on another file system: copy beside the target, then rename there.
      const tmp = `${installDir}.kiln-tmp-${token}`;
      try {
        await cp(staging, tmp, { recursive: true });
        await rename(tmp, installDir);
      } catch (copyErr) {
        await rm(tmp, { recursive: true, force: true });
        throw copyErr;
      }
      await rm(staging, { recursive: true, force: true });
    }
  } catch (err) {
    if (old) await rename(old, installDir).catch(() => {});
    throw err;
  }
  if (old) await rm(old, { recursive: true, force: true });
}

