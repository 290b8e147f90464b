/**
 * A small Redis client (RESP2 over one TCP connection) shaped as BullMQ's IRedisClient, which
 * BullMQ 6 accepts in place of ioredis (`RedisConnection.clientFactory`). Why: BullMQ's drivers
 * (ioredis, node-redis) are optional peer dependencies that are not installed here; this keeps
 * the dependency list as it is. It implements exactly what IRedisClient declares: commands are
 * pipelined in order on one socket, replies come back in order; bulk strings decode to UTF-8
 * strings unless a call asks for Buffers; MULTI/EXEC answers ioredis' [err, value] pairs.
 * Replacing it by ioredis is one line (`connection: new IORedis(url)`).
 *
 * Connection loss: every command in flight fails with "Connection is closed." (what BullMQ
 * treats as a connection error), the client reconnects with backoff, and new commands wait for
 * the connection (`offlineQueue`, as BullMQ's blocking clients want) or fail at once (the API's
 * producer, so that a request gets its 503 instead of hanging).
 */
import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { Socket, createConnection } from 'node:net';
import { Readable } from 'node:stream';

export interface RespClientOptions {
  host?: string;
  port?: number;
  db?: number;
  username?: string;
  password?: string;
  connectionName?: string;
  /** Commands issued while disconnected wait for the connection (default true) or fail at once. */
  offlineQueue?: boolean;
  /** Milliseconds before reconnect attempt `n` (default: 100 ms doubling, at most 2 s). */
  retryDelay?: (attempt: number) => number;
  [key: string]: unknown;
}

type Reply = string | number | Buffer | null | Error | Reply[];
type Arg = string | number | Buffer;

interface Pending {
  resolve: (value: Reply) => void;
  reject: (err: Error) => void;
  buffers: boolean;
}

const CLOSED = 'Connection is closed.';

export class ReplyError extends Error {
  override name = 'ReplyError';
}

/** Parses one RESP2 value at `offset`; undefined when the buffer ends first. */
function parse(buf: Buffer, offset: number, buffers: boolean): { value: Reply; next: number } | undefined {
  if (offset >= buf.length) return undefined;
  const eol = buf.indexOf('\r\n', offset);
  if (eol < 0) return undefined;
  const type = buf[offset];
  const line = buf.toString('utf8', offset + 1, eol);
  switch (type) {
    case 0x2b: // +
      return { value: line, next: eol + 2 };
    case 0x2d: // -
      return { value: new ReplyError(line), next: eol + 2 };
    case 0x3a: // :
      return { value: Number(line), next: eol + 2 };
    case 0x24: {
      // $
      const len = Number(line);
      if (len < 0) return { value: null, next: eol + 2 };
      const start = eol + 2;
      if (buf.length < start + len + 2) return undefined;
      const raw = buf.subarray(start, start + len);
      return { value: buffers ? Buffer.from(raw) : raw.toString('utf8'), next: start + len + 2 };
    }
    case 0x2a: {
      // *
      const n = Number(line);
      if (n < 0) return { value: null, next: eol + 2 };
      const items: Reply[] = [];
      let at = eol + 2;
      for (let i = 0; i < n; i++) {
        const item = parse(buf, at, buffers);
        if (!item) return undefined;
        items.push(item.value);
        at = item.next;
      }
      return { value: items, next: at };
    }
    default:
      throw new Error(`Redis protocol error: unexpected byte ${type}`);
  }
}

function encode(args: readonly Arg[]): Buffer {
  const parts: Buffer[] = [Buffer.from(`*${args.length}\r\n`)];
  for (const a of args) {
    const b = Buffer.isBuffer(a) ? a : Buffer.from(String(a));
    parts.push(Buffer.from(`$${b.length}\r\n`), b, Buffer.from('\r\n'));
  }
  return Buffer.concat(parts);
}

