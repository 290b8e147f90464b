import { DeviceUnavailableError, InvalidOptionError, ModelLoadError, ModelNotFoundError, NumericalError } from '../engine/errors.js';

/** One line for people: known errors as their message, unknown ones with their class. */
export function formatCliError(err: unknown): string {
  if (
    err instanceof InvalidOptionError ||
    err instanceof ModelLoadError ||
    err instanceof ModelNotFoundError ||
    err instanceof DeviceUnavailableError ||
    err instanceof NumericalError
  ) {
    return err.message;
  }
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  return String(err);
}
