/**
 * A local stand-in for the Hugging Face Hub, on 127.0.0.1, answering the routes kiln pull uses
 * (the same ones @huggingface/hub and huggingface_hub call):
 *
 *   GET /api/models/<owner>/<name>/revision/<rev>     model info, with `sha` (the commit) and `gated`
 *   GET /api/models/<owner>/<name>/tree/<rev>?recursive=true   file tree with `oid`, `size`,
 *       `lfs: {oid: sha256, size, pointerSize}` and `xetHash` for large files; paginated by a
 *       `Link: <...>; rel="next"` header like the real one
 *   GET /<owner>/<name>/resolve/<rev>/<path>          small files directly; LFS files by a 302
 *       to a second server on another port (the "CDN", another origin, like the Hub's)
 *
 * Both servers honour `Range: bytes=N-`. The hub counts body bytes served per file, records every
 * request (with its Authorization header), and can cut a connection mid-file or corrupt a file.
 */
import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface RecordedRequest {
  server: 'api' | 'cdn';
  method: string;
  path: string;
  range?: string;
  authorization?: string;
}

interface Blob {
  data: Buffer;
  sha256: string;
  gitOid: string;
  lfs: boolean;
}

interface Repo {
  id: string;
  gated: boolean;
  /** branch/tag → commit */
  refs: Map<string, string>;
  /** commit → path → blob */
  commits: Map<string, Map<string, Blob>>;
}

const LFS_EXTENSIONS = /\.(onnx|onnx_data|data|pb|safetensors|bin|ckpt|pth|msgpack|png)$/;
const PAGE_SIZE = 20;

function sha1(s: string | Buffer): string {
  return createHash('sha1').update(s).digest('hex');
}

function blob(data: Buffer, path: string): Blob {
  return {
    data,
    sha256: createHash('sha256').update(data).digest('hex'),
    gitOid: createHash('sha1').update(`blob ${data.length}\0`).update(data).digest('hex'),
    lfs: LFS_EXTENSIONS.test(path) || data.length > 100_000,
  };
}

export class FakeHub {
  readonly requests: RecordedRequest[] = [];
  /** `<repo>/<path>` → body bytes sent (all commits, both servers). */
  readonly served = new Map<string, number>();
  /** `<repo>/<path>` → cut the connection after this many body bytes, once. */
  readonly cutAfter = new Map<string, number>();
  /** `<repo>/<path>` → serve these bytes flipped (the listing keeps the true sha256). */
  readonly corrupt = new Set<string>();
  readonly token = 'hf_kiln_test_token_123';
  private readonly repos = new Map<string, Repo>();
  private readonly bySha = new Map<string, Buffer>();

  private constructor(
    private readonly api: Server,
    private readonly cdn: Server,
  ) {}