const scriptArg = (a: unknown): Arg => (Buffer.isBuffer(a) ? a : a === undefined || a === null ? '' : typeof a === 'number' ? a : String(a));
const flat = (args: unknown[]): unknown[] => (args.length === 1 && Array.isArray(args[0]) ? (args[0] as unknown[]) : args);

interface Script {
  sha: string;
  lua: string;
  numberOfKeys: number;
}

/** MULTI ... EXEC, queued client-side and sent at once. */
class Transaction {
  private readonly commands: { args: Arg[]; map?: (r: Reply) => unknown }[] = [];
  constructor(private readonly client: RespClient) {}
  private add(args: Arg[], map?: (r: Reply) => unknown): this {
    this.commands.push({ args, map });
    return this;
  }
  hgetall(key: string) {
    return this.add(['HGETALL', key], pairsToObject);
  }
  hset(key: string, data: Record<string, string | number>) {
    return this.add(['HSET', key, ...Object.entries(data).flat()]);
  }
  hscan(key: string, cursor: string | number, options?: { COUNT?: number }) {
    return this.add(['HSCAN', key, cursor, ...(options?.COUNT != null ? ['COUNT', options.COUNT] : [])]);
  }
  smembers(key: string) {
    return this.add(['SMEMBERS', key]);
  }
  sscan(key: string, cursor: string | number, options?: { COUNT?: number }) {
    return this.add(['SSCAN', key, cursor, ...(options?.COUNT != null ? ['COUNT', options.COUNT] : [])]);
  }
  zrange(key: string, start: number, end: number) {
    return this.add(['ZRANGE', key, start, end]);
  }
  lrange(key: string, start: number, end: number) {
    return this.add(['LRANGE', key, start, end]);
  }
  llen(key: string) {
    return this.add(['LLEN', key]);
  }
  del(...keys: string[]) {
    return this.add(['DEL', ...keys]);
  }
  runCommand(name: string, args: unknown[]) {
    const script = this.client.scripts.get(name);
    if (!script) throw new Error(`BullMQ: unknown command "${name}"`);
    const all = flat(args);
    // EVAL, not EVALSHA: a NOSCRIPT inside EXEC could not be retried.
    return this.add(['EVAL', script.lua, script.numberOfKeys, ...all.map(scriptArg)]);
  }
  async exec(): Promise<[Error | null, unknown][] | null> {
    if (this.commands.length === 0) return [];
    const sent = [['MULTI'] as Arg[], ...this.commands.map((c) => c.args), ['EXEC'] as Arg[]];
    const replies = await Promise.allSettled(sent.map((args) => this.client.call(args)));
    const exec = replies.at(-1)!;
    if (exec.status === 'rejected') throw exec.reason;
    const results = exec.value as Reply[] | null;
    if (results === null) return null;
    return results.map((r, i) => (r instanceof Error ? [r, null] : [null, this.commands[i]!.map ? this.commands[i]!.map!(r) : r]));
  }
}

function pairsToObject(reply: Reply): Record<string, string> {
  const out: Record<string, string> = {};
  const items = (reply as Reply[] | null) ?? [];
  for (let i = 0; i + 1 < items.length; i += 2) out[String(items[i])] = String(items[i + 1]);
  return out;
}

export class RespClient extends EventEmitter {
  status = 'wait';
  readonly isCluster = false;
  options: RespClientOptions & { maxRetriesPerRequest: null };
  /** Lua scripts by command name (defineCommand). */
  scripts = new Map<string, Script>();
  private socket: Socket | undefined;
  private buffer: Buffer = Buffer.alloc(0);
  private pending: Pending[] = [];
  private offline: { args: Arg[]; buffers: boolean; resolve: (v: Reply) => void; reject: (e: Error) => void }[] = [];
  private attempt = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private ended = false;
  private connecting: Promise<void> | undefined;

  constructor(options: RespClientOptions = {}) {
    super();
    this.options = { host: '127.0.0.1', port: 6379, ...options, maxRetriesPerRequest: null };
    // Like ioredis: connect at once; errors are reported through 'error'.
    void this.connect().catch(() => {});
  }

