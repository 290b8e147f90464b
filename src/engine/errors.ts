/**
 * Errors the engine raises on purpose. Each carries what a caller (CLI, HTTP API) needs to
 * answer clearly: a message meant for people, and the option it is about.
 */

/** A request option the engine cannot honour (unknown scheduler, quality, size, ...). */
export class InvalidOptionError extends Error {
  override name = 'InvalidOptionError';
  constructor(
    message: string,
    /** The option's name as the caller spelled it (`scheduler`, `quality`, `size`, ...). */
    readonly param: string,
  ) {
    super(message);
  }
}

/** A model folder that cannot be used: a missing file, or a file whose inputs/outputs do not fit. */
export class ModelLoadError extends Error {
  override name = 'ModelLoadError';
  constructor(
    message: string,
    readonly path?: string,
  ) {
    super(message);
  }
}

/** The requested model is not installed (or the name is unknown). */
export class ModelNotFoundError extends Error {
  override name = 'ModelNotFoundError';
  constructor(
    message: string,
    readonly model: string,
  ) {
    super(message);
  }
}

/** The execution provider asked for (e.g. CUDA) is not available on this host. */
export class DeviceUnavailableError extends Error {
  override name = 'DeviceUnavailableError';
}

/** Generation was cancelled through its AbortSignal (checked between steps). */
export class GenerationCancelledError extends Error {
  override name = 'AbortError';
  constructor(reason?: unknown) {
    super(reason instanceof Error ? reason.message : 'generation was cancelled');
  }
}

/** The model produced non-finite values (typically an fp16 SDXL VAE without the fp16 fix). */
export class NumericalError extends Error {
  override name = 'NumericalError';
}
