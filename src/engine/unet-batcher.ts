/**
 * Step-level batching across requests (continuous batching): concurrent generations in one
 * thread hand their denoising steps' UNet (and ControlNet) calls to one UnetBatcher, which runs
 * the calls that fit together as one session.run and gives each caller its own rows back.
 *
 * A request joins with its first step and leaves after its last; the others go on. Calls fit
 * together when they go to the same session for the same outputs, their per-row feeds (those
 * whose leading dimension is the call's rows and which the graph declares with a batch
 * dimension, such as `sample`, `encoder_hidden_states`, a `[batch]` timestep) agree in every
 * other dimension, and their other feeds (a rank-0 or `[1]` timestep, `ip_scale`,
 * `conditioning_scale`) are equal value for value. So timesteps may differ per row where the
 * UNet takes a batch of them; otherwise only calls at the same timestep share a run.
 *
 * Gathering: calls wait for the end of the current turn of the event loop (setImmediate), no
 * longer. ONNX Runtime's run blocks the thread, so while a batch runs nothing else advances;
 * when it returns, every request in it takes its scheduler step and submits its next call in
 * the same turn, and requests whose first step became ready meanwhile join them. No timer
 * holds a ready batch back.
 *
 * Determinism (the API's same-seed-same-bytes promise): a row of a batched run must be the
 * bits of its call run alone. On CPU that holds (measured: bench/unet-batch.ts, and the
 * batching tests), but it is a property of the kernels an execution provider picks for a
 * shape, not a law, so it is checked: the first time calls of a given shape are batched into
 * a given number of rows, each is also run alone and compared bit for bit. Where they differ,
 * that shape is never batched again (its calls run one by one) and the callers get the
 * results of running alone. The check costs one extra unbatched round per new batch shape.
 */
import type { Feed, FloatTensor, OnnxModel, TensorInfo } from './onnx.js';
import { GenerationCancelledError } from './errors.js';

export interface UnetBatcherOptions {
  /** Most calls (requests) one run takes; 1 runs every call alone, as without a batcher. */
  maxBatch: number;
  /**
   * Check, the first time each batch shape runs, that every row equals its call run alone (and
   * never batch a shape where it does not). Default true; turning it off trusts the provider.
   */
  verify?: boolean;
  /**
   * Whether VAE decodes of generations that finish together share a run (vae.ts). Default true.
   * Kiln's threads batch them only on CUDA: on CPU a batched decode costs as much per picture or
   * more (kiln-tiny, 32x32 latents: 21.6 ms alone, 21.1 / 23.9 / 28.1 ms each in batches of
   * 2 / 4 / 8; 64x64: 104 ms alone, 111-114 in batches of 4-8), its activations outgrow the caches.
   */
  batchDecodes?: boolean;
}

export interface BatchRunOptions {
  /** Rows of this call along the batch dimension (2 with classifier-free guidance). */
  rows: number;
  /** A call whose request was cancelled before its batch ran is dropped (rejected) instead. */
  signal?: AbortSignal;
  /** Most rows a run that carries this call may have (a bound on its memory); default: no bound. */
  maxRows?: number;
}

export interface BatcherStats {
  /** session.run calls made (batched runs, lone runs and check runs alike). */
  runs: number;
  /** Calls submitted. */
  calls: number;
  /** Runs that carried more than one call. */
  batchedRuns: number;
  /** Most calls one run carried. */
  largestBatch: number;
  /** Batch shapes checked against running alone, and those found inexact (never batched again). */
  checks: number;
  inexact: number;
}

interface Call {
  session: OnnxModel;
  feeds: Record<string, Feed>;
  outputNames: string[];
  rows: number;
  signal: AbortSignal | undefined;
  maxRows: number;
  /** Compatibility key (session, outputs, feed names, kinds and shapes); undefined: runs alone. */
  key: string | undefined;
  /** Names of the feeds that are not per-row (compared by value). */
  shared: string[];
  resolve: (out: Record<string, FloatTensor>) => void;
  reject: (err: unknown) => void;
}

