/**
 * Talking to the Hugging Face Hub (or a mirror) the way huggingface_hub does:
 *
 * - `HF_ENDPOINT`: the Hub's base URL (mirrors, tests), default https://huggingface.co.
 * - `HF_TOKEN` (else the legacy `HUGGING_FACE_HUB_TOKEN`, else the token file at
 *   `HF_TOKEN_PATH`, default `$HF_HOME/token`, `HF_HOME` defaulting to `~/.cache/huggingface`):
 *   sent as `Authorization: Bearer` to the endpoint only, never to the CDN a download is
 *   redirected to.
 * - `HF_HUB_OFFLINE=1` (also ON/YES/TRUE): no network at all; a pull fails at once.
 * - `HF_HUB_DOWNLOAD_TIMEOUT`: seconds without data before a download attempt is retried.
 *
 * The repository API (revision → commit, file tree with LFS sizes and sha256) goes through
 * `@huggingface/hub` (`modelInfo`, `listFiles`); file bodies are fetched here with HTTP ranges,
 * because a pull must resume into its own files and verify them as they stream.
 */
import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { HubApiError, listFiles, modelInfo } from '@huggingface/hub';
import { PullError } from './errors.js';

export const DEFAULT_ENDPOINT = 'https://huggingface.co';
const TRUE_VALUES = new Set(['1', 'ON', 'YES', 'TRUE']);

export interface HubConfig {
  endpoint: string;
  token: string | undefined;
  offline: boolean;
  /** Idle time (no bytes) after which a download attempt is abandoned and retried. */
  timeoutMs: number;
}

const isTrue = (value: string | undefined) => value !== undefined && TRUE_VALUES.has(value.trim().toUpperCase());

function readTokenFile(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
}

/** The Hub settings from the environment, following huggingface_hub's variable names. */
export function hubConfigFromEnv(env: NodeJS.ProcessEnv = process.env): HubConfig {
  const endpoint = (env.HF_ENDPOINT?.trim() || DEFAULT_ENDPOINT).replace(/\/+$/, '');
  const hfHome = env.HF_HOME || join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'huggingface');
  const token =
    env.HF_TOKEN?.trim() || env.HUGGING_FACE_HUB_TOKEN?.trim() || readTokenFile(env.HF_TOKEN_PATH || join(hfHome, 'token'));
  const timeoutSeconds = Number(env.HF_HUB_DOWNLOAD_TIMEOUT);
  return {
    endpoint,
    token: token || undefined,
    offline: isTrue(env.HF_HUB_OFFLINE),
    timeoutMs: Number.isFinite(timeoutSeconds) && timeoutSeconds > 0 ? Math.max(timeoutSeconds, 10) * 1000 : 60_000,
  };
}

export function offlineError(what: string, config: HubConfig): PullError {
  return new PullError(
    `HF_HUB_OFFLINE is set: kiln pull needs the Hub (${config.endpoint}) to fetch ${what}. ` +
      'Unset HF_HUB_OFFLINE to download, or copy a model folder into $KILN_HOME/models/<name>.',
    'offline',
  );
}

/**
 * A fetch for the Hub: adds the token to requests for the endpoint's origin only, sends a
 * user agent, and turns a connection failure into one clear PullError.
 */
export function hubFetch(config: HubConfig, base: typeof fetch = fetch): typeof fetch {
  const origin = new URL(config.endpoint).origin;
  return async (input, init) => {
    if (config.offline) throw offlineError(String(input), config);
    const url = new URL(input instanceof Request ? input.url : String(input));
    const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
    if (!headers.has('user-agent')) headers.set('user-agent', 'kiln/0.1.0; huggingface.js');
    if (config.token && url.origin === origin) headers.set('authorization', `Bearer ${config.token}`);
    else headers.delete('authorization');
    try {
      return await base(url, { ...init, headers });
    } catch (err) {
      if (init?.signal?.aborted) throw err;
      throw new PullError(`cannot reach ${url.origin} (${describeNetworkError(err)}); set HF_ENDPOINT for a mirror`, 'network', { cause: err });
    }
  };
}

export function describeNetworkError(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const cause = (err as { cause?: unknown }).cause;
  if (cause instanceof Error) return `${(cause as { code?: string }).code ?? cause.name}: ${cause.message}`;
  return err.message;
}

