/**
 * The store could not be reached (connection refused or reset, timeout, a 5xx or throttling
 * answer). The routes answer 503 so clients retry; nothing in the server is left broken, and
 * the next request tries the store again.
 */
export class StoreUnavailableError extends Error {
  override name = 'StoreUnavailableError';
  constructor(message = 'The image store is unavailable; try again shortly.', options?: { cause?: unknown }) {
    super(message, options);
  }
}
