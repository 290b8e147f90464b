/**
 * Limits on how slowly a request may arrive. A real client sends its headers at once and its body
 * as fast as its link allows; a slowloris client dribbles them, holding a connection (and what it
 * sent, up to a whole upload) for as long as the server lets it. Three limits:
 *
 *   headers   the header block must be complete within `headersTimeoutMs` of the request's first
 *             byte (Node's headersTimeout);
 *   deadline  the whole request, body included, within `bodyTimeoutMs` (Node's requestTimeout);
 *   rate      while a body is arriving, the last `bodyRateWindowMs` must always have brought at
 *             least `minBodyRate` bytes per second of it, so that a body that stalls or is
 *             dribbled a byte a second (which no idle timeout ever sees) is cut one window after
 *             it slowed down, instead of at the deadline.
 *
 * Past any of them the client gets a 408 in the error envelope and the connection is closed.
 */
import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';

export interface SlowClientLimits {
  headersTimeoutMs: number;
  bodyTimeoutMs: number;
  /** Bytes per second; 0 turns the rate check off. */
  minBodyRate: number;
  bodyRateWindowMs: number;
}

export const DEFAULT_SLOW_CLIENT_LIMITS: SlowClientLimits = {
  headersTimeoutMs: 10_000,
  bodyTimeoutMs: 120_000,
  minBodyRate: 1024,
  bodyRateWindowMs: 10_000,
};

/**
 * How often Node checks its header and request deadlines (its default, 30 s, would let a
 * 10 s limit run to 40 s): a tenth of the shorter one, between 50 ms and 1 s.
 */
export function connectionsCheckingInterval(limits: SlowClientLimits): number {
  return Math.max(50, Math.min(1000, Math.min(limits.headersTimeoutMs, limits.bodyTimeoutMs) / 10));
}

interface Tracked {
  socket: Socket;
  /** The socket's received byte count at each check, oldest first, back to one window ago. */
  samples: { at: number; bytes: number }[];
}

/**
 * The rate check: requests are tracked from their headers until their body has arrived (or
 * their connection closed); a timer samples each connection's received byte count four times a
 * window and compares it with the sample one window back. Reading the socket's counter leaves
 * the body's stream alone (a 'data' listener would take bytes from the parsers).
 */
export class BodyRateGuard {
  private readonly tracked = new Map<IncomingMessage, Tracked>();
  private readonly timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly limits: Pick<SlowClientLimits, 'minBodyRate' | 'bodyRateWindowMs'>,
    private readonly onTooSlow: (request: IncomingMessage, socket: Socket) => void,
  ) {
    if (limits.minBodyRate > 0) {
      this.timer = setInterval(() => this.check(performance.now()), Math.max(20, Math.min(1000, limits.bodyRateWindowMs / 4)));
      this.timer.unref();
    }
  }

  /** Watches `request` until its body is complete. */
  track(request: IncomingMessage): void {
    if (!this.timer || request.complete) return;
    const socket = request.socket;
    this.tracked.set(request, { socket, samples: [{ at: performance.now(), bytes: socket.bytesRead }] });
    // Both listeners go once either fires: a kept-alive socket serves many requests, and must not
    // collect one 'close' listener per request it ever carried.
    const untrack = () => {
      this.tracked.delete(request);
      request.off('end', untrack);
      socket.off('close', untrack);
    };
    request.once('end', untrack);
    socket.once('close', untrack);
  }

  private check(now: number): void {
    const { minBodyRate, bodyRateWindowMs } = this.limits;
    for (const [request, t] of this.tracked) {
      if (request.complete || t.socket.destroyed) {
        this.tracked.delete(request);
        continue;
      }
      const bytes = t.socket.bytesRead;
      t.samples.push({ at: now, bytes });
      // The newest sample at least a window old is the reference; older ones are not needed.
      let ref = -1;
      for (let i = 0; i < t.samples.length && now - t.samples[i]!.at >= bodyRateWindowMs; i++) ref = i;
      if (ref < 0) continue;
      const base = t.samples[ref]!;
      t.samples.splice(0, ref);
      if (bytes - base.bytes < (minBodyRate * (now - base.at)) / 1000) {
        this.tracked.delete(request);
        this.onTooSlow(request, t.socket);
      }
    }
  }

  close(): void {
    clearInterval(this.timer);
    this.tracked.clear();
  }
}
