/**
 * A model's extra pieces (pose models, image-prompt adapters) are not installed: the request
 * cannot be honoured as asked (400, with what to install). Not an ApiError so that the catalog
 * stays below the server; the server maps it (toApiError), and the runner carries it across
 * threads and hosts by name (src/runner/protocol.ts).
 */
export class AssetUnavailableError extends Error {
  override name = 'AssetUnavailableError';
  readonly status = 400;
  constructor(
    message: string,
    readonly param: string,
    readonly code: string,
  ) {
    super(message);
  }
}
