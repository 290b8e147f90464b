/**
 * Errors `kiln pull` raises on purpose. Each message is meant for people and says what to do.
 */

/** Why a pull failed, for callers that branch on it (CLI exit messages, tests). */
export type PullErrorCode =
  | 'offline' // HF_HUB_OFFLINE is set
  | 'unknown-alias' // a bare name that is no alias
  | 'bad-spec' // malformed repo id, revision or --name
  | 'auth' // 401/403: private or gated repository, or a refused token
  | 'not-found' // repository, revision or file missing on the Hub
  | 'network' // the Hub cannot be reached, or kept failing
  | 'layout' // the repository is not a usable ONNX layout
  | 'integrity' // size or sha256 mismatch
  | 'disk' // not enough free space
  | 'exists' // the target folder exists and was not pulled by kiln
  | 'busy' // another pull of the same name is running
  | 'aborted' // cancelled (Ctrl-C)
  | 'alias-file'; // the user's alias file is malformed

export class PullError extends Error {
  override name = 'PullError';
  constructor(
    message: string,
    readonly code: PullErrorCode,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}