  connect(): Promise<void> {
    if (this.status === 'ready') return Promise.resolve();
    this.ended = false;
    this.connecting ??= new Promise<void>((resolve, reject) => {
      this.status = 'connecting';
      const socket = createConnection({ host: this.options.host ?? '127.0.0.1', port: this.options.port ?? 6379 });
      socket.setNoDelay(true);
      this.socket = socket;
      this.buffer = Buffer.alloc(0);
      let opened = false;
      socket.on('data', (chunk: Buffer) => this.onData(chunk));
      socket.once('connect', () => {
        opened = true;
        this.status = 'connect';
        this.emit('connect');
        this.handshake().then(
          () => {
            this.attempt = 0;
            this.status = 'ready';
            this.connecting = undefined;
            this.emit('ready');
            this.flushOffline();
            resolve();
          },
          (err: Error) => {
            this.connecting = undefined;
            reject(err);
            socket.destroy(err);
          },
        );
      });
      socket.on('error', (err) => {
        if (!this.ended) this.emit('error', err);
        if (!opened) {
          this.connecting = undefined;
          reject(err);
        }
      });
      socket.once('close', () => this.onClose(socket));
    });
    return this.connecting;
  }

  private async handshake(): Promise<void> {
    const o = this.options;
    if (o.password) await this.send(o.username ? ['AUTH', o.username, o.password] : ['AUTH', o.password], false, true);
    if (o.db) await this.send(['SELECT', o.db], false, true);
    if (o.connectionName) await this.send(['CLIENT', 'SETNAME', o.connectionName], false, true);
  }

