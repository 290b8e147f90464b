/**
 * Signed image URLs: `/images/<key>?expires=<unix s>&signature=<HMAC-SHA256(key, expires)>`.
 * The secret lives in the home folder (created on first use, mode 0600), so URLs survive a
 * restart until they expire.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';

/** Reads the secret at `path`, creating it (32 random bytes, hex) when missing. */
export function loadOrCreateSecret(path: string): Buffer {
  try {
    const text = readFileSync(path, 'utf8').trim();
    if (/^[0-9a-f]{64,}$/.test(text)) return Buffer.from(text, 'hex');
    throw new Error(`${path} does not hold a hex secret of at least 32 bytes; delete it to have a new one made`);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  const secret = randomBytes(32);
  try {
    // 'wx': if another process made one meanwhile, keep theirs.
    writeFileSync(path, `${secret.toString('hex')}\n`, { flag: 'wx', mode: 0o600 });
    return secret;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return loadOrCreateSecret(path);
    throw err;
  }
}

export class UrlSigner {
  constructor(private readonly secret: Buffer) {}

  sign(key: string, expiresSec: number): string {
    return createHmac('sha256', this.secret).update(`${key}\n${expiresSec}`).digest('base64url');
  }

  /** Constant-time check of a signature taken from a URL. */
  verify(key: string, expires: string, signature: string): boolean {
    // Only the spelling sign() writes: `0123` or `+123` would be other URLs for the same signature.
    if (!/^(0|[1-9]\d{0,11})$/.test(expires) || !/^[A-Za-z0-9_-]{43}$/.test(signature)) return false;
    // Compare the text, not the decoded bytes: a 43-character base64url string carries 2 spare
    // bits in its last character, so decoded comparison would accept 4 spellings of one signature.
    const expected = Buffer.from(this.sign(key, Number(expires)), 'latin1');
    const given = Buffer.from(signature, 'latin1');
    return given.length === expected.length && timingSafeEqual(given, expected);
  }

  /** Path and query of the image's URL (append to the public base URL). */
  path(key: string, expiresAt: number): string {
    const expires = Math.floor(expiresAt / 1000);
    return `/images/${key}?expires=${expires}&signature=${this.sign(key, expires)}`;
  }
}
