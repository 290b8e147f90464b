/**
 * The periodic sweep every store runs: once now, then every `intervalMs` (unref'd, so it never
 * keeps the process alive); a failed sweep is reported and the next one tries again.
 */
export function startSweeper(sweep: () => Promise<unknown>, intervalMs: number, onError?: (err: unknown) => void): NodeJS.Timeout {
  const run = () => {
    sweep().catch((err) => onError?.(err));
  };
  run();
  const timer = setInterval(run, intervalMs);
  timer.unref();
  return timer;
}