type Outputs = Record<string, FloatTensor>;

export class UnetBatcher {
  readonly maxBatch: number;
  readonly verify: boolean;
  readonly batchDecodes: boolean;
  readonly stats: BatcherStats = { runs: 0, calls: 0, batchedRuns: 0, largestBatch: 0, checks: 0, inexact: 0 };
  private pending: Call[] = [];
  private scheduled = false;
  private flushing = false;
  private readonly sessionIds = new WeakMap<OnnxModel, number>();
  private nextSessionId = 1;
  /** Per batch shape: whether its rows came out exactly as alone (absent: not checked yet). */
  private readonly exact = new Map<string, boolean>();

  constructor(options: UnetBatcherOptions) {
    if (!Number.isInteger(options.maxBatch) || options.maxBatch < 1) throw new RangeError('maxBatch must be an integer >= 1');
    this.maxBatch = options.maxBatch;
    this.verify = options.verify ?? true;
    this.batchDecodes = options.batchDecodes ?? true;
  }

  /** Runs `session` on `feeds` as part of a batch when others fit; resolves with this call's rows only. */
  run(session: OnnxModel, feeds: Record<string, Feed>, outputNames: string[], options: BatchRunOptions): Promise<Outputs> {
    this.stats.calls++;
    if (this.maxBatch === 1) return this.runAlone(session, feeds, outputNames);
    return new Promise<Outputs>((resolve, reject) => {
      const { key, shared } = this.describe(session, feeds, outputNames, options.rows);
      const maxRows = options.maxRows ?? Number.POSITIVE_INFINITY;
      this.pending.push({ session, feeds, outputNames, rows: options.rows, signal: options.signal, maxRows, key, shared, resolve, reject });
      this.schedule();
    });
  }

  /** Calls waiting for their batch to run. */
  get waiting(): number {
    return this.pending.length;
  }

