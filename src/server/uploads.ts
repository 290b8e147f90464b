/**
 * Checks on uploaded images (PNG, JPEG or WebP), run before any work is queued: the format's
 * signature, the declared dimensions against a pixel budget (a small file can declare a huge
 * image: a decompression bomb), and a full decode. For PNGs also every chunk's CRC up to IEND.
 */
import { crc32 } from 'node:zlib';
import sharp from 'sharp';
import { ApiError } from './errors.js';

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

// libvips' operation cache (by default up to 50 MB and 100 operations, for the whole process)
// only pays off when the same image is processed again; uploads, masks and generated images
// never are, so it would only keep decoded pixels of hostile uploads alive.
sharp.cache(false);

export interface UploadLimits {
  /** Largest file in bytes. */
  maxBytes: number;
  /** Largest width x height. */
  maxPixels: number;
}

export type UploadFormat = 'png' | 'jpeg' | 'webp';

/** The format from the file's first bytes (never from its name or declared type). */
export function sniffImageFormat(bytes: Buffer): UploadFormat | undefined {
  if (bytes.length >= 8 && bytes.subarray(0, 8).equals(PNG_SIGNATURE)) return 'png';
  if (bytes.length >= 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff) return 'jpeg';
  if (bytes.length >= 12 && bytes.toString('latin1', 0, 4) === 'RIFF' && bytes.toString('latin1', 8, 12) === 'WEBP') return 'webp';
  return undefined;
}

export interface CheckedUpload {
  format: UploadFormat;
  /** As Kiln uses it: upright, after the EXIF orientation. */
  width: number;
  height: number;
}

/**
 * Throws ApiError (413, 415 or 400, naming `param`) unless `bytes` is a decodable PNG, JPEG or
 * WebP within the limits; returns its format and upright size.
 */
export async function checkImageUpload(bytes: Buffer, param: string, limits: UploadLimits): Promise<CheckedUpload> {
  if (bytes.length > limits.maxBytes) {
    throw new ApiError(413, `'${param}' is larger than ${limits.maxBytes} bytes.`, param, 'file_too_large');
  }
  const format = sniffImageFormat(bytes);
  if (!format) throw new ApiError(415, `'${param}' must be a PNG, JPEG or WebP file.`, param, 'invalid_image_format');
  const label = format === 'png' ? 'PNG' : format === 'jpeg' ? 'JPEG' : 'WebP';

  const tooLarge = (width: number, height: number) =>
    new ApiError(400, `'${param}' is ${width}x${height} pixels; at most ${limits.maxPixels} pixels are accepted.`, param, 'image_too_large');
  if (format === 'png') {
    // The declared size first, from the bytes themselves: libvips is not handed a bomb at all.
    const { width, height } = pngHeader(bytes, param);
    if (width * height > limits.maxPixels) throw tooLarge(width, height);
    checkChunks(bytes, param);
  }
  // The header only (no pixel is decoded): dimensions, and the size once the EXIF orientation is applied.
  let meta: sharp.Metadata;
  try {
    meta = await sharp(bytes, { limitInputPixels: false }).metadata();
  } catch (err) {
    throw new ApiError(400, `'${param}' is not a valid ${label}: ${firstLine(err)}.`, param, 'invalid_image');
  }
  const width = meta.width ?? 0;
  const height = meta.height ?? 0;
  if (width === 0 || height === 0) throw new ApiError(400, `'${param}' is not a valid ${label}: it declares a ${width}x${height} image.`, param, 'invalid_image');
  if (width * height > limits.maxPixels) throw tooLarge(width, height);
  const upright = meta.autoOrient ?? { width, height };
  try {
    // Decodes every row (streamed and shrunk, so memory stays small) and fails on damage: any
    // libpng warning for PNGs (whose CRCs were checked too); for JPEG/WebP a truncated file or
    // a decode error (libjpeg reports harmless oddities of camera files as warnings: those pass).
    await sharp(bytes, { limitInputPixels: limits.maxPixels, sequentialRead: true, failOn: format === 'png' ? 'warning' : 'error' })
      .rotate()
      .resize(16, 16, { fit: 'fill' })
      .raw()
      .toBuffer();
  } catch (err) {
    throw new ApiError(400, `'${param}' could not be decoded as a ${label} (${firstLine(err)}).`, param, 'invalid_image');
  }
  return { format, ...upright };
}

function firstLine(err: unknown): string {
  return (err instanceof Error ? err.message.split('\n')[0] : String(err)) ?? '';
}

/** The first chunk must be IHDR: length 13, then width and height (big-endian uint32). */
function pngHeader(bytes: Buffer, param: string): { width: number; height: number } {
  if (bytes.length < 33 || bytes.readUInt32BE(8) !== 13 || bytes.toString('latin1', 12, 16) !== 'IHDR') {
    throw new ApiError(400, `'${param}' is not a valid PNG: its header is missing or malformed.`, param, 'invalid_image');
  }
  const width = bytes.readUInt32BE(16);
  const height = bytes.readUInt32BE(20);
  if (width === 0 || height === 0) {
    throw new ApiError(400, `'${param}' is not a valid PNG: it declares a ${width}x${height} image.`, param, 'invalid_image');
  }
  return { width, height };
}

/**
 * Walks the chunk list: every chunk within the file and with a correct CRC, ending at IEND.
 * (Decoders forgive a missing IEND or a bad CRC in places; an upload that needs forgiving is corrupt.)
 */
function checkChunks(bytes: Buffer, param: string): void {
  const corrupt = (why: string) => new ApiError(400, `'${param}' is not a valid PNG: ${why}.`, param, 'invalid_image');
  let offset = 8;
  for (;;) {
    if (offset + 12 > bytes.length) throw corrupt('it ends before its IEND chunk');
    const length = bytes.readUInt32BE(offset);
    const end = offset + 12 + length;
    if (length > 0x7fffffff || end > bytes.length) throw corrupt('a chunk runs past the end of the file');
    const type = bytes.toString('latin1', offset + 4, offset + 8);
    if (!/^[A-Za-z]{4}$/.test(type)) throw corrupt('a chunk has an invalid type');
    const crc = crc32(bytes.subarray(offset + 4, offset + 8 + length)) >>> 0;
    if (crc !== bytes.readUInt32BE(offset + 8 + length)) throw corrupt(`the ${type} chunk's checksum is wrong`);
    offset = end;
    if (type === 'IEND') return;
  }
}
