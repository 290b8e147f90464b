/**
 * Budgets for the request bytes all requests hold in memory at once. An edit request may carry
 * up to (images + mask) x the per-file limit and holds those bytes until its job is done; a JSON
 * body is held while it arrives and is parsed. Without shared caps, many concurrent (or slow)
 * uploads could exhaust memory. Two caps:
 *
 *   held      every request byte in memory, from its arrival until the request is done;
 *   arriving  the bytes of bodies still arriving (a subset of the held ones): what clients that
 *             send most of an upload and then stall can pin, kept well below the first so that
 *             they cannot take all of it (the slow-client limits cut them within a window).
 *
 * Bytes are counted chunk by chunk as they arrive; a request that would go past either cap is
 * refused (503, retry later) before anything is queued.
 */
import { ApiError } from './errors.js';

export class UploadBudget {
  private held = 0;
  private arriving = 0;

  constructor(
    readonly maxBytes: number,
    readonly maxArrivingBytes: number = maxBytes,
  ) {}

  /**
   * A holder for one request: take() as bytes arrive, arrived() once its body is complete (its
   * bytes stay held), release() when the request is done (either may be called more than once).
   */
  holder(): UploadHold {
    let mine = 0;
    let mineArriving = 0;
    const busy = (message: string) =>
      new ApiError(503, message, null, 'uploads_busy', { headers: { 'retry-after': '2', 'x-should-retry': 'true' } });
    return {
      take: (bytes: number) => {
        if (this.held + bytes > this.maxBytes) {
          throw busy(`The server is holding its limit of ${this.maxBytes} bytes of uploads for other requests; retry shortly.`);
        }
        if (this.arriving + bytes > this.maxArrivingBytes) {
          throw busy(`The server is receiving its limit of ${this.maxArrivingBytes} bytes of request bodies from other clients; retry shortly.`);
        }
        this.held += bytes;
        this.arriving += bytes;
        mine += bytes;
        mineArriving += bytes;
      },
      arrived: () => {
        this.arriving -= mineArriving;
        mineArriving = 0;
      },
      release: () => {
        this.held -= mine;
        this.arriving -= mineArriving;
        mine = 0;
        mineArriving = 0;
      },
    };
  }

  /** Bytes held and arriving now (for tests and diagnostics). */
  usage(): { held: number; arriving: number } {
    return { held: this.held, arriving: this.arriving };
  }
}

export interface UploadHold {
  take(bytes: number): void;
  arrived(): void;
  release(): void;
}
