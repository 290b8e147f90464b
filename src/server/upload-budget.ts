/**
 * One budget for the upload bytes all requests hold at once. Each edit request may carry up to
 * (images + mask) x the per-file limit, and holds those bytes until its job is done; without a
 * shared cap, many concurrent uploads could exhaust memory. Each file is counted as soon as it is
 * read (so a request overshoots by at most the file being read, one per-file limit); a request
 * whose files would go past the budget is refused (503, retry later) before anything is queued.
 */
import { ApiError } from './errors.js';

export class UploadBudget {
  private held = 0;

  constructor(readonly maxBytes: number) {}

  /** A holder for one request: take() as bytes arrive, release() once when the request is done. */
  holder(): UploadHold {
    let mine = 0;
    return {
      take: (bytes: number) => {
        if (this.held + bytes > this.maxBytes) {
          throw new ApiError(
            503,
            `The server is holding its limit of ${this.maxBytes} bytes of uploads for other requests; retry shortly.`,
            null,
            'uploads_busy',
            { headers: { 'retry-after': '2', 'x-should-retry': 'true' } },
          );
        }
        this.held += bytes;
        mine += bytes;
      },
      release: () => {
        this.held -= mine;
        mine = 0;
      },
    };
  }
}

export interface UploadHold {
  take(bytes: number): void;
  release(): void;
}