  private schedule(): void {
    if (this.scheduled || this.flushing) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      void this.flush();
    });
  }

  private async flush(): Promise<void> {
    this.flushing = true;
    const calls = this.pending;
    this.pending = [];
    try {
      for (const group of this.groups(calls)) {
        // runGroup settles every call itself; this only guards against a fault in it leaving callers waiting.
        await this.runGroup(group).catch((err: unknown) => group.forEach((c) => c.reject(err)));
      }
    } finally {
      this.flushing = false;
      // The callers of the runs just made have submitted their next calls by now; they go in the
      // next turn, with every call that became ready meanwhile.
      if (this.pending.length) this.schedule();
    }
  }

  /** Calls in submission order, split into runs: same key, equal shared feeds, at most maxBatch each. */
  private groups(calls: Call[]): Call[][] {
    const groups: Call[][] = [];
    const open: Call[][] = [];
    for (const call of calls) {
      if (call.signal?.aborted) {
        call.reject(new GenerationCancelledError(call.signal.reason));
        continue;
      }
      const fits = call.key !== undefined && this.exact.get(this.shapeKey(call.key, 0)) !== false
        ? open.find((g) => g[0]!.key === call.key && g.length < this.maxBatch && fitsRows(g, call) && sameShared(g[0]!, call))
        : undefined;
      if (fits) {
        fits.push(call);
        continue;
      }
      const group = [call];
      groups.push(group);
      if (call.key !== undefined) open.push(group);
    }
    return groups;
  }

  private async runGroup(group: Call[]): Promise<void> {
    if (group.length === 1) {
      const [call] = group as [Call];
      await this.settleAlone(call);
      return;
    }
    const totalRows = group.reduce((n, c) => n + c.rows, 0);
    const shape = this.shapeKey(group[0]!.key!, totalRows, group);
    const known = this.exact.get(shape);
    if (known === false) {
      for (const call of group) await this.settleAlone(call);
      return;
    }
    let outputs: Outputs[];
    try {
      outputs = await this.runBatched(group, totalRows);
    } catch {
      // The batch as a whole failed (memory, a feed the graph refuses): each call alone, so that an
      // error reaches only the request it belongs to. If every call then succeeds, the batch itself
      // was the trouble (its size): that shape is not batched again.
      let allFine = true;
      for (const call of group) allFine = (await this.settleAlone(call)) && allFine;
      if (allFine) this.exact.set(shape, false);
      return;
    }
    if (known === undefined && this.verify) {
      this.stats.checks++;
      const alone: (Outputs | undefined)[] = [];
      for (const call of group) {
        try {
          alone.push(await this.runAlone(call.session, call.feeds, call.outputNames));
        } catch (err) {
          // It ran batched but fails alone: its rows cannot be vouched for, so the shape counts as inexact.
          alone.push(undefined);
          call.reject(err);
        }
      }
      const same = group.every((_, i) => alone[i] !== undefined && sameOutputs(alone[i]!, outputs[i]!));
      this.exact.set(shape, same);
      if (!same) {
        this.stats.inexact++;
        // Never batch this call shape again, at any batch size: the bits of running alone are the promise.
        this.exact.set(this.shapeKey(group[0]!.key!, 0), false);
      }
      group.forEach((call, i) => alone[i] && call.resolve(alone[i]));
      return;
    }
    group.forEach((call, i) => call.resolve(outputs[i]!));
  }

  private async runBatched(group: Call[], totalRows: number): Promise<Outputs[]> {
    const first = group[0]!;
    const feeds: Record<string, Feed> = {};
    const shared = new Set(first.shared);
    for (const [name, feed] of Object.entries(first.feeds)) {
      feeds[name] = shared.has(name) ? feed : stack(group.map((c) => c.feeds[name]!), totalRows);
    }
    const out = await this.runCounted(first.session, feeds, first.outputNames);
    this.stats.batchedRuns++;
    this.stats.largestBatch = Math.max(this.stats.largestBatch, group.length);
    for (const name of first.outputNames) {
      if (out[name]!.dims[0] !== totalRows) throw new Error(`output ${name} is not batched along its first dimension`);
    }
    let row = 0;
    return group.map((call) => {
      const mine: Outputs = {};
      for (const name of call.outputNames) {
        const { data, dims } = out[name]!;
        const rowSize = data.length / totalRows;
        mine[name] = { data: data.slice(row * rowSize, (row + call.rows) * rowSize), dims: [call.rows, ...dims.slice(1)] };
      }
      row += call.rows;
      return mine;
    });
  }

  /** Runs a call alone and settles it; whether it succeeded (a dropped cancelled call counts as fine). */
  private async settleAlone(call: Call): Promise<boolean> {
    if (call.signal?.aborted) {
      call.reject(new GenerationCancelledError(call.signal.reason));
      return true;
    }
    try {
      call.resolve(await this.runAlone(call.session, call.feeds, call.outputNames));
      return true;
    } catch (err) {
      call.reject(err);
      return false;
    }
  }

  private runAlone(session: OnnxModel, feeds: Record<string, Feed>, outputNames: string[]): Promise<Outputs> {
    this.stats.largestBatch = Math.max(this.stats.largestBatch, 1);
    return this.runCounted(session, feeds, outputNames);
  }

  private runCounted(session: OnnxModel, feeds: Record<string, Feed>, outputNames: string[]): Promise<Outputs> {
    this.stats.runs++;
    return session.run(feeds, outputNames);
  }

  /**
   * The call's compatibility key and its shared (not per-row) feeds. Per-row: a feed whose
   * leading dimension is `rows` and whose graph input declares that dimension symbolic (by any
   * name: exports name each input's batch dimension differently). A call none of whose feeds is per-row, or
   * whose feeds the graph does not know, runs alone.
   */
  private describe(session: OnnxModel, feeds: Record<string, Feed>, outputNames: string[], rows: number): { key: string | undefined; shared: string[] } {
    if (!Number.isInteger(rows) || rows < 1) return { key: undefined, shared: [] };
    const parts: string[] = [];
    const shared: string[] = [];
    let perRow = 0;
    for (const name of Object.keys(feeds).sort()) {
      const feed = feeds[name]!;
      const info = session.inputs.get(name);
      if (!info) return { key: undefined, shared: [] };
      const kind = 'data' in feed ? 'f' : 'i';
      if (isPerRow(info, feed, rows)) {
        perRow++;
        parts.push(`${name}:r:${kind}:${feed.dims.slice(1).join('x')}`);
      } else {
        shared.push(name);
        parts.push(`${name}:s:${kind}:${feed.dims.join('x')}`);
      }
    }
    if (!perRow) return { key: undefined, shared: [] };
    let id = this.sessionIds.get(session);
    if (id === undefined) {
      id = this.nextSessionId++;
      this.sessionIds.set(session, id);
    }
    return { key: `${id}|${outputNames.join(',')}|${parts.join(';')}`, shared };
  }

  /** A batch shape: the call key, the total rows and the rows of each call (kernels are picked by shape). */
  private shapeKey(key: string, totalRows: number, group?: Call[]): string {
    return `${key}#${totalRows}#${group ? [...new Set(group.map((c) => c.rows))].sort().join(',') : ''}`;
  }
}