/** One PullError for an HTTP status from the Hub, with what to do about it. */
export function statusError(status: number, what: string, config: HubConfig, detail?: string): PullError {
  const suffix = detail ? ` (${detail})` : '';
  if (status === 401) {
    return new PullError(
      config.token
        ? `${what}: the Hub refused HF_TOKEN (401)${suffix}. Check that the token is valid and has access.`
        : `${what}: authentication required (401)${suffix}. The repository is private or gated, or does not exist: ` +
            'set HF_TOKEN to a token of an account with access.',
      'auth',
    );
  }
  if (status === 403) {
    return new PullError(
      `${what}: access denied (403)${suffix}. For a gated model, accept its terms on its Hub page with the account ` +
        'whose token is in HF_TOKEN.',
      'auth',
    );
  }
  if (status === 404) return new PullError(`${what}: not found on ${config.endpoint} (404)${suffix}`, 'not-found');
  return new PullError(`${what}: the Hub answered HTTP ${status}${suffix}`, status === 429 || status >= 500 ? 'network' : 'not-found');
}

function apiError(err: unknown, what: string, config: HubConfig): never {
  if (err instanceof PullError) throw err;
  if (err instanceof HubApiError) {
    const data = err.data as { error?: unknown } | undefined;
    const detail = typeof data?.error === 'string' ? data.error : undefined;
    throw statusError(err.statusCode, what, config, detail);
  }
  throw new PullError(`${what}: ${err instanceof Error ? err.message : String(err)}`, 'network', { cause: err });
}

export interface RepoRevision {
  /** The commit the revision points at: everything after this is fetched by commit. */
  commit: string;
  gated: false | 'auto' | 'manual';
  private: boolean;
}

/** Resolves a branch, tag or commit of a model repository to its commit sha. */
export async function resolveRevision(repo: string, revision: string, config: HubConfig, fetchImpl?: typeof fetch): Promise<RepoRevision> {
  try {
    const info = await modelInfo({
      name: repo,
      revision,
      hubUrl: config.endpoint,
      fetch: hubFetch(config, fetchImpl),
      additionalFields: ['sha'],
    });
    const commit = (info as { sha?: unknown }).sha;
    if (typeof commit !== 'string' || !/^[0-9a-f]{40}$/i.test(commit)) {
      throw new PullError(`${repo}@${revision}: the Hub did not report a commit for this revision`, 'not-found');
    }
    return { commit: commit.toLowerCase(), gated: (info.gated as RepoRevision['gated']) ?? false, private: info.private === true };
  } catch (err) {
    apiError(err, `${repo}@${revision}`, config);
  }
}

/** A file of the repository tree, as the Hub lists it. */
export interface RepoFile {
  path: string;
  size: number;
  /** Git blob sha1 (for files stored in git). */
  oid?: string;
  /** LFS sha256 and size (for large files; xet-backed files keep their LFS sha256 too). */
  lfs?: { oid: string; size: number };
  xetHash?: string;
}

/** Every file of the repository at `commit` (recursive tree listing, paginated by the library). */
export async function listRepoFiles(repo: string, commit: string, config: HubConfig, fetchImpl?: typeof fetch): Promise<RepoFile[]> {
  const files: RepoFile[] = [];
  try {
    for await (const entry of listFiles({ repo, revision: commit, recursive: true, hubUrl: config.endpoint, fetch: hubFetch(config, fetchImpl) })) {
      if (entry.type !== 'file') continue;
      files.push({
        path: entry.path,
        size: entry.lfs?.size ?? entry.size,
        oid: entry.oid,
        lfs: entry.lfs ? { oid: entry.lfs.oid, size: entry.lfs.size } : undefined,
        xetHash: entry.xetHash,
      });
    }
  } catch (err) {
    apiError(err, `${repo}@${commit.slice(0, 7)} (file list)`, config);
  }
  return files;
}

/** `<endpoint>/<repo>/resolve/<revision>/<path>`, each segment URL-encoded. */
export function resolveUrl(config: HubConfig, repo: string, revision: string, path: string): string {
  const enc = (p: string) => p.split('/').map(encodeURIComponent).join('/');
  return `${config.endpoint}/${enc(repo)}/resolve/${encodeURIComponent(revision)}/${enc(path)}`;
}