  private onData(chunk: Buffer): void {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, chunk]) : chunk;
    let offset = 0;
    for (;;) {
      const head = this.pending[0];
      let parsed;
      try {
        parsed = parse(this.buffer, offset, head?.buffers ?? false);
      } catch (err) {
        this.socket?.destroy(err as Error);
        return;
      }
      if (!parsed) break;
      offset = parsed.next;
      const p = this.pending.shift();
      if (!p) continue;
      if (parsed.value instanceof Error) p.reject(parsed.value);
      else p.resolve(parsed.value);
    }
    this.buffer = offset >= this.buffer.length ? Buffer.alloc(0) : this.buffer.subarray(offset);
  }

  private onClose(socket: Socket): void {
    if (this.socket !== socket) return;
    this.socket = undefined;
    this.connecting = undefined;
    const failed = this.pending;
    this.pending = [];
    for (const p of failed) p.reject(new Error(CLOSED));
    this.emit('close');
    if (this.ended) {
      this.status = 'end';
      this.failOffline();
      this.emit('end');
      return;
    }
    this.status = 'reconnecting';
    if (this.options.offlineQueue === false) this.failOffline();
    const delay = this.options.retryDelay?.(++this.attempt) ?? Math.min(2000, 100 * 2 ** Math.min(5, this.attempt++));
    this.emit('reconnecting', delay);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      if (!this.ended) void this.connect().catch(() => {});
    }, delay);
  }

  private failOffline(): void {
    const waiting = this.offline;
    this.offline = [];
    for (const w of waiting) w.reject(new Error(CLOSED));
  }

  private flushOffline(): void {
    const waiting = this.offline;
    this.offline = [];
    for (const w of waiting) this.send(w.args, w.buffers).then(w.resolve, w.reject);
  }

  /** Writes a command now (handshake commands go before 'ready'). */
  private send(args: readonly Arg[], buffers: boolean, handshake = false): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      const socket = this.socket;
      if (!socket || (!handshake && this.status !== 'ready')) {
        reject(new Error(CLOSED));
        return;
      }
      this.pending.push({ resolve, reject, buffers });
      socket.write(encode(args));
    });
  }

  /** Any command; replies as RESP gives them (bulk strings as text, or as Buffers with `buffers`). */
  call(args: readonly Arg[], options: { buffers?: boolean } = {}): Promise<Reply> {
    const buffers = options.buffers ?? false;
    if (this.status === 'ready') return this.send(args, buffers);
    if (this.ended || this.options.offlineQueue === false) return Promise.reject(new Error(CLOSED));
    return new Promise<Reply>((resolve, reject) => this.offline.push({ args: [...args], buffers, resolve, reject }));
  }

  disconnect(reconnect = false): void {
    if (!reconnect) {
      this.ended = true;
      clearTimeout(this.retryTimer);
    }
    if (this.socket) this.socket.destroy();
    else if (!reconnect) {
      this.status = 'end';
      this.failOffline();
      setImmediate(() => this.emit('end'));
    }
  }

  async quit(): Promise<string> {
    this.ended = true;
    clearTimeout(this.retryTimer);
    if (this.socket && this.status === 'ready') {
      const socket = this.socket;
      await this.send(['QUIT'], false).catch(() => {});
      socket.destroy();
    } else this.disconnect(false);
    return 'OK';
  }

  duplicate(overrides: Partial<RespClientOptions> = {}): RespClient {
    const { maxRetriesPerRequest: _ignored, ...own } = this.options;
    const copy = new RespClient({ ...own, ...overrides });
    for (const [name, script] of this.scripts) copy.defineCommand(name, { lua: script.lua, numberOfKeys: script.numberOfKeys });
    return copy;
  }

  defineCommand(name: string, definition: { numberOfKeys: number; lua: string }): void {
    const sha = createHash('sha1').update(definition.lua).digest('hex');
    this.scripts.set(name, { sha, lua: definition.lua, numberOfKeys: definition.numberOfKeys });
    (this as unknown as Record<string, unknown>)[name] = (...args: unknown[]) => this.runCommand(name, args);
  }

  async runCommand(name: string, args: unknown[]): Promise<unknown> {
    const script = this.scripts.get(name);
    if (!script) throw new Error(`BullMQ: unknown command "${name}"`);
    const rest = flat(args).map(scriptArg);
    try {
      return await this.call(['EVALSHA', script.sha, script.numberOfKeys, ...rest]);
    } catch (err) {
      if (!(err instanceof ReplyError) || !err.message.startsWith('NOSCRIPT')) throw err;
      return this.call(['EVAL', script.lua, script.numberOfKeys, ...rest]);
    }
  }

  multi(): Transaction {
    return new Transaction(this);
  }

  pipeline(): Transaction {
    return new Transaction(this);
  }

  // ---- the commands IRedisClient declares -------------------------------------------------

  async hgetall(key: string) {
    return pairsToObject(await this.call(['HGETALL', key]));
  }
  hget(key: string, field: string) {
    return this.call(['HGET', key, field]) as Promise<string | null>;
  }
  hmget(key: string, ...fields: string[]) {
    return this.call(['HMGET', key, ...fields]) as Promise<(string | null)[]>;
  }
  hset(key: string, data: Record<string, string | number>) {
    return this.call(['HSET', key, ...Object.entries(data).flat()]) as Promise<number>;
  }
  hdel(key: string, ...fields: string[]) {
    return this.call(['HDEL', key, ...fields]) as Promise<number>;
  }
  hexists(key: string, field: string) {
    return this.call(['HEXISTS', key, field]) as Promise<number>;
  }
  get(key: string) {
    return this.call(['GET', key]) as Promise<string | null>;
  }
  set(key: string, value: string | number | Buffer, options?: { PX?: number; EX?: number; NX?: boolean }) {
    const extra: Arg[] = options?.PX != null ? ['PX', options.PX] : options?.EX != null ? ['EX', options.EX] : [];
    if (options?.NX) extra.push('NX');
    return this.call(['SET', key, value, ...extra]) as Promise<string | null>;
  }
  del(...keys: string[]) {
    return this.call(['DEL', ...keys]) as Promise<number>;
  }
  zrange(key: string, start: number, end: number, options?: { WITHSCORES?: boolean }) {
    return this.call(['ZRANGE', key, start, end, ...(options?.WITHSCORES ? ['WITHSCORES'] : [])]) as Promise<string[]>;
  }
  zrevrange(key: string, start: number, end: number, options?: { WITHSCORES?: boolean }) {
    return this.call(['ZREVRANGE', key, start, end, ...(options?.WITHSCORES ? ['WITHSCORES'] : [])]) as Promise<string[]>;
  }
  zcard(key: string) {
    return this.call(['ZCARD', key]) as Promise<number>;
  }
  zscore(key: string, member: string) {
    return this.call(['ZSCORE', key, member]) as Promise<string | null>;
  }
  lrange(key: string, start: number, end: number) {
    return this.call(['LRANGE', key, start, end]) as Promise<string[]>;
  }
  llen(key: string) {
    return this.call(['LLEN', key]) as Promise<number>;
  }
  ltrim(key: string, start: number, end: number) {
    return this.call(['LTRIM', key, start, end]) as Promise<string>;
  }
  lpos(key: string, value: string) {
    return this.call(['LPOS', key, value]) as Promise<number | null>;
  }
  smembers(key: string) {
    return this.call(['SMEMBERS', key]) as Promise<string[]>;
  }
  xadd(key: string, id: string, fields: Record<string, string | number>, options?: { MAXLEN?: number; approximate?: boolean }) {
    const trim: Arg[] = options?.MAXLEN != null ? ['MAXLEN', ...(options.approximate !== false ? ['~'] : []), options.MAXLEN] : [];
    return this.call(['XADD', key, ...trim, id, ...Object.entries(fields).flat()]) as Promise<string>;
  }
  xread(streams: { key: string; id: string }[], options?: { BLOCK?: number; COUNT?: number }) {
    const args: Arg[] = ['XREAD'];
    if (options?.BLOCK != null) args.push('BLOCK', options.BLOCK);
    if (options?.COUNT != null) args.push('COUNT', options.COUNT);
    args.push('STREAMS', ...streams.map((s) => s.key), ...streams.map((s) => s.id));
    return this.call(args);
  }
  xtrim(key: string, strategy: 'MAXLEN', threshold: number, options?: { approximate?: boolean }) {
    return this.call(['XTRIM', key, strategy, ...(options?.approximate !== false ? ['~'] : []), threshold]) as Promise<number>;
  }
  async bzpopmin(key: string, timeout: number): Promise<[string, string, string] | null> {
    return (await this.call(['BZPOPMIN', key, timeout])) as [string, string, string] | null;
  }
  info() {
    return this.call(['INFO']) as Promise<string>;
  }
  clientSetName(name: string) {
    return this.call(['CLIENT', 'SETNAME', name]);
  }
  clientList() {
    return this.call(['CLIENT', 'LIST']) as Promise<string>;
  }
  clientInfo() {
    return this.call(['CLIENT', 'INFO']) as Promise<string>;
  }
  async scan(cursor: string | number, options: { MATCH?: string; COUNT?: number }): Promise<[string, string[]]> {
    const args: Arg[] = ['SCAN', cursor];
    if (options.MATCH != null) args.push('MATCH', options.MATCH);
    if (options.COUNT != null) args.push('COUNT', options.COUNT);
    return (await this.call(args)) as [string, string[]];
  }
  scanStream(options: { match: string; count?: number }): Readable {
    let cursor = '0';
    let done = false;
    const stream: Readable = new Readable({
      objectMode: true,
      read: () => {
        if (done) return;
        this.scan(cursor, { MATCH: options.match, COUNT: options.count ?? 100 }).then(
          ([next, keys]) => {
            cursor = next;
            if (next === '0') done = true;
            stream.push(keys);
            if (done) stream.push(null);
          },
          (err: Error) => stream.destroy(err),
        );
      },
    });
    return stream;
  }
}