function isPerRow(info: TensorInfo, feed: Feed, rows: number): boolean {
  if (feed.dims.length === 0 || feed.dims[0] !== rows) return false;
  const declared = info.shape[0];
  return declared !== undefined && !(typeof declared === 'number' && declared > 0);
}

/** Whether a run of `group` and `call` stays within every member's maxRows. */
function fitsRows(group: Call[], call: Call): boolean {
  const rows = group.reduce((n, c) => n + c.rows, call.rows);
  return group.every((c) => rows <= c.maxRows) && rows <= call.maxRows;
}

/** Whether two calls' shared feeds hold the same values (their names and shapes are in the key). */
function sameShared(a: Call, b: Call): boolean {
  for (const name of a.shared) {
    const x = a.feeds[name]!;
    const y = b.feeds[name]!;
    const xs = 'data' in x ? x.data : x.ints;
    const ys = 'data' in y ? y.data : y.ints;
    if (xs === ys) continue;
    if (xs.length !== ys.length) return false;
    for (let i = 0; i < xs.length; i++) if (!Object.is(xs[i], ys[i])) return false;
  }
  return true;
}

/** Feeds of several calls stacked along their first dimension. */
function stack(feeds: Feed[], totalRows: number): Feed {
  const dims = [totalRows, ...feeds[0]!.dims.slice(1)];
  if (feeds.every((f) => 'data' in f)) {
    const parts = feeds.map((f) => (f as { data: Float32Array }).data);
    const data = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      data.set(p, at);
      at += p.length;
    }
    return { data, dims };
  }
  const ints: number[] = [];
  for (const f of feeds) {
    const values = 'data' in f ? f.data : f.ints;
    for (let i = 0; i < values.length; i++) ints.push(values[i]!);
  }
  return { ints, dims };
}

/** Bit for bit (NaNs and signed zeros included). */
function sameOutputs(a: Outputs, b: Outputs): boolean {
  for (const name of Object.keys(a)) {
    const x = a[name]!.data;
    const y = b[name]?.data;
    if (!y || x.length !== y.length) return false;
    const xb = new Uint32Array(x.buffer, x.byteOffset, x.length);
    const yb = new Uint32Array(y.buffer, y.byteOffset, y.length);
    for (let i = 0; i < xb.length; i++) if (xb[i] !== yb[i]) return false;
  }
  return true;
}
