/**
 * What `kiln pull` leaves on disk and how names find it, without loading any model:
 *
 *   $KILN_HOME/models/<name>/            an installed model (or file alias), renamed into place whole
 *   $KILN_HOME/models/<name>/kiln-source.json   where it came from (this module's SourceManifest)
 *   $KILN_HOME/downloads/<name>/         a pull in progress: verified files, `*.incomplete` partials
 *   $KILN_HOME/downloads/<name>.lock     held by the running pull of <name>
 *   $KILN_HOME/aliases.json              the user's aliases (aliases.ts)
 *
 * Kept free of engine imports: src/engine/locate.ts uses it to resolve aliases of installed models.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { aliasTableLenient, type AliasEntry, type InstallKind } from './aliases.js';

export const MANIFEST_FILE = 'kiln-source.json';

export interface ManifestFile {
  /** Path in the install folder. */
  path: string;
  /** Path in the repository, when it differs. */
  from?: string;
  size: number;
  sha256?: string;
  gitOid?: string;
}

/** `kiln-source.json`: written into every folder `kiln pull` installs. */
export interface SourceManifest {
  format: 1;
  source: 'huggingface';
  endpoint: string;
  repo: string;
  /** The revision asked for (branch, tag or commit). */
  revision: string;
  /** The commit it resolved to, which every file was fetched at. */
  commit: string;
  /** The alias the pull named, if any. */
  alias?: string;
  kind: InstallKind;
  pulledAt: string;
  files: ManifestFile[];
}

export const modelsDir = (home: string) => join(home, 'models');
export const downloadsDir = (home: string) => join(home, 'downloads');
export const stagingDir = (home: string, name: string) => join(downloadsDir(home), name);
export const lockPath = (home: string, name: string) => join(downloadsDir(home), `${name}.lock`);

/** The manifest of an installed folder, or undefined (absent or unreadable). */
export function readManifest(dir: string): SourceManifest | undefined {
  const path = join(dir, MANIFEST_FILE);
  if (!existsSync(path)) return undefined;
  try {
    const m = JSON.parse(readFileSync(path, 'utf8')) as SourceManifest;
    return m && typeof m.repo === 'string' && typeof m.commit === 'string' ? m : undefined;
  } catch {
    return undefined;
  }
}

/** The pid holding `lockPath`, if that process is alive. */
export function lockHolder(path: string): number | undefined {
  let pid: number;
  try {
    pid = Number.parseInt(readFileSync(path, 'utf8'), 10);
  } catch {
    return undefined;
  }
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  try {
    process.kill(pid, 0);
    return pid;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM' ? pid : undefined;
  }
}

/** Whether an installed folder's manifest is what `alias` pulls. */
export function manifestMatchesAlias(alias: string, entry: AliasEntry, m: SourceManifest): boolean {
  if (m.alias === alias) return true;
  if (entry.files || m.kind !== 'diffusion') return false;
  return m.repo.toLowerCase() === entry.repo.toLowerCase() && m.revision === (entry.revision ?? 'main');
}

/** An alias that resolves to an installed model folder of another name. */
export interface AliasLink {
  alias: string;
  /** The installed model's name (its folder name). */
  name: string;
  dir: string;
}

/**
 * Diffusion aliases (built-in and the user's) that are not installed under their own name but
 * whose repository is installed under another one, e.g. `be-stable-diffusion-xl-base-1.0` after
 * `kiln pull stabilityai/stable-diffusion-xl-base-1.0 --name sdxl`. `models` are the installed
 * models, first match wins.
 */
export function installedAliasLinks(models: readonly { name: string; dir: string }[], home: string): AliasLink[] {
  const names = new Set(models.map((m) => m.name));
  const manifests = models.map((m) => ({ ...m, manifest: readManifest(m.dir) }));
  const links: AliasLink[] = [];
  for (const [alias, entry] of Object.entries(aliasTableLenient(home)).sort(([a], [b]) => a.localeCompare(b))) {
    if (names.has(alias) || entry.files) continue;
    const hit = manifests.find((m) => m.manifest && manifestMatchesAlias(alias, entry, m.manifest));
    if (hit) links.push({ alias, name: hit.name, dir: hit.dir });
  }
  return links;
}