  static async start(): Promise<FakeHub> {
    const hub: FakeHub = new FakeHub(
      createServer((req, res) => hub.handleApi(req, res)),
      createServer((req, res) => hub.handleCdn(req, res)),
    );
    await Promise.all([hub.api, hub.cdn].map((s) => new Promise<void>((r) => s.listen(0, '127.0.0.1', r))));
    return hub;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.api.address() as AddressInfo).port}`;
  }

  get cdnUrl(): string {
    return `http://127.0.0.1:${(this.cdn.address() as AddressInfo).port}`;
  }

  async close(): Promise<void> {
    for (const s of [this.api, this.cdn]) s.closeAllConnections();
    await Promise.all([this.api, this.cdn].map((s) => new Promise<void>((r) => s.close(() => r()))));
  }

  /** Adds a repository; `revisions` maps branch or tag names to file trees. */
  addRepo(id: string, revisions: Record<string, Record<string, Buffer>>, options: { gated?: boolean } = {}): void {
    const repo: Repo = { id, gated: !!options.gated, refs: new Map(), commits: new Map() };
    for (const [ref, files] of Object.entries(revisions)) {
      const commit = sha1(`${id}\n${ref}`);
      repo.refs.set(ref, commit);
      const tree = new Map<string, Blob>();
      for (const [path, data] of Object.entries(files).sort(([a], [b]) => a.localeCompare(b))) {
        const b = blob(data, path);
        tree.set(path, b);
        this.bySha.set(b.sha256, data);
      }
      repo.commits.set(commit, tree);
    }
    this.repos.set(id, repo);
  }

  commitOf(id: string, ref: string): string {
    return this.repos.get(id)!.refs.get(ref)!;
  }

  /** Body bytes served for `<repo>/<path>`. */
  bytesServed(repo: string, path: string): number {
    return this.served.get(`${repo}/${path}`) ?? 0;
  }

  /** All body bytes served for a repository's files. */
  totalServed(repo: string): number {
    let n = 0;
    for (const [k, v] of this.served) if (k.startsWith(`${repo}/`)) n += v;
    return n;
  }

  reset(): void {
    this.requests.length = 0;
    this.served.clear();
    this.cutAfter.clear();
    this.corrupt.clear();
  }

  private record(server: 'api' | 'cdn', req: IncomingMessage): void {
    this.requests.push({
      server,
      method: req.method ?? 'GET',
      path: req.url ?? '',
      range: req.headers.range,
      authorization: req.headers.authorization,
    });
  }

  private json(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    const text = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), ...headers });
    res.end(text);
  }

  private authorized(repo: Repo, req: IncomingMessage): boolean {
    return !repo.gated || req.headers.authorization === `Bearer ${this.token}`;
  }

  private commit(repo: Repo, rev: string): string | undefined {
    if (repo.refs.has(rev)) return repo.refs.get(rev);
    if (rev === 'HEAD') return repo.refs.get('main');
    return repo.commits.has(rev) ? rev : undefined;
  }

  private handleApi(req: IncomingMessage, res: ServerResponse): void {
    this.record('api', req);
    const url = new URL(req.url ?? '/', this.url);
    const segs = url.pathname.split('/').slice(1).map(decodeURIComponent);
    if (segs[0] === 'api' && segs[1] === 'models') {
      const id = `${segs[2]}/${segs[3]}`;
      const repo = this.repos.get(id);
      if (!repo) return this.json(res, 404, { error: 'Repository not found' }, { 'x-error-code': 'RepoNotFound' });
      const commit = this.commit(repo, segs[5] ?? 'main');
      if (segs[4] === 'revision') {
        if (!commit) return this.json(res, 404, { error: `Invalid rev id: ${segs[5]}` }, { 'x-error-code': 'RevisionNotFound' });
        return this.json(res, 200, {
          _id: sha1(id).slice(0, 24),
          id,
          private: false,
          gated: repo.gated ? 'manual' : false,
          sha: commit,
          lastModified: '2024-01-01T00:00:00.000Z',
          downloads: 0,
          likes: 0,
          pipeline_tag: 'text-to-image',
          siblings: [...repo.commits.get(commit)!.keys()].map((rfilename) => ({ rfilename })),
        });
      }
      if (segs[4] === 'tree') {
        if (!this.authorized(repo, req)) return this.json(res, 401, { error: 'Access to this model is restricted.' });
        if (!commit) return this.json(res, 404, { error: `Invalid rev id: ${segs[5]}` });
        const prefix = segs.slice(6).join('/');
        const tree = repo.commits.get(commit)!;
        const entries: unknown[] = [];
        const dirs = new Set<string>();
        for (const [path, b] of tree) {
          if (prefix && !path.startsWith(`${prefix}/`)) continue;
          const parts = path.split('/');
          for (let i = 1; i < parts.length; i++) {
            const d = parts.slice(0, i).join('/');
            if (!dirs.has(d) && (!prefix || d.startsWith(`${prefix}/`))) {
              dirs.add(d);
              entries.push({ type: 'directory', oid: sha1(d), size: 0, path: d });
            }
          }
          entries.push({
            type: 'file',
            oid: b.lfs ? sha1(`pointer ${b.sha256}`) : b.gitOid,
            size: b.data.length,
            path,
            ...(b.lfs ? { lfs: { oid: b.sha256, size: b.data.length, pointerSize: 134 }, xetHash: sha1(b.sha256) + sha1(b.sha256).slice(0, 24) } : {}),
          });
        }
        const cursor = Number(url.searchParams.get('cursor') ?? 0);
        const page = entries.slice(cursor, cursor + PAGE_SIZE);
        const headers: Record<string, string> = {};
        if (cursor + PAGE_SIZE < entries.length) {
          const next = new URL(url.href);
          next.searchParams.set('cursor', String(cursor + PAGE_SIZE));
          headers.link = `<${next.href}>; rel="next"`;
        }
        return this.json(res, 200, page, headers);
      }
      return this.json(res, 404, { error: 'Not found' });
    }
    // /<owner>/<name>/resolve/<rev>/<path...>
    if (segs[2] === 'resolve') {
      const id = `${segs[0]}/${segs[1]}`;
      const repo = this.repos.get(id);
      if (!repo) return this.json(res, 404, { error: 'Repository not found' }, { 'x-error-code': 'RepoNotFound' });
      if (!this.authorized(repo, req)) return this.json(res, 401, { error: 'Access to this model is restricted.' });
      const commit = this.commit(repo, segs[3]!);
      const path = segs.slice(4).join('/');
      const b = commit ? repo.commits.get(commit)!.get(path) : undefined;
      if (!commit || !b) return this.json(res, 404, { error: 'Entry not found' }, { 'x-error-code': 'EntryNotFound' });
      const common = { 'x-repo-commit': commit, etag: `"${b.lfs ? b.sha256 : b.gitOid}"` };
      if (b.lfs) {
        res.writeHead(302, {
          ...common,
          location: `${this.cdnUrl}/cas/${b.sha256}?key=${encodeURIComponent(`${id}/${path}`)}&X-Amz-Signature=fake`,
          'x-linked-size': String(b.data.length),
          'x-linked-etag': `"${b.sha256}"`,
        });
        return void res.end();
      }
      return this.serve(req, res, b.data, `${id}/${path}`, common);
    }
    this.json(res, 404, { error: 'Not found' });
  }

  private handleCdn(req: IncomingMessage, res: ServerResponse): void {
    this.record('cdn', req);
    const url = new URL(req.url ?? '/', this.cdnUrl);
    const m = /^\/cas\/([0-9a-f]{64})$/.exec(url.pathname);
    const data = m ? this.bySha.get(m[1]!) : undefined;
    const key = url.searchParams.get('key');
    if (!data || !key) {
      res.writeHead(404);
      return void res.end();
    }
    this.serve(req, res, data, key, { etag: `"${m![1]}"` });
  }

  private serve(req: IncomingMessage, res: ServerResponse, data: Buffer, key: string, extra: Record<string, string>): void {
    let start = 0;
    let end = data.length - 1;
    let status = 200;
    const headers: Record<string, string> = { 'accept-ranges': 'bytes', 'content-type': 'application/octet-stream', ...extra };
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    if (range) {
      start = Number(range[1]);
      if (range[2]) end = Math.min(Number(range[2]), end);
      if (start >= data.length || start > end) {
        res.writeHead(416, { 'content-range': `bytes */${data.length}` });
        return void res.end();
      }
      status = 206;
      headers['content-range'] = `bytes ${start}-${end}/${data.length}`;
    }
    let body = data.subarray(start, end + 1);
    if (this.corrupt.has(key)) {
      body = Buffer.from(body);
      body[body.length >> 1] ^= 0xff;
    }
    headers['content-length'] = String(body.length);
    const cut = this.cutAfter.get(key);
    const count = (n: number) => this.served.set(key, (this.served.get(key) ?? 0) + n);
    if (cut !== undefined && cut < body.length) {
      this.cutAfter.delete(key);
      res.writeHead(status, headers);
      const part = body.subarray(0, cut);
      count(part.length);
      // Let the client read what was sent, then drop the connection mid-body.
      res.write(part, () => setTimeout(() => res.socket?.destroy(), 50));
      return;
    }
    res.writeHead(status, headers);
    count(body.length);
    res.end(body);
  }
}
